package proxy

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// TestReadShift: eligible reads go to the new store by the reads
// percentage, sticky per session; reads in a transaction, locking reads and
// reads of tables with open drift stay on the primary; a read that fails on
// new is retried on the primary without the client seeing an error.
func TestReadShift(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE t (id int PRIMARY KEY, v text);`)
	ctx := context.Background()
	// Make the stores tell apart: a marker row only on each side.
	if err := e.old.Exec(ctx, e.db, `INSERT INTO t VALUES (1, 'old'); CREATE TABLE only_old (x int); INSERT INTO only_old VALUES (42)`); err != nil {
		t.Fatal(err)
	}
	if err := e.new.Exec(ctx, e.db, `INSERT INTO t VALUES (1, 'new')`); err != nil {
		t.Fatal(err)
	}
	which := func(c *pgx.Conn) string {
		t.Helper()
		var v string
		if err := c.QueryRow(ctx, `SELECT v FROM t WHERE id = 1`).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}

	e.set(route.Settings{Primary: route.Old, Mirror: true, Reads: 100})
	c := e.client()
	if got := which(c); got != "new" {
		t.Fatalf("reads=100: served by %s", got)
	}
	// Simple protocol too.
	if got := queryOne(t, c.PgConn(), `SELECT v FROM t WHERE id = 1`); got != "new" {
		t.Fatalf("reads=100, simple protocol: served by %s", got)
	}
	// Locking reads and reads inside a transaction stay on the primary.
	var v string
	if err := c.QueryRow(ctx, `SELECT v FROM t WHERE id = 1 FOR UPDATE`).Scan(&v); err != nil || v != "old" {
		t.Fatalf("locking read served by %q (%v)", v, err)
	}
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.QueryRow(ctx, `SELECT v FROM t WHERE id = 1`).Scan(&v); err != nil || v != "old" {
		t.Fatalf("read in a transaction served by %q (%v)", v, err)
	}
	_ = tx.Rollback(ctx)
	// A read that fails on new is retried on the primary.
	var x int
	if err := c.QueryRow(ctx, `SELECT x FROM only_old`).Scan(&x); err != nil || x != 42 {
		t.Fatalf("read of a table missing on new: %d, %v", x, err)
	}
	// A table with open drift is not served from new.
	if err := table.RecordDrift(ctx, e.control, []table.DriftEntry{{Table: table.Name{Schema: "public", Table: "t"}, Reason: "test"}}); err != nil {
		t.Fatal(err)
	}
	open, err := table.OpenDrift(ctx, e.control)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for n := range open {
		names = append(names, n.String())
	}
	e.proxy.srv.SetDriftTables(names)
	if got := which(c); got != "old" {
		t.Fatalf("table with open drift served by %s", got)
	}
	e.proxy.srv.SetDriftTables(nil)

	// reads=50: each session sticks to one store; both stores serve some.
	e.set(route.Settings{Primary: route.Old, Mirror: true, Reads: 50})
	served := map[string]int{}
	for i := range 24 {
		c, err := pgx.Connect(ctx, e.proxy.dsn(e.db))
		if err != nil {
			t.Fatal(err)
		}
		first := which(c)
		for range 3 {
			if got := which(c); got != first {
				t.Fatalf("session %d moved from %s to %s", i, first, got)
			}
		}
		served[first]++
		c.Close(ctx)
	}
	if served["old"] == 0 || served["new"] == 0 {
		t.Fatalf("reads=50 over 24 sessions: %v", served)
	}
	t.Logf("reads=50 over 24 sessions: %v", served)

	// After the flip (primary=new, reads=100) every read is new's; a
	// rollback (primary=old, reads=0) brings every read back at once.
	e.set(route.Settings{Primary: route.New, Mirror: true, Reads: 100})
	if got := which(c); got != "new" {
		t.Fatalf("after the flip: served by %s", got)
	}
	e.set(route.Rollback(e.proxy.srv.State().Settings))
	if got := which(c); got != "old" {
		t.Fatalf("after the rollback: served by %s", got)
	}
	_ = fmt.Sprint()
}
