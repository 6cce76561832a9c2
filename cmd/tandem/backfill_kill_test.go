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
)

// TestBackfillChild is not a test: TestBackfillKilled runs the test binary
// as a separate tandem backfill process through it, to kill it with -9.
func TestBackfillChild(t *testing.T) {
	args := os.Getenv("TANDEM_BACKFILL_CHILD")
	if args == "" {
		t.Skip("helper process for TestBackfillKilled")
	}
	_, _, err := cli(strings.Split(args, "\x1f")...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// TestBackfillKilled: the backfill process is killed with -9 at random
// points three times, then run to the end. No row is missing or
// duplicated, every copied range is in the migration log, and the stores
// are equal. On both paths; on the snapshot path rows are deleted, updated
// and inserted after each kill (on old, then on new as the mirror does),
// so the rerun's reconcile must cover the changes since the first run's
// snapshot, and the slot is gone at the end.
func TestBackfillKilled(t *testing.T) {
	for _, path := range []string{"locked", "snapshot"} {
		t.Run(path, func(t *testing.T) { backfillKilled(t, path) })
	}
}

func backfillKilled(t *testing.T, path string) {
	const rows = 60000
	unit := 500 // rows per logged unit: --chunk on the locked path, --range-rows on the snapshot path
	if path == "snapshot" {
		unit = 5000
	}
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, fmt.Sprintf(`CREATE TABLE big (id int PRIMARY KEY, v text);
		INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, %d) g;`, rows))
	mustExec(t, newC, `CREATE TABLE big (id int PRIMARY KEY, v text)`)
	file, _ := pairConfig(t, oldC, newC, "kill-proxy")
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on", "--force"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}
	run := func(killAfter time.Duration) (killed bool) {
		t.Helper()
		cmd, done, out := startBackfillChild(t, "backfill", "-c", file, "--workers", "4", "--chunk", "500", "--rate", "20000",
			"--path", path, "--range-rows", fmt.Sprint(unit))
		if killAfter > 0 {
			select {
			case err := <-done:
				t.Logf("the backfill ended before the kill: %v\n%s", err, out.String())
				return false
			case <-time.After(killAfter):
				_ = cmd.Process.Signal(syscall.SIGKILL)
				<-done
				return true
			}
		}
		if err := <-done; err != nil {
			t.Fatalf("final backfill run: %v\n%s", err, out.String())
		}
		return false
	}
	changes := 0
	for i, after := range []time.Duration{700 * time.Millisecond, 1100 * time.Millisecond, 900 * time.Millisecond} {
		if !run(after) {
			t.Logf("run %d finished before its kill", i+1)
		}
		if path == "snapshot" {
			// What the mirror does: old first, then new. Deleted and
			// re-inserted keys keep the row count.
			for _, c := range []*pgtest.Cluster{oldC, newC} {
				mustExec(t, c, fmt.Sprintf(`UPDATE big SET v = 'upd%[1]d' WHERE id %% 97 = %[1]d;
					DELETE FROM big WHERE id %% 89 = %[1]d; INSERT INTO big SELECT g, 'back%[1]d' FROM generate_series(1, %[2]d) g WHERE g %% 89 = %[1]d`, i, rows))
			}
			changes++
		}
	}
	run(0)
	ho, no := storeHash(t, oldC, "big", "id")
	hn, nn := storeHash(t, newC, "big", "id")
	if changes > 0 {
		if v := pgtestScalar(t, oldC, "SELECT count(*) FROM big WHERE v LIKE 'upd%' OR v LIKE 'back%'"); v == "0" {
			t.Fatal("the changes between the kills did not reach old")
		}
		if v := pgtestScalar(t, oldC, "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'tandem_backfill%'"); v != "0" {
			t.Fatalf("%s backfill slots left on old", v)
		}
	}
	if ho != hn || no != nn || nn != rows {
		t.Fatalf("after three kills and a resume: old %d rows %s, new %d rows %s", no, ho, nn, hn)
	}
	// The units in the migration log cover the rows, but for those a kill
	// caught between the unit's commit on new and its log line (written
	// afterwards on the control database): at most one unit per worker per
	// kill. The checkpoints on new, committed with the rows, are what the
	// resume trusts.
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	var logged int64
	if err := ctl.QueryRow(ctx, `SELECT coalesce(sum(rows), 0) FROM tandem.migration_log WHERE status = 'done'`).Scan(&logged); err != nil {
		t.Fatal(err)
	}
	if lost := int64(3 * 4 * unit); logged < rows-lost {
		t.Fatalf("the migration log accounts for %d rows, fewer than the %d copied less %d", logged, rows, lost)
	}
	t.Logf("%d rows copied across 3 kills and a resume; the migration log accounts for %d row copies", rows, logged)
}

// pgtestScalar reads one value from c's postgres database as text.
func pgtestScalar(t *testing.T, c *pgtest.Cluster, sql string) string {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), c.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var s string
	if err := conn.QueryRow(context.Background(), "SELECT ("+sql+")::text").Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

// TestBackfillDeferIndexesKilled: tandem backfill --defer-indexes killed
// with -9 mid-copy (its indexes dropped on new) and again mid-rebuild (a
// CREATE INDEX CONCURRENTLY running; its backend is then terminated, as a
// restart of new would, leaving the index INVALID). While a definition is
// saved, the flip gate refuses naming the index. The rerun finishes with
// every index back, valid, defined as before, none missing or twice, and
// the stores equal; the flip then goes through.
func TestBackfillDeferIndexesKilled(t *testing.T) {
	const rows = 10000
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, fmt.Sprintf(`CREATE TABLE big (id int PRIMARY KEY, v text, n int);
		INSERT INTO big SELECT g, md5(g::text), g %% 100 FROM generate_series(1, %d) g;`, rows))
	// big_slow's build takes seconds (a sleep per row), so the kill lands
	// in it.
	mustExec(t, newC, `CREATE TABLE big (id int PRIMARY KEY, v text, n int);
		CREATE FUNCTION slow_md5(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN PERFORM pg_sleep(0.0003); RETURN md5($1); END $$;
		CREATE INDEX big_v ON big (v);
		CREATE INDEX big_n_v ON big (n, v) WHERE n > 5;
		CREATE INDEX big_slow ON big (public.slow_md5(v));
		CREATE UNIQUE INDEX big_v_id ON big (v, id);`)
	indexes := func() string {
		return pgtestScalar(t, newC, `SELECT string_agg(x.indexname || ' ' || x.indexdef || CASE WHEN i.indisvalid THEN '' ELSE ' INVALID' END, E'\n' ORDER BY x.indexname)
			FROM pg_indexes x JOIN pg_index i ON i.indexrelid = ('public.' || quote_ident(x.indexname))::regclass WHERE x.tablename = 'big'`)
	}
	before := indexes()
	file, _ := pairConfig(t, oldC, newC, "kill-proxy")
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on", "--force"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}
	start := func(rate string) (*exec.Cmd, chan error, *strings.Builder) {
		return startBackfillChild(t, "backfill", "-c", file, "--workers", "2", "--defer-indexes", "--path", "snapshot", "--range-rows", "1000", "--rate", rate)
	}
	killWhen := func(what string, cond func() bool) {
		t.Helper()
		cmd, done, out := start(map[string]string{"mid-copy": "2000", "mid-rebuild": "0"}[what])
		deadline := time.Now().Add(60 * time.Second)
		for !cond() {
			select {
			case err := <-done:
				t.Fatalf("the backfill ended before the kill %s: %v\n%s", what, err, out.String())
			case <-time.After(20 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("no moment to kill %s within 60s\n%s", what, out.String())
			}
		}
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-done
	}
	saved := func() string {
		return pgtestScalar(t, oldC, `SELECT coalesce(string_agg(index_name, ',' ORDER BY index_name), '') FROM tandem.backfill_deferred_indexes`)
	}
	// Mid-copy: the three plain indexes dropped, some chunks done, not all.
	killWhen("mid-copy", func() bool {
		return pgtestScalar(t, oldC, "SELECT to_regclass('tandem.backfill_chunks') IS NOT NULL AND to_regclass('tandem.backfill_deferred_indexes') IS NOT NULL") == "true" &&
			pgtestScalar(t, oldC, "SELECT count(*) FROM tandem.backfill_chunks WHERE status = 'done'") != "0" &&
			pgtestScalar(t, newC, "SELECT count(*) FROM pg_indexes WHERE tablename = 'big'") == "2"
	})
	if s := saved(); s != "big_n_v,big_slow,big_v" {
		t.Fatalf("definitions saved after the kill mid-copy: %q", s)
	}
	if pgtestScalar(t, oldC, "SELECT count(*) FROM tandem.backfill_chunks WHERE status <> 'done'") == "0" {
		t.Fatal("the kill mid-copy came after the copy")
	}
	refused(t, file, "3 index(es) of the new store dropped by tandem backfill --defer-indexes are not rebuilt yet: public.big_n_v (on public.big), public.big_slow (on public.big), public.big_v (on public.big)")
	// Mid-rebuild: the rerun finishes the copy and builds big_slow.
	building := `SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'CREATE INDEX CONCURRENTLY big_slow %'`
	killWhen("mid-rebuild", func() bool { return pgtestScalar(t, newC, building) != "0" })
	if s := saved(); !strings.Contains(s, "big_slow") {
		t.Fatalf("definitions saved after the kill mid-rebuild: %q", s)
	}
	// The killed process's build goes on in its backend until the server
	// notices the client is gone; end it as a restart of new would.
	pgtestScalar(t, newC, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY big_slow %' AND pid <> pg_backend_pid()`)
	waitFor(t, func() bool { return pgtestScalar(t, newC, building) == "0" })
	if got := indexes(); !strings.Contains(got, "big_slow CREATE INDEX big_slow ON public.big USING btree (slow_md5(v)) INVALID") {
		t.Fatalf("after the kill mid-rebuild big_slow is not INVALID:\n%s", got)
	}
	refused(t, file, "public.big_slow (on public.big)")

	_, done, out := start("0")
	if err := <-done; err != nil {
		t.Fatalf("final backfill run: %v\n%s", err, out.String())
	}
	if got := indexes(); got != before {
		t.Fatalf("indexes after the rerun:\n%s\nwant\n%s", got, before)
	}
	if s := saved(); s != "" {
		t.Fatalf("definitions left after the rerun: %q", s)
	}
	ho, no := storeHash(t, oldC, "big", "id")
	hn, nn := storeHash(t, newC, "big", "id")
	if ho != hn || no != nn || nn != rows {
		t.Fatalf("after two kills and a resume: old %d rows %s, new %d rows %s", no, ho, nn, hn)
	}
	verifyAll(t, file)
	if out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100", "--reason", "indexes back"); err != nil {
		t.Fatalf("flip after the rerun: %v\n%s%s", err, out, errOut)
	}
}

// startBackfillChild runs tandem with args in a child process of the test
// binary (TestBackfillChild), so that it can be killed with -9; done gets
// its exit, out its combined output.
func startBackfillChild(t *testing.T, args ...string) (cmd *exec.Cmd, done chan error, out *strings.Builder) {
	t.Helper()
	cmd = exec.Command(os.Args[0], "-test.run=^TestBackfillChild$")
	cmd.Env = append(os.Environ(), "TANDEM_BACKFILL_CHILD="+strings.Join(args, "\x1f"))
	out = &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done = make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	return cmd, done, out
}
