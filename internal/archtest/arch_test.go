// Package archtest checks the project's import arrows with `go list`, so a
// wrong dependency fails the build: data flows client -> proxy -> router ->
// backends; backfill and compare share internal packages and never import
// each other; the control plane drives the proxy without importing it; the
// admin API is handlers over internal packages; the wire codec stays pure.
package archtest

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/tandemdb/tandem"

type pkg struct {
	ImportPath string
	Imports    []string
	Deps       []string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-json", module+"/...")
	cmd.Dir = "../.."
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(out)
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	if len(pkgs) < 5 {
		t.Fatalf("go list found only %d packages", len(pkgs))
	}
	return pkgs
}

func under(path, prefix string) bool {
	return path == prefix || strings.HasPrefix(path, prefix+"/")
}

func TestImportArrows(t *testing.T) {
	rules := []struct {
		from, mustNot, why string
	}{
		{module + "/proxy", module + "/cmd", "the proxy never reaches back into the CLI"},
		{module + "/proxy", module + "/backfill", "the proxy does not run jobs"},
		{module + "/proxy", module + "/compare", "the proxy does not run jobs"},
		{module + "/backfill", module + "/compare", "backfill and compare share internal packages, never each other"},
		{module + "/compare", module + "/backfill", "backfill and compare share internal packages, never each other"},
		{module + "/backfill", module + "/proxy", "jobs talk to stores, not through the proxy package"},
		{module + "/compare", module + "/proxy", "jobs talk to stores, not through the proxy package"},
		{module + "/internal", module + "/proxy", "internal packages are shared leaves"},
		{module + "/internal", module + "/cmd", "internal packages are shared leaves"},
		{module + "/internal/shadow", module + "/internal/shadowpool", "the comparison stays pure: the shadow pool uses it, never the reverse"},
		{module + "/internal/control", module + "/proxy", "the control plane drives the proxy through control.Server, never imports it"},
		{module, module + "/internal/pgtest/harness", "the test harness is for tests only (it imports testing and goleak): no package's non-test code uses it"},
	}
	for _, p := range listPackages(t) {
		for _, r := range rules {
			if !under(p.ImportPath, r.from) || strings.HasSuffix(p.ImportPath, "/archtest") {
				continue
			}
			for _, d := range p.Deps {
				if under(d, r.mustNot) {
					t.Errorf("%s depends on %s: %s", p.ImportPath, d, r.why)
				}
			}
		}
	}
}

// TestPureCodec: internal/pgwire imports only pgproto3 and the standard
// library (no networking, contexts or logging).
func TestPureCodec(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.ImportPath != module+"/internal/pgwire" {
			continue
		}
		for _, imp := range p.Imports {
			switch {
			case imp == "github.com/jackc/pgx/v5/pgproto3":
			case strings.Contains(imp, "."):
				t.Errorf("internal/pgwire imports %s; it may import only pgproto3 and the standard library", imp)
			case imp == "net" || imp == "context" || imp == "log" || imp == "log/slog" || strings.HasPrefix(imp, "net/"):
				t.Errorf("internal/pgwire imports %s; the codec stays free of networking, contexts and logging", imp)
			}
		}
		return
	}
	t.Fatal("internal/pgwire not found")
}

// TestAdminHandlersOnly: internal/admin is HTTP handlers over the internal
// packages (the control plane's facade among them); it imports no
// top-level package directly. What it serves is built in internal/control.
func TestAdminHandlersOnly(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.ImportPath != module+"/internal/admin" {
			continue
		}
		for _, imp := range p.Imports {
			if under(imp, module) && !under(imp, module+"/internal") {
				t.Errorf("internal/admin imports %s; it serves internal/control over HTTP and imports no top-level package (backfill, compare, feed, proxy, cmd)", imp)
			}
		}
		return
	}
	t.Fatal("internal/admin not found")
}

// TestControlSchemaIsALeaf: the control schema's migrations import nothing
// of the module, so every owner of control tables (route, table, mismatch,
// backfill, compare, feed) can apply them without an import cycle.
func TestControlSchemaIsALeaf(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.ImportPath != module+"/internal/controlschema" {
			continue
		}
		for _, d := range p.Deps {
			if under(d, module) {
				t.Errorf("internal/controlschema depends on %s; it must stay a leaf", d)
			}
		}
		return
	}
	t.Fatal("internal/controlschema not found")
}
