package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
	"go.uber.org/goleak"
)

// cli runs tandem with args and returns its stdout, stderr and error.
func cli(args ...string) (string, string, error) {
	root := newRoot()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), errOut.String(), err
}

// startReplicas starts a quiet proxy (startQuietProxy) per replica id in
// front of oldC and newC and returns the last one's config file and the
// proxies; the test defers stop, which stops them in reverse order.
func startReplicas(t *testing.T, oldC, newC *pgtest.Cluster, ids ...string) (file string, proxies []*runningProxy, stop func()) {
	t.Helper()
	stop = func() {
		for i := len(proxies) - 1; i >= 0; i-- {
			stopProxy(t, proxies[i])
		}
	}
	started := false
	defer func() {
		if !started {
			stop() // a start that failed stops the ones before it
		}
	}()
	for _, id := range ids {
		f, cfg := pairConfig(t, oldC, newC, id)
		file = f
		proxies = append(proxies, startQuietProxy(t, cfg))
	}
	started = true
	return file, proxies, stop
}

// execCommand runs one subcommand (newCompareCmd(), newPlanCmd(), ...) with
// args, silent about usage and errors, and returns its stdout, stderr and
// error.
func execCommand(t *testing.T, cmd *cobra.Command, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.ExecuteContext(t.Context())
	return out.String(), errOut.String(), err
}

// startQuietProxy starts a tandem proxy in the test's process with cfg,
// logging only errors, to nowhere; the test stops it (stopProxy).
func startQuietProxy(t *testing.T, cfg *config.Config) *runningProxy {
	t.Helper()
	rp, err := startProxy(cfg, newLogger(config.Log{Format: "text", Level: "error"}, io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	return rp
}

// stopProxy stops rp, failing the test (not at once) if it does not stop
// cleanly; tests defer it.
func stopProxy(t *testing.T, rp *runningProxy) {
	if err := rp.stop(); err != nil {
		t.Error(err)
	}
}

// pairConfig writes a config file for a proxy in front of old and new,
// changed by edits in order (feedOn, repairEvery, feedWait, withGates), and
// returns its path and the loaded config. It is every cmd/tandem test's
// config; editConfig derives variants of one.
func pairConfig(t *testing.T, oldC, newC *pgtest.Cluster, replica string, edits ...configEdit) (string, *config.Config) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "tandem.yaml")
	yaml := pairYAML(oldC.DSN("postgres"), newC.DSN("postgres"), replica)
	for _, e := range edits {
		yaml = e(yaml)
	}
	if err := os.WriteFile(file, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := loadConfig(t, file)
	return file, cfg
}

// pairYAML is the config of every cmd/tandem test's proxy: both stores,
// ports of the kernel's choosing, short timeouts and quiet logs.
func pairYAML(oldDSN, newDSN, replica string) string {
	return fmt.Sprintf(`listen: 127.0.0.1:0
admin: 127.0.0.1:0
old:
  dsn: %q
new:
  dsn: %q
limits:
  drain_timeout: 2s
routing:
  replica_id: %s
  poll: 200ms
  fence_timeout: 2s
  repair_interval: 100ms
log:
  level: error
`, oldDSN, newDSN, replica)
}

// loadConfig loads the config file (no environment) and validates it.
func loadConfig(t *testing.T, file string) *config.Config {
	t.Helper()
	cfg, err := config.Load(file, nil)
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// configEdit changes a test config's YAML before it is written.
type configEdit func(yaml string) string

// feedOn enables the change feed.
func feedOn(yaml string) string { return yaml + "feed:\n  enabled: true\n" }

// repairEvery runs the repairer every d, backing off to at most max(d, 5s).
func repairEvery(d time.Duration) configEdit {
	return func(yaml string) string {
		return strings.Replace(yaml, "repair_interval: 100ms",
			fmt.Sprintf("repair_interval: %s\n  repair_backoff_max: %s", d, max(d, 5*time.Second)), 1)
	}
}

// feedWait sets routing.feed_wait.
func feedWait(d time.Duration) configEdit {
	return func(yaml string) string {
		return strings.Replace(yaml, "routing:\n", fmt.Sprintf("routing:\n  feed_wait: %s\n", d), 1)
	}
}

// withGates adds a gates section (its lines indented by two spaces).
func withGates(gates string) configEdit {
	return func(yaml string) string { return yaml + "gates:\n" + gates }
}

// editConfig writes a copy of the config file with edits applied, named
// after name, and returns its path.
func editConfig(t *testing.T, file, name string, edits ...configEdit) string {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	yaml := string(raw)
	for _, e := range edits {
		yaml = e(yaml)
	}
	out := file + "." + name + ".yaml"
	if err := os.WriteFile(out, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return out
}

// waitFor waits up to 5s for cond.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func mustExec(t *testing.T, c *pgtest.Cluster, sql string) {
	t.Helper()
	if err := c.Exec(context.Background(), "postgres", sql); err != nil {
		t.Fatal(err)
	}
}

// TestRouteCLI walks the playbook with `tandem route` against a proxy in
// front of two clusters: refusals exit 1 with the reason, changes report
// who acknowledged them, a flip reports its fence and syncs sequences, the
// drift gate refuses until --force, and rollback works from the flip.
func TestRouteCLI(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "cli-proxy")
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id serial PRIMARY KEY, note text)")
	}
	mustExec(t, oldC, "INSERT INTO orders (note) SELECT 'x' FROM generate_series(1, 10)")

	// Before anything created the control schema.
	if _, _, err := cli("route", "show", "-c", file); err == nil || !strings.Contains(err.Error(), "no routing state yet") {
		t.Fatalf("show before the schema exists: %v", err)
	}
	// Refused: primary=new while mirror is off. Exit status 1 and the reason.
	out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100")
	if ec, ok := err.(exitCode); !ok || ec != 1 || !strings.Contains(errOut, "refused: primary can change (old -> new) only while mirror is on") {
		t.Fatalf("flip with mirror off: %v\n%s%s", err, out, errOut)
	}
	if _, _, err := cli("route", "set", "-c", file, "--mirror", "maybe"); err == nil || !strings.Contains(err.Error(), "--mirror must be on or off") {
		t.Fatalf("--mirror maybe: %v", err)
	}
	if _, _, err := cli("route", "set", "-c", file); err == nil || !strings.Contains(err.Error(), "nothing to change") {
		t.Fatalf("set without settings: %v", err)
	}

	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	out, _, err = cli("route", "set", "-c", file, "--mirror", "on", "--reason", "start dual-write")
	if err != nil || !strings.Contains(out, "routing version 2 (was 1): primary=old mirror=on reads=0% shadow=0%") ||
		!strings.Contains(out, "acknowledged by: cli-proxy") {
		t.Fatalf("dual-write: %v\n%s", err, out)
	}
	backfillAll(t, file)
	verifyAll(t, file)

	// Open drift on a table the repairer cannot fix: the flip is refused.
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	if err := table.RecordDrift(ctx, ctl, []table.DriftEntry{{Table: table.Name{Schema: "public", Table: "ghost"}, Key: []string{"7"}}}); err != nil {
		t.Fatal(err)
	}
	out, errOut, err = cli("route", "set", "-c", file, "--primary", "new", "--reads", "100")
	if ec, ok := err.(exitCode); !ok || ec != 1 || !strings.Contains(errOut, "drift is open: 1 entries on 1 tables (public.ghost)") {
		t.Fatalf("flip with open drift: %v\n%s%s", err, out, errOut)
	}
	out, _, err = cli("route", "set", "-c", file, "--primary", "new", "--reads", "100", "--force", "--reason", "cutover")
	if err != nil {
		t.Fatalf("forced flip: %v\n%s", err, out)
	}
	for _, want := range []string{"routing version 3 (was 2): primary=new mirror=on reads=100% shadow=0%",
		"write flip: fence held", "drained by: cli-proxy", "sequences synced to new: 1", "forced past: drift is open", "acknowledged by: cli-proxy"} {
		if !strings.Contains(out, want) {
			t.Errorf("flip output lacks %q:\n%s", want, out)
		}
	}
	if st := rp.srv.State(); st.Primary != route.New || st.Version != 3 {
		t.Errorf("proxy state after the flip: version %d %s", st.Version, st.Settings)
	}
	waitFor(t, func() bool { return rp.srv.State().Fence == 0 })
	var next int64
	nc, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close(ctx)
	if err := nc.QueryRow(ctx, "SELECT nextval('orders_id_seq')").Scan(&next); err != nil || next != 1011 {
		t.Errorf("new's orders_id_seq after the flip: %d %v, want 10 + margin 1000 + 1", next, err)
	}

	out, _, err = cli("route", "show", "-c", file)
	for _, want := range []string{"routing version 3: primary=new", "write fence: none", "open drift: 1 entries on 1 tables: public.ghost (1)", "1 missed by the new store",
		"cli-proxy", "closed", "cutover [forced past: drift is open", "start dual-write", "tandem cli", "change feed: off (feed.enabled is false)"} {
		if err != nil || !strings.Contains(out, want) {
			t.Errorf("route show lacks %q (%v):\n%s", want, err, out)
		}
	}
	out, _, err = cli("route", "show", "-c", file, "--json")
	var st control.Status
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.State.Version != 3 || len(st.Replicas) != 1 ||
		!st.Replicas[0].Live || st.Replicas[0].AckedVersion != 3 || st.Drift == nil || st.Drift.Open != 1 {
		t.Fatalf("route show --json: %v\n%s", err, out)
	}

	out, _, err = cli("rollback", "-c", file, "--reason", "p99 regression")
	if err != nil || !strings.Contains(out, "routing version 4 (was 3): primary=old mirror=on reads=0% shadow=0%") || !strings.Contains(out, "write flip: fence held") {
		t.Fatalf("rollback: %v\n%s", err, out)
	}
	out, _, err = cli("route", "rollback", "-c", file)
	if err != nil || !strings.Contains(out, "routing unchanged at version 4") {
		t.Fatalf("second rollback: %v\n%s", err, out)
	}
	if st := rp.srv.State(); st.Primary != route.Old || st.Version != 4 {
		t.Errorf("proxy state after the rollback: version %d %s", st.Version, st.Settings)
	}
}

// TestRouteHelp: the help teaches the playbook.
func TestRouteHelp(t *testing.T) {
	for _, args := range [][]string{{"route", "--help"}, {"route", "set", "--help"}, {"rollback", "--help"}} {
		out, _, err := cli(args...)
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"--reason", "rollback"} {
			if !strings.Contains(out, want) {
				t.Errorf("%v lacks %q", args, want)
			}
		}
		if args[1] != "--help" || args[0] == "rollback" {
			continue
		}
		for _, want := range []string{"--mirror on", "--reads 10", "--primary new", "tandem complete", "tandem rollback"} {
			if !strings.Contains(out, want) {
				t.Errorf("%v lacks the example %q", args, want)
			}
		}
	}
	out, _, _ := cli("route", "set", "--help")
	for _, want := range []string{"--primary string", "--mirror string", "--reads int", "--shadow int", "--force", "--control DSN"} {
		if !strings.Contains(out, want) {
			t.Errorf("route set --help lacks %q", want)
		}
	}
}

// TestRoutingAdminAPI changes the routing through a running proxy's admin
// API, the same code path as the CLI, and checks the proxy follows.
func TestRoutingAdminAPI(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	_, cfg := pairConfig(t, oldC, newC, "api-proxy")
	rp, err := startProxy(cfg, newLogger(config.Log{Format: "text", Level: "error"}, io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			_ = rp.stop()
		}
	}()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	call := func(method, path, body string, v any) int {
		t.Helper()
		resp, b := harness.Request(t, client, method, "http://"+rp.AdminAddr()+path, body)
		if v != nil {
			if err := json.Unmarshal(b, v); err != nil {
				t.Fatalf("%s %s: %v\n%s", method, path, err, b)
			}
		}
		return resp.StatusCode
	}
	var st control.Status
	if code := call("GET", "/api/v1/state", "", &st); code != 200 || st.State.Version != 1 || st.Drift == nil || st.Drift.Open != 0 {
		t.Fatalf("GET state: %d %+v", code, st)
	}
	var e struct{ Error string }
	if code := call("POST", "/api/v1/route", `{"primary": "new", "reads": 100}`, &e); code != 409 || !strings.Contains(e.Error, "only while mirror is on") {
		t.Fatalf("flip with mirror off: %d %+v", code, e)
	}
	if code := call("POST", "/api/v1/route", `{"reads": "all"}`, &e); code != 400 {
		t.Fatalf("bad input: %d %+v", code, e)
	}
	var res control.Result
	if code := call("POST", "/api/v1/route", `{"mirror": true}`, &res); code != 200 || res.State.Version != 2 || strings.Join(res.Report.Acked, ",") != "api-proxy" {
		t.Fatalf("dual-write: %d %+v", code, res)
	}
	res = control.Result{}
	if code := call("POST", "/api/v1/route", `{"primary": "new", "reads": 100, "reason": "cutover"}`, &res); code != 200 ||
		!res.Report.Flip || strings.Join(res.Report.Drained, ",") != "api-proxy" || res.Report.FenceMS <= 0 || res.State.Primary != route.New {
		t.Fatalf("write flip: %d %+v", code, res)
	}
	t.Logf("write flip through the admin API: fence held %.2fms", res.Report.FenceMS)
	// The proxy applied version 3 before the flip returned, and sees the
	// fence released at its next notification.
	if s := rp.srv.State(); s.Version != 3 || s.Primary != route.New {
		t.Fatalf("proxy state: version %d %s", s.Version, s.Settings)
	}
	waitFor(t, func() bool { return rp.srv.State().Fence == 0 })
	res = control.Result{}
	if code := call("POST", "/api/v1/rollback", `{"reason": "drill"}`, &res); code != 200 || res.State.Primary != route.Old || res.State.Version != 4 {
		t.Fatalf("rollback: %d %+v", code, res)
	}
	resp, err := client.Get("http://" + rp.AdminAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(metrics), "tandem_fence_duration") {
		t.Errorf("/metrics lacks the fence duration")
	}
	stopped = true
	if err := rp.stop(); err != nil {
		t.Fatal(err)
	}
}

// TestProxyNeedsControlDatabase: with a new store, an unreachable control
// database stops the proxy from starting, with a clear error.
func TestProxyNeedsControlDatabase(t *testing.T) {
	c := pgtest.New(t)
	cfg := config.Default()
	cfg.Listen, cfg.Admin = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Old.DSN, cfg.New.DSN = c.DSN("postgres"), c.DSN("postgres")
	cfg.Control.DSN = "postgres://tandem:Sekrit@127.0.0.1:1/tandem?sslmode=disable"
	cfg.Limits.ConnectTimeout = config.Duration(2 * time.Second)
	rp, err := startProxy(&cfg, newLogger(config.Log{Format: "text", Level: "error"}, io.Discard))
	if err == nil {
		_ = rp.stop()
		t.Fatal("the proxy started without its control database")
	}
	if msg := err.Error(); !strings.Contains(msg, "control database postgres://tandem:xxxxx@127.0.0.1:1/tandem") ||
		!strings.Contains(msg, "unreachable") || strings.Contains(msg, "Sekrit") {
		t.Fatalf("error: %v", err)
	}
}
