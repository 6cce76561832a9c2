package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
)

// statusJSON runs `tandem status --json` and decodes it.
func statusJSON(t *testing.T, file string) (migrationStatus, map[string]any) {
	t.Helper()
	out, errOut, err := cli("status", "-c", file, "--json")
	if err != nil {
		t.Fatalf("tandem status: %v\n%s%s", err, out, errOut)
	}
	var st migrationStatus
	var raw map[string]any
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		t.Fatal(err)
	}
	return st, raw
}

func gate(st migrationStatus, name string) gateStatus {
	for _, g := range st.Gates {
		if g.Name == name {
			return g
		}
	}
	return gateStatus{Name: name, Reason: "absent"}
}

// TestStatus: `tandem status` carries every section, empty lists are [],
// and each gate it shows answers as the write flip does: blocked with the
// same reason the flip's refusal gives, then ready once the evidence exists.
func TestStatus(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "status-proxy")
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id serial PRIMARY KEY, note text)")
	}
	mustExec(t, oldC, "INSERT INTO orders (note) SELECT 'x' FROM generate_series(1, 300)")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}

	// Before the backfill: the backfill and verify gates are blocked, and
	// a flip is refused with the same reasons.
	st, raw := statusJSON(t, file)
	for _, k := range []string{"generated_at", "routing", "backfill", "verify", "shadow", "next_flip", "gates", "errors"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("status --json lacks %q", k)
		}
	}
	if b, _ := json.Marshal(raw["backfill"]); string(b) != "[]" {
		t.Errorf("backfill before any backfill: %s, want []", b)
	}
	if st.NextFlip != "old -> new" || st.Routing.State.Version != 2 || len(st.Routing.Replicas) != 1 || len(st.Errors) != 0 {
		t.Errorf("status: next flip %q, version %d, %d replicas, errors %v", st.NextFlip, st.Routing.State.Version, len(st.Routing.Replicas), st.Errors)
	}
	if len(st.Verify) != 1 || st.Verify[0].Table != "public.orders" || st.Verify[0].Verified {
		t.Errorf("verify before any compare: %+v", st.Verify)
	}
	for _, name := range []string{"backfill", "verify"} {
		g := gate(st, name)
		if g.Ready || g.Reason == "" {
			t.Fatalf("gate %s before the evidence: %+v", name, g)
		}
		refusal := refused(t, file, g.Reason)
		if !strings.Contains(refusal, g.Reason) {
			t.Errorf("the flip's refusal does not carry the %s gate's reason %q:\n%s", name, g.Reason, refusal)
		}
	}
	for _, name := range []string{"mapping", "shadow", "drift", "stuck drift", "replicas"} {
		if g := gate(st, name); !g.Ready {
			t.Errorf("gate %s: %+v", name, g)
		}
	}

	backfillAll(t, file)
	verifyAll(t, file)
	st, _ = statusJSON(t, file)
	if len(st.Backfill) != 1 || !st.Backfill[0].Finished || st.Backfill[0].Percent != 100 || st.Backfill[0].RowsCopied != 300 {
		t.Errorf("backfill after the backfill: %+v", st.Backfill)
	}
	if len(st.Verify) != 1 || !st.Verify[0].Verified || !st.Verify[0].Clean || st.Verify[0].LastRun == nil {
		t.Errorf("verify after compare: %+v", st.Verify)
	}
	for _, g := range st.Gates {
		if !g.Ready {
			t.Errorf("gate %s after the evidence: %s", g.Name, g.Reason)
		}
	}
	// Every gate ready: the flip goes through.
	if out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100"); err != nil {
		t.Fatalf("flip with every gate ready: %v\n%s%s", err, out, errOut)
	}

	// The text form has every section.
	out, _, err := cli("status", "-c", file)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"routing version 3: primary=new", "replicas", "backfill:", "public.orders", "verify (last finished tandem compare):", "clean",
		"shadow reads over", "cutover gates of the next write flip (new -> old):", "replicas     ready"} {
		if !strings.Contains(out, want) {
			t.Errorf("tandem status lacks %q:\n%s", want, out)
		}
	}
}

// TestRoutePrune: replicas silent for longer than --older-than are removed,
// live ones never, and a window shorter than liveness is refused.
func TestRoutePrune(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "prune-proxy")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	mustExec(t, oldC, `INSERT INTO tandem.replicas (replica_id, acked_version, heartbeat_at) VALUES
		('gone-a', 1, now() - interval '2 hours'), ('gone-b', 1, now() - interval '3 days'), ('recent', 1, now() - interval '10 minutes')`)
	out, _, err := cli("route", "prune", "-c", file)
	if err != nil || !strings.Contains(out, "pruned 2 replica(s) silent for longer than 1h0m0s: gone-a, gone-b") {
		t.Fatalf("prune: %v %s", err, out)
	}
	out, _, err = cli("route", "prune", "-c", file, "--older-than", "5m", "--json")
	var pruned struct {
		Pruned    []string `json:"pruned"`
		OlderThan string   `json:"older_than"`
	}
	if err != nil || json.Unmarshal([]byte(out), &pruned) != nil || len(pruned.Pruned) != 1 || pruned.Pruned[0] != "recent" || pruned.OlderThan != "5m0s" {
		t.Fatalf("prune 5m: %v %s", err, out)
	}
	if _, _, err := cli("route", "prune", "-c", file, "--older-than", "10ms"); err == nil || !strings.Contains(err.Error(), "shorter than the liveness window") {
		t.Fatalf("prune 10ms: %v", err)
	}
	st, _ := statusJSON(t, file)
	if len(st.Routing.Replicas) != 1 || st.Routing.Replicas[0].ID != "prune-proxy" {
		t.Errorf("replicas after pruning: %+v", st.Routing.Replicas)
	}
}

// TestComplete: complete is refused before the flip; after it, it turns
// mirroring off and drops the change feed's slots and publications on both
// stores, keeps the history, and a second run finds nothing left to do.
func TestComplete(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "complete-proxy")
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id serial PRIMARY KEY, note text)")
	}
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on", "--shadow", "10"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}
	if _, _, err := cli("complete", "-c", file); err == nil || !strings.Contains(err.Error(), "complete refused: the primary is old") {
		t.Fatalf("complete before the flip: %v", err)
	}
	if out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100", "--force"); err != nil {
		t.Fatalf("flip: %v\n%s%s", err, out, errOut)
	}
	// What the change feed leaves on the stores.
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, `CREATE PUBLICATION tandem_feed FOR TABLE orders`)
		mustExec(t, c, `SELECT pg_create_logical_replication_slot('tandem_feed_old', 'pgoutput')`)
		mustExec(t, c, `SELECT pg_create_logical_replication_slot('tandem_feed_new', 'pgoutput')`)
	}
	out, _, err := cli("complete", "-c", file, "--reason", "soaked")
	if err != nil {
		t.Fatalf("complete: %v\n%s", err, out)
	}
	for _, want := range []string{"routing version 4: primary=new mirror=off reads=100% shadow=0%", "mirroring to old: turned off",
		"dropped old: slot tandem_feed_old", "dropped new: slot tandem_feed_new", "dropped new: publication tandem_feed"} {
		if !strings.Contains(out, want) {
			t.Errorf("complete output lacks %q:\n%s", want, out)
		}
	}
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		h, n := storeHash(t, c, "(SELECT slot_name FROM pg_replication_slots UNION ALL SELECT pubname FROM pg_publication)", "1")
		if n != 0 {
			t.Errorf("left on a store: %d slots or publications (%s)", n, h)
		}
	}
	st, _ := statusJSON(t, file)
	if st.Routing.State.Mirror || len(st.Routing.History) < 4 || st.Routing.History[0].Reason != "soaked" {
		t.Errorf("after complete: %+v, history %+v", st.Routing.State, st.Routing.History)
	}
	out, _, err = cli("complete", "-c", file)
	if err != nil || !strings.Contains(out, "mirroring to old: already off") || !strings.Contains(out, "change feed: nothing to drop") {
		t.Errorf("second complete: %v\n%s", err, out)
	}
}
