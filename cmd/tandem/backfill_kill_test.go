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
		args := strings.Join([]string{"backfill", "-c", file, "--workers", "4", "--chunk", "500", "--rate", "20000",
			"--path", path, "--range-rows", fmt.Sprint(unit)}, "\x1f")
		cmd := exec.Command(os.Args[0], "-test.run=^TestBackfillChild$")
		cmd.Env = append(os.Environ(), "TANDEM_BACKFILL_CHILD="+args)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
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
