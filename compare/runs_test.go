package compare

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/table"
)

// control is the connection config of the pair's control database, the
// old store's.
func (p *pair) control() *pgx.ConnConfig {
	p.t.Helper()
	cfg, err := pgx.ParseConfig(oldStore.DSN(p.db))
	if err != nil {
		p.t.Fatal(err)
	}
	return cfg
}

func (p *pair) scalar(sql string, dst any, args ...any) {
	p.t.Helper()
	if err := p.old.QueryRow(context.Background(), sql, args...).Scan(dst); err != nil {
		p.t.Fatalf("%s: %v", sql, err)
	}
}

const itemsSchema = `CREATE TABLE items (id bigint PRIMARY KEY, name text, price numeric(10,2));
	INSERT INTO items SELECT g, 'n' || g, g * 1.5 FROM generate_series(1, 5000) g;`

// TestResume interrupts a verify after four ranges, checks the run is
// recorded as interrupted at its checkpoint, resumes it and checks that
// the resumed run walks only the ranges after the checkpoint and ends with
// the totals of a fresh run. The range walk is what resumes (the
// whole-table pass is one query per store, begun again), so the test asks
// for it.
func TestResume(t *testing.T) {
	p := newPair(t, itemsSchema, itemsSchema+`DELETE FROM items WHERE id = 100; UPDATE items SET name = 'x' WHERE id = 3000;`)
	m := p.mapping(nil, "items")
	opts := Options{Batch: 500, Leaf: 16, Control: p.control(), RangesOnly: true}
	fresh, err := Table(t.Context(), p.old, p.new, m, opts)
	if err != nil || fresh.Differences() != 2 || fresh.RunID == 0 {
		t.Fatalf("fresh: %+v, %v", fresh, err)
	}

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	o := opts
	o.Progress = func(pr Progress) {
		if pr.Ranges == 4 {
			cancel()
		}
	}
	s, err := Table(ctx, p.old, p.new, m, o)
	if !errors.Is(err, context.Canceled) || s.Ranges != 4 || s.Rows != 2000 {
		t.Fatalf("interrupted: %+v, %v", s, err)
	}
	var status string
	var cp []string
	var ranges int
	if err := p.old.QueryRow(t.Context(), "SELECT status, checkpoint, ranges FROM tandem.verify_runs WHERE id = $1", s.RunID).Scan(&status, &cp, &ranges); err != nil {
		t.Fatal(err)
	}
	if status != "interrupted" || !slices.Equal(cp, []string{"2000"}) || ranges != 4 {
		t.Fatalf("interrupted run: status %s, checkpoint %v, ranges %d", status, cp, ranges)
	}

	var calls []Progress
	o = opts
	o.Resume = true
	o.Progress = func(pr Progress) { calls = append(calls, pr) }
	r, err := Table(t.Context(), p.old, p.new, m, o)
	if err != nil || !r.Resumed || r.RunID != s.RunID {
		t.Fatalf("resumed: %+v, %v", r, err)
	}
	if r.Rows != fresh.Rows || r.Ranges != fresh.Ranges || r.Counts[MissingOnNew] != 1 || r.Counts[ValueDiff] != 1 || r.Differences() != 2 {
		t.Fatalf("resumed totals %+v, fresh %+v", r, fresh)
	}
	// The first call reports where the run resumed; each later one a range
	// after the checkpoint.
	if len(calls) == 0 || calls[0].Ranges != 4 || calls[0].Rows != 2000 || len(calls)-1 != fresh.Ranges-4 {
		t.Fatalf("resumed walk: %d progress calls, first %+v; fresh run has %d ranges", len(calls), calls[0], fresh.Ranges)
	}
	if got(r) == nil || !slices.Equal(got(r), []string{"ValueDiff 3000"}) {
		t.Errorf("resumed session's differences = %q", got(r))
	}
	if err := p.old.QueryRow(t.Context(), "SELECT status FROM tandem.verify_runs WHERE id = $1", r.RunID).Scan(&status); err != nil || status != "done" {
		t.Fatalf("status %s, %v", status, err)
	}
	// The latest run is done: resuming starts a new one.
	n, err := Table(t.Context(), p.old, p.new, m, o)
	if err != nil || n.Resumed || n.RunID == r.RunID || n.Ranges != fresh.Ranges {
		t.Fatalf("after done: %+v, %v", n, err)
	}
}

// TestResumeBucketed interrupts a verify in its bucketed pass (as it
// confirms what the key buckets found) and resumes it: the passes begin
// again, find the same differences, and the run ends done.
func TestResumeBucketed(t *testing.T) {
	p := newPair(t, itemsSchema, itemsSchema+`DELETE FROM items WHERE id = 100; UPDATE items SET name = 'x' WHERE id = 3000;`)
	m := p.mapping(nil, "items")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	opts := Options{Control: p.control(), Knobs: &TestingKnobs{BeforeConfirm: func([]Difference) { cancel() }}}
	s, err := Table(ctx, p.old, p.new, m, opts)
	if !errors.Is(err, context.Canceled) || s.Differences() != 0 {
		t.Fatalf("interrupted: %+v, %v", s, err)
	}
	// The cancellation may have closed the pair's connections.
	p.old, p.new = harness.Connect(t, oldStore, p.db), harness.Connect(t, newStore, p.db)
	var status string
	p.scalar("SELECT status FROM tandem.verify_runs WHERE id = $1", &status, s.RunID)
	if status != "interrupted" {
		t.Fatalf("interrupted run: status %s", status)
	}
	opts.Resume, opts.Knobs = true, nil
	r, err := Table(t.Context(), p.old, p.new, m, opts)
	if err != nil || !r.Resumed || r.RunID != s.RunID || r.Buckets == 0 || r.Rows != 5000 {
		t.Fatalf("resumed: %+v, %v", r, err)
	}
	if g := got(r); !slices.Equal(g, []string{"MissingOnNew 100", "ValueDiff 3000"}) {
		t.Fatalf("resumed differences = %q", g)
	}
	p.scalar("SELECT status FROM tandem.verify_runs WHERE id = $1", &status, r.RunID)
	if status != "done" {
		t.Fatalf("resumed run: status %s", status)
	}
}

// TestVerifyLock: a verify of a table whose run another session holds is
// refused (after the lock's 2s wait), and goes ahead once that session
// has let go.
func TestVerifyLock(t *testing.T) {
	p := newPair(t, itemsSchema, itemsSchema)
	m := p.mapping(nil, "items")
	holder := harness.Connect(t, oldStore, p.db)
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_lock(hashtext('tandem.verify public.items'))"); err != nil {
		t.Fatal(err)
	}
	opts := Options{Control: p.control()}
	if _, err := Table(t.Context(), p.old, p.new, m, opts); err == nil || !strings.Contains(err.Error(), "another tandem compare is verifying this table") {
		t.Fatalf("verify beside a running one: %v", err)
	}
	if _, err := holder.Exec(t.Context(), "SELECT pg_advisory_unlock(hashtext('tandem.verify public.items'))"); err != nil {
		t.Fatal(err)
	}
	if s, err := Table(t.Context(), p.old, p.new, m, opts); err != nil || !s.Clean() {
		t.Fatalf("verify after the other let go: %+v, %v", s, err)
	}
}

// TestRate checks that the verify consults the rate limiter after every
// range but the last, for the range's rows.
func TestRate(t *testing.T) {
	schema := `CREATE TABLE items (id bigint PRIMARY KEY, name text);
		INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 3000) g;`
	p := newPair(t, schema, schema)
	var calls, rows int
	opts := Options{Batch: 500, Rate: 2000, Knobs: &TestingKnobs{BeforePace: func(n int) { calls++; rows += n }}}
	s, err := Table(t.Context(), p.old, p.new, p.mapping(nil, "items"), opts)
	if err != nil || !s.Clean() {
		t.Fatalf("%+v, %v", s, err)
	}
	if calls != s.Ranges-1 || rows != 3000 {
		t.Fatalf("limiter consulted %d times for %d rows; want %d times for 3000", calls, rows, s.Ranges-1)
	}
	// A shared limiter is used as given.
	lim := NewLimiter(1e6, 500)
	calls, rows = 0, 0
	opts.Limiter = lim
	if _, err := Table(t.Context(), p.old, p.new, p.mapping(nil, "items"), opts); err != nil || calls != s.Ranges-1 {
		t.Fatalf("shared limiter: %d calls, %v", calls, err)
	}
	if lim.Tokens() > 1e6 {
		t.Fatal("shared limiter not used")
	}
}

// TestLastRuns checks the cutover gate's view of the runs: nothing before
// any verify, then the latest done run per table, clean or not.
func TestLastRuns(t *testing.T) {
	p := newPair(t, itemsSchema, itemsSchema+`UPDATE items SET name = 'x' WHERE id = 7;`)
	runs, err := LastRuns(t.Context(), p.old)
	if err != nil || len(runs) != 0 {
		t.Fatalf("before any verify: %v, %v", runs, err)
	}
	m := p.mapping(nil, "items")
	opts := Options{Batch: 1000, Control: p.control()}
	s, err := Table(t.Context(), p.old, p.new, m, opts)
	if err != nil {
		t.Fatal(err)
	}
	items := table.Name{Schema: "public", Table: "items"}
	runs, err = LastRuns(t.Context(), p.old)
	r := runs[items]
	if err != nil || r.ID != s.RunID || r.Clean || r.Diffs != 1 || r.Rows != 5000 || r.NewTable != items || r.Finished.IsZero() {
		t.Fatalf("unclean: %+v, %v", runs, err)
	}
	opts.Repair = true
	s, err = Table(t.Context(), p.old, p.new, m, opts)
	if err != nil {
		t.Fatal(err)
	}
	// An interrupted run is not done: the gate still sees the repair run.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := Table(ctx, p.old, p.new, m, Options{Control: p.control()}); err == nil {
		t.Fatal("cancelled verify succeeded")
	}
	runs, err = LastRuns(t.Context(), p.old)
	r = runs[items]
	if err != nil || r.ID != s.RunID || !r.Clean || r.Diffs != 1 || r.Repaired != 1 {
		t.Fatalf("repaired: %+v, %v", runs, err)
	}
}

// TestDriftFirst records drift entries for some keys, checks that compare
// verifies them before the walk without reporting a key twice, that
// --repair repairs them, marks their entries repaired and logs the repairs
// in the migration log with source 'compare', and that other entries stay
// open.
func TestDriftFirst(t *testing.T) {
	p := newPair(t, itemsSchema, itemsSchema+`UPDATE items SET name = 'x' WHERE id IN (10, 4000); DELETE FROM items WHERE id = 20;`)
	if err := table.EnsureSchema(t.Context(), p.old); err != nil {
		t.Fatal(err)
	}
	items := table.Name{Schema: "public", Table: "items"}
	err := table.RecordDrift(t.Context(), p.old, []table.DriftEntry{
		{Table: items, Key: []string{"10"}}, {Table: items, Key: []string{"20"}}, {Table: items, Key: []string{"30"}},
		{Table: items, Key: []string{"10"}}, // twice: checked once
		{Table: items},                      // the whole table
		{Table: items, Key: []string{"40"}, Stale: table.StaleOld},
		{Table: table.Name{Schema: "public", Table: "other"}, Key: []string{"1"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	m := p.mapping(nil, "items")
	opts := Options{Batch: 1000, Leaf: 8, Control: p.control()}
	s, err := Table(t.Context(), p.old, p.new, m, opts)
	want := []string{"MissingOnNew 20", "ValueDiff 10", "ValueDiff 4000"}
	if err != nil || s.DriftKeys != 3 || !slices.Equal(got(s), want) || s.Differences() != 3 {
		t.Fatalf("verify: %+v, %v", s, err)
	}
	var open int
	p.scalar("SELECT count(*) FROM tandem.drift WHERE repaired_at IS NULL", &open)
	if open != 7 {
		t.Fatalf("open drift entries after a verify = %d, want 7", open)
	}

	opts.Repair = true
	s, err = Table(t.Context(), p.old, p.new, m, opts)
	if err != nil || s.DriftKeys != 3 || !slices.Equal(got(s), want) || s.Repaired != 3 || !s.Clean() {
		t.Fatalf("repair: %+v, %v", s, err)
	}
	var still []string
	rows, err := p.old.Query(t.Context(), "SELECT table_name || ':' || coalesce(array_to_string(key, ','), '*') || ':' || stale FROM tandem.drift WHERE repaired_at IS NULL ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var e string
		if err := rows.Scan(&e); err != nil {
			t.Fatal(err)
		}
		still = append(still, e)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(still, []string{"items:*:new", "items:40:old", "other:1:new"}) {
		t.Fatalf("open after repair: %q", still)
	}
	type logRow struct {
		lo, hi []string
		rows   int64
	}
	var logs []logRow
	rows, err = p.old.Query(t.Context(), "SELECT lo, hi, rows FROM tandem.migration_log WHERE source = 'compare' AND status = 'repaired' AND table_name = 'items' ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var l logRow
		if err := rows.Scan(&l.lo, &l.hi, &l.rows); err != nil {
			t.Fatal(err)
		}
		logs = append(logs, l)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if len(logs) != 2 || !slices.Equal(logs[0].lo, []string{"10"}) || !slices.Equal(logs[0].hi, []string{"30"}) || logs[0].rows != 3 ||
		!slices.Equal(logs[1].lo, []string{"4000"}) || logs[1].rows != 1 {
		t.Fatalf("migration log: %+v", logs)
	}
	s, err = Table(t.Context(), p.old, p.new, m, Options{Control: p.control()})
	if err != nil || s.Differences() != 0 || s.DriftKeys != 0 {
		t.Fatalf("after repair: %+v, %v", s, err)
	}
}
