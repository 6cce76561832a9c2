package main

import (
	"os"
	"strings"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
)

// TestMappingBlocksFlip: a computed column without a reverse expression
// lets dual-write run (old -> new works) but refuses the write flip, naming
// the table and the column; once the reverse is declared, the flip goes.
func TestMappingBlocksFlip(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, `CREATE TABLE users (id int PRIMARY KEY, first_name text, last_name text)`)
	mustExec(t, newC, `CREATE TABLE accounts (id int PRIMARY KEY, full_name text)`)
	file, _ := pairConfig(t, oldC, newC, "map-proxy")
	mapping := `tables:
  map:
    public.users:
      to: public.accounts
      compute:
        full_name: "first_name || ' ' || last_name"
`
	appendFile(t, file, mapping)
	cfg := loadConfig(t, file)
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on", "--reads", "100"); err != nil {
		t.Fatalf("dual-write: %v\n%s%s", err, out, errOut)
	}
	out, errOut, err := cli("route", "set", "-c", file, "--primary", "new")
	if ec, ok := err.(exitCode); !ok || ec != 1 || !strings.Contains(errOut, "mapping problem") ||
		!strings.Contains(errOut, "first_name") {
		t.Fatalf("flip with a computed column without reverse: %v\n%s%s", err, out, errOut)
	}
	// Declare the reverse: the flip goes through.
	appendFile(t, file, `      reverse:
        first_name: "split_part(full_name, ' ', 1)"
        last_name: "split_part(full_name, ' ', 2)"
`)
	backfillAll(t, file) // the flip's backfill gate
	verifyAll(t, file)   // and its verify gate
	if out, errOut, err := cli("route", "set", "-c", file, "--primary", "new"); err != nil {
		t.Fatalf("flip with the reverse declared: %v\n%s%s", err, out, errOut)
	}
}

func appendFile(t *testing.T, file, text string) {
	t.Helper()
	f, err := os.OpenFile(file, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		t.Fatal(err)
	}
}
