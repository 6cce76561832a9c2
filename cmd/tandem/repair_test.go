package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// TestRepairerIsolatesFailures is issue 10 through a running proxy: drift
// from a new-store outage on five ordinary tables, next to two entries the
// repairer cannot repair: one stale on the primary, which it tries first,
// for a table in scope without a mapping (it does not exist), and a row
// the new store's CHECK rejects. The five tables are repaired all the
// same; the bad entries back off, become stuck, and are then shown by
// tandem route show (and --json), counted by tandem_drift_stuck, and named
// by the refusal of a write flip. Once the CHECK is dropped the repairer
// repairs its row; the other entry is closed by hand, as the refusal's
// hint says; then the flip passes.
func TestRepairerIsolatesFailures(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	file, _ := pairConfig(t, oldC, newC, "repair-proxy")
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	raw = []byte(strings.Replace(string(raw), "  repair_interval: 100ms\n", "  repair_interval: 100ms\n  repair_backoff_max: 400ms\n  drift_stuck_attempts: 3\n", 1))
	if err := os.WriteFile(file, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := loadConfig(t, file)
	tables := []string{"t1", "t2", "t3", "t4", "t5"}
	mustExec(t, oldC, "CREATE TABLE strict (id int PRIMARY KEY, v text); INSERT INTO strict VALUES (1, 'bad')")
	mustExec(t, newC, "CREATE TABLE strict (id int PRIMARY KEY, v text CONSTRAINT not_bad CHECK (v <> 'bad'))")
	for _, tb := range tables {
		for _, c := range []*pgtest.Cluster{oldC, newC} {
			mustExec(t, c, fmt.Sprintf("CREATE TABLE %s (id int PRIMARY KEY, v text); INSERT INTO %[1]s SELECT i, 'v' || i FROM generate_series(1, 10) i", tb))
		}
	}
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("dual-write: %v\n%s%s", err, out, errOut)
	}

	// The outage: writes that reached old only, and their drift. The bad
	// entry first: stale on old (the primary), which the repairer repairs
	// first, for a table missing on both stores.
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	entries := []table.DriftEntry{{Table: table.Name{Schema: "public", Table: "ghost"}, Key: []string{"7"}, Stale: table.StaleOld},
		{Table: table.Name{Schema: "public", Table: "strict"}, Key: []string{"1"}}}
	for _, tb := range tables {
		mustExec(t, oldC, fmt.Sprintf("UPDATE %s SET v = 'changed' WHERE id <= 5; INSERT INTO %[1]s SELECT i, 'new' || i FROM generate_series(11, 20) i", tb))
		for i := 1; i <= 20; i++ {
			if i <= 5 || i > 10 {
				entries = append(entries, table.DriftEntry{Table: table.Name{Schema: "public", Table: tb}, Key: []string{fmt.Sprint(i)}, Reason: "new store down"})
			}
		}
	}
	if err := table.RecordDrift(ctx, ctl, entries); err != nil {
		t.Fatal(err)
	}
	nc, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close(ctx)
	fingerprint := func(q *pgx.Conn, tb string) string {
		var h string
		if err := q.QueryRow(ctx, "SELECT coalesce(md5(string_agg(id || ':' || v, ',' ORDER BY id)), '') FROM "+tb).Scan(&h); err != nil {
			t.Fatal(err)
		}
		return h
	}
	waitFor(t, func() bool {
		for _, tb := range tables {
			if fingerprint(ctl, tb) != fingerprint(nc, tb) {
				return false
			}
		}
		return true
	})

	// The bad entries: failing, backing off, then stuck.
	var attempts int
	waitFor(t, func() bool {
		if err := ctl.QueryRow(ctx, "SELECT min(attempts) FROM tandem.drift WHERE table_name IN ('ghost', 'strict')").Scan(&attempts); err != nil {
			t.Fatal(err)
		}
		return attempts >= 3
	})
	rows, err := ctl.Query(ctx, "SELECT table_name || ': ' || coalesce(last_error, '') FROM tandem.drift WHERE repaired_at IS NULL ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	failed, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(failed) != 2 || !strings.Contains(failed[0], "ghost: repairing public.ghost on old: no mapping has public.ghost as its new table") ||
		!strings.Contains(failed[1], `strict: repairing public.strict: copying public.strict: writing the secondary: ERROR: new row for relation "strict" violates check constraint "not_bad"`) {
		t.Errorf("open entries (%v), want only the two bad ones:\n%s", err, strings.Join(failed, "\n"))
	}

	out, _, err := cli("route", "show", "-c", file)
	for _, want := range []string{"open drift: 2 entries on 2 tables: public.ghost (1), public.strict (1)",
		"stuck drift: 2 entries failed to repair at least 3 times (routing.drift_stuck_attempts)",
		"public.ghost key (7), stale on old,", "last error: repairing public.ghost on old: no mapping has public.ghost as its new table; next attempt",
		"public.strict key (1), stale on new,", `violates check constraint "not_bad"`} {
		if err != nil || !strings.Contains(out, want) {
			t.Errorf("route show lacks %q (%v):\n%s", want, err, out)
		}
	}
	out, _, err = cli("route", "show", "-c", file, "--json")
	var st control.Status
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.Drift == nil || st.Drift.Stuck != 2 || st.Drift.StuckAttempts != 3 ||
		len(st.Drift.StuckEntries) != 2 || st.Drift.StuckEntries[0].Table != "public.ghost" || st.Drift.StuckEntries[0].Attempts < 3 ||
		st.Drift.StuckEntries[0].Stale != "old" || !strings.Contains(st.Drift.StuckEntries[0].LastError, "no mapping") ||
		st.Drift.StuckEntries[1].Table != "public.strict" || !strings.Contains(st.Drift.StuckEntries[1].LastError, "check constraint") {
		t.Errorf("route show --json: %v\n%s", err, out)
	}
	stuckMetric := regexp.MustCompile(`(?m)^tandem_drift_stuck(_[a-z]+)?(\{[^}]*\})? (\d+)`)
	metric := func() string {
		resp, err := http.Get("http://" + rp.AdminAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if m := stuckMetric.FindStringSubmatch(string(b)); m != nil {
			return m[3]
		}
		return "absent"
	}
	waitFor(t, func() bool { return metric() == "2" })
	errOut := refused(t, file, "drift is stuck: 2 entries failed to repair at least 3 times")
	for _, want := range []string{"public.ghost key (7), stale on old", "no mapping has public.ghost", "public.strict key (1)", "fix the cause"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("refusal lacks %q:\n%s", want, errOut)
		}
	}

	// Fixed: new accepts the row, and the repairer copies it within
	// routing.repair_backoff_max. The entry for a table that does not
	// exist can never apply: closed by hand.
	mustExec(t, newC, "ALTER TABLE strict DROP CONSTRAINT not_bad")
	waitFor(t, func() bool { return fingerprint(ctl, "strict") == fingerprint(nc, "strict") })
	if _, err := ctl.Exec(ctx, "UPDATE tandem.drift SET repaired_at = now() WHERE table_name = 'ghost'"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return metric() == "0" })
	out, _, err = cli("route", "show", "-c", file)
	if err != nil || !strings.Contains(out, "open drift: none") || strings.Contains(out, "stuck drift") {
		t.Errorf("route show after the repair (%v):\n%s", err, out)
	}
	backfillAll(t, file)
	verifyAll(t, file)
	if out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100"); err != nil {
		t.Fatalf("flip after the repair: %v\n%s%s", err, out, errOut)
	}
}

// TestRepairPassGoesOn: one repair pass, as the proxy's repairer runs it.
// An entry stale on the primary that fails (its table is gone) does not
// end the pass: the entries stale on the secondary, on three tables, are
// repaired in the same pass (issue 10: the pass used to end at the first
// failure, so they never were). A store error (the new store's session
// killed) does end it, asking for fresh connections, and counts against
// no entry.
func TestRepairPassGoesOn(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	_, cfg := pairConfig(t, oldC, newC, "pass-proxy")
	tables := []string{"t1", "t2", "t3"}
	for _, tb := range tables {
		mustExec(t, oldC, fmt.Sprintf("CREATE TABLE %s (id int PRIMARY KEY, v text); INSERT INTO %[1]s SELECT i, 'v' || i FROM generate_series(1, 10) i", tb))
		mustExec(t, newC, fmt.Sprintf("CREATE TABLE %s (id int PRIMARY KEY, v text); INSERT INTO %[1]s SELECT i, 'stale' FROM generate_series(1, 5) i", tb))
	}
	cp, err := control.Open(cfg, newLogger(config.Log{Format: "text", Level: "error"}, io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	ctx := context.Background()
	entries := []table.DriftEntry{{Table: table.Name{Schema: "public", Table: "ghost"}, Key: []string{"1"}, Stale: table.StaleOld}}
	for _, tb := range tables {
		for i := 1; i <= 10; i++ {
			entries = append(entries, table.DriftEntry{Table: table.Name{Schema: "public", Table: tb}, Key: []string{fmt.Sprint(i)}})
		}
	}
	if err := table.RecordDrift(ctx, cp.Pool(), entries); err != nil {
		t.Fatal(err)
	}
	conns := map[route.Store]*pgx.Conn{}
	defer func() {
		for _, c := range conns {
			c.Close(ctx)
		}
	}()
	st := route.State{Version: 2, Settings: route.Settings{Primary: route.Old, Mirror: true}}
	if !cp.RepairPass(ctx, st, conns) {
		t.Fatal("the pass ended early")
	}
	type entry struct {
		Table    string
		Open     bool
		Attempts int
	}
	read := func() map[string]entry {
		rows, err := cp.Pool().Query(ctx, "SELECT table_name, bool_or(repaired_at IS NULL), max(attempts) FROM tandem.drift GROUP BY table_name")
		if err != nil {
			t.Fatal(err)
		}
		list, err := pgx.CollectRows(rows, pgx.RowToStructByPos[entry])
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]entry{}
		for _, e := range list {
			m[e.Table] = e
		}
		return m
	}
	got := read()
	if g := got["ghost"]; !g.Open || g.Attempts != 1 {
		t.Errorf("ghost entry: %+v, want open after 1 attempt", g)
	}
	for _, tb := range tables {
		if got[tb].Open {
			t.Errorf("%s: entries still open after the pass", tb)
		}
		var o, n string
		q := "SELECT string_agg(id || v, ',' ORDER BY id) FROM " + tb
		if err := conns[route.Old].QueryRow(ctx, q).Scan(&o); err != nil {
			t.Fatal(err)
		}
		if err := conns[route.New].QueryRow(ctx, q).Scan(&n); err != nil || o != n {
			t.Errorf("%s differs after the pass: old %s, new %s (%v)", tb, o, n, err)
		}
	}

	// The new store's session dies: the pass ends, and no entry is blamed.
	mustExec(t, newC, "UPDATE t1 SET v = 'stale again' WHERE id = 1")
	if err := table.RecordDrift(ctx, cp.Pool(), []table.DriftEntry{{Table: table.Name{Schema: "public", Table: "t1"}, Key: []string{"1"}, Reason: "second"}}); err != nil {
		t.Fatal(err)
	}
	pid := conns[route.New].PgConn().PID()
	mustExec(t, newC, fmt.Sprintf("SELECT pg_terminate_backend(%d)", pid))
	watch, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close(ctx)
	waitFor(t, func() bool {
		var alive bool
		if err := watch.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", int(pid)).Scan(&alive); err != nil {
			t.Fatal(err)
		}
		return !alive
	})
	if cp.RepairPass(ctx, st, conns) {
		t.Fatal("the pass went on with the new store's session gone")
	}
	var attempts int
	var open bool
	if err := cp.Pool().QueryRow(ctx, "SELECT attempts, repaired_at IS NULL FROM tandem.drift WHERE reason = 'second'").Scan(&attempts, &open); err != nil ||
		attempts != 0 || !open {
		t.Errorf("entry after a store error: attempts %d, open %v (%v)", attempts, open, err)
	}
	// Fresh connections, as the repairer makes them: repaired.
	conns[route.New].Close(ctx)
	delete(conns, route.New)
	if !cp.RepairPass(ctx, st, conns) {
		t.Fatal("the pass on fresh connections ended early")
	}
	if err := cp.Pool().QueryRow(ctx, "SELECT repaired_at IS NULL FROM tandem.drift WHERE reason = 'second'").Scan(&open); err != nil || open {
		t.Errorf("entry still open on fresh connections (%v)", err)
	}
}
