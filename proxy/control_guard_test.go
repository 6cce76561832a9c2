package proxy

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/route"
)

// A client of the proxy cannot change the control schema (issue 12): a
// statement that writes tandem.*, however it is sent, gets 42501 and does
// not run; the session carries on outside a transaction and ends inside
// one, whose writes the store rolls back. Reading it is allowed.
func TestControlSchemaRefused(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE t (id int PRIMARY KEY)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	snapshot := func() string {
		t.Helper()
		var s string
		if err := e.control.QueryRow(ctx, `SELECT coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM (
			SELECT s::text AS x FROM tandem.state s UNION ALL SELECT h::text FROM tandem.state_history h
			UNION ALL SELECT d::text FROM tandem.drift d) a`).Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	before := snapshot()
	c := e.client()
	refused := func(what string, err error) {
		t.Helper()
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Message, "control schema") {
			t.Fatalf("%s: %v, want 42501 naming the control schema", what, err)
		}
	}
	_, err := c.Exec(ctx, `UPDATE tandem.state SET version = version + 100`, pgx.QueryExecModeSimpleProtocol)
	refused("simple UPDATE", err)
	_, err = c.Exec(ctx, `DELETE FROM tandem.drift WHERE reason <> $1`, "x")
	refused("extended DELETE", err)
	_, err = c.Exec(ctx, `WITH d AS (DELETE FROM "tandem".state_history RETURNING 1) SELECT count(*) FROM d`)
	refused("DELETE in a CTE", err)
	_, err = c.Exec(ctx, `TRUNCATE tandem.drift`)
	refused("TRUNCATE", err)
	_, err = c.Exec(ctx, `DROP TABLE tandem.state`)
	refused("DROP", err)
	var n int
	if err := c.QueryRow(ctx, `SELECT count(*) FROM tandem.state`).Scan(&n); err != nil {
		t.Fatalf("reading tandem.state through the proxy: %d %v", n, err)
	}
	if _, err := c.Exec(ctx, `INSERT INTO t VALUES (1)`); err != nil {
		t.Fatalf("the session after refusals: %v", err)
	}

	// Inside a transaction the session ends and the transaction with it.
	tx := e.client()
	if _, err := tx.Exec(ctx, `BEGIN`); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO t VALUES (2)`); err != nil {
		t.Fatal(err)
	}
	_, err = tx.Exec(ctx, `UPDATE tandem.state SET version = 0`)
	refused("UPDATE in a transaction", err)
	if _, err := tx.Exec(ctx, `COMMIT`); err == nil {
		t.Fatal("COMMIT after a refused control-schema write succeeded")
	}
	if h, rows := tableHash(t, e.old, e.db, "t", "id"); rows != 1 {
		t.Fatalf("old holds %d rows of t (%s), want only the one committed outside the transaction", rows, h)
	}
	if after := snapshot(); after != before {
		t.Fatal("the control schema changed")
	}
}
