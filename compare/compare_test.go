package compare

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/table"
)

var oldStore, newStore *pgtest.Cluster

func TestMain(m *testing.M) {
	os.Exit(harness.Run(m, harness.Clusters(&oldStore, &newStore)))
}

// pair is one test's database on both clusters.
type pair struct {
	t        *testing.T
	db       string
	old, new *pgx.Conn
}

func newPair(t *testing.T, oldSchema, newSchema string) *pair {
	t.Helper()
	name := harness.NewDBs(t, "", oldStore, newStore)
	p := &pair{t: t, db: name}
	for _, c := range []struct {
		cl     *pgtest.Cluster
		schema string
		conn   **pgx.Conn
	}{{oldStore, oldSchema, &p.old}, {newStore, newSchema, &p.new}} {
		if err := c.cl.Exec(t.Context(), name, c.schema); err != nil {
			t.Fatal(err)
		}
		*c.conn = harness.Connect(t, c.cl, name)
	}
	return p
}

func (p *pair) exec(conn *pgx.Conn, sql string) {
	p.t.Helper()
	if _, err := conn.Exec(context.Background(), sql); err != nil {
		p.t.Fatalf("%s: %v", sql, err)
	}
}

func (p *pair) mapping(decl map[string]config.TableMap, old string) *table.Mapping {
	p.t.Helper()
	ms, _, err := table.LoadMappings(context.Background(), config.Tables{Map: decl}, p.old, p.new)
	if err != nil {
		p.t.Fatal(err)
	}
	m := ms.ForOld(table.Name{Schema: "public", Table: old})
	if m == nil {
		p.t.Fatalf("no mapping for %s", old)
	}
	return m
}

// got renders the differences as "Kind key" lines, sorted.
func got(s TableSummary) []string {
	var out []string
	for _, d := range s.Diffs {
		out = append(out, string(d.Kind)+" "+strings.Join(d.Key, ","))
	}
	slices.Sort(out)
	return out
}

// TestPlantedDifferences plants one changed value, three deletes and two
// inserts directly on new, and checks that compare reports exactly those
// keys with their kinds, that --repair fixes them, and that a second
// compare is clean. Small ranges and leaves make it bisect.
func TestPlantedDifferences(t *testing.T) {
	for _, textHash := range []bool{false, true} {
		t.Run(fmt.Sprintf("text_hash=%v", textHash), func(t *testing.T) { testPlanted(t, &TestingKnobs{TextHash: textHash}) })
	}
}

// testPlanted plants each kind of difference, with both row hashes (the
// json column has no hash function: it is hashed as text).
func testPlanted(t *testing.T, knobs *TestingKnobs) {
	schema := `CREATE TABLE items (id bigint PRIMARY KEY, name text, price numeric(10,2), at timestamptz, doc json);`
	fill := `INSERT INTO items SELECT g, 'n' || g, g * 1.5, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 minute', json_build_object('g', g) FROM generate_series(1, 5000) g;`
	p := newPair(t, schema+fill, schema+fill)
	m := p.mapping(nil, "items")
	opts := Options{Batch: 700, Leaf: 16, Knobs: knobs}
	s, err := Table(t.Context(), p.old, p.new, m, opts)
	if err != nil || !s.Clean() || len(s.Diffs) != 0 || s.Rows != 5000 {
		t.Fatalf("identical tables: %+v, %v", s, err)
	}
	if s.Ranges != 1 || !s.WholeTable {
		t.Errorf("ranges = %d, whole table %v: want the one whole-table pass", s.Ranges, s.WholeTable)
	}
	ro := opts
	ro.RangesOnly = true
	if s, err := Table(t.Context(), p.old, p.new, m, ro); err != nil || !s.Clean() || s.Ranges != 8 || s.WholeTable || s.Rows != 5000 {
		t.Fatalf("ranges only: %+v, %v", s, err)
	}
	p.exec(p.new, `UPDATE items SET name = 'changed' WHERE id = 2500; UPDATE items SET doc = '{"g": 0}' WHERE id = 2600;
		DELETE FROM items WHERE id IN (1, 1400, 5000);
		INSERT INTO items VALUES (0, 'extra', 1, now()), (9001, 'extra', 2, now())`)
	s, err = Table(t.Context(), p.old, p.new, m, opts)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"MissingOnNew 1", "MissingOnNew 1400", "MissingOnNew 5000", "MissingOnOld 0", "MissingOnOld 9001", "ValueDiff 2500", "ValueDiff 2600"}
	if g := got(s); !slices.Equal(g, want) {
		t.Fatalf("differences = %q, want %q", g, want)
	}
	if s.Counts[MissingOnNew] != 3 || s.Counts[MissingOnOld] != 2 || s.Counts[ValueDiff] != 2 || s.Clean() {
		t.Errorf("summary = %+v", s)
	}
	opts.Repair = true
	s, err = Table(t.Context(), p.old, p.new, m, opts)
	if err != nil || s.Repaired != 7 || !s.Clean() {
		t.Fatalf("repair: %+v, %v", s, err)
	}
	s, err = Table(t.Context(), p.old, p.new, m, Options{Knobs: knobs})
	if err != nil || len(s.Diffs) != 0 || !s.Clean() {
		t.Fatalf("after repair: %+v, %v", s, err)
	}
}

// TestMappedTable verifies users on old against accounts on new, whose
// full_name is computed, with one changed row.
func TestMappedTable(t *testing.T) {
	p := newPair(t,
		`CREATE TABLE users (id int PRIMARY KEY, first_name text, last_name text, email varchar(50), legacy_flag bool);
		INSERT INTO users SELECT g, 'F' || g, 'L' || g, g || '@example.org', g % 2 = 0 FROM generate_series(1, 300) g;`,
		`CREATE TABLE accounts (id int PRIMARY KEY, full_name text, email text, created_at timestamptz DEFAULT now());
		INSERT INTO accounts (id, full_name, email) SELECT g, 'F' || g || ' L' || g, g || '@example.org' FROM generate_series(1, 300) g;`)
	decl := map[string]config.TableMap{"users": {
		To:      "accounts",
		Drop:    []string{"legacy_flag"},
		Compute: map[string]string{"full_name": "first_name || ' ' || last_name"},
		Reverse: map[string]string{
			"first_name": "split_part(full_name, ' ', 1)",
			"last_name":  "substr(full_name, length(split_part(full_name, ' ', 1)) + 2)",
		},
	}}
	m := p.mapping(decl, "users")
	opts := Options{Batch: 100, Leaf: 8}
	s, err := Table(t.Context(), p.old, p.new, m, opts)
	if err != nil || len(s.Diffs) != 0 || s.Rows != 300 {
		t.Fatalf("identical: %+v, %v", s, err)
	}
	p.exec(p.new, `UPDATE accounts SET full_name = 'Someone Else' WHERE id = 123`)
	opts.Repair = true
	s, err = Table(t.Context(), p.old, p.new, m, opts)
	if err != nil || !slices.Equal(got(s), []string{"ValueDiff 123"}) || s.Repaired != 1 || s.NewTable != "public.accounts" {
		t.Fatalf("mapped: %+v, %v", s, err)
	}
	var name string
	if err := p.new.QueryRow(t.Context(), "SELECT full_name FROM accounts WHERE id = 123").Scan(&name); err != nil || name != "F123 L123" {
		t.Fatalf("repaired full_name = %q, %v", name, err)
	}
	s, err = Table(t.Context(), p.old, p.new, m, Options{})
	if err != nil || len(s.Diffs) != 0 {
		t.Fatalf("after repair: %+v, %v", s, err)
	}
}

// TestCompositeKeyAndNoKey checks a two-column key and that a table
// without a key is skipped with ErrNotComparable.
func TestCompositeKeyAndNoKey(t *testing.T) {
	schema := `CREATE TABLE lines (o int, n int, qty int, PRIMARY KEY (o, n));
		INSERT INTO lines SELECT g / 10, g % 10, g FROM generate_series(1, 2000) g;
		CREATE TABLE heap (v int);`
	p := newPair(t, schema, schema)
	p.exec(p.new, `DELETE FROM lines WHERE o = 7 AND n = 3; UPDATE lines SET qty = 0 WHERE o = 150 AND n = 1`)
	s, err := Table(t.Context(), p.old, p.new, p.mapping(nil, "lines"), Options{Batch: 300, Leaf: 4})
	if err != nil || !slices.Equal(got(s), []string{"MissingOnNew 7,3", "ValueDiff 150,1"}) {
		t.Fatalf("composite: %+v, %v", s, err)
	}
	s, err = Table(t.Context(), p.old, p.new, p.mapping(nil, "heap"), Options{})
	if !errors.Is(err, ErrNotComparable) || s.Skipped == "" {
		t.Fatalf("no key: %+v, %v", s, err)
	}
}

// TestVerifyThroughput measures a clean verify of 200k rows.
func TestVerifyThroughput(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	schema := `CREATE TABLE big (id bigint PRIMARY KEY, name text, n int, at timestamptz);
		INSERT INTO big SELECT g, md5(g::text), g % 1000, '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, 200000) g;
		ANALYZE big;`
	p := newPair(t, schema, schema)
	start := time.Now()
	s, err := Table(t.Context(), p.old, p.new, p.mapping(nil, "big"), Options{})
	if err != nil || len(s.Diffs) != 0 || s.Rows != 200000 {
		t.Fatalf("%+v, %v", s, err)
	}
	t.Logf("clean verify of %d rows in %d ranges: %v, %.0f rows/s", s.Rows, s.Ranges, time.Since(start), float64(s.Rows)/time.Since(start).Seconds())
}

// TestInFlightWrite: a write committed on the primary and still
// uncommitted on the secondary (a mirror in flight) is not reported: the
// re-check holds the primary's table and waits for the secondary's open
// write to commit. A write that never lands is reported once Settle has
// passed. Both directions: old primary, and new primary after a flip; and
// both passes that find differences: the range walk and the key buckets
// hashed after a whole-table pass that disagreed.
func TestInFlightWrite(t *testing.T) {
	for _, primaryNew := range []bool{false, true} {
		for _, rangesOnly := range []bool{true, false} {
			t.Run(fmt.Sprintf("primary_new=%v/ranges_only=%v", primaryNew, rangesOnly), func(t *testing.T) { testInFlight(t, primaryNew, rangesOnly) })
		}
	}
}

func testInFlight(t *testing.T, primaryNew, rangesOnly bool) {
	schema := `CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;`
	p := newPair(t, schema, schema)
	m := p.mapping(nil, "items")
	ctx := t.Context()
	primary, secondary, missing := p.old, newStore, "MissingOnNew"
	if primaryNew {
		primary, secondary, missing = p.new, oldStore, "MissingOnOld"
	}
	mirror, err := pgx.Connect(ctx, secondary.DSN(p.db))
	if err != nil {
		t.Fatal(err)
	}
	defer mirror.Close(context.Background())
	for _, commit := range []bool{true, false} {
		id := 200
		if !commit {
			id = 201
		}
		tx, err := mirror.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO items VALUES ($1, 'late')", id); err != nil {
			t.Fatal(err)
		}
		p.exec(primary, fmt.Sprintf("INSERT INTO items VALUES (%d, 'late')", id))
		// The mirror commits while the verify re-checks the difference it
		// saw (within Settle), not at a time a loaded machine may not meet.
		seen := make(chan struct{})
		var once sync.Once
		knobs := &TestingKnobs{BeforeConfirm: func([]Difference) { once.Do(func() { close(seen) }) }}
		done := make(chan struct{})
		go func() {
			defer close(done)
			select {
			case <-seen:
			case <-time.After(30 * time.Second):
			}
			time.Sleep(100 * time.Millisecond)
			if commit {
				_ = tx.Commit(context.Background())
			}
		}()
		s, err := Table(ctx, p.old, p.new, m, Options{Settle: 2 * time.Second, RangesOnly: rangesOnly, PrimaryNew: primaryNew, Knobs: knobs})
		<-done
		if !commit {
			_ = tx.Rollback(context.Background())
		}
		if err != nil {
			t.Fatal(err)
		}
		if commit && (len(s.Diffs) != 0 || s.Transient != 1) {
			t.Fatalf("a mirror in flight was reported: %+v", s)
		}
		if !commit && !slices.Equal(got(s), []string{fmt.Sprintf("%s %d", missing, id)}) {
			t.Fatalf("a write that never reached the secondary: %+v", s)
		}
	}
}

// TestSwappedValues: two rows that swapped a column's values differ. With
// one seed for every row, a range's sum of hash_record_extended is a sum
// of per-column sums and the swap hashed equal: the whole-table pass (and
// every range) called the table clean. Both row hashes, composite and
// single keys.
func TestSwappedValues(t *testing.T) {
	for _, textHash := range []bool{false, true} {
		t.Run(fmt.Sprintf("text_hash=%v", textHash), func(t *testing.T) {
			schema := `CREATE TABLE s (id int PRIMARY KEY, v text, n numeric);
				INSERT INTO s SELECT g, 'v' || g, g FROM generate_series(1, 300) g;
				CREATE TABLE c (a text, b int, v text, PRIMARY KEY (a, b));
				INSERT INTO c SELECT 'k' || (g % 7), g, 'v' || g FROM generate_series(1, 300) g;`
			p := newPair(t, schema, schema)
			p.exec(p.new, `UPDATE s SET v = CASE id WHEN 10 THEN 'v20' ELSE 'v10' END, n = CASE id WHEN 10 THEN 20 ELSE 10 END WHERE id IN (10, 20);
				UPDATE c SET v = CASE b WHEN 3 THEN 'v200' ELSE 'v3' END WHERE b IN (3, 200)`)
			knobs := &TestingKnobs{TextHash: textHash}
			s, err := Table(t.Context(), p.old, p.new, p.mapping(nil, "s"), Options{Knobs: knobs})
			if err != nil || !slices.Equal(got(s), []string{"ValueDiff 10", "ValueDiff 20"}) {
				t.Fatalf("single key: %q, %+v, %v", got(s), s, err)
			}
			s, err = Table(t.Context(), p.old, p.new, p.mapping(nil, "c"), Options{Knobs: knobs, Leaf: 8, Batch: 50})
			if err != nil || !slices.Equal(got(s), []string{"ValueDiff k3,3", "ValueDiff k4,200"}) {
				t.Fatalf("composite key: %q, %+v, %v", got(s), s, err)
			}
		})
	}
}

// TestEdgesAndKeyTypes plants differences at the edges of the top-level
// ranges and of the subranges a differing range is split into (first and
// last keys, a range's last key, the key after it), NULLs against values,
// and keys before the first and after the last, for an integer, a text
// and a composite key, with both row hashes; and checks an empty and a
// one-row table. Each run must report exactly the planted keys with their
// kinds, whichever pass finds them: the key buckets hashed after the
// whole-table pass disagreed (record hashes), the range walk after buckets
// that held too many differing rows to fetch (FetchMax 1), and the walk
// alone.
func TestEdgesAndKeyTypes(t *testing.T) {
	for _, textHash := range []bool{false, true} {
		t.Run(fmt.Sprintf("text_hash=%v", textHash), func(t *testing.T) { testEdges(t, &TestingKnobs{TextHash: textHash}) })
	}
}

func testEdges(t *testing.T, knobs *TestingKnobs) {
	// 1000 rows; Batch 100 makes top-level ranges end at 100, 200, ...;
	// Leaf 10 splits a differing range into subranges of 10 rows.
	schema := `CREATE TABLE ik (id bigint PRIMARY KEY, v text, n numeric);
		INSERT INTO ik SELECT g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'v' || g END, g FROM generate_series(1, 1000) g;
		CREATE TABLE tk (k text PRIMARY KEY, v text);
		INSERT INTO tk SELECT lpad(g::text, 5, '0'), 'v' || g FROM generate_series(1, 1000) g;
		CREATE TABLE ck (a int, b text, v int, PRIMARY KEY (a, b));
		INSERT INTO ck SELECT g / 10, 'b' || (g % 10), g FROM generate_series(10, 1009) g;
		CREATE TABLE empty (id int PRIMARY KEY, v text);
		CREATE TABLE one (id int PRIMARY KEY, v text); INSERT INTO one VALUES (7, 'x');`
	p := newPair(t, schema, schema)
	opts := Options{Batch: 100, Leaf: 10, Knobs: knobs}
	for _, tb := range []string{"ik", "tk", "ck", "empty", "one"} {
		s, err := Table(t.Context(), p.old, p.new, p.mapping(nil, tb), opts)
		if err != nil || len(s.Diffs) != 0 || !s.Clean() {
			t.Fatalf("%s identical: %+v, %v", tb, s, err)
		}
	}
	p.exec(p.new, `
		DELETE FROM ik WHERE id IN (1, 100, 1000); UPDATE ik SET v = NULL WHERE id IN (101, 110); UPDATE ik SET v = 'x' WHERE id = 300;
		UPDATE ik SET n = NULL WHERE id = 111; INSERT INTO ik VALUES (0, 'new', 0), (1001, NULL, NULL), (-5, 'neg', 1);
		DELETE FROM tk WHERE k IN ('00001', '00200'); UPDATE tk SET v = NULL WHERE k IN ('00201', '00210', '01000');
		INSERT INTO tk VALUES ('', 'empty'), ('00200a', 'between'), ('zzz', NULL);
		DELETE FROM ck WHERE (a, b) IN ((1, 'b0'), (100, 'b9')); UPDATE ck SET v = NULL WHERE (a, b) = (50, 'b0');
		INSERT INTO ck VALUES (0, 'b0', 1), (50, 'b00', 2), (101, '', 3);
		INSERT INTO empty VALUES (1, NULL);
		UPDATE one SET v = NULL`)
	want := map[string][]string{
		"ik": {"MissingOnNew 1", "MissingOnNew 100", "MissingOnNew 1000", "MissingOnOld -5", "MissingOnOld 0", "MissingOnOld 1001",
			"ValueDiff 101", "ValueDiff 110", "ValueDiff 111", "ValueDiff 300"},
		"tk": {"MissingOnNew 00001", "MissingOnNew 00200", "MissingOnOld ", "MissingOnOld 00200a", "MissingOnOld zzz",
			"ValueDiff 00201", "ValueDiff 00210", "ValueDiff 01000"},
		"ck":    {"MissingOnNew 1,b0", "MissingOnNew 100,b9", "MissingOnOld 0,b0", "MissingOnOld 101,", "MissingOnOld 50,b00", "ValueDiff 50,b0"},
		"empty": {"MissingOnOld 1"},
		"one":   {"ValueDiff 7"},
	}
	for _, pass := range []struct {
		name            string
		rangesOnly      bool
		fetchMax        int
		bucketed, walks bool // the pass that must find them (record hashes)
	}{
		{name: "buckets", bucketed: true},
		{name: "whole then walk", fetchMax: 1, walks: true},
		{name: "ranges only", rangesOnly: true, walks: true},
	} {
		o := opts
		o.RangesOnly, o.FetchMax = pass.rangesOnly, pass.fetchMax
		for _, tb := range []string{"ik", "tk", "ck", "empty", "one"} {
			s, err := Table(t.Context(), p.old, p.new, p.mapping(nil, tb), o)
			if err != nil {
				t.Fatal(err)
			}
			if g := got(s); !slices.Equal(g, want[tb]) {
				t.Errorf("%s (%s): differences = %q, want %q", tb, pass.name, g, want[tb])
			}
			if s.Transient != 0 || s.Clean() {
				t.Errorf("%s (%s): %+v", tb, pass.name, s)
			}
			if knobs.TextHash {
				if s.Buckets != 0 {
					t.Errorf("%s (%s): text hashes bucketed: %+v", tb, pass.name, s)
				}
				continue
			}
			if pass.bucketed && (s.Buckets == 0 || s.Ranges != 1) {
				t.Errorf("%s (%s): not found by the key buckets: %+v", tb, pass.name, s)
			}
			// (A one-row difference fits FetchMax 1: the small tables may
			// be found either way.)
			if pass.walks && tb != "empty" && tb != "one" && (s.Buckets != 0 || s.Ranges < 10) {
				t.Errorf("%s (%s): not found by the range walk: %+v", tb, pass.name, s)
			}
		}
	}
}

// TestBucketPlan: the bucketed pass's GROUP BY is planned as a hash
// aggregate, never as a sort of every row (grouped directly, the planner
// expects a group per row; see bucketsSQL), and without JIT.
func TestBucketPlan(t *testing.T) {
	schema := `CREATE TABLE big (id bigint PRIMARY KEY, name text, n numeric, at timestamptz);
		INSERT INTO big SELECT g, md5(g::text), g, '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, 300000) g;
		ANALYZE big;`
	p := newPair(t, schema, schema)
	m := p.mapping(nil, "big")
	h, err := m.RecordHashSQL("old")
	if err != nil {
		t.Fatal(err)
	}
	seed, err := m.RecordHashSeedSQL("old")
	if err != nil {
		t.Fatal(err)
	}
	s := newSide(m.Old.Name, []table.Column{m.Old.Columns[m.Old.Key[0]]}, h, true)
	s.seed = seed
	tx, err := p.old.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(t.Context()) //nolint:errcheck // read-only
	// As on a server that sorts and compiles eagerly.
	if _, err := tx.Exec(t.Context(), "SET LOCAL jit_above_cost = 0; SET LOCAL work_mem = '256MB'; "+bucketSettings); err != nil {
		t.Fatal(err)
	}
	// The whole table, and one page range of it (pageScan), which must be
	// a TID range scan: a filter over a full scan would read every page on
	// every connection.
	for _, cond := range []string{"true", "t.ctid >= '(100,0)'::tid AND t.ctid < '(200,0)'::tid"} {
		rows, err := tx.Query(t.Context(), "EXPLAIN (VERBOSE) "+s.bucketsSQL(bucketCount(300000), cond))
		if err != nil {
			t.Fatal(err)
		}
		lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		got := strings.Join(lines, "\n")
		if strings.Contains(got, "Sort") || !strings.Contains(got, "HashAggregate") || strings.Contains(got, "JIT") {
			t.Fatalf("bucketed pass plan (%s):\n%s", cond, got)
		}
		if cond != "true" && !strings.Contains(got, "Tid Range Scan") {
			t.Fatalf("page range plan (%s):\n%s", cond, got)
		}
	}
}

// TestPageRanges: the bucketed pass hashes each store in page ranges on
// several connections, in one snapshot per store, and adds their partial
// sums per key bucket. A difference planted in each range (the table's
// rows are laid out in key order, four ranges of a quarter each) is found,
// so a range whose sums were dropped fails it; a clean table counts every
// row once, so a range counted twice (or a row seen in two ranges, as a
// scan outside one snapshot could, when an update moves it) fails it; and
// rows moved to the end of old's heap by updates, a layout new does not
// share, change nothing.
func TestPageRanges(t *testing.T) {
	schema := `CREATE TABLE pr (id bigint PRIMARY KEY, v text, n int) WITH (fillfactor = 100);
		INSERT INTO pr SELECT g, md5(g::text), g FROM generate_series(1, 20000) g;`
	p := newPair(t, schema+`UPDATE pr SET n = n WHERE id % 7 = 0;`, schema)
	m := p.mapping(nil, "pr")
	var ranges [2][]string
	opts := Options{Workers: 4, Knobs: &TestingKnobs{PageRanges: func(o, n []string) { ranges = [2][]string{o, n} }}}
	s, err := Table(t.Context(), p.old, p.new, m, opts)
	if err != nil || !s.Clean() || s.Rows != 20000 || s.Buckets == 0 || !s.WholeTable {
		t.Fatalf("identical tables: %+v, %v", s, err)
	}
	if len(ranges[0]) != 4 || len(ranges[1]) != 4 {
		t.Fatalf("page ranges = %q: want 4 on each store", ranges)
	}
	// Rows moved from the first range to the end of the heap (new row
	// versions) after the scan's snapshot, before its ranges are hashed:
	// every range sees them where the snapshot had them, once.
	writer := harness.Connect(t, oldStore, p.db)
	moved := opts
	moved.Knobs = &TestingKnobs{PageRanges: func(_, _ []string) {
		if _, err := writer.Exec(t.Context(), "UPDATE pr SET n = n WHERE id <= 3000"); err != nil {
			t.Error(err)
		}
	}}
	s, err = Table(t.Context(), p.old, p.new, m, moved)
	if err != nil || !s.Clean() || s.Rows != 20000 || !s.WholeTable || s.Transient != 0 {
		t.Fatalf("rows moved during the scan: %+v, %v", s, err)
	}
	p.exec(p.new, `UPDATE pr SET v = 'x' WHERE id IN (10, 6000, 11000, 19990); DELETE FROM pr WHERE id = 15000`)
	p.exec(p.old, `UPDATE pr SET v = 'y' WHERE id = 20000`)
	s, err = Table(t.Context(), p.old, p.new, m, opts)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"MissingOnNew 15000", "ValueDiff 10", "ValueDiff 11000", "ValueDiff 19990", "ValueDiff 20000", "ValueDiff 6000"}
	if g := got(s); !slices.Equal(g, want) || s.Buckets == 0 || s.Rows != 20000 {
		t.Fatalf("differences = %q, want %q (%+v)", g, want, s)
	}
}
