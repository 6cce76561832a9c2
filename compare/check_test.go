package compare

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// TestChecker: the change feed's point check types exactly the differing
// keys among those given (a key absent from both is equal), and a mirror
// still uncommitted on the secondary past the grace re-reads is settled by
// the locked re-check, not reported.
func TestChecker(t *testing.T) {
	schema := `CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;`
	p := newPair(t, schema, schema)
	m := p.mapping(nil, "items")
	ctx := t.Context()
	c, err := NewChecker(ctx, p.old, p.new, m, Options{Settle: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	p.exec(p.old, "UPDATE items SET v = 'changed' WHERE id = 1")
	p.exec(p.old, "DELETE FROM items WHERE id = 2")
	p.exec(p.new, "DELETE FROM items WHERE id = 3")
	p.exec(p.old, "DELETE FROM items WHERE id = 4")
	p.exec(p.new, "DELETE FROM items WHERE id = 4")
	diffs, _, err := c.Check(ctx, [][]string{{"1"}, {"2"}, {"3"}, {"4"}, {"5"}, {"999"}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range diffs {
		got = append(got, string(d.Kind)+" "+strings.Join(d.Key, ","))
	}
	slices.Sort(got)
	if want := []string{"MissingOnNew 3", "MissingOnOld 2", "ValueDiff 1"}; !slices.Equal(got, want) {
		t.Fatalf("differences %v, want %v", got, want)
	}

	// A mirror in flight: committed on old, open on new past the grace.
	mirror, err := pgx.Connect(ctx, newStore.DSN(p.db))
	if err != nil {
		t.Fatal(err)
	}
	defer mirror.Close(context.Background())
	tx, err := mirror.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "INSERT INTO items VALUES (500, 'late')"); err != nil {
		t.Fatal(err)
	}
	p.exec(p.old, "INSERT INTO items VALUES (500, 'late')")
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(c.Grace + 300*time.Millisecond) // past the unlocked re-reads, into the locked re-check
		_ = tx.Commit(context.Background())
	}()
	diffs, transient, err := c.Check(ctx, [][]string{{"500"}})
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if len(diffs) != 0 || transient != 1 {
		t.Fatalf("a mirror in flight was reported: %v (transient %d)", diffs, transient)
	}
}
