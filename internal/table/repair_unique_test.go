package table

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// TestRepairUniqueMoves: the secondary missed writes that move a unique
// value from one row to another, so copying the primary's rows over the
// secondary's as upserts meets a unique_violation on a column that is not
// the key: a key change (the row under its old key still holds the email;
// whole-table drift, as the proxy records a key change), a swap of two
// rows' emails (keyed drift), and a key change whose old key's row lies in
// a later chunk than its new key's, and a swap of emails between rows
// chunks apart (whole-table drift: the table is rewritten in one unit).
// Before, each entry failed on every attempt until it was stuck; now the
// repair removes the rows the primary has lost and replaces rather than
// upserts, and both stores end equal.
func TestRepairUniqueMoves(t *testing.T) {
	for _, tc := range []struct {
		name, schema, old, new string
		entries                []DriftEntry
	}{
		{name: "key change, whole table",
			old:     `INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(1, 300) g; UPDATE u SET id = 1000 WHERE id = 7`,
			new:     `INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(1, 300) g`,
			entries: []DriftEntry{{Table: Name{"public", "u"}, Reason: "key columns updated"}}},
		{name: "key change across chunks",
			// 2999 -> 1: the row under its old key is copied in a later
			// chunk (repairChunk keys) than the row under the new one.
			old:     `INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(2, 3000) g; UPDATE u SET id = 1 WHERE id = 2999`,
			new:     `INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(2, 3000) g`,
			entries: []DriftEntry{{Table: Name{"public", "u"}, Reason: "key columns updated"}}},
		{name: "swap across chunks, whole table",
			// Rows 1 and 2000 swap emails: each chunk's replace meets the
			// other chunk's row still holding the value, so the table is
			// rewritten in one unit.
			old: `INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(1, 3000) g;
				UPDATE u SET email = 'swapping' WHERE id = 1; UPDATE u SET email = 'e1' WHERE id = 2000; UPDATE u SET email = 'e2000' WHERE id = 1`,
			new:     `INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(1, 3000) g`,
			entries: []DriftEntry{{Table: Name{"public", "u"}, Reason: "statement text"}}},
		{name: "swap, by key",
			old: `INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(1, 10) g;
				UPDATE u SET email = 'swapping' WHERE id = 2; UPDATE u SET email = 'e2' WHERE id = 3; UPDATE u SET email = 'e3' WHERE id = 2`,
			new:     `INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(1, 10) g`,
			entries: []DriftEntry{{Table: Name{"public", "u"}, Key: []string{"2"}}, {Table: Name{"public", "u"}, Key: []string{"3"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStores(t)
			s.both(`CREATE TABLE u (id int PRIMARY KEY, email text NOT NULL UNIQUE, n int)`)
			s.old(tc.old)
			s.new(tc.new)
			control, primary, secondary := s.primary(), s.primary(), s.secondary()
			ctx := context.Background()
			if err := EnsureSchema(ctx, control); err != nil {
				t.Fatal(err)
			}
			if err := RecordDrift(ctx, control, tc.entries); err != nil {
				t.Fatal(err)
			}
			if n, err := Repair(ctx, control, primary, secondary, StaleNew, 100); n != len(tc.entries) || err != nil {
				t.Fatalf("Repair = %d, %v; want %d entries repaired", n, err, len(tc.entries))
			}
			sameTable(t, primary, secondary, Name{"public", "u"}, "id")
			if open, err := OpenDrift(ctx, control); err != nil || len(open) != 0 {
				t.Fatalf("open drift after the repair: %v %v", open, err)
			}
		})
	}
}

// TestRepairUniqueMovesTooLarge: above repairWholeMaxRows, a swap across
// chunks is not rewritten in one locked unit: the entry fails with the
// reason and a hint and stays open, and the table is left as it was.
func TestRepairUniqueMovesTooLarge(t *testing.T) {
	defer func(n int) { repairWholeMaxRows = n }(repairWholeMaxRows)
	repairWholeMaxRows = 2999
	s := newStores(t)
	s.both(`CREATE TABLE u (id int PRIMARY KEY, email text NOT NULL UNIQUE, n int); INSERT INTO u SELECT g, 'e' || g, g FROM generate_series(1, 3000) g`)
	s.old(`UPDATE u SET email = 'swapping' WHERE id = 1; UPDATE u SET email = 'e1' WHERE id = 2000; UPDATE u SET email = 'e2000' WHERE id = 1`)
	control, primary, secondary := s.primary(), s.primary(), s.secondary()
	ctx := context.Background()
	if err := EnsureSchema(ctx, control); err != nil {
		t.Fatal(err)
	}
	if err := RecordDrift(ctx, control, []DriftEntry{{Table: Name{"public", "u"}, Reason: "statement text"}}); err != nil {
		t.Fatal(err)
	}
	n, err := Repair(ctx, control, primary, secondary, StaleNew, 100)
	var ef *EntryFailures
	if n != 0 || !errors.As(err, &ef) || !strings.Contains(err.Error(), "more than 2999 rows") || !strings.Contains(err.Error(), "hint:") {
		t.Fatalf("Repair = %d, %v; want the entry failed, naming the bound and a hint", n, err)
	}
	if open, err := OpenDrift(ctx, control); err != nil || len(open) != 1 {
		t.Fatalf("open drift: %v %v, want the entry", open, err)
	}
	if got := queryText(t, secondary, `SELECT email FROM u WHERE id = 1`); got != "e1" {
		t.Errorf("the secondary's row 1 after the refused rewrite: %s, want e1 as it was", got)
	}
}
