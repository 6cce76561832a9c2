package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgwire"
)

// One set of OIDs per session. The OIDs of user-defined objects (enums,
// composites, domains, ranges, extension types such as citext or hstore,
// and tables) differ between two stores that hold the same schema. A
// driver learns them once per connection (pgx's LoadType, JDBC's and
// npgsql's type caches) and then trusts them. So a routed session keeps
// the OIDs of its home store, the store it was started on: the
// RowDescription and ParameterDescription a session gets from the other
// store are translated by qualified name to the home store's OIDs, and
// the parameter types of a Parse sent to the other store are translated
// back. Reads of the catalogs themselves stay on the home store (see
// catalogRead). Built-in objects (OID below FirstNormalObjectId) are the
// same everywhere and pass unchanged.

// firstNormalOID is PostgreSQL's FirstNormalObjectId.
const firstNormalOID = 16384

type oidKey struct {
	database, from, to string
	kind               byte // 't' type, 'r' relation
	oid                uint32
}

// oidCache holds translated OIDs until DDL invalidates them.
type oidCache struct {
	mu sync.Mutex
	m  map[oidKey]uint32
}

func (c *oidCache) get(k oidKey) (uint32, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[k]
	return v, ok
}

func (c *oidCache) put(k oidKey, v uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[oidKey]uint32{}
	}
	if len(c.m) > 100000 {
		clear(c.m)
	}
	c.m[k] = v
}

func (c *oidCache) invalidate() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.m)
}

const (
	typeByOID  = `SELECT n.nspname, t.typname FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1`
	typeByName = `SELECT t.oid FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = $1 AND t.typname = $2`
	relByOID   = `SELECT n.nspname, c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1`
	relByName  = `SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2`
)

// translateOID returns the OID on store to of the object that has oid on
// store from, found by schema and name. It returns oid itself for built-in
// objects, for temporary objects (their schema differs per session) and
// when the object cannot be found on to, so a lookup failure never breaks
// the session; a table not found is reported as 0, as PostgreSQL reports
// a column that is not a table's.
func (rs *routedSession) translateOID(from, to *rstore, kind byte, oid uint32) uint32 {
	if oid < firstNormalOID || from == to {
		return oid
	}
	s := rs.srv
	k := oidKey{database: rs.ss.database, from: from.name, to: to.name, kind: kind, oid: oid}
	if v, ok := s.oids.get(k); ok {
		return v
	}
	ctx, cancel := context.WithTimeout(rs.ss.ctx, 5*time.Second)
	defer cancel()
	fc, err := s.catalogFor(ctx, from.st, rs.ss.database)
	if err != nil {
		return oid
	}
	tc, err := s.catalogFor(ctx, to.st, rs.ss.database)
	if err != nil {
		return oid
	}
	byOID, byName := typeByOID, typeByName
	if kind == 'r' {
		byOID, byName = relByOID, relByName
	}
	var schema, name string
	if err := fc.pool.QueryRow(ctx, byOID, oid).Scan(&schema, &name); err != nil {
		return oid
	}
	if strings.HasPrefix(schema, "pg_temp") || strings.HasPrefix(schema, "pg_toast_temp") {
		return oid
	}
	var out uint32
	switch err := tc.pool.QueryRow(ctx, byName, schema, name).Scan(&out); {
	case err == pgx.ErrNoRows && kind == 'r':
		out = 0
	case err != nil:
		rs.ss.log.Debug("no matching object on the other store; its OID passes unchanged", "schema", schema, "name", name, "store", to.name, "error", err)
		return oid
	}
	s.oids.put(k, out)
	// The way back is known too.
	s.oids.put(oidKey{database: k.database, from: to.name, to: from.name, kind: kind, oid: out}, oid)
	return out
}

// homeOIDs rewrites a RowDescription ('T') or ParameterDescription ('t')
// from store from into the home store's OIDs. body is not modified.
func (rs *routedSession) homeOIDs(from *rstore, typ byte, body []byte) []byte {
	if from == nil || from == rs.home || rs.home == nil {
		return body
	}
	out := body
	copied := false
	set := func(at int, v uint32) {
		if !copied {
			out = append([]byte(nil), body...)
			copied = true
		}
		binary.BigEndian.PutUint32(out[at:], v)
	}
	switch typ {
	case pgwire.ServerParameterDescription:
		if len(body) < 2 {
			return body
		}
		n := int(binary.BigEndian.Uint16(body))
		for i := 0; i < n && 2+4*i+4 <= len(body); i++ {
			at := 2 + 4*i
			if o := binary.BigEndian.Uint32(body[at:]); o >= firstNormalOID {
				if v := rs.translateOID(from, rs.home, 't', o); v != o {
					set(at, v)
				}
			}
		}
	case pgwire.ServerRowDescription:
		if len(body) < 2 {
			return body
		}
		n := int(binary.BigEndian.Uint16(body))
		pos := 2
		for i := 0; i < n; i++ {
			end := pos
			for end < len(body) && body[end] != 0 {
				end++
			}
			pos = end + 1 // past the name
			if pos+18 > len(body) {
				return body
			}
			if o := binary.BigEndian.Uint32(body[pos:]); o >= firstNormalOID {
				if v := rs.translateOID(from, rs.home, 'r', o); v != o {
					set(pos, v)
				}
			}
			if o := binary.BigEndian.Uint32(body[pos+6:]); o >= firstNormalOID {
				if v := rs.translateOID(from, rs.home, 't', o); v != o {
					set(pos+6, v)
				}
			}
			pos += 18
		}
	}
	return out
}

// storeOIDs translates the parameter types of a client's Parse (in the
// home store's OIDs) for store to.
func (rs *routedSession) storeOIDs(to *rstore, oids []uint32) []uint32 {
	if to == rs.home || rs.home == nil || len(oids) == 0 {
		return oids
	}
	var out []uint32
	for i, o := range oids {
		if o < firstNormalOID {
			continue
		}
		if v := rs.translateOID(rs.home, to, 't', o); v != o {
			if out == nil {
				out = append([]uint32(nil), oids...)
			}
			out[i] = v
		}
	}
	if out == nil {
		return oids
	}
	return out
}

// catalogNames are the relations and casts that reveal OIDs: a read that
// touches them stays on the session's home store.
var catalogNames = []string{"pg_catalog.", "information_schema.", "pg_type", "pg_class", "pg_attribute", "pg_namespace",
	"pg_enum", "pg_range", "pg_proc", "pg_extension", "pg_depend", "pg_constraint", "pg_index", "::reg", "::oid", "to_regtype", "to_regclass", "format_type"}

// catalogRead reports whether the read un looks up catalog objects: it
// names a pg_* or information_schema relation, or its text mentions one of
// catalogNames. It reads the messages in place, allocating nothing.
func (rs *routedSession) catalogRead(un *unit, tables []string) bool {
	for _, t := range tables {
		t = strings.TrimLeft(t, `"`)
		if hasPrefixFold(t, "pg_") || hasPrefixFold(t, "information_schema") {
			return true
		}
	}
	for _, m := range un.msgs {
		var text []byte
		switch m.typ {
		case pgwire.ClientQuery:
			text = m.body
		case pgwire.ClientParse: // name, then the statement's text
			if _, rest, ok := bytes.Cut(m.body, []byte{0}); ok {
				text, _, _ = bytes.Cut(rest, []byte{0})
			}
		case pgwire.ClientBind: // portal, then the statement's name
			if _, rest, ok := bytes.Cut(m.body, []byte{0}); ok {
				name, _, _ := bytes.Cut(rest, []byte{0})
				if si := rs.stmts[string(name)]; si != nil && mentionsCatalog(si.sql) {
					return true
				}
			}
		}
		if mentionsCatalog(text) {
			return true
		}
	}
	return false
}

func mentionsCatalog[T string | []byte](text T) bool {
	for _, n := range catalogNames {
		if containsFold(text, n) {
			return true
		}
	}
	return false
}

// hasPrefixFold is strings.HasPrefix ignoring ASCII case; prefix is lower case.
func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// containsFold reports whether b contains sub, ignoring ASCII case; sub is
// lower case.
func containsFold[T string | []byte](b T, sub string) bool {
	for i := 0; i+len(sub) <= len(b); i++ {
		j := 0
		for j < len(sub) && lowerASCII(b[i+j]) == sub[j] {
			j++
		}
		if j == len(sub) {
			return true
		}
	}
	return false
}

func lowerASCII(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}
