package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

// TestFeedCatchesWhatTheProxyCannotSee is issue 11's trigger side-write,
// write inside a function and write that bypasses the proxy, through a
// running tandem proxy with feed.enabled: the proxy mirrors items' row
// images (in replica mode, so new's trigger does not fire), the audit rows
// the trigger writes on old and the rows written directly on old reach
// new only through the feed: ledger entries with reason "change feed",
// which the proxy's repairer then repairs, until every table hashes the
// same on both stores. Without the feed the audit table stays short on
// new and the test fails.
func TestFeedCatchesWhatTheProxyCannotSee(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "feed-proxy", feedOn)
	if !cfg.Feed.Enabled {
		t.Fatal("config: the feed is not enabled")
	}
	schema := `CREATE TABLE items (id int PRIMARY KEY, name text, n int);
INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 50) g;
CREATE TABLE audit (id bigserial PRIMARY KEY, item int, what text);
CREATE FUNCTION audit_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (item, what) VALUES (NEW.id, TG_OP); RETURN NEW; END $$;
CREATE TRIGGER items_audit AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION audit_items();
CREATE FUNCTION bump(k int) RETURNS void LANGUAGE sql AS $$ UPDATE items SET n = n + 1 WHERE id = k $$;`
	mustExec(t, oldC, schema)
	mustExec(t, newC, schema)
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("dual-write: %v\n%s%s", err, out, errOut)
	}
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	newConn, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer newConn.Close(ctx)
	// The feed is reading once it has checked everything committed so far.
	waitChecked := func() {
		t.Helper()
		waitFeedChecked(t, ctl, "feed-proxy", nil)
	}
	waitChecked()

	app, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", rp.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(ctx)
	for _, sql := range []string{
		"UPDATE items SET name = 'renamed' WHERE id IN (3, 4)", // the trigger's audit rows: old only
		"SELECT bump(9)",
		"DO $$ BEGIN UPDATE items SET n = -1 WHERE id = 10; END $$",
	} {
		if _, err := app.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// A cron job on old, not through the proxy.
	if _, err := ctl.Exec(ctx, "INSERT INTO items VALUES (500, 'cron', 0)"); err != nil {
		t.Fatal(err)
	}
	waitChecked()
	var audit, direct int
	if err := ctl.QueryRow(ctx, `SELECT count(*) FILTER (WHERE table_name = 'audit'), count(*) FILTER (WHERE table_name = 'items' AND key = '{500}')
		FROM tandem.drift WHERE reason = 'change feed' AND stale = 'new'`).Scan(&audit, &direct); err != nil {
		t.Fatal(err)
	}
	if audit < 2 || direct != 1 {
		t.Fatalf("the feed recorded %d audit entries (want 2) and %d for the direct insert (want 1)", audit, direct)
	}
	hash := func(c *pgx.Conn, tbl string) string {
		var h string
		if err := c.QueryRow(ctx, fmt.Sprintf("SELECT coalesce(md5(string_agg(r::text, '|' ORDER BY r::text)), '') || count(*) FROM %s r", tbl)).Scan(&h); err != nil {
			t.Fatal(err)
		}
		return h
	}
	// The proxy's repairer closes the entries.
	harness.SucceedsSoon(t, 60*time.Second, func() error {
		for _, tbl := range []string{"items", "audit"} {
			if o, n := hash(ctl, tbl), hash(newConn, tbl); o != n {
				return fmt.Errorf("%s differs: old %s, new %s", tbl, o, n)
			}
		}
		var open int
		if err := ctl.QueryRow(ctx, "SELECT count(*) FROM tandem.drift WHERE repaired_at IS NULL").Scan(&open); err != nil {
			return err
		}
		if open != 0 {
			return fmt.Errorf("%d drift entries open", open)
		}
		return nil
	})
}

// waitFeedChecked waits up to 60s until the feed run by the replica holder
// has checked old's WAL up to its current insert position (ctl is old's
// control database). note, when set, adds to a failure to read the row.
func waitFeedChecked(t *testing.T, ctl *pgx.Conn, holder string, note func() string) {
	t.Helper()
	ctx := context.Background()
	var target string
	if err := ctl.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&target); err != nil {
		t.Fatal(err)
	}
	harness.SucceedsSoon(t, 60*time.Second, func() error {
		var ok *bool
		if err := ctl.QueryRow(ctx, "SELECT checked_lsn >= $1::pg_lsn FROM tandem.feed WHERE store = 'old' AND holder = $2", target, holder).Scan(&ok); err != nil {
			if note != nil {
				return fmt.Errorf("%s: %w (%s)", holder, err, note())
			}
			return err
		}
		if ok == nil || !*ok {
			return fmt.Errorf("%s has not checked up to %s", holder, target)
		}
		return nil
	})
}

// TestFeedProxyChild is not a test: TestFeedReplicaKilled runs the test
// binary as a separate tandem proxy process through it, to kill it with -9.
func TestFeedProxyChild(t *testing.T) {
	args := os.Getenv("TANDEM_FEED_CHILD")
	if args == "" {
		t.Skip("helper process for TestFeedReplicaKilled")
	}
	_, _, err := cli(strings.Split(args, "\x1f")...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// TestFeedReplicaKilled: the tandem proxy running the feed is killed with
// -9 while rows are written directly on old; the other replica is elected
// within seconds and resumes from the slot's confirmed position, so every
// one of those rows is in the ledger (reason change feed) and, repaired,
// on new: no change is left unchecked.
func TestFeedReplicaKilled(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, "CREATE TABLE items (id int PRIMARY KEY, v text)")
	mustExec(t, newC, "CREATE TABLE items (id int PRIMARY KEY, v text)")
	fileA, _ := pairConfig(t, oldC, newC, "feed-a", feedOn)
	_, cfgB := pairConfig(t, oldC, newC, "feed-b", feedOn)
	if out, errOut, err := cli("route", "set", "-c", fileA, "--mirror", "on", "--force"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestFeedProxyChild$")
	cmd.Env = append(os.Environ(), "TANDEM_FEED_CHILD="+strings.Join([]string{"proxy", "-c", fileA}, "\x1f"))
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-done
	}()
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	checkedBy := func(holder string) {
		t.Helper()
		waitFeedChecked(t, ctl, holder, func() string { return "child output: " + out.String() })
	}
	checkedBy("feed-a")
	rp := startQuietProxy(t, cfgB)
	defer stopProxy(t, rp)
	const rows = 300
	for i := range rows {
		if i == rows/3 {
			_ = cmd.Process.Signal(syscall.SIGKILL) // mid-stream
		}
		if _, err := ctl.Exec(ctx, "INSERT INTO items VALUES ($1, 'direct')", i); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond) // pacing the writes across the kill, not synchronisation
	}
	checkedBy("feed-b")
	var missing []int
	rowsq, err := ctl.Query(ctx, `SELECT g FROM generate_series(0, $1 - 1) g WHERE NOT EXISTS (
		SELECT 1 FROM tandem.drift WHERE reason = 'change feed' AND table_name = 'items' AND key = ARRAY[g::text])`, rows)
	if err != nil {
		t.Fatal(err)
	}
	for rowsq.Next() {
		var g int
		if err := rowsq.Scan(&g); err != nil {
			t.Fatal(err)
		}
		missing = append(missing, g)
	}
	rowsq.Close()
	if len(missing) > 0 {
		t.Fatalf("%d of %d rows written directly on old were never recorded by the feed: %v", len(missing), rows, missing)
	}
	ho, no := storeHash(t, oldC, "items", "id")
	harness.SucceedsSoon(t, 60*time.Second, func() error {
		if hn, nn := storeHash(t, newC, "items", "id"); hn != ho || nn != no {
			return fmt.Errorf("new has %d rows, old %d", nn, no)
		}
		return nil
	})
}
