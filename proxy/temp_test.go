package proxy

import (
	"context"
	"testing"

	"github.com/tandemdb/tandem/internal/route"
)

// TestMirrorTempTables: temporary tables are the session's own. In
// dual-write their writes are never mirrored and never reach the drift
// ledger, reads of them stay on the store that holds them (even when a
// real table of the same name exists and reads are shifted), and writes
// to real tables that read them are mirrored as usual.
func TestMirrorTempTables(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE items (id int PRIMARY KEY, v text); CREATE TABLE totals (id int PRIMARY KEY, n bigint)`)
	ctx := context.Background()
	if err := e.new.Exec(ctx, e.db, `INSERT INTO items VALUES (999, 'only on new')`); err != nil {
		t.Fatal(err)
	}
	if err := e.old.Exec(ctx, e.db, `INSERT INTO items VALUES (999, 'only on new')`); err != nil {
		t.Fatal(err)
	}
	e.set(route.Settings{Primary: route.Old, Mirror: true, Reads: 100})
	c := e.client()
	steps := []string{
		`CREATE TEMP TABLE scratch (id int PRIMARY KEY, v text)`,
		`INSERT INTO scratch VALUES (1, 'a'), (2, 'b'), (3, 'c')`,
		`UPDATE scratch SET v = v || '!' WHERE id > 1`,
		`DELETE FROM scratch WHERE id = 3`,
		`INSERT INTO totals SELECT 1, count(*) FROM scratch`,
		`CREATE TEMP TABLE snap AS SELECT * FROM scratch`,
		`SELECT id, v INTO TEMP snap2 FROM scratch`,
		`INSERT INTO pg_temp.snap2 VALUES (9, 'z')`,
		// A temporary table that hides a real one of the same name.
		`CREATE TEMP TABLE items (id int PRIMARY KEY, v text)`,
		`INSERT INTO items VALUES (1, 'temp')`,
		`INSERT INTO public.items VALUES (2, 'real')`,
		`BEGIN`,
		`CREATE TEMP TABLE per_tx (x int) ON COMMIT DROP`,
		`INSERT INTO per_tx VALUES (1)`,
		`INSERT INTO totals SELECT 2, sum(x) FROM per_tx`,
		`COMMIT`,
		`DROP TABLE snap`,
	}
	for _, sql := range steps {
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// The extended protocol too.
	if _, err := c.Exec(ctx, `INSERT INTO scratch VALUES ($1, $2)`, 4, "ext"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, `UPDATE scratch SET v = $1 WHERE id = $2`, "ext2", 4); err != nil {
		t.Fatal(err)
	}
	// Reads of temporary tables are served by the store that has them.
	var n int
	if err := c.QueryRow(ctx, `SELECT count(*) FROM scratch`).Scan(&n); err != nil || n != 3 {
		t.Fatalf("scratch: %d rows, %v", n, err)
	}
	var v string
	if err := c.QueryRow(ctx, `SELECT v FROM items WHERE id = 1`).Scan(&v); err != nil || v != "temp" {
		t.Fatalf("the temporary items table read %q, %v", v, err)
	}
	if err := c.QueryRow(ctx, `SELECT count(*) FROM items`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("the temporary items table has %d rows (%v); the read went to the real table", n, err)
	}
	if got := e.openDrift(); got != 0 {
		rows, _ := e.control.Query(ctx, `SELECT schema_name || '.' || table_name || ' ' || coalesce(reason, '') FROM tandem.drift`)
		for rows.Next() {
			var s string
			_ = rows.Scan(&s)
			t.Log("drift:", s)
		}
		rows.Close()
		t.Fatalf("%d drift entries for temporary tables", got)
	}
	e.assertEqual("totals", "id")
	e.assertEqual("items", "id")
}
