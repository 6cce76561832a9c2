package backfill

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

var oldStore, newStore *pgtest.Cluster

func TestMain(m *testing.M) {
	os.Exit(harness.Run(m, harness.Clusters(&oldStore, &newStore)))
}

// env is one test's database on both clusters, with the control schema on
// old and mirror on (unless the test turns it off).
type env struct {
	t        *testing.T
	db       string
	old, new *pgx.Conn
}

func newEnv(t *testing.T, schema string, mirror bool) *env {
	t.Helper()
	name := harness.DBName(t)
	e := &env{t: t, db: name}
	for _, c := range []*pgtest.Cluster{oldStore, newStore} {
		if err := c.CreateDatabase(t.Context(), name); err != nil {
			t.Fatal(err)
		}
		if err := c.Exec(t.Context(), name, schema); err != nil {
			t.Fatal(err)
		}
	}
	e.old, e.new = e.connect(oldStore), e.connect(newStore)
	if err := route.EnsureSchema(t.Context(), e.old); err != nil {
		t.Fatal(err)
	}
	if mirror {
		if _, err := route.Apply(t.Context(), e.old, route.Change{Next: route.Settings{Primary: route.Old, Mirror: true}, By: "test"}); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func (e *env) connect(c *pgtest.Cluster) *pgx.Conn {
	e.t.Helper()
	conn, err := pgx.Connect(context.Background(), c.DSN(e.db))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func (e *env) exec(conn *pgx.Conn, sql string) {
	e.t.Helper()
	if _, err := conn.Exec(context.Background(), sql); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

func (e *env) cfg(c *pgtest.Cluster) *pgx.ConnConfig {
	cc, err := pgx.ParseConfig(c.DSN(e.db))
	if err != nil {
		e.t.Fatal(err)
	}
	return cc
}

func (e *env) options(decl map[string]config.TableMap, tables ...string) Options {
	e.t.Helper()
	ms, probs, err := table.LoadMappings(context.Background(), config.Tables{Map: decl}, e.old, e.new)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, p := range probs {
		if !p.FlipOnly {
			e.t.Logf("mapping problem: %v", p)
		}
	}
	o := Options{Control: e.cfg(oldStore), Primary: e.cfg(oldStore), Secondary: e.cfg(newStore), Mappings: ms,
		Workers: 4, Chunk: 100, RangeRows: 500, Backoff: 20 * time.Millisecond, Poll: 10 * time.Millisecond, WorkerID: "test"}
	for _, n := range tables {
		o.Tables = append(o.Tables, table.Name{Schema: "public", Table: n})
	}
	return o
}

func run(t *testing.T, o Options) (Summary, error) {
	t.Helper()
	eng, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return eng.Run(t.Context())
}

func mustRun(t *testing.T, o Options) Summary {
	t.Helper()
	s, err := run(t, o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func text(t *testing.T, q *pgx.Conn, sql string) string {
	t.Helper()
	var s string
	if err := q.QueryRow(context.Background(), sql).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

// hash is an independent full-row hash of a table.
func hash(t *testing.T, q *pgx.Conn, tbl string) string {
	t.Helper()
	return text(t, q, "SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '') FROM "+tbl+" x")
}

func equalTables(t *testing.T, e *env, tbl string) {
	t.Helper()
	if a, b := hash(t, e.old, tbl), hash(t, e.new, tbl); a != b {
		t.Fatalf("%s differs: old %s, new %s", tbl, a, b)
	}
}

const itemsSchema = `CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int);`

func TestBackfillIdempotent(t *testing.T) {
	// Both paths: rows new holds before the backfill (stale, or absent on
	// old) are made equal to old's.
	for _, path := range []Path{PathLocked, PathSnapshot} {
		t.Run(string(path), func(t *testing.T) {
			e := newEnv(t, itemsSchema, true)
			e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g % 7 FROM generate_series(1, 3000) g`)
			e.exec(e.new, `INSERT INTO items VALUES (5, 'stale', 0), (999999, 'extra', 1)`)
			o := e.options(nil, "items")
			o.Path = path
			s := mustRun(t, o)
			equalTables(t, e, "items")
			if len(s.Tables) != 1 || s.Tables[0].Done != 3000 || s.Tables[0].Chunks < 2 || s.Failed {
				t.Fatalf("summary %+v", s)
			}
			// A unit per Chunk rows on the locked path, per chunk on the snapshot path.
			want := 30
			if path == PathSnapshot {
				want = s.Tables[0].Chunks
			}
			var units int
			if err := e.old.QueryRow(t.Context(), `SELECT count(*) FROM tandem.migration_log WHERE status = 'done'`).Scan(&units); err != nil || units < want {
				t.Fatalf("migration log: %d units, %v", units, err)
			}
			// A finished table is skipped; --restart copies it again to the same data.
			s = mustRun(t, o)
			if !strings.HasPrefix(s.Tables[0].Skipped, "finished") {
				t.Fatalf("second run did not skip: %+v", s.Tables[0])
			}
			o.Restart = true
			mustRun(t, o)
			equalTables(t, e, "items")
		})
	}
}

func TestBackfillSingleKeyAndRange(t *testing.T) {
	e := newEnv(t, itemsSchema, true)
	e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 500) g`)
	o := e.options(nil, "items")
	o.Key = []string{"42"}
	mustRun(t, o)
	if got := text(t, e.new, `SELECT string_agg(id::text, ',') FROM items`); got != "42" {
		t.Fatalf("--key copied %q, want 42", got)
	}
	o.Key = nil
	o.RangeLo, o.RangeHi = []string{"100"}, []string{"349"}
	mustRun(t, o)
	if got := text(t, e.new, `SELECT count(*) || ':' || min(id) || ':' || max(id) FROM items WHERE id <> 42`); got != "250:100:349" {
		t.Fatalf("--range copied %q, want 250 rows 100..349", got)
	}
}

func TestBackfillRefusesWithoutMirror(t *testing.T) {
	e := newEnv(t, itemsSchema, false)
	_, err := run(t, e.options(nil, "items"))
	if !errors.Is(err, ErrMirrorOff) || !strings.Contains(err.Error(), "tandem route set") {
		t.Fatalf("err = %v, want a refusal that says mirror is off", err)
	}
}

// TestBackfillBadRow: a row the new store rejects is logged with its key
// and error, and every other row is copied.
func TestBackfillBadRow(t *testing.T) {
	e := newEnv(t, itemsSchema, true)
	e.exec(e.new, `ALTER TABLE items ADD CONSTRAINT no13 CHECK (qty <> 13)`)
	e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, CASE WHEN g = 1234 THEN 13 ELSE 1 END FROM generate_series(1, 3000) g`)
	o := e.options(nil, "items")
	o.MaxAttempts = 2
	s, err := run(t, o)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Failed || s.Tables[0].FailedKeys != 1 || s.Tables[0].ChunksFailed != 1 {
		t.Fatalf("summary %+v, want one failed key in one failed chunk", s.Tables[0])
	}
	if got := text(t, e.new, `SELECT count(*) || ':' || count(*) FILTER (WHERE id = 1234) FROM items`); got != "2999:0" {
		t.Fatalf("new has %s rows:bad, want 2999:0", got)
	}
	fs, err := Report(t.Context(), e.old)
	if err != nil {
		t.Fatal(err)
	}
	if len(fs) != 1 || strings.Join(fs[0].Lo, ",") != "1234" || !strings.Contains(fs[0].Error, "no13") || fs[0].Attempts != 2 || fs[0].Fixed {
		t.Fatalf("report %+v", fs)
	}
	// Fix the row: the next run retries the failed chunk only.
	e.exec(e.old, `UPDATE items SET qty = 2 WHERE id = 1234`)
	s = mustRun(t, o)
	if s.Failed {
		t.Fatalf("summary %+v", s)
	}
	equalTables(t, e, "items")
	if fs, _ := Report(t.Context(), e.old); len(fs) != 1 || !fs[0].Fixed {
		t.Fatalf("report after the fix %+v", fs)
	}
}

// TestBackfillResume cancels a run mid-way, marks a chunk as claimed by a
// dead worker, and resumes: the result is equal and every chunk done.
func TestBackfillResume(t *testing.T) {
	e := newEnv(t, itemsSchema, true)
	e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 5000) g`)
	o := e.options(nil, "items")
	o.Workers = 2
	o.Rate = 5000
	eng, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { _, err := eng.Run(ctx); done <- err }()
	deadline := time.After(20 * time.Second)
	for wait := true; wait; {
		select {
		case <-deadline:
			t.Fatal("no progress")
		case <-time.After(10 * time.Millisecond):
			p := eng.Progress()
			wait = len(p) == 0 || p[0].Done < 1500
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled run: %v", err)
	}
	var left int
	if err := e.old.QueryRow(t.Context(), `SELECT count(*) FROM tandem.backfill_chunks WHERE status <> 'done'`).Scan(&left); err != nil || left == 0 {
		t.Fatalf("chunks left %d, %v", left, err)
	}
	// A claim whose worker died without rolling back is claimable again.
	e.exec(e.old, `UPDATE tandem.backfill_chunks SET status = 'running', claimed_by = 'dead' WHERE chunk = (SELECT max(chunk) FROM tandem.backfill_chunks)`)
	o.Rate = 0
	s := mustRun(t, o)
	equalTables(t, e, "items")
	if s.Tables[0].ChunksDone != s.Tables[0].Chunks || s.Tables[0].Done < 5000 {
		t.Fatalf("summary %+v", s.Tables[0])
	}
	// No gap, no repeat: every key is covered by exactly the checkpointed rows.
	if got := text(t, e.new, `SELECT sum(rows)::text FROM tandem.backfill_checkpoints`); got != "5000" {
		t.Fatalf("checkpoints count %s rows, want 5000", got)
	}
}

func TestBackfillCompositeUUIDMapped(t *testing.T) {
	schema := `CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
		CREATE TABLE tokens (id uuid PRIMARY KEY, v int);`
	e := newEnv(t, schema+`CREATE TABLE users (id int PRIMARY KEY, first_name text, last_name text);`, true)
	// users maps to accounts on new.
	e.exec(e.new, `DROP TABLE users; CREATE TABLE accounts (id int PRIMARY KEY, full_name text)`)
	e.exec(e.old, `INSERT INTO pairs SELECT g % 13, 'k' || g, 'v' || g FROM generate_series(1, 2000) g;
		INSERT INTO tokens SELECT md5(g::text)::uuid, g FROM generate_series(1, 2000) g;
		INSERT INTO users SELECT g, 'F' || g, 'L' || g FROM generate_series(1, 1500) g`)
	decl := map[string]config.TableMap{"users": {To: "accounts", Drop: []string{"first_name", "last_name"},
		Compute: map[string]string{"full_name": "first_name || ' ' || last_name"}}}
	o := e.options(decl, "pairs", "tokens", "users")
	s := mustRun(t, o)
	if s.Failed {
		t.Fatalf("summary %+v", s)
	}
	equalTables(t, e, "pairs")
	equalTables(t, e, "tokens")
	if got, want := text(t, e.new, `SELECT md5(string_agg(id || full_name, ',' ORDER BY id)) FROM accounts`),
		text(t, e.old, `SELECT md5(string_agg(id || first_name || ' ' || last_name, ',' ORDER BY id)) FROM users`); got != want {
		t.Fatal("accounts differ from users")
	}
}

// TestBackfillThrottle: --rate is honoured within 10% over 10 s.
func TestBackfillThrottle(t *testing.T) {
	e := newEnv(t, itemsSchema, true)
	e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 20000) g`)
	o := e.options(nil, "items")
	o.Rate = 2000
	// Small units: a unit's rows count as done when it commits and are
	// charged to the limiter after, so up to one unit per worker is
	// counted and not yet paid for, and which units are at either end of
	// the window moves the measured rate by up to that many rows over its
	// length. With 500-row units, 4 of them are 2000 rows, and 2310 rows/s
	// was measured in 1 run of 4 under -race; with 100-row units they are
	// 400 (about 2% of the window's rows).
	o.RangeRows = 100
	eng, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := eng.Run(t.Context()); done <- err }()
	// The rate is measured over the copy itself, from the moment 2000 rows
	// are in to the last row: a run's fixed costs (the snapshot path's
	// slot, its reconcile) are not rows and the limiter does not pace them.
	const from, total = 2000, 20000
	var t0, t1 time.Time
	var d0 int64
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for t1.IsZero() {
		select {
		case err := <-done:
			t.Fatalf("the run ended before its last row was seen: %v", err)
		case <-tick.C:
		}
		p := eng.Progress()
		if len(p) != 1 {
			continue
		}
		now := time.Now()
		if t0.IsZero() && p[0].Done >= from {
			t0, d0 = now, p[0].Done
		}
		if p[0].Done >= total {
			t1 = now
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := float64(total-d0) / t1.Sub(t0).Seconds()
	t.Logf("%d rows in %v: %.0f rows/s at --rate 2000", total-d0, t1.Sub(t0), got)
	if got > 2200 || got < 1800 {
		t.Fatalf("rate %.0f rows/s, want 2000 ± 10%%", got)
	}
}

// TestBackfillPause holds the copy while paused, on both paths.
func TestBackfillPause(t *testing.T) {
	for _, path := range []Path{PathLocked, PathSnapshot} {
		t.Run(string(path), func(t *testing.T) {
			e := newEnv(t, itemsSchema, true)
			e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 2000) g`)
			o := e.options(nil, "items")
			o.Path = path
			if path == PathSnapshot {
				o.Workers = 1 // 4 chunks of 500: a paused worker loads one
			}
			eng, err := New(o)
			if err != nil {
				t.Fatal(err)
			}
			eng.Pause()
			done := make(chan error, 1)
			go func() { _, err := eng.Run(t.Context()); done <- err }()
			select {
			case err := <-done:
				t.Fatalf("a paused run ended: %v", err)
			case <-time.After(500 * time.Millisecond):
			}
			// At most one unit per worker: Chunk rows locked, a chunk (RangeRows) from the snapshot.
			unit := int64(o.Chunk)
			if path == PathSnapshot {
				unit = int64(o.RangeRows)
			}
			if p := eng.Progress(); len(p) == 1 && p[0].Done > int64(o.Workers)*unit {
				t.Fatalf("paused run copied %d rows, want at most one unit per worker", p[0].Done)
			}
			if !eng.Throttle().Paused {
				t.Fatal("throttle does not say paused")
			}
			eng.Resume()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			equalTables(t, e, "items")
		})
	}
}

// TestBackfillWaitsForMirrorToSettle: a transaction open on old since
// before mirror turned on writes to old only; the backfill does not start
// while it is open (it would miss the write when it commits after the
// backfill's snapshot), nor while a live proxy replica has not
// acknowledged mirror=on. Once both have settled it runs, and the row is
// on new.
func TestBackfillWaitsForMirrorToSettle(t *testing.T) {
	e := newEnv(t, itemsSchema, false)
	e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 50) g`)
	late := e.connect(oldStore)
	tx, err := late.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(t.Context(), `INSERT INTO items VALUES (1000, 'late', 1)`); err != nil {
		t.Fatal(err)
	}
	st, err := route.Apply(t.Context(), e.old, route.Change{Next: route.Settings{Primary: route.Old, Mirror: true}, By: "test"})
	if err != nil {
		t.Fatal(err)
	}
	o := e.options(nil, "items")
	o.SettleTimeout = 500 * time.Millisecond
	if _, err := run(t, o); !errors.Is(err, ErrNotSettled) || !strings.Contains(err.Error(), "began before mirror=on") {
		t.Fatalf("err = %v, want a refusal naming the open transaction", err)
	}
	if err := tx.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
	// A live replica that has not acknowledged the version holds it too.
	e.exec(e.old, fmt.Sprintf(`INSERT INTO tandem.replicas (replica_id, acked_version) VALUES ('lagging', %d)`, st.Version-1))
	if _, err := run(t, o); !errors.Is(err, ErrNotSettled) || !strings.Contains(err.Error(), "lagging") {
		t.Fatalf("err = %v, want a refusal naming the lagging replica", err)
	}
	e.exec(e.old, fmt.Sprintf(`UPDATE tandem.replicas SET acked_version = %d WHERE replica_id = 'lagging'`, st.Version))
	mustRun(t, o)
	equalTables(t, e, "items")
}
