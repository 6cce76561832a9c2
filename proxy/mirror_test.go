package proxy

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// The new store for dual-write tests: one more throwaway cluster, started
// by the first test that needs it.
var newCluster struct {
	once sync.Once
	c    *pgtest.Cluster
	err  error
}

func sharedNew(t testing.TB) *pgtest.Cluster {
	t.Helper()
	newCluster.once.Do(func() {
		newCluster.c, newCluster.err = pgtest.Start(context.Background(), pgtest.Options{})
	})
	if newCluster.err != nil {
		t.Fatal(newCluster.err)
	}
	return newCluster.c
}

func destroySharedNew() {
	if newCluster.c != nil {
		if err := newCluster.c.Destroy(); err != nil {
			fmt.Fprintln(os.Stderr, "destroying new test cluster:", err)
		}
	}
}

// pairEnv is a database of the same name on an old and a new cluster, the
// control schema on old, and a proxy in front with mirroring available.
type pairEnv struct {
	t        testing.TB
	old, new *pgtest.Cluster
	db       string
	proxy    *testProxy
	control  *pgxpool.Pool
}

// loadMappings loads cfg's mappings over connections to both stores'
// databases, failing the test on any problem; the connections, returned
// for the test's own queries, close with it.
func (e *pairEnv) loadMappings(t testing.TB, cfg config.Tables) (ms *table.Mappings, oc, nc *pgx.Conn) {
	t.Helper()
	ctx := context.Background()
	for _, c := range []struct {
		conn **pgx.Conn
		dsn  string
	}{{&oc, e.old.DSN(e.db)}, {&nc, e.new.DSN(e.db)}} {
		conn, err := pgx.Connect(ctx, c.dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
		*c.conn = conn
	}
	ms, probs, err := table.LoadMappings(ctx, cfg, oc, nc)
	if err != nil || len(probs) > 0 {
		t.Fatalf("LoadMappings: %v %v", probs, err)
	}
	return ms, oc, nc
}

// newPairEnv creates the databases, runs setup on both stores, and starts
// a proxy whose drift ledger is the control schema on old.
func newPairEnv(t testing.TB, setup string, mutate ...func(*config.Config)) *pairEnv {
	t.Helper()
	return newPairEnvOn(t, sharedNew(t), setup, mutate...)
}

// newPairEnvOn is newPairEnv with a given new store.
func newPairEnvOn(t testing.TB, nc *pgtest.Cluster, setup string, mutate ...func(*config.Config)) *pairEnv {
	t.Helper()
	return newPairEnvWith(t, nc, Options{}, setup, mutate...)
}

// newPairEnvWith is newPairEnvOn with proxy options (RecordDrift is the
// control schema's ledger).
func newPairEnvWith(t testing.TB, nc *pgtest.Cluster, opts Options, setup string, mutate ...func(*config.Config)) *pairEnv {
	t.Helper()
	ctx := context.Background()
	e := &pairEnv{t: t, old: shared, new: nc, db: newDB(t)}
	if err := e.new.CreateDatabase(ctx, e.db); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*pgtest.Cluster{e.old, e.new} {
		if setup != "" {
			if err := c.Exec(ctx, e.db, setup); err != nil {
				t.Fatalf("setup on %s: %v", c.DSN(e.db), err)
			}
		}
	}
	conn, err := pgx.Connect(ctx, e.old.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	if err := route.EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}
	if err := table.EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}
	conn.Close(ctx)
	e.control, err = pgxpool.New(ctx, e.old.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.control.Close)
	muts := append([]func(*config.Config){func(c *config.Config) { c.New.DSN = e.new.DSN(e.db) }}, mutate...)
	opts.RecordDrift = func(ctx context.Context, entries []table.DriftEntry) error {
		return table.RecordDrift(ctx, e.control, entries)
	}
	e.proxy = startProxyWith(t, e.old, e.db, opts, muts...)
	return e
}

// set applies routing settings to the proxy, as the follower would.
func (e *pairEnv) set(s route.Settings) {
	st := e.proxy.srv.State()
	e.proxy.srv.ApplyState(route.State{Version: st.Version + 1, Settings: s})
}

func (e *pairEnv) client() *pgx.Conn {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, e.proxy.dsn(e.db))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// tableHash hashes every row of tbl in key order, on one store, with a
// query independent of Tandem.
func tableHash(t testing.TB, c *pgtest.Cluster, db, tbl, key string) (string, int) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, c.DSN(db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var h string
	var n int
	err = conn.QueryRow(ctx, fmt.Sprintf(`SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY %s)), ''), count(*) FROM %s t`, key, tbl)).Scan(&h, &n)
	if err != nil {
		t.Fatal(err)
	}
	return h, n
}

func (e *pairEnv) assertEqual(tbl, key string) int {
	e.t.Helper()
	ho, no := tableHash(e.t, e.old, e.db, tbl, key)
	hn, nn := tableHash(e.t, e.new, e.db, tbl, key)
	if ho != hn || no != nn {
		e.t.Errorf("%s differs: old %d rows %s, new %d rows %s", tbl, no, ho, nn, hn)
		e.dump(tbl, key)
	}
	return no
}

func (e *pairEnv) dump(tbl, key string) {
	ctx := context.Background()
	for _, c := range []*pgtest.Cluster{e.old, e.new} {
		conn, err := pgx.Connect(ctx, c.DSN(e.db))
		if err != nil {
			continue
		}
		rows, _ := conn.Query(ctx, fmt.Sprintf(`SELECT t::text FROM %s t ORDER BY %s LIMIT 20`, tbl, key))
		var lines []string
		for rows.Next() {
			var s string
			_ = rows.Scan(&s)
			lines = append(lines, s)
		}
		rows.Close()
		conn.Close(ctx)
		e.t.Logf("%s:\n  %s", c.DSN(e.db), strings.Join(lines, "\n  "))
	}
}

func (e *pairEnv) openDrift() int64 {
	n, err := table.OpenDriftTotal(context.Background(), e.control)
	if err != nil {
		e.t.Fatal(err)
	}
	return n
}

const determinismSchema = `
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TABLE items (
	id serial PRIMARY KEY,
	uid uuid NOT NULL DEFAULT gen_random_uuid(),
	created_at timestamptz NOT NULL DEFAULT now(),
	written_at timestamptz NOT NULL DEFAULT clock_timestamp(),
	r float8,
	filled text,
	name text
);
CREATE TABLE ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
CREATE FUNCTION fill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.filled := md5(random()::text || clock_timestamp()::text); RETURN NEW; END $$;
CREATE TRIGGER items_fill BEFORE INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION fill();
`

func TestMirrorDeterminism(t *testing.T) {
	e := newPairEnv(t, determinismSchema)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	c := e.client()
	mustExec := func(sql string, args ...any) {
		t.Helper()
		if _, err := c.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// Extended protocol (pgx prepares and caches statements).
	mustExec(`INSERT INTO items (name) VALUES ('a'), ('b'), ('c')`)
	var id int
	var uid string
	if err := c.QueryRow(ctx, `INSERT INTO items (name) VALUES ($1) RETURNING id, uid`, "d").Scan(&id, &uid); err != nil {
		t.Fatal(err)
	}
	if id != 4 || len(uid) != 36 {
		t.Fatalf("RETURNING gave id=%d uid=%q", id, uid)
	}
	mustExec(`UPDATE items SET r = random() WHERE id <= $1`, 3)
	mustExec(`INSERT INTO items (id, name) VALUES (2, 'b2') ON CONFLICT (id) DO UPDATE SET name = excluded.name, r = random()`)
	var deleted []int32
	rows, err := c.Query(ctx, `DELETE FROM items WHERE id IN (1, 3) RETURNING id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var d int32
		if err := rows.Scan(&d); err != nil {
			t.Fatal(err)
		}
		deleted = append(deleted, d)
	}
	if rows.Err() != nil || len(deleted) != 2 {
		t.Fatalf("DELETE RETURNING: %v %v", deleted, rows.Err())
	}
	mustExec(`INSERT INTO ident (v) VALUES ('x'), ('y')`)
	// Simple protocol, with a transaction, a savepoint and a rollback to it.
	pc := c.PgConn()
	for _, sql := range []string{
		`BEGIN`,
		`INSERT INTO items (name) VALUES ('tx1')`,
		`SAVEPOINT s1`,
		`INSERT INTO items (name) VALUES ('undone')`,
		`ROLLBACK TO SAVEPOINT s1`,
		`UPDATE items SET r = random(), name = name || '!' WHERE name = 'tx1'`,
		`COMMIT`,
		`INSERT INTO items (name) VALUES ('s1'), ('s2'); UPDATE items SET r = random() WHERE name = 's1'`,
		`BEGIN; INSERT INTO items (name) VALUES ('rolled back'); ROLLBACK`,
	} {
		if _, err := pc.Exec(ctx, sql).ReadAll(); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// A statement that fails on the primary fails for the client, as usual.
	if _, err := c.Exec(ctx, `INSERT INTO items (id, name) VALUES (2, 'dup')`); sqlState(err) != "23505" {
		t.Fatalf("duplicate key: got %v", err)
	}
	n := e.assertEqual("items", "id")
	if n != 5 {
		t.Errorf("items has %d rows, want 5", n)
	}
	e.assertEqual("ident", "id")
	if d := e.openDrift(); d != 0 {
		t.Errorf("open drift: %d entries, want none", d)
	}
}

// TestMirrorHandoff: sessions that began in passthrough, with statements
// prepared while relayed, switch to mirroring at their next safe point.
func TestMirrorHandoff(t *testing.T) {
	for _, engine := range []string{"epoll", "goroutines"} {
		t.Run(engine, func(t *testing.T) {
			e := newPairEnv(t, `CREATE TABLE kv (k int PRIMARY KEY, v text, at timestamptz DEFAULT clock_timestamp())`,
				func(c *config.Config) { c.Relay.Engine = engine })
			ctx := context.Background()
			c := e.client()
			// Relayed: pgx prepares and caches these statements.
			if _, err := c.Exec(ctx, `INSERT INTO kv (k, v) VALUES ($1, $2)`, 1, "before"); err != nil {
				t.Fatal(err)
			}
			tx, err := c.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO kv (k, v) VALUES ($1, $2)`, 2, "in tx"); err != nil {
				t.Fatal(err)
			}
			// The state changes while the session is inside a transaction:
			// it finishes on the old routing.
			e.set(route.Settings{Primary: route.Old, Mirror: true})
			if _, err := tx.Exec(ctx, `INSERT INTO kv (k, v) VALUES ($1, $2)`, 3, "same tx"); err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			// Now at a safe point: the cached statement is re-parsed with the
			// rewrite and mirrored.
			if _, err := c.Exec(ctx, `INSERT INTO kv (k, v) VALUES ($1, $2)`, 4, "after"); err != nil {
				t.Fatal(err)
			}
			var v string
			if err := c.QueryRow(ctx, `UPDATE kv SET v = v || '!' WHERE k = $1 RETURNING v`, 4).Scan(&v); err != nil || v != "after!" {
				t.Fatalf("UPDATE RETURNING = %q, %v", v, err)
			}
			// Rows written before mirroring began are the backfill's job;
			// rows 4 must be on both stores, identical.
			ho, _ := tableHash(t, e.old, e.db, "(SELECT * FROM kv WHERE k = 4)", "k")
			hn, nn := tableHash(t, e.new, e.db, "(SELECT * FROM kv WHERE k = 4)", "k")
			if ho != hn || nn != 1 {
				t.Fatalf("row 4 not mirrored identically: old %s new %s (%d rows)", ho, hn, nn)
			}
			if _, n := tableHash(t, e.new, e.db, "kv", "k"); n != 1 {
				t.Fatalf("new has %d rows, want only the one written after the switch", n)
			}
		})
	}
}

// TestMirrorConcurrentWriters: 16 writers run random inserts, updates and
// deletes, in transactions and in autocommit, with random rollbacks,
// through two proxies. Old and new end identical.
func TestMirrorConcurrentWriters(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text, touched timestamptz DEFAULT clock_timestamp());
		INSERT INTO acct SELECT g, 0, 'seed' FROM generate_series(1, 50) g;`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	second := startProxyWith(t, e.old, e.db, Options{RecordDrift: func(ctx context.Context, entries []table.DriftEntry) error {
		return table.RecordDrift(ctx, e.control, entries)
	}}, func(c *config.Config) { c.New.DSN = e.new.DSN(e.db) })
	second.srv.ApplyState(e.proxy.srv.State())
	ctx := context.Background()
	const writers, ops = 16, 60
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := e.proxy
			if w%2 == 1 {
				p = second
			}
			c, err := pgx.Connect(ctx, p.dsn(e.db))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(ctx)
			rnd := uint32(w*7919 + 1)
			next := func(n int) int { rnd = rnd*1103515245 + 12345; return int(rnd>>8) % n }
			for i := range ops {
				id := 1 + next(80)
				stmt := func(q interface {
					Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
				}) error {
					var err error
					switch next(4) {
					case 0:
						_, err = q.Exec(ctx, `INSERT INTO acct (id, bal, note) VALUES ($1, $2, 'ins') ON CONFLICT (id) DO UPDATE SET bal = acct.bal + excluded.bal`, id, next(100))
					case 1:
						_, err = q.Exec(ctx, `UPDATE acct SET bal = bal + $2, note = md5(random()::text) WHERE id = $1`, id, next(100))
					case 2:
						_, err = q.Exec(ctx, `DELETE FROM acct WHERE id = $1`, id)
					default:
						_, err = q.Exec(ctx, `UPDATE acct SET bal = bal - 1 WHERE id IN ($1, $2)`, id, 1+next(80))
					}
					return err
				}
				if i%3 == 0 {
					// autocommit (pgx runs each Exec outside a transaction)
					if err := stmt(c); err != nil && sqlState(err) != "40P01" {
						errs <- fmt.Errorf("writer %d autocommit: %w", w, err)
						return
					}
					continue
				}
				tx, err := c.Begin(ctx)
				if err != nil {
					errs <- err
					return
				}
				var ferr error
				for range 1 + next(3) {
					if ferr = stmt(tx); ferr != nil {
						break
					}
				}
				if ferr != nil || next(5) == 0 {
					_ = tx.Rollback(ctx)
					if ferr != nil && sqlState(ferr) != "40P01" {
						errs <- fmt.Errorf("writer %d: %w", w, ferr)
						return
					}
					continue
				}
				if err := tx.Commit(ctx); err != nil && sqlState(err) != "40P01" {
					errs <- fmt.Errorf("writer %d commit: %w", w, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	e.assertEqual("acct", "id")
	if d := e.openDrift(); d != 0 {
		t.Errorf("open drift: %d entries, want none", d)
	}
}

// TestMirrorSessionState: the secondary's session follows the client's
// settings (copied when it opens, replayed after), so statement-mirrored
// writes mean the same on both stores; DISCARD ALL and prepared statements
// keep working.
func TestMirrorSessionState(t *testing.T) {
	e := newPairEnv(t, `CREATE SCHEMA app;
		CREATE TABLE app.nokey (v int, at timestamptz);
		CREATE TABLE app.kv (k int PRIMARY KEY, v text);`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	c := e.client()
	pc := c.PgConn()
	for _, sql := range []string{
		// Set before the secondary's session exists: copied when it opens.
		`SET search_path = app, public`,
		`SET TimeZone = 'Asia/Tokyo'`,
		`INSERT INTO nokey VALUES (1, '2020-01-01 00:00')`,
		// Set after: replayed.
		`SET TimeZone = 'America/Denver'`,
		`INSERT INTO nokey VALUES (2, '2020-01-01 00:00')`,
		`DISCARD ALL`,
		`SET search_path = app`,
		`INSERT INTO nokey VALUES (3, '2020-01-01 00:00')`,
	} {
		if _, err := pc.Exec(ctx, sql).ReadAll(); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	for i := range 3 {
		if _, err := c.Exec(ctx, `INSERT INTO kv VALUES ($1, $2)`, i, fmt.Sprint("v", i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pc.Exec(ctx, `DISCARD ALL`).ReadAll(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, `UPDATE app.kv SET v = v || '!'`); err != nil {
		t.Fatal(err)
	}
	e.assertEqual("app.nokey", "v")
	e.assertEqual("app.kv", "k")
}

// TestMirrorCopyFrom: rows written by COPY FROM STDIN reach the new store:
// the table is recorded as drift before the client's reply, and the
// repairer copies it under lock.
func TestMirrorCopyFrom(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE c (id serial PRIMARY KEY, v text, at timestamptz DEFAULT clock_timestamp())`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	c := e.client()
	n, err := c.CopyFrom(ctx, pgx.Identifier{"c"}, []string{"v"}, pgx.CopyFromRows([][]any{{"a"}, {"b"}, {"c"}}))
	if err != nil || n != 3 {
		t.Fatalf("COPY: %d rows, %v", n, err)
	}
	if _, err := c.PgConn().CopyFrom(ctx, strings.NewReader("d\ne\n"), "COPY c (v) FROM STDIN"); err != nil {
		t.Fatal(err)
	}
	open, err := table.OpenDrift(ctx, e.control)
	if err != nil || open[table.Name{Schema: "public", Table: "c"}] == 0 {
		t.Fatalf("COPY left no drift for public.c: %v %v", open, err)
	}
	repairAll(t, e)
	if n := e.assertEqual("c", "id"); n != 5 {
		t.Fatalf("c has %d rows, want 5", n)
	}
}

// repairAll drains the drift ledger towards new, as the repairer does.
func repairAll(t testing.TB, e *pairEnv) {
	t.Helper()
	ctx := context.Background()
	var conns []*pgx.Conn
	for _, dsn := range []string{e.old.DSN(e.db), e.old.DSN(e.db), e.new.DSN(e.db)} {
		c, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		conns = append(conns, c)
	}
	for i := 0; e.openDrift() > 0; i++ {
		if i == 200 {
			t.Fatalf("drift still open after %d repair passes: %d entries", i, e.openDrift())
		}
		if _, err := table.Repair(ctx, conns[0], conns[1], conns[2], table.StaleNew, 1000); err != nil {
			t.Fatal(err)
		}
	}
}

// repairDrift brings both stores level from the drift ledger, as the
// repairer does with primary old: entries stale on old (missed while new
// was primary) first, copied from new, then those stale on new.
func repairDrift(t testing.TB, e *pairEnv) {
	t.Helper()
	ctx := context.Background()
	connect := func(dsn string) *pgx.Conn {
		c, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(ctx) })
		return c
	}
	control, oldc, newc := connect(e.old.DSN(e.db)), connect(e.old.DSN(e.db)), connect(e.new.DSN(e.db))
	for i := 0; e.openDrift() > 0; i++ {
		if i == 200 {
			t.Fatalf("drift still open after %d repair passes: %d entries", i, e.openDrift())
		}
		if _, err := table.RepairWith(ctx, control, newc, oldc, table.RepairOptions{Target: table.StaleOld, Limit: 1000, TargetIsPrimary: true}); err != nil {
			t.Fatal(err)
		}
		if _, err := table.Repair(ctx, control, oldc, newc, table.StaleNew, 1000); err != nil {
			t.Fatal(err)
		}
	}
}

// TestMirrorLargeStatement: a write whose row images outgrow the memory
// bound is not held: its table goes to the drift ledger and the repairer
// brings new level.
func TestMirrorLargeStatement(t *testing.T) {
	old := maxImageBytes
	maxImageBytes = 64 << 10
	t.Cleanup(func() { maxImageBytes = old })
	e := newPairEnv(t, `CREATE TABLE big (id int PRIMARY KEY, pad text)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	c := e.client()
	tag, err := c.Exec(ctx, `INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g`)
	if err != nil || tag.RowsAffected() != 5000 {
		t.Fatalf("INSERT ... SELECT: %v %v", tag, err)
	}
	if _, err := c.Exec(ctx, `INSERT INTO big VALUES (6000, 'small')`); err != nil {
		t.Fatal(err)
	}
	open, err := table.OpenDrift(ctx, e.control)
	if err != nil || open[table.Name{Schema: "public", Table: "big"}] != 1 {
		t.Fatalf("drift after a large statement: %v %v", open, err)
	}
	repairAll(t, e)
	if n := e.assertEqual("big", "id"); n != 5001 {
		t.Fatalf("big has %d rows", n)
	}
}

// TestMirrorDeleteWaitsForInsert: a row inserted and committed on the
// primary but not yet on the secondary, then deleted by another session,
// is gone from both stores: the delete's mirror waits for the insert's
// secondary commit instead of missing the uncommitted row.
func TestMirrorDeleteWaitsForInsert(t *testing.T) {
	hold := make(chan struct{})
	var once, releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(hold) }) }
	held := make(chan struct{})
	e := newPairEnv(t, `CREATE TABLE r (id int PRIMARY KEY, v text)`)
	// A second proxy on the same stores with the knob: session A uses it.
	pa := startProxyWith(t, e.old, e.db, Options{
		RecordDrift: func(ctx context.Context, entries []table.DriftEntry) error {
			return table.RecordDrift(ctx, e.control, entries)
		},
		Knobs: TestingKnobs{BeforeSecondaryCommit: func() {
			once.Do(func() { close(held); <-hold })
		}},
	}, func(c *config.Config) { c.New.DSN = e.new.DSN(e.db) })
	t.Cleanup(release) // registered after the proxy's: runs before it stops
	st := route.State{Version: 2, Settings: route.Settings{Primary: route.Old, Mirror: true}}
	pa.srv.ApplyState(st)
	e.proxy.srv.ApplyState(st)
	ctx := context.Background()
	a, err := pgx.Connect(ctx, pa.dsn(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close(ctx)
	b := e.client()
	aDone := make(chan error, 1)
	go func() {
		aDone <- pgx.BeginFunc(ctx, a, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `INSERT INTO r VALUES (1, 'a')`)
			return err
		})
	}()
	<-held // A committed on old, not yet on new
	bDone := make(chan error, 1)
	go func() {
		_, err := b.Exec(ctx, `DELETE FROM r WHERE id = 1`)
		bDone <- err
	}()
	select {
	case err := <-bDone:
		t.Fatalf("the delete's mirror did not wait for the insert's secondary commit (err %v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	release()
	if err := <-aDone; err != nil {
		t.Fatal(err)
	}
	if err := <-bDone; err != nil {
		t.Fatal(err)
	}
	if n := e.assertEqual("r", "id"); n != 0 {
		t.Fatalf("r has %d rows on old, want 0", n)
	}
}

// TestMirrorFlushBatches: an extended-protocol batch ended by Flush leaves
// the primary's implicit transaction open until a later Sync; its mirrored
// writes commit on the secondary only when that Sync commits the primary's,
// and vanish on both when the implicit transaction fails.
func TestMirrorFlushBatches(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	pc := e.client().PgConn()
	count := func(c *pgtest.Cluster) int {
		t.Helper()
		_, n := tableHash(t, c, e.db, "f", "id")
		return n
	}
	run := func(ids []string, then func()) error {
		t.Helper()
		pl := pc.StartPipeline(ctx)
		pl.SendQueryParams(`INSERT INTO f VALUES ($1)`, [][]byte{[]byte(ids[0])}, nil, nil, nil)
		pl.SendFlushRequest()
		if err := pl.Flush(); err != nil {
			t.Fatal(err)
		}
		res, err := pl.GetResults()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := res.(*pgconn.ResultReader).Close(); err != nil {
			t.Fatal(err)
		}
		then()
		for _, id := range ids[1:] {
			pl.SendQueryParams(`INSERT INTO f VALUES ($1)`, [][]byte{[]byte(id)}, nil, nil, nil)
		}
		pl.SendPipelineSync()
		if err := pl.Flush(); err != nil {
			t.Fatal(err)
		}
		var firstErr error
		for {
			res, err := pl.GetResults()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			if rr, ok := res.(*pgconn.ResultReader); ok {
				if _, err := rr.Close(); err != nil && firstErr == nil {
					firstErr = err
				}
			}
			if _, ok := res.(*pgconn.PipelineSync); ok {
				break
			}
			if res == nil && err == nil {
				break
			}
		}
		if err := pl.Close(); err != nil && firstErr == nil {
			firstErr = err
		}
		return firstErr
	}
	// Committed by the Sync: on both stores, and not on new before it.
	if err := run([]string{"1", "2"}, func() {
		if n := count(e.new); n != 0 {
			t.Errorf("new has %d rows before the primary committed", n)
		}
	}); err != nil {
		t.Fatal(err)
	}
	// Failed before the Sync (a duplicate key): on neither store.
	if err := run([]string{"3", "1"}, func() {}); sqlState(err) != "23505" {
		t.Fatalf("want a duplicate-key error, got %v", err)
	}
	if n := e.assertEqual("f", "id"); n != 2 {
		t.Fatalf("f has %d rows, want 2", n)
	}
}

// TestMirrorHandoffUnnamed: a write that runs the unnamed statement parsed
// while the session was still relayed is mirrored after the switch.
func TestMirrorHandoffUnnamed(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE kv (k int PRIMARY KEY, v text)`)
	ctx := context.Background()
	pc := e.client().PgConn()
	if _, err := pc.Prepare(ctx, "", `INSERT INTO kv VALUES ($1, $2)`, nil); err != nil {
		t.Fatal(err)
	}
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	res := pc.ExecPrepared(ctx, "", [][]byte{[]byte("7"), []byte("after")}, nil, nil).Read()
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	if n := e.assertEqual("kv", "k"); n != 1 {
		t.Fatalf("kv has %d rows", n)
	}
}

// TestMirrorSentAhead: inside a client's transaction the mirrored writes
// are sent to the secondary ahead, without waiting for each reply, and
// applied there before the primary commits (design section 3). The stores
// are equal when each COMMIT returns, in both protocols, across a
// savepoint rolled back to and with a table without a key; a rolled-back transaction changes neither; a
// write the secondary refuses mid-transaction fails nothing for the client,
// and every key of its transaction is in the ledger when the COMMIT
// returns; afterwards the session mirrors in lockstep again.
func TestMirrorSentAhead(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE ah (id int PRIMARY KEY, v text); CREATE TABLE ahlog (id int, at text)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	c := e.client()
	run := func(mode pgx.QueryExecMode, sqls ...string) {
		t.Helper()
		for _, s := range sqls {
			if _, err := c.Exec(ctx, s, mode); err != nil {
				t.Fatalf("%s: %v", s, err)
			}
		}
	}
	for i, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeExec} {
		b := i * 10
		run(mode, "BEGIN",
			fmt.Sprintf("INSERT INTO ah VALUES (%d, 'a'), (%d, 'b')", b+1, b+2),
			fmt.Sprintf("UPDATE ah SET v = v || '!' WHERE id = %d", b+1),
			"SAVEPOINT s1",
			fmt.Sprintf("INSERT INTO ah VALUES (%d, 'gone')", b+3),
			"ROLLBACK TO SAVEPOINT s1",
			fmt.Sprintf("DELETE FROM ah WHERE id = %d", b+2),
			fmt.Sprintf("SELECT v FROM ah WHERE id = %d", b+1),
			fmt.Sprintf("INSERT INTO ahlog VALUES (%d, 'no key: its text is sent ahead')", b+1),
			fmt.Sprintf("INSERT INTO ah VALUES (%d, 'c')", b+4),
			"COMMIT")
		e.assertLockstep(fmt.Sprintf("a transaction sent ahead (mode %v)", mode))
	}
	run(pgx.QueryExecModeSimpleProtocol, "BEGIN", "INSERT INTO ah VALUES (50, 'rolled back')", "UPDATE ah SET v = 'no' WHERE id = 1", "ROLLBACK")
	e.assertLockstep("a rolled-back transaction")

	if err := e.new.Exec(ctx, e.db, `ALTER TABLE ah ADD CONSTRAINT small CHECK (id < 100)`); err != nil {
		t.Fatal(err)
	}
	run(pgx.QueryExecModeExec, "BEGIN", "INSERT INTO ah VALUES (100, 'refused')",
		"INSERT INTO ah VALUES (60, 'after')", "UPDATE ah SET v = 'x' WHERE id = 1", "COMMIT")
	d := e.openEntries()
	for _, key := range []string{"{100}", "{60}", "{1}"} {
		found := false
		for _, l := range d {
			found = found || strings.HasPrefix(l, "ah "+key+" ")
		}
		if !found {
			t.Errorf("no open drift entry for key %s of the transaction the secondary refused: %v", key, d)
		}
	}
	if err := e.new.Exec(ctx, e.db, `ALTER TABLE ah DROP CONSTRAINT small`); err != nil {
		t.Fatal(err)
	}
	e.assertLedger("a write sent ahead that the secondary refused", "ah")
	run(pgx.QueryExecModeExec, "BEGIN", "INSERT INTO ah VALUES (70, 'again')", "UPDATE ah SET v = 'y' WHERE id = 60", "COMMIT")
	e.assertLockstep("the transaction after the refused one")
}
