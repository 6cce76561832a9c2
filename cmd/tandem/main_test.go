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
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
)

// TestDemo runs the whole walkthrough that `make demo` runs.
func TestDemo(t *testing.T) {
	var out bytes.Buffer
	if err := runDemo(context.Background(), &out, false); err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out.String())
	}
	for _, want := range []string{
		"1000 orders",
		"COPY FROM STDIN loaded 3 rows",
		"SQLSTATE 23505",
		"old store: 1004 orders",
		"routing version 2: primary=old mirror=on",
		"dual-write: old store 1014 orders, new store 10 orders",
		"the app's database 'shop' on old holds 1000 orders and 300000 order events",
		"POST /api/v1/route {\"primary\": \"new\"} before the backfill  ->  409: the backfill has not finished on 2 table(s)",
		"backfill public.order_events: 300000 rows",
		"backfill public.orders: 1014 rows",
		"GET /api/v1/backfill  ->  2 tables, finished true",
		"backfill done: old store 1014 orders, new store 1014 orders",
		"primary=old mirror=on reads=50%",
		"verify public.order_events -> public.order_events: 300000 rows hashed on both stores in ",
		"verify public.orders -> public.orders: 1014 rows hashed on both stores in ",
		"routing version 4: primary=old mirror=on reads=50% shadow=100%",
		"write flip: fence held",
		"sequences synced to new: 2",
		"written on new, mirrored to old: on new true, on old true",
		"rollback: fence held",
		"written on old again, mirrored to new: on old true, on new true",
		"data checked equal on both stores",
		"open drift: 0",
		"verify public.orders -> public.orders: 1016 rows hashed on both stores in ",
		"200 compared, 200 matched, 0 mismatched",
		`tandem_shadow_reads_total{tandem_outcome="matched"`,
		`tandem_statements_total{db_operation_name="SELECT"`,
		"/readyz -> 200",
		"SQLSTATE 57P01",
		"both clusters stopped",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
	// The read shift split the sessions, and the stores hash the same.
	if m := regexp.MustCompile(`new served the reads of (\d+) of (\d+) sessions`).FindStringSubmatch(out.String()); m == nil || m[1] == "0" || m[1] == m[2] {
		t.Errorf("read shift line: %v", m)
	}
	hashes := regexp.MustCompile(`(?m)^   (old|new) store: (\d+ orders, md5 [0-9a-f]{32})$`).FindAllStringSubmatch(out.String(), -1)
	if len(hashes) != 2 || hashes[0][1] != "old" || hashes[1][1] != "new" || hashes[0][2] != hashes[1][2] {
		t.Errorf("final hashes: %q", hashes)
	}
}

// TestAdminAndMetrics checks /healthz, /readyz and that /metrics counts
// statements by kind, errors by SQLSTATE, latency and bytes.
func TestAdminAndMetrics(t *testing.T) {
	c := pgtest.New(t)
	cfg := config.Default()
	cfg.Listen, cfg.Admin = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Old.DSN = c.DSN("postgres")
	cfg.New.DSN = "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable" // nothing listens there
	cfg.Limits.DrainTimeout = config.Duration(2 * time.Second)
	rp := startQuietProxy(t, &cfg)
	defer stopProxy(t, rp)
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + rp.AdminAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz = %d %q", code, body)
	}
	code, body := get("/readyz")
	var ready struct {
		Ready  bool
		Checks []struct {
			Name  string
			OK    bool
			Error string
		}
	}
	if err := json.Unmarshal([]byte(body), &ready); err != nil {
		t.Fatal(err)
	}
	if code != 503 || ready.Ready || len(ready.Checks) != 2 || !ready.Checks[0].OK || ready.Checks[1].OK {
		t.Fatalf("/readyz with the new store down = %d %s", code, body)
	}
	if strings.Contains(body, "password") {
		t.Fatalf("/readyz leaks credentials: %s", body)
	}

	ctx := context.Background()
	conn, err := pgconn.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", rp.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{"SELECT 1", "SELECT 2", "CREATE TABLE m (id int)", "INSERT INTO m VALUES (1)", "BEGIN", "COMMIT"} {
		if _, err := conn.Exec(ctx, sql).ReadAll(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := conn.Exec(ctx, "SELECT 1/0").ReadAll(); err == nil {
		t.Fatal("division by zero succeeded")
	}
	conn.Close(ctx)

	_, metrics := get("/metrics")
	// The build and the replica are named on every scrape.
	if !regexp.MustCompile(`(?m)^tandem_build_info\{[^}]*tandem_go_version="go[^"]+"[^}]*\} 1$`).MatchString(metrics) {
		t.Errorf("/metrics lacks tandem_build_info with the Go version:\n%s", grepLines(metrics, "build_info"))
	}
	if !strings.Contains(metrics, `service_name="tandem"`) || strings.Contains(metrics, "unknown_service") {
		t.Errorf("/metrics does not name the service tandem:\n%s", grepLines(metrics, "target_info"))
	}
	value := func(series string) float64 {
		t.Helper()
		re := regexp.MustCompile(`(?m)^` + series + `(?:\{[^}]*\})? ([0-9.e+]+)$`)
		var total float64
		for _, line := range strings.Split(metrics, "\n") {
			if m := re.FindStringSubmatch(line); m != nil {
				v, _ := strconv.ParseFloat(m[1], 64)
				total += v
			}
		}
		return total
	}
	labelled := func(name string, labels ...string) float64 {
		t.Helper()
		var total float64
		for _, line := range strings.Split(metrics, "\n") {
			if !strings.HasPrefix(line, name+"{") {
				continue
			}
			ok := true
			for _, l := range labels {
				ok = ok && strings.Contains(line, l)
			}
			if ok {
				v, _ := strconv.ParseFloat(line[strings.LastIndex(line, " ")+1:], 64)
				total += v
			}
		}
		return total
	}
	checks := []struct {
		name string
		got  float64
		min  float64
	}{
		{"SELECT statements (read)", labelled("tandem_statements_total", `db_operation_name="SELECT"`, `tandem_statement_kind="read"`, `tandem_store="old"`), 2},
		{"INSERT statements (write)", labelled("tandem_statements_total", `db_operation_name="INSERT"`, `tandem_statement_kind="write"`), 1},
		{"CREATE statements (ddl)", labelled("tandem_statements_total", `tandem_statement_kind="ddl"`), 1},
		{"transaction statements", labelled("tandem_statements_total", `tandem_statement_kind="transaction"`), 2},
		{"22012 errors from the store", labelled("tandem_errors_total", `db_response_status_code="22012"`, `tandem_error_origin="store"`), 1},
		{"latency samples", value("db_client_operation_duration_seconds_count"), 7},
		{"bytes to the store", labelled("tandem_bytes_total", `tandem_direction="client_to_store"`), 50},
		{"bytes to the client", labelled("tandem_bytes_total", `tandem_direction="store_to_client"`), 50},
		{"accepted connections", labelled("tandem_client_connections_total", `tandem_outcome="accepted"`), 1},
		{"sessions on the epoll engine", labelled("tandem_relay_sessions_total", `tandem_relay_engine="epoll"`), 1},
	}
	for _, c := range checks {
		if c.got < c.min {
			t.Errorf("%s = %v, want >= %v", c.name, c.got, c.min)
		}
	}
	if t.Failed() {
		t.Log(metrics)
	}
}

// TestConfigCheck runs `tandem config check` on a good and a bad file.
func TestConfigCheck(t *testing.T) {
	dir, err := os.MkdirTemp("", "tandem-cfg-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte("old:\n  dsn: postgres://app@127.0.0.1:5432/shop\n"), 0o644)
	os.WriteFile(bad, []byte("old:\n  dsn: postgres://app@127.0.0.1:5432/shop\nlimits:\n  max_sesions: 5\n  drain_timeout: forever\n"), 0o644)

	run := func(args ...string) (string, error) {
		root := newRoot()
		var out bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&out)
		root.SetArgs(args)
		err := root.Execute()
		return out.String(), err
	}
	out, err := run("config", "check", good)
	if err != nil || !strings.Contains(out, "ok") {
		t.Fatalf("good file: %v\n%s", err, out)
	}
	out, err = run("config", "check", bad)
	if ec, ok := err.(exitCode); !ok || ec != 1 {
		t.Fatalf("bad file: exit %v, want 1\n%s", err, out)
	}
	for _, want := range []string{"bad.yaml:4:3", `max_sesions`, "bad.yaml:5:", "drain_timeout"} {
		if !strings.Contains(out, want) {
			t.Errorf("config check output lacks %q:\n%s", want, out)
		}
	}
	// The deployed example must stay valid.
	if out, err := run("config", "check", "../../deploy/tandem.example.yaml"); err != nil {
		t.Fatalf("deploy/tandem.example.yaml: %v\n%s", err, out)
	}
}

// TestProxyHelp lists every option with its default.
func TestProxyHelp(t *testing.T) {
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"proxy", "--help"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"--listen", `"127.0.0.1:6432"`, "--old", "--new", "--admin", "--config", "--max-client-sessions", "(default 1000)",
		"--max-message-bytes", "--idle-session-timeout", "--drain-timeout", "--require-tls", "--auth-userlist", "TANDEM_LISTEN"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("proxy --help lacks %q", want)
		}
	}
}

// TestNoSecretsInLogs: a DSN password never reaches the log, even at debug
// level, and neither do query parameters.
func TestNoSecretsInLogs(t *testing.T) {
	c := pgtest.New(t)
	ctx := context.Background()
	if err := c.Exec(ctx, "postgres", "CREATE ROLE app LOGIN PASSWORD 'Sekrit-Pa55'"); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Listen, cfg.Admin = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Old.DSN = fmt.Sprintf("postgres://app:Sekrit-Pa55@127.0.0.1:%d/postgres?sslmode=disable", c.Port())
	cfg.Limits.DrainTimeout = config.Duration(time.Second)
	var logs bytes.Buffer
	rp, err := startProxy(&cfg, newLogger(config.Log{Format: "json", Level: "debug"}, &logs))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgconn.Connect(ctx, fmt.Sprintf("postgres://app@%s/postgres?sslmode=disable", rp.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	res := conn.ExecParams(ctx, "SELECT $1::text", [][]byte{[]byte("param-Value-42")}, nil, nil, nil).Read()
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	conn.Close(ctx)
	if err := rp.stop(); err != nil {
		t.Fatal(err)
	}
	out := logs.String()
	for _, secret := range []string{"Sekrit-Pa55", "param-Value-42"} {
		if strings.Contains(out, secret) {
			t.Errorf("log contains %q:\n%s", secret, out)
		}
	}
	if !strings.Contains(out, "session started") || !strings.Contains(out, "xxxxx") {
		t.Errorf("expected debug session lines and a redacted DSN in the log:\n%s", out)
	}
}

// grepLines returns the lines of text that contain sub, for failure messages.
func grepLines(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
