package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
)

func runCompareCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newCompareCmd()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.ExecuteContext(t.Context())
	return out.String(), err
}

// TestCompareCLI plants differences on new, checks that compare reports
// them and exits 1, that --repair exits 0, and that a second compare is
// clean, in JSON.
func TestCompareCLI(t *testing.T) {
	old, new := pgtest.NewPair(t)
	schema := `CREATE TABLE items (id bigint PRIMARY KEY, name text);
		INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 3000) g;`
	mustExec(t, old, schema)
	mustExec(t, new, schema+`UPDATE items SET name = 'x' WHERE id = 10;
		DELETE FROM items WHERE id IN (20, 30, 40); INSERT INTO items VALUES (5000, 'a'), (5001, 'b');`)
	base := []string{"--old", old.DSN(""), "--new", new.DSN("")}
	got, err := runCompareCmd(t, append(base, "--table", "items", "--batch", "500")...)
	var ec exitCode
	if !errors.As(err, &ec) || ec != 1 || !strings.Contains(got, "6 differences (3 MissingOnNew, 2 MissingOnOld, 1 ValueDiff)") ||
		!strings.Contains(got, "ValueDiff    key 10") {
		t.Fatalf("compare: %v\n%s", err, got)
	}
	got, err = runCompareCmd(t, append(base, "--repair")...)
	if err != nil || !strings.Contains(got, "6 repaired") {
		t.Fatalf("--repair: %v\n%s", err, got)
	}
	got, err = runCompareCmd(t, append(base, "--json")...)
	if err != nil {
		t.Fatalf("--json: %v\n%s", err, got)
	}
	var res struct {
		Tables []struct {
			Table string
			Rows  int64
			Diffs []any `json:"differences"`
		}
	}
	if err := json.Unmarshal([]byte(got), &res); err != nil || len(res.Tables) != 1 || res.Tables[0].Rows != 3000 || len(res.Tables[0].Diffs) != 0 {
		t.Fatalf("--json: %v\n%s", err, got)
	}
	if _, err := runCompareCmd(t, append(base, "--table", "nosuch")...); err == nil {
		t.Fatal("unknown table accepted")
	}
}

func TestCompareHelp(t *testing.T) {
	got, err := runCompareCmd(t, "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"MissingOnNew", "MissingOnOld", "ValueDiff", "--repair", "--json", "locked-copy unit", "Exit status", "transient"} {
		if !strings.Contains(got, want) {
			t.Errorf("help lacks %q", want)
		}
	}
}
