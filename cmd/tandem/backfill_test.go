package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
)

func runBackfillCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newBackfillCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.ExecuteContext(t.Context())
	return out.String(), err
}

// TestBackfillCLI refuses without mirror, then backfills with --key, the
// whole table, and reports no failure.
func TestBackfillCLI(t *testing.T) {
	old, new := pgtest.NewPair(t)
	schema := `CREATE TABLE items (id bigint PRIMARY KEY, name text);`
	mustExec(t, old, schema+`INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 2500) g;`)
	mustExec(t, new, schema)
	base := []string{"--old", old.DSN(""), "--new", new.DSN("")}
	if _, err := runBackfillCmd(t, append(base, "route")...); err == nil {
		t.Fatal("extra argument accepted")
	}
	// No routing state yet, then mirror off: refused, saying why.
	if _, err := runBackfillCmd(t, base...); err == nil {
		t.Fatal("backfill ran without a routing state")
	}
	cmd := newRouteCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(append([]string{"set", "--mirror", "on"}, base...))
	if err := cmd.ExecuteContext(t.Context()); err != nil {
		t.Fatalf("route set: %v\n%s", err, out.String())
	}
	got, err := runBackfillCmd(t, append(base, "--table", "items", "--key", "7")...)
	if err != nil || !strings.Contains(got, "path: locked (a key or a range is copied under lock)") {
		t.Fatalf("--key: %v\n%s", err, got)
	}
	if got, err := runBackfillCmd(t, append(base, "--path", "fast")...); err == nil || !strings.Contains(err.Error()+got, "auto, snapshot or locked") {
		t.Fatalf("--path fast: %v\n%s", err, got)
	}
	got, err = runBackfillCmd(t, append(base, "--dry-run")...)
	if err != nil || !strings.Contains(got, "public.items: would copy ~2500 rows") {
		t.Fatalf("--dry-run: %v\n%s", err, got)
	}
	got, err = runBackfillCmd(t, append(base, "--workers", "3", "--chunk", "200")...)
	if err != nil || !strings.Contains(got, "public.items: 2500 rows") || !strings.Contains(got, "path: snapshot (snapshot ") {
		t.Fatalf("backfill: %v\n%s", err, got)
	}
	got, err = runBackfillCmd(t, append(base, "--report")...)
	if err != nil || !strings.Contains(got, "0 failed units") {
		t.Fatalf("--report: %v\n%s", err, got)
	}
}

func TestBackfillHelp(t *testing.T) {
	got, err := runBackfillCmd(t, "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"upserts it on new", "--restart", "--range", "--report", "mirror on", "SKIP LOCKED", "--settle-timeout"} {
		if !strings.Contains(got, want) {
			t.Errorf("help lacks %q", want)
		}
	}
}
