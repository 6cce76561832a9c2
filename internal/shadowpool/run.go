package shadowpool

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
	"github.com/tandemdb/tandem/internal/table"
)

// Running a sample on a store: the connections the workers keep (one per
// store, user, database), the statement as it runs there (rewritten
// through the mappings for new), and reading its result.

type shadowConnKey struct {
	store    string
	user, db string
	gucs     string // for grouping a batch only: a connection takes any settings
}

type shadowConn struct {
	pc   *pgconn.PgConn
	gucs string // the settings applied, as a key
}

// sqlFor is j's statement as it runs on st: the client's text on old, the
// text rewritten through the table mappings on new.
func (sh *Pool) sqlFor(j *Job, st route.Store) (string, error) {
	if st != route.New {
		return j.SQL, nil
	}
	ms := sh.opts.Mappings()
	if ms == nil {
		return j.SQL, nil
	}
	c := &sh.rewrites
	c.mu.Lock()
	if c.ms != ms {
		// New mappings: forget the old rewrites; parse nothing at all when
		// every table maps to itself.
		c.ms, c.m, c.reshaped = ms, map[string]rewritten{}, false
		for _, m := range ms.All() {
			if !m.Identity() {
				c.reshaped = true
			}
		}
	}
	if !c.reshaped {
		c.mu.Unlock()
		return j.SQL, nil
	}
	r, ok := c.m[j.SQL]
	c.mu.Unlock()
	if !ok {
		r.sql, r.ok, r.reason = ms.RewriteRead(j.SQL)
		c.mu.Lock()
		if c.ms == ms {
			if len(c.m) >= 4096 {
				clear(c.m)
			}
			c.m[j.SQL] = r
		}
		c.mu.Unlock()
	}
	if !r.ok {
		return "", errSkip("not rewritable for new: " + r.reason)
	}
	return r.sql, nil
}

// rewriteCache holds reads rewritten for new, for one set of mappings.
type rewriteCache struct {
	mu       sync.Mutex
	ms       *table.Mappings
	reshaped bool // some table maps to another name or shape
	m        map[string]rewritten
}

type rewritten struct {
	sql    string
	ok     bool
	reason string
}

// run executes j's statement on store st and returns its result.
func (sh *Pool) run(j *Job, st route.Store) (shadow.Result, time.Duration, error) {
	sql, err := sh.sqlFor(j, st)
	if err != nil {
		return shadow.Result{}, 0, err
	}
	ctx, cancel := context.WithTimeout(sh.ctx, sh.Settings().Timeout)
	defer cancel()
	c, key, err := sh.conn(ctx, st, j)
	if err != nil {
		return shadow.Result{}, 0, err
	}
	start := time.Now()
	res, err := sh.exec(ctx, c.pc, sql, j)
	dur := time.Since(start)
	sh.put(key, c)
	return res, dur, err
}

// describe returns the result columns of j's statement on the store that
// served it, with the client's result formats.
func (sh *Pool) describe(j *Job) ([]shadow.Field, error) {
	sql, err := sh.sqlFor(j, j.Served)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(sh.ctx, sh.Settings().Timeout)
	defer cancel()
	c, key, err := sh.conn(ctx, j.Served, j)
	if err != nil {
		return nil, err
	}
	sd, err := c.pc.Prepare(ctx, "", sql, j.ParamOIDs)
	sh.put(key, c)
	if err != nil {
		return nil, fmt.Errorf("describing the statement: %w", err)
	}
	fs := make([]shadow.Field, len(sd.Fields))
	for i, f := range sd.Fields {
		fs[i] = shadow.Field{Name: f.Name, OID: f.DataTypeOID, Format: FormatOf(j.ResultFmts, i)}
	}
	return fs, nil
}

// exec runs j's statement alone on pc: sql is its text as it runs on that
// store. A Query runs as one parameterless extended-protocol statement with
// text results, as in a pipeline: for one statement the result is the same.
func (sh *Pool) exec(ctx context.Context, pc *pgconn.PgConn, sql string, j *Job) (shadow.Result, error) {
	params, oids, fmts, rfmts := j.bindArgs()
	return sh.readResult(pc.ExecParams(ctx, sql, params, oids, fmts, rfmts))
}

// bindArgs are the parameters and formats j's statement is bound with:
// the client's, or none for a Query.
func (j *Job) bindArgs() (params [][]byte, oids []uint32, fmts, rfmts []int16) {
	if !j.Extended {
		return nil, nil, nil, nil
	}
	return j.Params, j.ParamOIDs, j.ParamFmts, j.ResultFmts
}

// readResult reads one result (its rows copied), up to twice the served
// result bound. A statement's error becomes the result's ErrCode; the
// error returned is the connection's, or a result over the bound.
func (sh *Pool) readResult(rr *pgconn.ResultReader) (shadow.Result, error) {
	var res shadow.Result
	limit, size := 2*sh.Settings().MaxResult, 0
	for _, fd := range rr.FieldDescriptions() {
		res.Fields = append(res.Fields, shadow.Field{Name: fd.Name, OID: fd.DataTypeOID, Format: fd.Format})
	}
	for rr.NextRow() {
		vals := rr.Values()
		row := make([][]byte, len(vals))
		for i, v := range vals {
			if v != nil {
				row[i] = append([]byte{}, v...)
				size += len(v)
			}
		}
		size += 8 * len(vals)
		if size > limit {
			_, _ = rr.Close()
			return res, errSkip("shadow result too large")
		}
		res.Rows = append(res.Rows, row)
	}
	_, err := rr.Close()
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		res.ErrCode, res.ErrMsg = pe.Code, pe.Message
		return res, nil
	}
	return res, err
}

// conn returns an idle connection to st for j's user and database, with
// j's settings applied, or opens one.
func (sh *Pool) conn(ctx context.Context, name route.Store, j *Job) (*shadowConn, shadowConnKey, error) {
	key := shadowConnKey{store: string(name), user: j.User, db: j.DB}
	gk := gucKey(j.GUCs)
	sh.mu.Lock()
	var c *shadowConn
	if cs := sh.idle[key]; len(cs) > 0 {
		c = cs[len(cs)-1]
		sh.idle[key] = cs[:len(cs)-1]
	}
	sh.mu.Unlock()
	if c == nil {
		cfg := sh.connConfig(name, j)
		if cfg == nil {
			return nil, key, errSkip("no " + string(name) + " store")
		}
		pc, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			return nil, key, fmt.Errorf("connecting to the %s store: %w", name, err)
		}
		c = &shadowConn{pc: pc}
	}
	if c.gucs != gk {
		var b strings.Builder
		b.WriteString("RESET ALL")
		for _, g := range j.GUCs {
			fmt.Fprintf(&b, "; SELECT pg_catalog.set_config(%s, %s, false)", pgwire.QuoteLiteral(g[0]), pgwire.QuoteLiteral(g[1]))
		}
		if _, err := c.pc.Exec(ctx, b.String()).ReadAll(); err != nil {
			_ = c.pc.Close(context.Background())
			return nil, key, fmt.Errorf("applying the session's settings: %w", err)
		}
		c.gucs = gk
	}
	return c, key, nil
}

func gucKey(g [][2]string) string {
	var b strings.Builder
	for _, kv := range g {
		b.WriteString(kv[0])
		b.WriteByte(0)
		b.WriteString(kv[1])
		b.WriteByte(0)
	}
	return b.String()
}

// put returns c to the idle list, or closes it if it is broken or the
// list is full.
func (sh *Pool) put(key shadowConnKey, c *shadowConn) {
	if c.pc.IsClosed() || c.pc.TxStatus() != 'I' {
		_ = c.pc.Close(context.Background())
		return
	}
	sh.mu.Lock()
	if sh.ctx.Err() == nil && len(sh.idle[key]) < cap(sh.queue) && len(sh.idle[key]) < 2*sh.opts.Workers {
		sh.idle[key] = append(sh.idle[key], c)
		c = nil
	}
	sh.mu.Unlock()
	if c != nil {
		_ = c.pc.Close(context.Background())
	}
}

// connConfig is st's connection config for the session's user and
// database, as the proxy would open it (nil: no such store).
func (sh *Pool) connConfig(st route.Store, j *Job) *pgconn.Config {
	cfg := sh.opts.Config(st, j.User, j.DB)
	if cfg == nil {
		return nil
	}
	rp := map[string]string{}
	for k, v := range cfg.RuntimeParams {
		rp[k] = v
	}
	for k, v := range j.Startup {
		switch k {
		case "user", "database", "replication", "application_name":
		default:
			rp[k] = v
		}
	}
	rp["application_name"] = "tandem shadow"
	cfg.RuntimeParams = rp
	cfg.OnNotice, cfg.OnNotification = nil, nil
	return cfg
}
