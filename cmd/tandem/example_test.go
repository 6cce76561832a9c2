package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

// exampleFile returns the text of deploy/examples/<dir>/<name>.
func exampleFile(t *testing.T, dir, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "examples", dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// example is one example of deploy/examples run end to end on a pair of
// throwaway clusters.
type example struct {
	file           string // the config: the pair's stores and the example's tables section
	oldDSN, newDSN string
	dsn            string // the proxy's, as the application's load connects
	api            *adminClient
}

// startExample loads dir's old.sql, then seed, on old and its new.sql on
// new; writes a config of the pair (replica id replica) with sections (a
// feed section, say; "" for none) and the tables section of dir's config
// file yaml; wants config check and plan clean; starts a proxy and turns
// mirror on. The caller stops the proxy (stopProxy), before its
// goroutine-leak check.
func startExample(t *testing.T, oldC, newC *pgtest.Cluster, dir, yaml, seed, replica, sections string) (*example, *runningProxy) {
	t.Helper()
	mustExec(t, oldC, exampleFile(t, dir, "old.sql")+"; "+seed)
	mustExec(t, newC, exampleFile(t, dir, "new.sql"))
	text := exampleFile(t, dir, yaml)
	i := strings.Index(text, "\ntables:\n")
	if i < 0 {
		t.Fatalf("%s has no tables section", yaml)
	}
	ex := &example{oldDSN: oldC.DSN("postgres"), newDSN: newC.DSN("postgres")}
	ex.file = filepath.Join(t.TempDir(), dir+".yaml")
	if err := os.WriteFile(ex.file, []byte(pairYAML(ex.oldDSN, ex.newDSN, replica)+sections+text[i+1:]), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, errOut, err := cli("config", "check", "-c", ex.file); err != nil {
		t.Fatalf("config check: %v\n%s%s", err, out, errOut)
	}
	if out, errOut, err := cli("plan", "-c", ex.file); err != nil {
		t.Fatalf("plan: %v\n%s%s", err, out, errOut)
	}
	rp := startQuietProxy(t, loadConfig(t, ex.file))
	ex.api = newAdminClient(t, rp)
	ex.dsn = fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable&application_name=%s-load", rp.Addr(), dir)
	ex.api.waitLive(1)
	ex.api.change("/api/v1/route", `{"mirror": true, "reason": "dual-write"}`, replica)
	return ex, rp
}

// sameRows fails the test unless each pair of queries (name, one over old,
// one over new, each giving a hash and a count) gives the same on both.
func (ex *example) sameRows(t *testing.T, when string, pairs ...[3]string) {
	t.Helper()
	for _, p := range pairs {
		if o, n := splitText(t, ex.oldDSN, p[1]), splitText(t, ex.newDSN, p[2]); o != n {
			t.Fatalf("%s: %s differ: old %s, new %s", when, p[0], o, n)
		}
	}
}

// sameRowsSoon is sameRows that waits up to a minute for the pairs to give
// the same: for what only the change feed and the repairer bring there.
func (ex *example) sameRowsSoon(t *testing.T, when string, pairs ...[3]string) {
	t.Helper()
	harness.SucceedsSoon(t, 60*time.Second, func() error {
		for _, p := range pairs {
			if o, n := splitText(t, ex.oldDSN, p[1]), splitText(t, ex.newDSN, p[2]); o != n {
				return fmt.Errorf("%s: %s differ: old %s, new %s", when, p[0], o, n)
			}
		}
		return nil
	})
}

// direct runs sqls, one by one, on the store at dsn, around the proxy.
func direct(t *testing.T, dsn string, sqls ...string) {
	t.Helper()
	ctx := context.Background()
	c := mustConnect(t, dsn)
	defer c.Close(ctx)
	for _, sql := range sqls {
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
}

// verifyClean runs tandem compare and wants a clean run of each of the
// tables names (old names, or the new tables of a split's parts), which it
// logs.
func (ex *example) verifyClean(t *testing.T, when string, names ...string) {
	t.Helper()
	out, errOut, err := cli("compare", "-c", ex.file)
	if err != nil || strings.Count(out, "clean") < len(names) {
		t.Fatalf("verify %s: %v\n%s%s", when, err, out, errOut)
	}
	for _, n := range names {
		if !strings.Contains(out, n) {
			t.Fatalf("verify %s does not name %s:\n%s", when, n, out)
		}
	}
	t.Logf("verify %s:\n%s", when, out)
}

// shadowReads turns shadowing on for all reads, runs each of compared (a
// read the proxy can shadow, which must match) and of skipped (one it
// cannot, which is skipped with a reason) for ids 1 to 20 through the
// proxy, waits for them to be counted, and turns shadowing off.
func (ex *example) shadowReads(t *testing.T, replica string, compared, skipped []string) {
	t.Helper()
	ctx := context.Background()
	ex.api.change("/api/v1/route", `{"mirror": true, "shadow": 100}`, replica)
	app, err := pgx.Connect(ctx, ex.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(ctx)
	for id := 1; id <= 20; id++ {
		for _, q := range append(slices.Clone(compared), skipped...) {
			var s string
			if err := app.QueryRow(ctx, q, id).Scan(&s); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
	}
	waitShadowed(t, ex.api, int64(20*len(compared)), int64(20*len(skipped)))
	ex.api.change("/api/v1/route", `{"mirror": true, "shadow": 0}`, replica)
}

// positionsConfig is a config of the pair (replica id replica) to which a
// test appends a tables section: its file, its text so far, and the number
// of its lines before that section.
func positionsConfig(t *testing.T, oldC, newC *pgtest.Cluster, replica string) (file, head string, base int) {
	t.Helper()
	file, _ = pairConfig(t, oldC, newC, replica)
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return file, string(b), strings.Count(string(b), "\n")
}
