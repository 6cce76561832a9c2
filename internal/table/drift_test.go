package table

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

func TestDriftLedger(t *testing.T) {
	s := newStores(t)
	conn := s.primary()
	ctx := context.Background()
	// Idempotent, also when concurrent.
	var wg sync.WaitGroup
	for range 4 {
		c := s.primary()
		wg.Go(func() {
			if err := EnsureSchema(ctx, c); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if err := EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}

	if err := RecordDrift(ctx, conn, nil); err != nil {
		t.Fatal(err)
	}
	odd := []string{`a,b`, `"q"`, `{}`, `NULL`, ``, `\`, `ünï`}
	entries := []DriftEntry{
		{Table: hostile, Key: []string{"1", "x"}, Reason: "secondary timed out"},
		{Table: hostile, Key: odd, Reason: "odd key"},
		{Table: hostile, Reason: "ddl primary-only"},
		{Table: Name{"public", "t"}, Key: []string{"7"}, Reason: "breaker open"},
		{Table: Name{"public", "t"}, Key: []string{}, Reason: "empty key means the whole table"},
	}
	if err := RecordDrift(ctx, conn, entries); err != nil {
		t.Fatal(err)
	}
	rows, err := conn.Query(ctx, "SELECT schema_name, table_name, key, reason, attempts, repaired_at IS NULL FROM tandem.drift ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	type stored struct {
		Schema, Table string
		Key           []string
		Reason        string
		Attempts      int
		Open          bool
	}
	got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[stored])
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(entries) {
		t.Fatalf("%d entries stored", len(got))
	}
	for i, e := range entries {
		want := stored{e.Table.Schema, e.Table.Table, e.Key, e.Reason, 0, true}
		if len(e.Key) == 0 {
			want.Key = nil
		}
		if !reflect.DeepEqual(got[i], want) {
			t.Errorf("entry %d: got %+v, want %+v", i, got[i], want)
		}
	}
	open, err := OpenDrift(ctx, conn)
	if err != nil || !reflect.DeepEqual(open, map[Name]int{hostile: 3, {"public", "t"}: 2}) {
		t.Errorf("OpenDrift = %v, %v", open, err)
	}
	if n, err := OpenDriftTotal(ctx, conn); err != nil || n != 5 {
		t.Errorf("OpenDriftTotal = %d, %v", n, err)
	}
	if _, err := conn.Exec(ctx, "UPDATE tandem.drift SET repaired_at = now() WHERE table_name = 't'"); err != nil {
		t.Fatal(err)
	}
	open, err = OpenDrift(ctx, conn)
	if err != nil || !reflect.DeepEqual(open, map[Name]int{hostile: 3}) {
		t.Errorf("OpenDrift after repair = %v, %v", open, err)
	}

	// One statement: a failing batch records nothing.
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if err := RecordDrift(ctx, tx, []DriftEntry{{Table: hostile, Key: []string{"bad\x00"}}}); err == nil {
		t.Error("a key holding NUL was recorded")
	}
}

// TestRepair records drift for some keys of one table and the whole of
// another, repairs it, and checks that the tables are equal and the entries
// settled; an entry whose key does not fit stays open with its error.
func TestRepair(t *testing.T) {
	s := newStores(t)
	s.both(copySchema + `CREATE TABLE "Other Table" (id int PRIMARY KEY, v text); CREATE TABLE nokey (a int)`)
	s.new(noTriggers)
	var b strings.Builder
	b.WriteString(`INSERT INTO "Sch ""1""".parent VALUES (1), (2), (3);`)
	for i := 1; i <= 20; i++ {
		b.WriteString(row(i, "v"))
	}
	b.WriteString(`INSERT INTO "Other Table" SELECT i, 'v' || i FROM generate_series(1, 1200) i; INSERT INTO nokey VALUES (1), (2)`)
	s.old(b.String())
	s.new(`SET session_replication_role = replica;` + row(5, "stale") + row(99, "extra") +
		`INSERT INTO "Other Table" SELECT i, 'stale' FROM generate_series(1000, 1500) i; INSERT INTO nokey VALUES (3)`)
	control, primary, secondary := s.primary(), s.primary(), s.secondary()
	ctx := context.Background()
	if err := EnsureSchema(ctx, control); err != nil {
		t.Fatal(err)
	}
	var entries []DriftEntry
	for _, i := range []string{"3", "5", "7", "99"} {
		entries = append(entries, DriftEntry{Table: hostile, Key: []string{i, "n " + i}, Reason: "test"})
	}
	entries = append(entries,
		DriftEntry{Table: hostile, Key: []string{"1"}, Reason: "too short"},
		DriftEntry{Table: Name{"public", "Other Table"}, Key: []string{"5"}},
		DriftEntry{Table: Name{"public", "Other Table"}, Reason: "whole"},
		DriftEntry{Table: Name{"public", "nokey"}, Reason: "whole"},
		DriftEntry{Table: Name{"public", "gone"}, Key: []string{"1"}})
	if err := RecordDrift(ctx, control, entries); err != nil {
		t.Fatal(err)
	}
	n, err := Repair(ctx, control, primary, secondary, StaleNew, 100)
	if n != 7 {
		t.Errorf("repaired %d entries, want 7", n)
	}
	if err == nil || !strings.Contains(err.Error(), "has 1 values") || !strings.Contains(err.Error(), "public.gone") {
		t.Errorf("Repair error = %v, want the short key and the missing table", err)
	}
	for _, c := range []struct {
		n     Name
		order string
	}{{Name{"public", "Other Table"}, "id"}, {Name{"public", "nokey"}, "a"}} {
		sameTable(t, primary, secondary, c.n, c.order)
	}
	// Only the drifted keys of the hostile table were copied.
	var v string
	if err := secondary.QueryRow(ctx, `SELECT count(*) FROM `+hostile.Quoted()).Scan(&n); err != nil || n != 3 {
		t.Errorf("hostile table on the secondary has %d rows (%v), want 3 (5 and 3, 7 copied; 99 deleted)", n, err)
	}
	if err := secondary.QueryRow(ctx, `SELECT encode(b, 'escape') FROM `+hostile.Quoted()+` WHERE "Id" = 5`).Scan(&v); err != nil || !strings.HasSuffix(v, "v") {
		t.Errorf("row 5 on the secondary: %q %v", v, err)
	}
	open, err := OpenDrift(ctx, control)
	if err != nil || !reflect.DeepEqual(open, map[Name]int{hostile: 1, {"public", "gone"}: 1}) {
		t.Errorf("open drift after repair: %v %v", open, err)
	}
	var attempts int
	var lastErr string
	if err := control.QueryRow(ctx, "SELECT attempts, last_error FROM tandem.drift WHERE table_name = 'gone'").Scan(&attempts, &lastErr); err != nil ||
		attempts != 1 || !strings.Contains(lastErr, "does not exist") {
		t.Errorf("failed entry: attempts %d, last_error %q (%v)", attempts, lastErr, err)
	}
	// Nothing left that can be repaired: the failed entries stay open, and
	// are left alone until their backoff ends.
	if n, err := Repair(ctx, control, primary, secondary, StaleNew, 100); n != 0 || err != nil {
		t.Errorf("second Repair, in the backoff: %d, %v", n, err)
	}
	if _, err := control.Exec(ctx, "UPDATE tandem.drift SET next_attempt_at = now() WHERE repaired_at IS NULL"); err != nil {
		t.Fatal(err)
	}
	if n, err := Repair(ctx, control, primary, secondary, StaleNew, 100); n != 0 || err == nil {
		t.Errorf("third Repair, after the backoff: %d, %v", n, err)
	}
	if err := control.QueryRow(ctx, "SELECT attempts FROM tandem.drift WHERE table_name = 'gone'").Scan(&attempts); err != nil || attempts != 2 {
		t.Errorf("attempts %d (%v), want 2", attempts, err)
	}
}

// TestRepairIsolatesFailures is issue 10: drift on five ordinary tables,
// after an outage of the new store, next to entries that can never be
// repaired (a table that is gone, a row the new store's CHECK rejects).
// One pass repairs every other entry, the rejected row's neighbours in
// its own table included; the bad entries carry their error and attempts
// and sit in their backoff, so a later pass with a small limit is not
// starved by them; once due they are retried with a longer wait, capped.
func TestRepairIsolatesFailures(t *testing.T) {
	s := newStores(t)
	tables := []string{"t1", "t2", "t3", "t4", "t5"}
	var ddl, fill, stale strings.Builder
	for _, tb := range tables {
		fmt.Fprintf(&ddl, "CREATE TABLE %s (id int PRIMARY KEY, v text);", tb)
		fmt.Fprintf(&fill, "INSERT INTO %s SELECT i, 'good ' || i FROM generate_series(1, 20) i;", tb)
		fmt.Fprintf(&stale, "INSERT INTO %s SELECT i, 'good ' || i FROM generate_series(1, 10) i; INSERT INTO %[1]s VALUES (15, 'stale');", tb)
	}
	s.both(ddl.String() + "CREATE TABLE strict (id int PRIMARY KEY, v text)")
	s.new("ALTER TABLE strict ADD CHECK (v <> 'bad')")
	s.old(fill.String() + "INSERT INTO strict VALUES (1, 'ok 1'), (2, 'bad'), (3, 'ok 3')")
	s.new(stale.String())
	control, primary, secondary := s.primary(), s.primary(), s.secondary()
	ctx := context.Background()
	if err := EnsureSchema(ctx, control); err != nil {
		t.Fatal(err)
	}
	// The bad entries first: the oldest ids, where a claim starts.
	entries := []DriftEntry{{Table: Name{"public", "gone"}, Key: []string{"1"}}}
	for _, k := range []string{"1", "2", "3"} {
		entries = append(entries, DriftEntry{Table: Name{"public", "strict"}, Key: []string{k}})
	}
	for _, tb := range tables {
		for i := 11; i <= 20; i++ {
			entries = append(entries, DriftEntry{Table: Name{"public", tb}, Key: []string{fmt.Sprint(i)}, Reason: "new store down"})
		}
	}
	if err := RecordDrift(ctx, control, entries); err != nil {
		t.Fatal(err)
	}
	opts := RepairOptions{Target: StaleNew, Limit: 1000, Backoff: Backoff{Base: 10 * time.Second, Max: 30 * time.Second}}
	n, err := RepairWith(ctx, control, primary, secondary, opts)
	var ef *EntryFailures
	if n != 52 || !errors.As(err, &ef) || ef.Entries != 2 {
		t.Fatalf("RepairWith = %d, %v; want 52 repaired and the 2 bad entries' failures", n, err)
	}
	for _, tb := range tables {
		sameTable(t, primary, secondary, Name{"public", tb}, "id")
	}
	var got string
	if err := secondary.QueryRow(ctx, "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM strict").Scan(&got); err != nil || got != "1=ok 1,3=ok 3" {
		t.Errorf("strict on new: %q (%v), want rows 1 and 3 repaired", got, err)
	}
	type failed struct {
		Table    string
		Attempts int
		LastErr  string
		Wait     float64 // seconds until next_attempt_at
	}
	read := func() []failed {
		t.Helper()
		rows, err := control.Query(ctx, `SELECT table_name, attempts, coalesce(last_error, ''),
			extract(epoch FROM next_attempt_at - clock_timestamp())::float8
			FROM tandem.drift WHERE repaired_at IS NULL ORDER BY id`)
		if err != nil {
			t.Fatal(err)
		}
		f, err := pgx.CollectRows(rows, pgx.RowToStructByPos[failed])
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	check := func(attempts int, minWait, maxWait float64) {
		t.Helper()
		f := read()
		if len(f) != 2 || f[0].Table != "gone" || f[1].Table != "strict" {
			t.Fatalf("open entries: %+v, want gone and strict", f)
		}
		for i, want := range []string{`table public.gone does not exist`, `violates check constraint`} {
			if f[i].Attempts != attempts || !strings.Contains(f[i].LastErr, want) || f[i].Wait <= minWait || f[i].Wait > maxWait {
				t.Errorf("entry %+v: want %d attempts, an error with %q, the next attempt in (%gs, %gs]", f[i], attempts, want, minWait, maxWait)
			}
		}
	}
	check(1, 15, 20) // Base·2

	// More drift on t1: a pass that claims 2 entries takes it, not the bad
	// entries with lower ids, which wait for their backoff.
	s.new("UPDATE t1 SET v = 'stale again' WHERE id = 3")
	if err := RecordDrift(ctx, control, []DriftEntry{{Table: Name{"public", "t1"}, Key: []string{"3"}}}); err != nil {
		t.Fatal(err)
	}
	opts.Limit = 2
	if n, err := RepairWith(ctx, control, primary, secondary, opts); n != 1 || err != nil {
		t.Fatalf("pass during the backoff: %d, %v; want the t1 entry alone", n, err)
	}
	sameTable(t, primary, secondary, Name{"public", "t1"}, "id")
	check(1, 15, 20)

	// Due: retried, and the wait doubles up to the cap.
	if _, err := control.Exec(ctx, "UPDATE tandem.drift SET next_attempt_at = now() WHERE repaired_at IS NULL"); err != nil {
		t.Fatal(err)
	}
	if n, err := RepairWith(ctx, control, primary, secondary, opts); n != 0 || !errors.As(err, &ef) || ef.Entries != 2 {
		t.Fatalf("retry when due: %d, %v", n, err)
	}
	check(2, 25, 30) // Base·4 = 40s, capped at 30s

	// Stuck at 2 attempts, not at 3.
	if stuck, total, err := StuckDrift(ctx, control, 3, 10); err != nil || total != 0 || len(stuck) != 0 {
		t.Errorf("StuckDrift(3) = %v, %d, %v", stuck, total, err)
	}
	stuck, total, err := StuckDrift(ctx, control, 2, 1)
	if err != nil || total != 2 || len(stuck) != 1 || stuck[0].Table != (Name{"public", "gone"}) || !reflect.DeepEqual(stuck[0].Key, []string{"1"}) ||
		stuck[0].Attempts != 2 || !strings.Contains(stuck[0].LastError, "does not exist") || stuck[0].Stale != StaleNew {
		t.Errorf("StuckDrift(2) = %+v, %d, %v", stuck, total, err)
	}

	// The fence's repair ignores the backoff: every entry is tried.
	opts.IgnoreBackoff = true
	if n, err := RepairWith(ctx, control, primary, secondary, opts); n != 0 || !errors.As(err, &ef) || ef.Entries != 2 {
		t.Fatalf("repair ignoring the backoff: %d, %v", n, err)
	}
	check(3, 25, 30)
}

// TestRepairStoreDown: a store error (the new store's session killed) is
// not recorded on the entries: no attempt counted, no backoff, and the
// error is not an *EntryFailures. A fresh connection then repairs them.
func TestRepairStoreDown(t *testing.T) {
	s := newStores(t)
	s.both("CREATE TABLE t (id int PRIMARY KEY, v text)")
	s.old("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
	control, primary, secondary, killer := s.primary(), s.primary(), s.secondary(), s.secondary()
	ctx := context.Background()
	if err := EnsureSchema(ctx, control); err != nil {
		t.Fatal(err)
	}
	if err := RecordDrift(ctx, control, []DriftEntry{{Table: Name{"public", "t"}, Key: []string{"1"}}, {Table: Name{"public", "t"}, Key: []string{"2"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := killer.Exec(ctx, "SELECT pg_terminate_backend($1)", int(secondary.PgConn().PID())); err != nil {
		t.Fatal(err)
	}
	harness.SucceedsSoon(t, 10*time.Second, func() error {
		var alive bool
		if err := killer.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", int(secondary.PgConn().PID())).Scan(&alive); err != nil || alive {
			return fmt.Errorf("backend still alive (%v)", err)
		}
		return nil
	})
	n, err := Repair(ctx, control, primary, secondary, StaleNew, 100)
	var ef *EntryFailures
	if n != 0 || err == nil || errors.As(err, &ef) {
		t.Fatalf("Repair with the new store's session gone: %d, %v; want a store error", n, err)
	}
	var attempts int
	var untouched bool
	if err := control.QueryRow(ctx, "SELECT max(attempts), bool_and(last_error IS NULL AND next_attempt_at IS NULL AND repaired_at IS NULL) FROM tandem.drift").Scan(&attempts, &untouched); err != nil ||
		attempts != 0 || !untouched {
		t.Errorf("entries after a store error: attempts %d, untouched %v (%v)", attempts, untouched, err)
	}
	if n, err := Repair(ctx, control, primary, s.secondary(), StaleNew, 100); n != 2 || err != nil {
		t.Fatalf("Repair on a fresh connection: %d, %v", n, err)
	}
}

// TestDriftSchemaUpgrade: a ledger made before the backoff columns gets
// them from EnsureSchema.
func TestDriftSchemaUpgrade(t *testing.T) {
	s := newStores(t)
	conn := s.primary()
	ctx := context.Background()
	if err := EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}
	// As an older release made it: before the backoff columns, and before
	// the control schema was versioned.
	if _, err := conn.Exec(ctx, `DROP TABLE tandem.schema_version;
		ALTER TABLE tandem.drift DROP COLUMN failing_since, DROP COLUMN next_attempt_at, DROP COLUMN attempts, DROP COLUMN last_error`); err != nil {
		t.Fatal(err)
	}
	if err := RecordDrift(ctx, conn, []DriftEntry{{Table: Name{"public", "t"}, Key: []string{"1"}}}); err != nil {
		t.Fatal(err)
	}
	if err := EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}
	var attempts int
	var lastErr *string
	var since, next *time.Time
	if err := conn.QueryRow(ctx, "SELECT attempts, last_error, failing_since, next_attempt_at FROM tandem.drift").Scan(&attempts, &lastErr, &since, &next); err != nil ||
		attempts != 0 || lastErr != nil || since != nil || next != nil {
		t.Fatalf("upgraded ledger: %d %v %v %v (%v)", attempts, lastErr, since, next, err)
	}
}

// TestRepairConcurrent: while one repairer is stuck on a locked row holding
// its claimed entry, another takes only the other entries; each entry is
// repaired exactly once.
func TestRepairConcurrent(t *testing.T) {
	s := newStores(t)
	s.both(`CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY, v text);
		INSERT INTO t VALUES (1, 'a'); INSERT INTO u VALUES (1, 'a'), (2, 'b')`)
	control1, control2 := s.primary(), s.primary()
	primary1, primary2 := s.primary(), s.primary()
	secondary1, secondary2 := s.secondary(), s.secondary()
	writer := s.primary()
	ctx := context.Background()
	if err := EnsureSchema(ctx, control1); err != nil {
		t.Fatal(err)
	}
	if err := RecordDrift(ctx, control1, []DriftEntry{
		{Table: Name{"public", "t"}, Key: []string{"1"}},
		{Table: Name{"public", "u"}, Key: []string{"1"}},
		{Table: Name{"public", "u"}, Key: []string{"2"}},
	}); err != nil {
		t.Fatal(err)
	}
	tx, err := writer.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, "UPDATE t SET v = 'new' WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	type result struct {
		n   int
		err error
	}
	first := make(chan result, 1)
	go func() {
		n, err := Repair(ctx, control1, primary1, secondary1, StaleNew, 1) // claims the entry for t
		first <- result{n, err}
	}()
	waitBlocked(t, writer, primary1.PgConn().PID(), writer.PgConn().PID())
	n, err := Repair(ctx, control2, primary2, secondary2, StaleNew, 10)
	if err != nil || n != 2 {
		t.Fatalf("second repairer: %d, %v; want the 2 entries for u", n, err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-first:
	case <-time.After(10 * time.Second):
		t.Fatal("first repairer still blocked")
	}
	if r.err != nil || r.n != 1 {
		t.Fatalf("first repairer: %+v", r)
	}
	if total, err := OpenDriftTotal(ctx, control1); err != nil || total != 0 {
		t.Fatalf("open drift %d (%v)", total, err)
	}
	sameTable(t, primary1, secondary1, Name{"public", "t"}, "id")
	sameTable(t, primary1, secondary1, Name{"public", "u"}, "id")

	// Many repairers racing over many entries: each entry once.
	var more []DriftEntry
	for i := range 200 {
		more = append(more, DriftEntry{Table: Name{"public", "u"}, Key: []string{[]string{"1", "2", "3"}[i%3]}})
	}
	if err := RecordDrift(ctx, control1, more); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	for range 4 {
		c, p, sec := s.primary(), s.primary(), s.secondary()
		wg.Go(func() {
			for {
				n, err := Repair(ctx, c, p, sec, StaleNew, 7)
				if err != nil {
					t.Error(err)
					return
				}
				if n == 0 {
					return
				}
				mu.Lock()
				total += n
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if total != 200 {
		t.Errorf("repairers repaired %d entries in all, want 200", total)
	}
}

// TestDriftStale: each entry records the store that missed the write
// (new when unset), a bad store name is refused, open drift is reported
// per store, and a ledger created before the stale column is upgraded with
// its entries stale on new.
func TestDriftStale(t *testing.T) {
	s := newStores(t)
	conn := s.primary()
	ctx := context.Background()
	// A ledger as it was before the stale column, with one open entry.
	s.old(`CREATE SCHEMA tandem; CREATE TABLE tandem.drift (id bigserial PRIMARY KEY, schema_name text NOT NULL,
		table_name text NOT NULL, key text[], reason text NOT NULL DEFAULT '', recorded_at timestamptz NOT NULL DEFAULT now(),
		repaired_at timestamptz, attempts int NOT NULL DEFAULT 0, last_error text);
		INSERT INTO tandem.drift (schema_name, table_name, key) VALUES ('public', 'before', '{1}')`)
	for range 2 {
		if err := EnsureSchema(ctx, conn); err != nil {
			t.Fatal(err)
		}
	}
	if err := RecordDrift(ctx, conn, []DriftEntry{
		{Table: Name{"public", "t"}, Key: []string{"1"}, Stale: StaleOld},
		{Table: Name{"public", "t"}, Key: []string{"2"}, Stale: StaleNew},
		{Table: Name{"public", "t"}, Key: []string{"3"}},
		{Table: Name{"public", "u"}, Stale: StaleOld},
	}); err != nil {
		t.Fatal(err)
	}
	rows, err := conn.Query(ctx, "SELECT table_name || coalesce(key[1], '*') || ':' || stale FROM tandem.drift ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if want := []string{"before1:new", "t1:old", "t2:new", "t3:new", "u*:old"}; err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("stored %v (%v), want %v", got, err, want)
	}
	if err := RecordDrift(ctx, conn, []DriftEntry{{Table: Name{"public", "t"}, Stale: "primary"}}); err == nil ||
		!strings.Contains(err.Error(), `not "primary"`) {
		t.Errorf("a stale store named primary: %v", err)
	}
	byStore, err := OpenDriftByStore(ctx, conn)
	want := map[string]map[Name]int{
		StaleOld: {{"public", "t"}: 1, {"public", "u"}: 1},
		StaleNew: {{"public", "t"}: 2, {"public", "before"}: 1},
	}
	if err != nil || !reflect.DeepEqual(byStore, want) {
		t.Errorf("OpenDriftByStore = %v, %v", byStore, err)
	}
	open, err := OpenDrift(ctx, conn)
	if err != nil || !reflect.DeepEqual(open, map[Name]int{{"public", "t"}: 3, {"public", "u"}: 1, {"public", "before"}: 1}) {
		t.Errorf("OpenDrift = %v, %v", open, err)
	}
	if _, err := Repair(ctx, conn, s.primary(), s.secondary(), "primary", 10); err == nil {
		t.Error("Repair took a target store named primary")
	}
}

// TestRepairDirection is the rollback before repair: during a write flip
// (primary=new) a write to row 1 missed old, and before it (primary=old) a
// write to row 2 missed new; then a rollback made old primary again. Each
// entry is repaired only towards its stale store, from the other one: new's
// good row 1 is never overwritten with old's stale one.
func TestRepairDirection(t *testing.T) {
	s := newStores(t)
	s.both(`CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'seed'), (2, 'seed'), (3, 'seed'), (4, 'seed')`)
	s.old(`UPDATE t SET v = 'good' WHERE id = 2; DELETE FROM t WHERE id = 4`) // new missed these
	s.new(`UPDATE t SET v = 'good' WHERE id = 1; DELETE FROM t WHERE id = 3`) // old missed these
	control, oldC, newC := s.primary(), s.primary(), s.secondary()
	ctx := context.Background()
	if err := EnsureSchema(ctx, control); err != nil {
		t.Fatal(err)
	}
	tn := Name{"public", "t"}
	if err := RecordDrift(ctx, control, []DriftEntry{
		{Table: tn, Key: []string{"2"}, Stale: StaleNew},
		{Table: tn, Key: []string{"4"}, Stale: StaleNew},
		{Table: tn, Key: []string{"1"}, Stale: StaleOld},
		{Table: tn, Key: []string{"3"}, Stale: StaleOld},
	}); err != nil {
		t.Fatal(err)
	}
	rowsOf := func(c *pgx.Conn) string {
		t.Helper()
		var r string
		if err := c.QueryRow(ctx, "SELECT string_agg(id || '=' || v, ' ' ORDER BY id) FROM t").Scan(&r); err != nil {
			t.Fatal(err)
		}
		return r
	}
	// After the rollback old is primary: new is repaired from it the usual way.
	if n, err := Repair(ctx, control, oldC, newC, StaleNew, 100); err != nil || n != 2 {
		t.Fatalf("repairing new: %d, %v", n, err)
	}
	if got := rowsOf(newC); got != "1=good 2=good" {
		t.Errorf("new after its repair: %s, want its own good row 1 kept", got)
	}
	if got := rowsOf(oldC); got != "1=seed 2=good 3=seed" {
		t.Errorf("old changed by the repair of new: %s", got)
	}
	// Old, the primary, is repaired from new.
	if n, err := RepairPrimary(ctx, control, newC, oldC, StaleOld, 100); err != nil || n != 2 {
		t.Fatalf("repairing old: %d, %v", n, err)
	}
	if got := rowsOf(oldC); got != "1=good 2=good" {
		t.Errorf("old after its repair: %s", got)
	}
	sameTable(t, oldC, newC, tn, "id")
	if n, err := OpenDriftTotal(ctx, control); err != nil || n != 0 {
		t.Errorf("open drift %d (%v)", n, err)
	}
}

// TestRepairPrimaryWaitsForSecondaryCommit: a writer has committed an
// upsert of row 5 on the primary and not yet on the secondary (lockstep
// commits the primary first). RepairPrimary, repairing row 5 on the
// primary from the secondary, waits for that commit instead of deleting
// the acknowledged row as absent, and holds writers to the primary's table
// meanwhile.
func TestRepairPrimaryWaitsForSecondaryCommit(t *testing.T) {
	s := newStores(t)
	s.both(`CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')`)
	// new is the primary, old the secondary; row 5 is stale on new.
	control, primary, secondary := s.primary(), s.secondary(), s.primary()
	writerP, writerS, other := s.secondary(), s.primary(), s.secondary()
	ctx := context.Background()
	if err := EnsureSchema(ctx, control); err != nil {
		t.Fatal(err)
	}
	if err := RecordDrift(ctx, control, []DriftEntry{{Table: Name{"public", "t"}, Key: []string{"5"}, Stale: StaleNew}}); err != nil {
		t.Fatal(err)
	}
	if _, err := writerP.Exec(ctx, "INSERT INTO t VALUES (5, 'w')"); err != nil {
		t.Fatal(err)
	}
	tx, err := writerS.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, "INSERT INTO t VALUES (5, 'w')"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := RepairPrimary(ctx, control, secondary, primary, StaleNew, 10)
		done <- err
	}()
	waitBlocked(t, writerS, secondary.PgConn().PID(), writerS.PgConn().PID())
	// A new write to the primary's table waits for the unit.
	wrote := make(chan error, 1)
	go func() {
		_, err := other.Exec(ctx, "UPDATE t SET v = 'b' WHERE id = 1")
		wrote <- err
	}()
	waitBlocked(t, writerP, other.PgConn().PID(), primary.PgConn().PID())
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	for _, ch := range []chan error{done, wrote} {
		select {
		case err := <-ch:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("still blocked")
		}
	}
	var v string
	if err := primary.QueryRow(ctx, "SELECT v FROM t WHERE id = 5").Scan(&v); err != nil || v != "w" {
		t.Fatalf("row 5 on the primary: %q %v", v, err)
	}
	if n, err := OpenDriftTotal(ctx, control); err != nil || n != 0 {
		t.Errorf("open drift %d (%v)", n, err)
	}
}
