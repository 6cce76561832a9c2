package backfill

import (
	"context"
	"slices"
	"strings"
	"testing"
)

// deferSchema has one index of every kind --defer-indexes keeps or drops.
const deferSchema = `CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int, code text, during tsrange);
	CREATE INDEX items_name ON items (name);
	CREATE INDEX items_lower ON items (lower(name));
	CREATE INDEX items_partial ON items (qty) WHERE qty > 10;
	CREATE INDEX items_multi ON items (qty, name DESC) WITH (fillfactor = 70);
	CREATE UNIQUE INDEX items_code ON items (code);
	ALTER TABLE items ADD CONSTRAINT items_no_overlap EXCLUDE USING gist (during WITH &&);
	CREATE INDEX items_commented ON items (qty);
	COMMENT ON INDEX items_commented IS 'kept: a definition would not bring the comment back';`

// indexDefs is every index of items on q: name, definition and validity.
func indexDefs(t *testing.T, e *env, q string) []string {
	t.Helper()
	conn := e.new
	if q == "old" {
		conn = e.old
	}
	s := text(t, conn, `SELECT coalesce(string_agg(x.indexname || ' ' || x.indexdef || CASE WHEN i.indisvalid THEN '' ELSE ' INVALID' END, E'\n' ORDER BY x.indexname), '')
		FROM pg_indexes x JOIN pg_index i ON i.indexrelid = (quote_ident(x.schemaname) || '.' || quote_ident(x.indexname))::regclass
		WHERE x.tablename = 'items'`)
	return strings.Split(s, "\n")
}

func indexNames(defs []string) []string {
	var out []string
	for _, d := range defs {
		name, _, _ := strings.Cut(d, " ")
		out = append(out, name)
	}
	return out
}

// TestBackfillDeferIndexes: --defer-indexes drops exactly the plain
// indexes of the new table for the copy (never the primary key, a unique
// or exclusion index, nor one with a comment), with their definitions
// saved in the control schema first (DeferredIndexes, which the flip gate
// reads, names them), and rebuilds them afterwards: pg_indexes is the same
// before and after, every index valid, nothing left saved.
func TestBackfillDeferIndexes(t *testing.T) {
	e := newEnv(t, deferSchema, true)
	e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g % 50, 'c' || g,
		tsrange('2020-01-01'::timestamp + g * interval '1 hour', '2020-01-01'::timestamp + (g + 1) * interval '1 hour') FROM generate_series(1, 3000) g`)
	before := indexDefs(t, e, "new")
	if len(before) != 8 {
		t.Fatalf("indexes before: %q", before)
	}
	o := e.options(nil, "items")
	o.Path = PathSnapshot
	o.DeferIndexes = true
	var during []string
	var saved []DeferredIndex
	o.hooks.afterSnapshot = func(ctx context.Context) {
		during = indexNames(indexDefs(t, e, "new"))
		var err error
		if saved, err = DeferredIndexes(ctx, e.old); err != nil {
			t.Error(err)
		}
	}
	s := mustRun(t, o)
	dropped := []string{"items_lower", "items_multi", "items_name", "items_partial"}
	if want := []string{"items_code", "items_commented", "items_no_overlap", "items_pkey"}; !slices.Equal(during, want) {
		t.Fatalf("indexes on new during the copy: %q, want %q", during, want)
	}
	var names []string
	for _, d := range saved {
		names = append(names, d.Index.Table)
		if d.Table.Table != "items" || !strings.HasPrefix(d.Definition, "CREATE INDEX "+d.Index.Table+" ON public.items ") {
			t.Errorf("saved %+v", d)
		}
	}
	if !slices.Equal(names, dropped) {
		t.Fatalf("definitions saved during the copy: %q, want %q", names, dropped)
	}
	if s.IndexesDeferred != 4 || s.IndexesRebuilt != 4 || s.Failed {
		t.Fatalf("summary %+v: want 4 indexes deferred and rebuilt", s)
	}
	if after := indexDefs(t, e, "new"); !slices.Equal(after, before) {
		t.Fatalf("indexes after the copy:\n%s\nwant\n%s", strings.Join(after, "\n"), strings.Join(before, "\n"))
	}
	if left, err := DeferredIndexes(t.Context(), e.old); err != nil || len(left) != 0 {
		t.Fatalf("definitions left after the rebuild: %v %v", left, err)
	}
	equalTables(t, e, "items")
}

// TestBackfillRestoresDeferredIndexes: what a deferred run that died left
// behind (a saved definition whose index is gone, one whose CREATE INDEX
// CONCURRENTLY was killed and left it INVALID, one saved but not dropped
// yet) is rebuilt by the next run, with or without --defer-indexes, each
// index once, valid, as defined.
func TestBackfillRestoresDeferredIndexes(t *testing.T) {
	for _, deferred := range []bool{false, true} {
		e := newEnv(t, deferSchema, true)
		e.exec(e.old, `INSERT INTO items SELECT g, 'n' || g, g % 50, 'c' || g, NULL FROM generate_series(1, 3000) g`)
		e.exec(e.new, `INSERT INTO items SELECT g, 'n' || g, g % 50, 'c' || g, NULL FROM generate_series(1, 3000) g`)
		before := indexDefs(t, e, "new")
		o := e.options(nil, "items")
		if err := EnsureSchema(t.Context(), e.old, e.new); err != nil {
			t.Fatal(err)
		}
		// As an earlier deferred run that died would have left it: every
		// definition saved; items_name and items_lower dropped;
		// items_partial INVALID (a build killed half way: the same
		// definition on a duplicate key makes CREATE INDEX CONCURRENTLY
		// fail and leave it so); items_multi still there.
		e.exec(e.old, `INSERT INTO tandem.backfill_deferred_indexes (index_schema, index_name, schema_name, table_name, definition) VALUES
			('public', 'items_name', 'public', 'items', 'CREATE INDEX items_name ON public.items USING btree (name)'),
			('public', 'items_lower', 'public', 'items', 'CREATE INDEX items_lower ON public.items USING btree (lower(name))'),
			('public', 'items_partial', 'public', 'items', 'CREATE INDEX items_partial ON public.items USING btree (qty) WHERE (qty > 10)'),
			('public', 'items_multi', 'public', 'items', 'CREATE INDEX items_multi ON public.items USING btree (qty, name DESC) WITH (fillfactor=''70'')')`)
		e.exec(e.new, `DROP INDEX items_name, items_lower, items_partial`)
		e.exec(e.new, `UPDATE items SET qty = 11 WHERE id IN (1, 2)`)
		if _, err := e.new.Exec(t.Context(), `CREATE UNIQUE INDEX CONCURRENTLY items_partial ON items (qty) WHERE qty > 10 AND id < 3`); err == nil {
			t.Fatal("the unique build should have failed")
		}
		e.exec(e.new, `UPDATE items SET qty = 1 WHERE id IN (1, 2)`)
		if got := indexDefs(t, e, "new"); !strings.Contains(strings.Join(got, "\n"), "items_partial CREATE UNIQUE INDEX items_partial ON public.items USING btree (qty) WHERE ((qty > 10) AND (id < 3)) INVALID") {
			t.Fatalf("no INVALID index to start from: %q", got)
		}
		o.DeferIndexes = deferred
		s := mustRun(t, o)
		if after := indexDefs(t, e, "new"); !slices.Equal(after, before) {
			t.Fatalf("deferred %v: indexes after the rerun:\n%s\nwant\n%s", deferred, strings.Join(after, "\n"), strings.Join(before, "\n"))
		}
		if left, err := DeferredIndexes(t.Context(), e.old); err != nil || len(left) != 0 {
			t.Fatalf("deferred %v: definitions left: %v %v", deferred, left, err)
		}
		if want := map[bool]int{false: 3, true: 4}[deferred]; s.IndexesRebuilt != want {
			t.Fatalf("deferred %v: %d rebuilt, want %d (summary %+v)", deferred, s.IndexesRebuilt, want, s)
		}
		equalTables(t, e, "items")
	}
}
