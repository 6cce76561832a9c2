package controlschema

import (
	"context"
	_ "embed"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

var cluster *pgtest.Cluster

func TestMain(m *testing.M) { os.Exit(harness.Run(m, harness.Clusters(&cluster))) }

//go:embed testdata/before_versions.sql
var beforeVersions string

// newDB is a fresh database of its own for t; its DSN.
func newDB(t *testing.T) string { return cluster.DSN(harness.NewDB(t, cluster)) }

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(t.Context(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// controlTables are the tables the control schema holds at the latest
// migration, with the version table.
var controlTables = []string{"backfill_chunks", "backfill_control", "backfill_deferred_indexes", "backfill_slots", "backfill_tables", "drift", "feed", "migration_log", "mismatches",
	"replicas", "schema_version", "shadow_stats", "state", "state_history", "verify_runs"}

// layout is the control schema's columns and constraints, to compare two
// schemas by.
func layout(t *testing.T, c *pgx.Conn) string {
	t.Helper()
	var s string
	err := c.QueryRow(t.Context(), `SELECT string_agg(x, E'\n' ORDER BY x) FROM (
		SELECT format('%s.%s %s %s %s', table_name, column_name, data_type, is_nullable, coalesce(column_default, '')) AS x
			FROM information_schema.columns WHERE table_schema = 'tandem'
		UNION ALL
		SELECT format('%s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid)) FROM pg_constraint
			WHERE connamespace = 'tandem'::regnamespace
		UNION ALL
		SELECT format('%s %s', indexname, indexdef) FROM pg_indexes WHERE schemaname = 'tandem') l`).Scan(&s)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func tables(t *testing.T, c *pgx.Conn) []string {
	t.Helper()
	rows, err := c.Query(t.Context(), "SELECT tablename FROM pg_tables WHERE schemaname = 'tandem' ORDER BY 1")
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func versions(t *testing.T, c *pgx.Conn) []int {
	t.Helper()
	rows, err := c.Query(t.Context(), "SELECT version FROM tandem.schema_version ORDER BY 1")
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestApplyFresh: on an empty database Apply makes every control table,
// the initial passthrough state and the backfill's control row, and
// records each migration once.
func TestApplyFresh(t *testing.T) {
	c := connect(t, newDB(t))
	ctx := t.Context()
	if v, err := Version(ctx, c); err != nil || v != 0 {
		t.Fatalf("version of an empty database: %d, %v", v, err)
	}
	if err := Apply(ctx, c); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(tables(t, c), " "); got != strings.Join(controlTables, " ") {
		t.Fatalf("tables:\n got %s\nwant %s", got, strings.Join(controlTables, " "))
	}
	if v, err := Version(ctx, c); err != nil || v != Latest() {
		t.Fatalf("version: %d, %v; want %d", v, err, Latest())
	}
	if got := versions(t, c); len(got) != len(Migrations) {
		t.Fatalf("schema_version rows %v, want one per migration (%d)", got, len(Migrations))
	}
	var primary, by string
	if err := c.QueryRow(ctx, "SELECT primary_store, changed_by FROM tandem.state").Scan(&primary, &by); err != nil || primary != "old" {
		t.Fatalf("initial state: %q %q %v", primary, by, err)
	}
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM tandem.backfill_control").Scan(&n); err != nil || n != 1 {
		t.Fatalf("backfill control rows: %d %v", n, err)
	}
}

// TestApplyTwice: a second Apply changes nothing, and with the schema
// current it runs no migration (the rows it would touch keep their values).
func TestApplyTwice(t *testing.T) {
	c := connect(t, newDB(t))
	ctx := t.Context()
	if err := Apply(ctx, c); err != nil {
		t.Fatal(err)
	}
	before := layout(t, c)
	if _, err := c.Exec(ctx, "UPDATE tandem.state SET version = 7, reads = 40, mirror = true"); err != nil {
		t.Fatal(err)
	}
	if err := Apply(ctx, c); err != nil {
		t.Fatal(err)
	}
	if after := layout(t, c); after != before {
		t.Fatalf("the second Apply changed the schema:\n%s\n----\n%s", before, after)
	}
	if got := versions(t, c); len(got) != len(Migrations) {
		t.Fatalf("schema_version rows %v after two applies", got)
	}
	var v, reads int
	if err := c.QueryRow(ctx, "SELECT version, reads FROM tandem.state").Scan(&v, &reads); err != nil || v != 7 || reads != 40 {
		t.Fatalf("state after the second Apply: version %d reads %d (%v)", v, reads, err)
	}
}

// TestUpgradeFromBeforeVersions: a control schema made by the release
// before the versions (testdata/before_versions.sql, with its rows) is
// upgraded by Apply: it gets the version table and ends up the same
// schema as a fresh one, rows kept.
func TestUpgradeFromBeforeVersions(t *testing.T) {
	ctx := t.Context()
	fresh := connect(t, newDB(t))
	if err := Apply(ctx, fresh); err != nil {
		t.Fatal(err)
	}
	c := connect(t, newDB(t))
	if _, err := c.Exec(ctx, beforeVersions); err != nil {
		t.Fatalf("the old DDL: %v", err)
	}
	if _, err := c.Exec(ctx, `UPDATE tandem.state SET version = 5, mirror = true;
		INSERT INTO tandem.drift (schema_name, table_name, key, stale) VALUES ('public', 'orders', '{7}', 'old');
		INSERT INTO tandem.migration_log (schema_name, table_name, status, worker_id) VALUES ('public', 'orders', 'done', 'w1')`); err != nil {
		t.Fatal(err)
	}
	if v, err := Version(ctx, c); err != nil || v != 0 {
		t.Fatalf("version of a schema from before the versions: %d, %v", v, err)
	}
	if err := Apply(ctx, c); err != nil {
		t.Fatal(err)
	}
	if v, err := Version(ctx, c); err != nil || v != Latest() {
		t.Fatalf("version after the upgrade: %d, %v", v, err)
	}
	if got, want := layout(t, c), layout(t, fresh); got != want {
		t.Fatalf("upgraded schema differs from a fresh one:\n%s\n----\n%s", got, want)
	}
	var version int64
	var mirror bool
	var drift, logged int
	if err := c.QueryRow(ctx, `SELECT (SELECT version FROM tandem.state), (SELECT mirror FROM tandem.state),
		(SELECT count(*) FROM tandem.drift WHERE stale = 'old' AND repaired_at IS NULL), (SELECT count(*) FROM tandem.migration_log)`).
		Scan(&version, &mirror, &drift, &logged); err != nil || version != 5 || !mirror || drift != 1 || logged != 1 {
		t.Fatalf("rows after the upgrade: version %d mirror %v drift %d log %d (%v)", version, mirror, drift, logged, err)
	}
}

// TestConcurrentApply: eight callers on an empty database at once, as
// replicas starting together: each succeeds and every migration is
// recorded once.
func TestConcurrentApply(t *testing.T) {
	dsn := newDB(t)
	ctx := t.Context()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	const callers = 8
	errs := make([]error, callers)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range callers {
		wg.Go(func() {
			c, err := pgx.Connect(ctx, dsn)
			if err != nil {
				errs[i] = err
				return
			}
			defer c.Close(context.Background())
			<-start
			errs[i] = Apply(ctx, c)
		})
	}
	close(start)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	c := connect(t, dsn)
	if got := versions(t, c); len(got) != len(Migrations) {
		t.Fatalf("schema_version rows %v, want one per migration", got)
	}
	if got := strings.Join(tables(t, c), " "); got != strings.Join(controlTables, " ") {
		t.Fatalf("tables: %s", got)
	}
	// Apply through a pool works the same.
	if err := Apply(ctx, pool); err != nil {
		t.Fatal(err)
	}
}

// TestNewerSchemaRefused: a control schema at a version this binary does
// not know is refused, before and under the lock, with a PostgreSQL-style
// message and hint, and left as it is.
func TestNewerSchemaRefused(t *testing.T) {
	c := connect(t, newDB(t))
	ctx := t.Context()
	if err := Apply(ctx, c); err != nil {
		t.Fatal(err)
	}
	next := Latest() + 1
	if _, err := c.Exec(ctx, "INSERT INTO tandem.schema_version (version, name) VALUES ($1, 'from a newer release')", next); err != nil {
		t.Fatal(err)
	}
	err := Apply(ctx, c)
	var ne *NewerSchemaError
	if !errors.As(err, &ne) || ne.Found != next || ne.Known != Latest() || ne.Code() != "55000" {
		t.Fatalf("Apply on a newer schema: %v", err)
	}
	msg := err.Error()
	for _, want := range []string{"ERROR:", "newer than this Tandem knows", "SQLSTATE 55000", "HINT:", "never downgraded"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	if got := versions(t, c); got[len(got)-1] != next {
		t.Fatalf("versions after the refusal: %v", got)
	}
	// Under the lock too: the check after the first read refuses as well.
	if err := check(next); !errors.As(err, &ne) {
		t.Fatalf("check(%d) = %v", next, err)
	}
}
