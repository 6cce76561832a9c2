package backfill

import (
	"context"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/tandemdb/tandem/internal/table"
)

// snapshotRun runs a snapshot backfill of items (3000 rows) where change
// runs on old and new (as the mirror would) right after the snapshot is
// exported, before any chunk is loaded. skip leaves the reconcile out;
// overwrite makes the load DO UPDATE.
func snapshotRun(t *testing.T, change func(e *env), skip, overwrite bool) *env {
	t.Helper()
	e, _ := snapshotRunSummary(t, change, skip, overwrite)
	return e
}

func snapshotRunSummary(t *testing.T, change func(e *env), skip, overwrite bool) (*env, Summary) {
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
	return e, s
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
	e, s := snapshotRunSummary(t, del, false, false)
	equalTables(t, e, "items")
	// No chunk's range held a row on new (the mirrored deletes found
	// nothing): every chunk was COPYed straight into the table.
	if p := s.Tables[0]; p.StraightChunks != p.Chunks || p.StagedChunks != 0 || p.StraightRaced != 0 {
		t.Fatalf("chunks %d: %d straight, %d staged, %d raced; want all straight", p.Chunks, p.StraightChunks, p.StagedChunks, p.StraightRaced)
	}
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
// overwrite it (a straight COPY leaves the keys new holds out), and the
// reconcile copies every changed key again under lock: each suffices.
// With a load that overwrites (staged, DO UPDATE) and no
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
	e0, s := snapshotRunSummary(t, newer, false, false) // both layers
	check(e0)
	// The chunks that held the mirrored rows were COPYed straight too,
	// those rows left out of the COPY.
	if p := s.Tables[0]; p.StraightChunks != p.Chunks {
		t.Fatalf("chunks %d: %d straight, %d staged; want all straight", p.Chunks, p.StraightChunks, p.StagedChunks)
	}
	check(snapshotRun(t, newer, true, false)) // the load alone
	check(snapshotRun(t, newer, false, true)) // the reconcile alone
	e := snapshotRun(t, newer, true, true)    // neither: the hazard
	if got := text(t, e.new, `SELECT string_agg(name, ',' ORDER BY id) FROM items WHERE id IN (20, 1500)`); !strings.Contains(got, "n20") || !strings.Contains(got, "n1500") {
		t.Fatalf("an overwriting load without reconcile kept %q: the test would not see the hazard", got)
	}
}

// TestBackfillSnapshotStraightRace: a mirrored write lands on new in a
// chunk's range after the load saw the range empty and before its straight
// COPY into the table. The COPY fails on the key (it never overwrites),
// the chunk is loaded through the staging table instead, the backfill
// finishes, and the stores are equal. Without the reconcile the mirrored
// row is still the mirror's, not the snapshot's: neither load replaced it.
func TestBackfillSnapshotStraightRace(t *testing.T) {
	for _, skip := range []bool{false, true} {
		e := newEnv(t, itemsSchema, true)
		e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 3000) g`)
		o := e.options(nil, "items")
		o.Path = PathSnapshot
		o.hooks.skipReconcile = skip
		var calls atomic.Int32
		var raced int64
		o.hooks.beforeStraight = func(_ context.Context, _ table.Name, lo, hi []string) {
			if calls.Add(1) != 1 {
				return
			}
			// The chunk's last key (or the one after its start, for the
			// last chunk), updated on old after the snapshot and mirrored:
			// on new it is an insert, committed, in the range just seen
			// empty.
			if hi != nil {
				raced, _ = strconv.ParseInt(hi[0], 10, 64)
			} else {
				lo0, _ := strconv.ParseInt(lo[0], 10, 64)
				raced = lo0 + 1
			}
			k := strconv.FormatInt(raced, 10)
			e.exec(e.old, `UPDATE items SET name = 'raced', qty = -1 WHERE id = `+k)
			e.exec(e.new, `INSERT INTO items VALUES (`+k+`, 'raced', -1) ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty`)
		}
		eng, err := New(o)
		if err != nil {
			t.Fatal(err)
		}
		s, err := eng.Run(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		p := s.Tables[0]
		if s.Failed || p.ChunksDone != p.Chunks || p.Chunks < 2 {
			t.Fatalf("summary %+v", s)
		}
		if p.StraightRaced != 1 || p.StagedChunks != 1 || p.StraightChunks != p.Chunks-1 {
			t.Fatalf("chunks %d: %d straight, %d staged, %d raced; want one raced chunk staged, the others straight", p.Chunks, p.StraightChunks, p.StagedChunks, p.StraightRaced)
		}
		if got := text(t, e.new, `SELECT name || '/' || qty FROM items WHERE id = `+strconv.FormatInt(raced, 10)); got != "raced/-1" {
			t.Fatalf("reconcile skipped %v: new holds %s for the raced key %d, want the mirrored raced/-1", skip, got, raced)
		}
		if n := text(t, e.new, `SELECT count(*) FROM items`); n != "3000" {
			t.Fatalf("reconcile skipped %v: new holds %s rows, want 3000", skip, n)
		}
		if !skip {
			equalTables(t, e, "items")
		}
	}
}

// TestBackfillSnapshotStraightGivesUp: when mirrored writes race into
// every chunk's straight COPY, the backfill stops trying it after two races
// (more than it succeeded) and loads the rest staged at once; it finishes
// and the stores are equal.
func TestBackfillSnapshotStraightGivesUp(t *testing.T) {
	e := newEnv(t, itemsSchema, true)
	e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 3000) g`)
	o := e.options(nil, "items")
	o.Path = PathSnapshot
	o.Workers = 1 // one chunk at a time: the count of attempts is exact
	o.hooks.beforeStraight = func(_ context.Context, _ table.Name, lo, _ []string) {
		var k int64 = 1
		if lo != nil {
			k, _ = strconv.ParseInt(lo[0], 10, 64)
			k++
		}
		ks := strconv.FormatInt(k, 10)
		e.exec(e.old, `UPDATE items SET name = 'raced' WHERE id = `+ks)
		e.exec(e.new, `INSERT INTO items SELECT id, name, qty FROM (VALUES (`+ks+`::bigint, 'raced', `+ks+`)) v(id, name, qty) ON CONFLICT (id) DO UPDATE SET name = excluded.name`)
	}
	s := mustRun(t, o)
	p := s.Tables[0]
	if p.Chunks < 4 || p.StraightRaced != 2 || p.StraightChunks != 0 || p.StagedChunks != p.Chunks || s.Failed {
		t.Fatalf("chunks %d: %d straight, %d staged, %d raced; want 2 raced, then staged without trying", p.Chunks, p.StraightChunks, p.StagedChunks, p.StraightRaced)
	}
	equalTables(t, e, "items")
}
