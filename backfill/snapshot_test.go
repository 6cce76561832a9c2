package backfill

import (
	"context"
	"strings"
	"testing"
)

// snapshotRun runs a snapshot backfill of items (3000 rows) where change
// runs on old and new (as the mirror would) right after the snapshot is
// exported, before any chunk is loaded. skip leaves the reconcile out;
// overwrite makes the load DO UPDATE.
func snapshotRun(t *testing.T, change func(e *env), skip, overwrite bool) *env {
	t.Helper()
	e := newEnv(t, itemsSchema, true)
	e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 3000) g`)
	o := e.options(nil, "items")
	o.Path = PathSnapshot
	o.hooks.afterSnapshot = func(context.Context) { change(e) }
	o.hooks.skipReconcile = skip
	o.hooks.overwrite = overwrite
	eng, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	s, err := eng.Run(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if p, why := eng.Path(); p != PathSnapshot {
		t.Fatalf("path %s (%s), want snapshot", p, why)
	}
	if s.Failed {
		t.Fatalf("summary %+v", s)
	}
	return e
}

// TestBackfillSnapshotDeleted: a row deleted on old after the snapshot
// (its mirrored delete found nothing on new yet) is not resurrected on new
// by the load of the snapshot's version: the reconcile deletes it. Without
// the reconcile it comes back.
func TestBackfillSnapshotDeleted(t *testing.T) {
	del := func(e *env) {
		for _, c := range []string{`DELETE FROM items WHERE id IN (10, 2500)`} {
			e.exec(e.old, c)
			e.exec(e.new, c) // the mirror: nothing to delete yet
		}
	}
	e := snapshotRun(t, del, false, false)
	equalTables(t, e, "items")
	if n := text(t, e.new, `SELECT count(*) FROM items WHERE id IN (10, 2500)`); n != "0" {
		t.Fatalf("%s deleted rows resurrected on new", n)
	}
	var slots string
	slots = text(t, e.old, `SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'tandem_backfill%' AND database = current_database()`)
	if slots != "0" {
		t.Fatalf("%s backfill slots left after the reconcile", slots)
	}
	// The hazard is real: without the reconcile the snapshot's rows come back.
	e = snapshotRun(t, del, true, false)
	if n := text(t, e.new, `SELECT count(*) FROM items WHERE id IN (10, 2500)`); n != "2" {
		t.Fatalf("without the reconcile %s rows came back, want 2 (the test would not see the hazard)", n)
	}
}

// TestBackfillSnapshotNewerMirrored: a row the mirror wrote on new after
// the snapshot (an update, a re-insert, an insert of a key the snapshot
// lacks) is never replaced by the snapshot's version. The load does not
// overwrite it (DO NOTHING), and the reconcile copies every changed key
// again under lock: each suffices. With a load that overwrites and no
// reconcile, the newer rows are lost.
func TestBackfillSnapshotNewerMirrored(t *testing.T) {
	newer := func(e *env) {
		for _, c := range []string{
			`INSERT INTO items VALUES (20, 'newer', -1), (3001, 'beyond', -2) ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty`,
			`DELETE FROM items WHERE id = 1500`,
			`INSERT INTO items VALUES (1500, 'reborn', -3)`,
		} {
			e.exec(e.old, c)
			e.exec(e.new, c) // the mirror
		}
	}
	check := func(e *env) {
		t.Helper()
		equalTables(t, e, "items")
		if got := text(t, e.new, `SELECT string_agg(id || '=' || name, ',' ORDER BY id) FROM items WHERE id IN (20, 1500, 3001)`); got != "20=newer,1500=reborn,3001=beyond" {
			t.Fatalf("new has %s", got)
		}
	}
	check(snapshotRun(t, newer, false, false)) // both layers
	check(snapshotRun(t, newer, true, false))  // the DO NOTHING load alone
	check(snapshotRun(t, newer, false, true))  // the reconcile alone
	e := snapshotRun(t, newer, true, true)     // neither: the hazard
	if got := text(t, e.new, `SELECT string_agg(name, ',' ORDER BY id) FROM items WHERE id IN (20, 1500)`); !strings.Contains(got, "n20") || !strings.Contains(got, "n1500") {
		t.Fatalf("an overwriting load without reconcile kept %q: the test would not see the hazard", got)
	}
}
