package proxy

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/route"
)

// A replica that has not read the routing state within routing.self_fence
// refuses writes with 40001 (reads go on) until it reads it again; inside
// a transaction the session ends and the store rolls the transaction back
// (issue 12).
func TestSelfFenceRefusesWrites(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE t (id int PRIMARY KEY)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	srv := e.proxy.srv
	c := e.client()
	if _, err := c.Exec(ctx, `INSERT INTO t VALUES (1)`); err != nil {
		t.Fatalf("before the replica ever heard the state (no control plane): %v", err)
	}
	srv.HeardState(time.Now().Add(-time.Minute))
	var pe *pgconn.PgError
	if _, err := c.Exec(ctx, `INSERT INTO t VALUES (2)`); !errors.As(err, &pe) || pe.Code != "40001" {
		t.Fatalf("a write on a replica silent for a minute: %v, want 40001", err)
	}
	var n int
	if err := c.QueryRow(ctx, `SELECT count(*) FROM t`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("a read on a fenced replica: %d %v", n, err)
	}
	srv.HeardState(time.Now())
	tx := e.client()
	if _, err := tx.Exec(ctx, `BEGIN`); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO t VALUES (3)`); err != nil {
		t.Fatalf("a write once the state is heard again: %v", err)
	}
	srv.HeardState(time.Now().Add(-time.Minute))
	if _, err := tx.Exec(ctx, `INSERT INTO t VALUES (4)`); !errors.As(err, &pe) || pe.Code != "40001" || pe.Severity != "FATAL" {
		t.Fatalf("a write in a transaction on a fenced replica: %v, want FATAL 40001", err)
	}
	srv.HeardState(time.Now())
	if _, rows := tableHash(t, e.old, e.db, "t", "id"); rows != 1 {
		t.Fatalf("old holds %d rows, want 1: the fenced transaction must not commit", rows)
	}
}
