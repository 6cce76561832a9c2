package table

import (
	"context"
	"testing"
)

// TestRepairUniqueMoves: the secondary missed writes that move a unique
// value from one row to another, so copying the primary's rows over the
// secondary's as upserts meets a unique_violation on a column that is not
// the key: a key change (the row under its old key still holds the email;
// whole-table drift, as the proxy records a key change), a swap of two
// rows' emails (keyed drift), and a key change whose old key's row lies in
// a later chunk than its new key's. Before, each entry failed on every
// attempt until it was stuck; now the repair removes the rows the primary
// has lost and replaces rather than upserts, and both stores end equal.
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
