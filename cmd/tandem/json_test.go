package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
)

var (
	binaryOnce sync.Once
	binaryPath string
	binaryErr  error
)

// tandemBinary builds the tandem binary once per test process (without
// -race: it is the binary an operator runs) and returns its path.
// binaryDir holds the binary tandemBinary built; TestMain removes it.
var binaryDir string

// TestMain removes the built binary (about 40 MB) when the tests end.
func TestMain(m *testing.M) {
	code := m.Run()
	if binaryDir != "" {
		_ = os.RemoveAll(binaryDir)
	}
	os.Exit(code)
}

func tandemBinary(t *testing.T) string {
	t.Helper()
	binaryOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tandem-bin-")
		if err != nil {
			binaryErr = err
			return
		}
		binaryDir = dir
		binaryPath = filepath.Join(dir, "tandem")
		cmd := exec.Command("go", "build", "-o", binaryPath, ".")
		if out, err := cmd.CombinedOutput(); err != nil {
			binaryErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binaryErr != nil {
		t.Fatal(binaryErr)
	}
	return binaryPath
}

// runBinary runs the built binary with args and env added to the test's
// environment; it returns stdout, stderr and the exit status.
func runBinary(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(tandemBinary(t), args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), errOut.String(), 0
	case errors.As(err, &ee):
		return out.String(), errOut.String(), ee.ExitCode()
	}
	t.Fatalf("tandem %s: %v", strings.Join(args, " "), err)
	return "", "", -1
}

// durationKey names JSON fields that hold a duration: they must be text.
var durationKey = regexp.MustCompile(`(^|_)(duration|window|estimate|age|latency|older_than|timeout|wait|elapsed|interval|span)$`)

// checkJSONHygiene walks a decoded document: no key ends in _ns or
// _nanos, a duration field is text, and null appears only on the fields
// documented as nullable (a missing object or number), never for a list.
func checkJSONHygiene(t *testing.T, what string, v any, path string) {
	t.Helper()
	nullable := []string{"last_run", "drift", "feed", "sample", "old", "new", "lag_bytes", "lag_seconds", "retained",
		"heartbeat_at", "fence_ms", "change", "body", "checked_at", "next_attempt"}
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			p := path + "." + k
			if strings.HasSuffix(k, "_ns") || strings.HasSuffix(k, "_nanos") {
				t.Errorf("%s: %s is a duration in nanoseconds", what, p)
			}
			if _, isNum := e.(float64); isNum && durationKey.MatchString(k) {
				t.Errorf("%s: %s = %v is a duration as a number, want text", what, p, e)
			}
			if e == nil && !slices.Contains(nullable, k) {
				t.Errorf("%s: %s is null", what, p)
			}
			checkJSONHygiene(t, what, e, p)
		}
	case []any:
		for i, e := range x {
			if e == nil {
				t.Errorf("%s: %s[%d] is null", what, path, i)
			}
			checkJSONHygiene(t, what, e, fmt.Sprintf("%s[%d]", path, i))
		}
	}
}

// decodeJSON decodes out as one JSON object, checks its hygiene and that
// it has the documented top-level fields.
func decodeJSON(t *testing.T, what, out string, fields ...string) map[string]any {
	t.Helper()
	var doc map[string]any
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("%s --json is not one JSON object: %v\n%s", what, err, out)
	}
	for _, f := range fields {
		if _, ok := doc[f]; !ok {
			t.Errorf("%s --json lacks the documented field %q:\n%s", what, f, out)
		}
	}
	checkJSONHygiene(t, what, doc, "")
	return doc
}

// TestJSONOutputs runs the built binary's reporting commands with --json
// through a whole migration (refusal, backfill, verify, flip, rollback,
// flip, complete) and checks every document: its documented top-level
// fields, [] for empty lists, durations as text.
func TestJSONOutputs(t *testing.T) {
	tandemBinary(t) // build first, before the clusters start
	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "json-proxy")
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id serial PRIMARY KEY, note text)")
	}
	mustExec(t, oldC, "INSERT INTO orders (note) SELECT 'x' FROM generate_series(1, 200)")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	adminEnv := []string{"TANDEM_ADMIN=" + rp.AdminAddr()}
	run := func(wantStatus int, fields []string, args ...string) map[string]any {
		t.Helper()
		args = append(args, "--json")
		out, errOut, code := runBinary(t, adminEnv, args...)
		what := "tandem " + strings.Join(args, " ")
		if code != wantStatus {
			t.Fatalf("%s: exit status %d, want %d\n%s%s", what, code, wantStatus, out, errOut)
		}
		return decodeJSON(t, what, out, fields...)
	}

	run(0, []string{"version", "commit", "modified", "go_version"}, "version")
	run(0, []string{"file", "valid", "problems"}, "config", "check", "-c", file)
	run(0, []string{"url", "healthy", "status", "body"}, "health", "-c", file)
	run(0, []string{"url", "healthy", "status", "body"}, "health", "-c", file, "--ready")
	statusFields := []string{"generated_at", "routing", "backfill", "verify", "shadow", "next_flip", "gates", "errors"}
	st := run(0, statusFields, "status", "-c", file)
	if b, _ := json.Marshal(st["backfill"]); string(b) != "[]" {
		t.Errorf("status before any backfill: backfill is %s, want []", b)
	}
	if w, _ := st["shadow"].(map[string]any)["window"].(string); w == "" {
		t.Errorf("status: shadow.window is not duration text: %v", st["shadow"])
	}
	run(0, []string{"failures", "failing"}, "backfill", "-c", file, "--report")
	planOut, planErr, code := runBinary(t, adminEnv, "plan", "-c", file, "--json")
	if code > 2 {
		t.Fatalf("tandem plan --json: exit status %d\n%s%s", code, planOut, planErr)
	}
	decodeJSON(t, "tandem plan", planOut, "verdict", "stores", "tables", "sequences", "triggers", "foreign_keys", "extensions", "findings")

	routeFields := []string{"state", "report"}
	run(0, routeFields, "route", "set", "-c", file, "--mirror", "on", "--reason", "json test")
	ref := run(1, []string{"error", "refused"}, "route", "set", "-c", file, "--primary", "new", "--reads", "100")
	if !strings.Contains(fmt.Sprint(ref["error"]), "backfill") {
		t.Errorf("refused flip: %v, want the backfill gate's reason", ref["error"])
	}
	bf := run(0, []string{"tables", "duration", "failed", "dry_run"}, "backfill", "-c", file)
	if tables, _ := bf["tables"].([]any); len(tables) != 1 {
		t.Errorf("backfill --json tables: %v", bf["tables"])
	}
	cmp := run(0, []string{"tables"}, "compare", "-c", file)
	if tables, _ := cmp["tables"].([]any); len(tables) != 1 || tables[0].(map[string]any)["duration"] == nil {
		t.Errorf("compare --json tables: %v", cmp["tables"])
	}
	run(0, []string{"state", "replicas", "history", "drift", "feed"}, "route", "show", "-c", file)
	run(0, statusFields, "status", "-c", file)
	run(0, []string{"pruned", "older_than"}, "route", "prune", "-c", file)

	flip := run(0, routeFields, "route", "set", "-c", file, "--primary", "new", "--reads", "100", "--reason", "json test")
	if rep := flip["report"].(map[string]any); rep["flip"] != true || fmt.Sprintf("%T", rep["fence"]) != "string" {
		t.Errorf("flip report: %v", rep)
	}
	run(0, routeFields, "rollback", "-c", file, "--reason", "json test")
	run(0, routeFields, "route", "set", "-c", file, "--primary", "new", "--reads", "100", "--reason", "json test")
	run(0, []string{"state", "mirror", "dropped", "skipped"}, "complete", "-c", file)

	// The admin API's documents follow the same rules.
	a := newAdminClient(t, rp)
	for path, fields := range map[string][]string{
		"/api/v1/status":     statusFields,
		"/api/v1/state":      {"state", "replicas", "history", "drift"},
		"/api/v1/mismatches": {"rate"},
		"/api/v1/history":    {"interval", "samples"},
	} {
		code, body := a.call("GET", path, "", nil)
		if code != 200 {
			t.Errorf("GET %s: %d %s", path, code, body)
			continue
		}
		decodeJSON(t, "GET "+path, body, fields...)
	}
}
