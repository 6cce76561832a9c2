package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/admin"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
)

// verifyAll runs `tandem compare -c file` and wants it clean, as the
// playbook does before a write flip.
func verifyAll(t *testing.T, file string) {
	t.Helper()
	out, errOut, err := cli("compare", "-c", file)
	if err != nil {
		t.Fatalf("tandem compare: %v\n%s%s", err, out, errOut)
	}
}

// refused runs a flip to new with the CLI and wants it refused with want.
func refused(t *testing.T, file, want string) string {
	t.Helper()
	out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100")
	if ec, ok := err.(exitCode); !ok || ec != 1 || !strings.Contains(errOut, want) {
		t.Fatalf("flip: %v, want a refusal with %q\n%s%s", err, want, out, errOut)
	}
	return errOut
}

// TestVerifyGate: a write flip to new is refused until every table in
// scope has a recent, clean verify: never verified, verified with a
// difference left, verified too long ago; then compare --repair opens it.
func TestVerifyGate(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	const schema = "CREATE TABLE items (id int PRIMARY KEY, v text);"
	mustExec(t, oldC, schema+"INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 500) g")
	mustExec(t, newC, schema)
	file, cfg := pairConfig(t, oldC, newC, "verify-gate")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("dual-write: %v\n%s%s", err, out, errOut)
	}
	backfillAll(t, file)
	refused(t, file, "1 table(s) never verified: public.items; run tandem compare")

	// A difference the verify finds and does not repair: not clean.
	mustExec(t, newC, "UPDATE items SET v = 'drifted' WHERE id = 42")
	if _, _, err := cli("compare", "-c", file); err == nil {
		t.Fatal("compare with a planted difference exited 0")
	}
	refused(t, file, "1 table(s) whose last verify was not clean: public.items (1 differences, 0 repaired)")

	// Repaired: clean, but a config that wants verifies younger than the
	// one just made still refuses.
	if out, errOut, err := cli("compare", "-c", file, "--repair"); err != nil {
		t.Fatalf("compare --repair: %v\n%s%s", err, out, errOut)
	}
	strict := file + ".strict.yaml"
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(strict, append(raw, "gates:\n  verify_max_age: 1ms\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	refused(t, strict, "verified longer ago than gates.verify_max_age=1ms: public.items")

	out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100", "--reason", "verified")
	if err != nil || !strings.Contains(out, "primary=new") {
		t.Fatalf("flip after a clean verify: %v\n%s%s", err, out, errOut)
	}
	if h, _ := storeHash(t, oldC, "items", "id"); h != func() string { h2, _ := storeHash(t, newC, "items", "id"); return h2 }() {
		t.Fatal("stores differ after the repair")
	}
}

// TestShadowGateAndAPI: a difference planted on new is found by shadow
// reads through the proxy, listed by GET /api/v1/mismatches with its
// fingerprint and diff, and blocks the write flip (naming the
// fingerprint) until --force, which the history records.
func TestShadowGateAndAPI(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	const schema = "CREATE TABLE items (id int PRIMARY KEY, v text);"
	mustExec(t, oldC, schema+"INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 200) g")
	mustExec(t, newC, schema)
	file, cfg := pairConfig(t, oldC, newC, "shadow-gate")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	api := newAdminClient(t, rp)
	api.waitLive(1)
	var rep admin.MismatchReport
	if code, raw := api.call("GET", "/api/v1/mismatches", "", &rep); code != http.StatusOK || len(rep.Groups) != 0 || rep.Rate.Total.Compared() != 0 {
		t.Fatalf("GET /api/v1/mismatches before anything: %d %s", code, raw)
	}
	if code, raw := api.call("GET", "/api/v1/mismatches?window=soon", "", nil); code != http.StatusBadRequest {
		t.Fatalf("bad window: %d %s", code, raw)
	}
	api.change("/api/v1/route", `{"mirror": true, "shadow": 100}`, "shadow-gate")
	backfillAll(t, file)
	verifyAll(t, file)

	// Bypass the proxy: new now disagrees on one row.
	mustExec(t, newC, "UPDATE items SET v = 'planted' WHERE id = 7")
	ctx := context.Background()
	app, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", rp.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(ctx)
	for id := 1; id <= 10; id++ {
		var v string
		if err := app.QueryRow(ctx, "SELECT v FROM items WHERE id = $1", id).Scan(&v); err != nil || v != fmt.Sprintf("v%d", id) {
			t.Fatalf("read %d through the proxy: %q %v", id, v, err)
		}
	}
	// The counts reach the control schema within the flush interval.
	deadline := time.Now().Add(3 * control.ShadowFlush)
	for {
		rep = admin.MismatchReport{}
		code, raw := api.call("GET", "/api/v1/mismatches", "", &rep)
		if code != http.StatusOK {
			t.Fatalf("GET /api/v1/mismatches: %d %s", code, raw)
		}
		if rep.Rate.Total.Compared() >= 10 && len(rep.Groups) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("mismatch not reported: %s", raw)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if rep.Rate.Total.Mismatched != 1 || rep.Rate.Total.Matched != 9 {
		t.Fatalf("rate %+v", rep.Rate.Total)
	}
	g := rep.Groups[0]
	if g.Count != 1 || g.Statement != "SELECT v FROM items WHERE id = $1" || len(g.Samples) != 1 || g.Fingerprint == "" {
		t.Fatalf("group %+v", g)
	}
	s := g.Samples[0]
	var d shadow.Diff
	if err := json.Unmarshal(s.Diff, &d); err != nil {
		t.Fatal(err)
	}
	// Redacted by default (shadow.record_values off): the record says where
	// the difference is, never the parameters or the rows' values.
	if s.Replica != "shadow-gate" || s.ServedBy != "old" || s.ShadowOn != "new" || s.Params != nil ||
		!d.Redacted || len(d.OnlyServed) != 0 || d.OnlyServedCount != 1 || d.OnlyShadowCount != 1 {
		t.Fatalf("sample %+v diff %s", s, s.Diff)
	}
	_, raw := api.call("GET", "/api/v1/mismatches", "", nil)
	if strings.Contains(raw, "planted") || strings.Contains(raw, "v7") || strings.Contains(raw, `"7"`) {
		t.Fatalf("GET /api/v1/mismatches shows a value: %s", raw)
	}

	errOut := refused(t, file, "shadow reads found 1 confirmed mismatch(es) in 10 compared reads over the last 15m0s")
	if !strings.Contains(errOut, "fingerprint "+g.Fingerprint+": 1 of 10") {
		t.Fatalf("refusal does not name the fingerprint %s: %s", g.Fingerprint, errOut)
	}
	out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100", "--force", "--reason", "mismatch understood")
	if err != nil {
		t.Fatalf("forced flip: %v\n%s%s", err, out, errOut)
	}
	var forced bool
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	if err := ctl.QueryRow(ctx, "SELECT forced FROM tandem.state_history ORDER BY version DESC LIMIT 1").Scan(&forced); err != nil || !forced {
		t.Fatalf("history does not record the forced flip: %v %v", forced, err)
	}
	if st := rp.srv.State(); st.Primary != route.New {
		t.Fatalf("proxy state %s", st.Settings)
	}
}
