package table

import (
	"errors"
	"testing"
	"time"
)

// TestMigrationLogUpgrade creates the migration log as Tandem created it
// before the source column and the 'repaired' status, upgrades it twice,
// and checks old rows, the new column and the replaced status check.
func TestMigrationLogUpgrade(t *testing.T) {
	s := newStores(t)
	s.old(`CREATE SCHEMA tandem;
		CREATE TABLE tandem.migration_log (
			id bigserial PRIMARY KEY, schema_name text NOT NULL, table_name text NOT NULL, lo text[],
			lo_inclusive boolean NOT NULL DEFAULT false, hi text[], rows bigint NOT NULL DEFAULT 0,
			status text NOT NULL CHECK (status IN ('done', 'failed')), error text,
			duration_ms double precision NOT NULL DEFAULT 0, attempt int NOT NULL DEFAULT 1,
			worker_id text NOT NULL, logged_at timestamptz NOT NULL DEFAULT now());
		INSERT INTO tandem.migration_log (schema_name, table_name, rows, status, worker_id) VALUES ('public', 'items', 10, 'done', 'w1');`)
	c := s.primary()
	ctx := t.Context()
	for range 2 {
		if err := EnsureMigrationLog(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	n := Name{Schema: "public", Table: "items"}
	if err := LogUnit(ctx, c, LogEntry{Table: n, Lo: []string{"1"}, Hi: []string{"9"}, LoInclusive: true, Rows: 2, Status: LogRepaired,
		Worker: "w2", Source: LogSourceCompare, Duration: time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if err := LogUnit(ctx, c, LogEntry{Table: n, Err: errors.New("boom"), Worker: "w3"}); err != nil {
		t.Fatal(err)
	}
	rows, err := c.Query(ctx, "SELECT worker_id, status, source, rows FROM tandem.migration_log ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for rows.Next() {
		var w, st, src string
		var r int64
		if err := rows.Scan(&w, &st, &src, &r); err != nil {
			t.Fatal(err)
		}
		got = append(got, w+" "+st+" "+src)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	want := []string{"w1 done backfill", "w2 repaired compare", "w3 failed backfill"}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("log = %q, want %q", got, want)
	}
	if _, err := c.Exec(ctx, "INSERT INTO tandem.migration_log (schema_name, table_name, status, worker_id) VALUES ('a', 'b', 'bogus', 'w')"); err == nil {
		t.Fatal("status 'bogus' accepted")
	}
	var checks int
	if err := c.QueryRow(ctx, `SELECT count(*) FROM pg_constraint WHERE conrelid = 'tandem.migration_log'::regclass AND contype = 'c'`).Scan(&checks); err != nil || checks != 1 {
		t.Fatalf("check constraints = %d, %v; want 1", checks, err)
	}
}
