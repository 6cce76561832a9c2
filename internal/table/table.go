// Package table knows the tables Tandem copies: their metadata on each
// store, the SQL that applies row images idempotently, the drift ledger, and
// the locked-copy unit that drift repair, the backfill and verify share
// (design sections 3, 4 and 7).
//
// Every identifier that reaches SQL is quoted, so schema, table and column
// names may hold capitals, spaces and double quotes.
package table

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
)

// Querier runs queries. *pgx.Conn, pgx.Tx and *pgxpool.Pool satisfy it.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Name is a table's schema-qualified name, unquoted.
type Name struct {
	Schema string `json:"schema"`
	Table  string `json:"table"`
}

// Quoted returns the name as an SQL identifier: "schema"."table".
func (n Name) Quoted() string { return quoteIdent(n.Schema) + "." + quoteIdent(n.Table) }

// String returns schema.table unquoted, for logs and the drift ledger.
func (n Name) String() string { return n.Schema + "." + n.Table }

// quoteIdent quotes s as an SQL identifier, doubling any double quote.
func quoteIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

// Column is one column of a table as one store defines it.
type Column struct {
	Name string
	// Type is format_type(atttypid, atttypmod) on that store, e.g.
	// "character varying(50)". A type outside pg_catalog is always
	// schema-qualified ("public.mood", "public.mood[]"), so the Meta means
	// the same thing whatever search_path it is used under.
	Type string
	// ParamType is Type without its modifier ("character varying",
	// "bpchar", "numeric"). Parameters are cast to it, not to Type: an
	// explicit cast to a modified type silently truncates or pads
	// ('abcdef'::varchar(3) is 'abc'), whereas assigning the unmodified
	// value to the column checks it and fails.
	ParamType string
	TypeOID   uint32
	Generated bool // attgenerated <> '': the column cannot be written
	Identity  byte // attidentity: 0, 'a' (GENERATED ALWAYS) or 'd' (BY DEFAULT)
}

// Meta is a table's metadata on one store. A Meta is immutable once loaded
// and may be shared between goroutines; callers must not modify it.
type Meta struct {
	OID     uint32
	Name    Name
	Columns []Column // attnum order, without dropped and system columns
	Key     []int    // indexes into Columns of the primary key, in key order; empty when there is none
}

// Column returns the index in m.Columns of the column called name.
func (m *Meta) Column(name string) (int, bool) {
	for i := range m.Columns {
		if m.Columns[i].Name == name {
			return i, true
		}
	}
	return 0, false
}

// KeyNames returns the primary key's column names in key order.
func (m *Meta) KeyNames() []string {
	out := make([]string, len(m.Key))
	for i, k := range m.Key {
		out[i] = m.Columns[k].Name
	}
	return out
}

// HasKey reports whether the table has a primary key.
func (m *Meta) HasKey() bool { return len(m.Key) > 0 }

// metaSQL loads a table and its columns in one round trip; %s is the
// condition that picks the table (c = pg_class, n = its namespace). Types
// outside pg_catalog that format_type leaves unqualified (because they are
// visible on the search_path) get their schema prefixed; for an array the
// element type decides, as it does in format_type.
const metaSQL = `
SELECT c.oid, n.nspname, c.relname, c.relkind::text,
	a.attname, a.atttypid, a.attgenerated <> '', a.attidentity::text,
	CASE WHEN bn.nspname <> 'pg_catalog' AND pg_type_is_visible(bt.oid) THEN quote_ident(bn.nspname) || '.' ELSE '' END,
	format_type(a.atttypid, a.atttypmod),
	format_type(a.atttypid, -1),
	(SELECT k.ord FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
	  WHERE i.indrelid = c.oid AND i.indisprimary AND k.attnum = a.attnum)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON bt.oid = CASE WHEN t.typelem <> 0 AND t.typlen = -1 AND t.typtype <> 'd' THEN t.typelem ELSE t.oid END
LEFT JOIN pg_namespace bn ON bn.oid = bt.typnamespace
WHERE %s
ORDER BY a.attnum`

// NotFoundError says that a table does not exist on a store.
type NotFoundError struct {
	What string // the table as asked for: a name, a written name or an OID
}

func (e *NotFoundError) Error() string { return fmt.Sprintf("table %s does not exist", e.What) }

// load runs metaSQL with cond and args; what names the table in errors.
func load(ctx context.Context, q Querier, what, cond string, args ...any) (*Meta, error) {
	rows, err := q.Query(ctx, fmt.Sprintf(metaSQL, cond), args...)
	if err != nil {
		return nil, fmt.Errorf("loading table %s: %w", what, err)
	}
	defer rows.Close()
	var m *Meta
	keyAt := map[int64]int{} // key position (1-based) -> column index
	for rows.Next() {
		var (
			oid                        uint32
			schema, name, kind         string
			col, identity, prefix, typ *string
			paramType                  *string
			typOID                     *uint32
			generated                  *bool
			keyPos                     *int64
		)
		if err := rows.Scan(&oid, &schema, &name, &kind, &col, &typOID, &generated, &identity, &prefix, &typ, &paramType, &keyPos); err != nil {
			return nil, fmt.Errorf("loading table %s: %w", what, err)
		}
		if m == nil {
			m = &Meta{OID: oid, Name: Name{Schema: schema, Table: name}}
			if kind != "r" && kind != "p" {
				return nil, fmt.Errorf("%s is not a table (relkind %q)", m.Name, kind)
			}
		}
		if col == nil { // a table without columns
			continue
		}
		c := Column{Name: *col, Type: *prefix + *typ, ParamType: *prefix + *paramType, TypeOID: *typOID, Generated: *generated}
		if *identity != "" {
			c.Identity = (*identity)[0]
		}
		if keyPos != nil {
			keyAt[*keyPos] = len(m.Columns)
		}
		m.Columns = append(m.Columns, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("loading table %s: %w", what, err)
	}
	if m == nil {
		return nil, &NotFoundError{What: what}
	}
	for i := 1; i <= len(keyAt); i++ {
		idx, ok := keyAt[int64(i)]
		if !ok {
			// An expression in a primary key index cannot happen; refuse
			// rather than guess.
			return nil, fmt.Errorf("table %s: primary key column %d not found", m.Name, i)
		}
		m.Key = append(m.Key, idx)
	}
	return m, nil
}

// LoadByOID loads the table with this OID.
func LoadByOID(ctx context.Context, q Querier, oid uint32) (*Meta, error) {
	return load(ctx, q, fmt.Sprintf("with OID %d", oid), "c.oid = $1", oid)
}

// LoadByName loads the table with exactly this schema and name (no
// search_path, no case folding). The error for a missing table is a
// *NotFoundError that names it.
func LoadByName(ctx context.Context, q Querier, n Name) (*Meta, error) {
	return load(ctx, q, n.String(), "n.nspname = $1 AND c.relname = $2", n.Schema, n.Table)
}

// Resolve loads a table named as SQL would write it: possibly unqualified,
// possibly quoted (`orders`, `"Order Items"`, `shop."Orders"`). Unquoted
// parts fold to lower case and an unqualified name is looked up on q's
// search_path, exactly as Postgres does (to_regclass).
func Resolve(ctx context.Context, q Querier, written string) (*Meta, error) {
	m, err := load(ctx, q, written, "c.oid = to_regclass($1)", written)
	var nf *NotFoundError
	if errors.As(err, &nf) {
		return nil, fmt.Errorf("%w (looked up on the search_path)", err)
	}
	return m, err
}

// Cache holds the Meta of the tables of one store, by OID and by Name. It
// is safe for concurrent use. Invalidate drops everything; call it after
// DDL. The Metas it returns are shared and must not be modified.
type Cache struct {
	mu     sync.Mutex
	gen    uint64 // bumped by Invalidate, so a load that raced with it is not stored
	byOID  map[uint32]*Meta
	byName map[Name]*Meta
}

// NewCache returns an empty cache.
func NewCache() *Cache {
	return &Cache{byOID: map[uint32]*Meta{}, byName: map[Name]*Meta{}}
}

// ByOID returns the table with this OID, loading it with q when not cached.
func (c *Cache) ByOID(ctx context.Context, q Querier, oid uint32) (*Meta, error) {
	c.mu.Lock()
	m, gen := c.byOID[oid], c.gen
	c.mu.Unlock()
	if m != nil {
		return m, nil
	}
	m, err := LoadByOID(ctx, q, oid)
	if err != nil {
		return nil, err
	}
	c.store(gen, m)
	return m, nil
}

// ByName returns the table with exactly this name, loading it with q when
// not cached.
func (c *Cache) ByName(ctx context.Context, q Querier, n Name) (*Meta, error) {
	c.mu.Lock()
	m, gen := c.byName[n], c.gen
	c.mu.Unlock()
	if m != nil {
		return m, nil
	}
	m, err := LoadByName(ctx, q, n)
	if err != nil {
		return nil, err
	}
	c.store(gen, m)
	return m, nil
}

func (c *Cache) store(gen uint64, m *Meta) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return // loaded before an Invalidate; it may predate the DDL
	}
	c.byOID[m.OID] = m
	c.byName[m.Name] = m
}

// Invalidate forgets every table.
func (c *Cache) Invalidate() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	clear(c.byOID)
	clear(c.byName)
}
