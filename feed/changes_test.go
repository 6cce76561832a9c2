package feed

import (
	"testing"
	"time"
)

// TestChangesMerge: keys are deduplicated across a batch; a truncate stays
// a truncate (equal when the secondary is empty) until a change whose key
// cannot be read makes the table a plain whole-table change, after which
// its keys are not kept.
func TestChangesMerge(t *testing.T) {
	at := time.Now()
	var tx, batch changes
	tx.add(1, []string{"7"}, at)
	tx.add(1, []string{"7"}, at)
	tx.addWhole(2, at, true)
	tx.end = 100
	batch.merge(&tx)
	if batch.n != 2 || len(batch.keys[1]) != 1 || !batch.whole[2].truncate || batch.end != 100 {
		t.Fatalf("after one transaction: %+v", batch)
	}
	tx.reset()
	tx.add(1, []string{"8"}, at)
	tx.addWhole(2, at, false) // a key of table 2 that cannot be read
	tx.end = 200
	batch.merge(&tx)
	if batch.n != 3 || len(batch.keys[1]) != 2 || batch.whole[2].truncate || batch.end != 200 {
		t.Fatalf("after two transactions: %+v", batch)
	}
	batch.add(2, []string{"1"}, at)
	if len(batch.keys[2]) != 0 || batch.n != 3 {
		t.Fatalf("a key of a table recorded whole was kept: %+v", batch)
	}
}
