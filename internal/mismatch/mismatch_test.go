package mismatch

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

func connect(t *testing.T) *pgx.Conn {
	t.Helper()
	return harness.Connect(t, pgtest.New(t), "postgres")
}

// Before any proxy created the tables, readers see no data, not an error;
// then records group by fingerprint and counters add up across replicas
// and flushes, within the window only.
func TestRecordsAndRates(t *testing.T) {
	ctx := t.Context()
	conn := connect(t)
	if r, err := WindowRate(ctx, conn, time.Hour); err != nil || r.Total.Compared() != 0 {
		t.Fatalf("rate before the schema: %+v %v", r, err)
	}
	if g, err := List(ctx, conn, ListOptions{}); err != nil || len(g) != 0 {
		t.Fatalf("list before the schema: %v %v", g, err)
	}
	if err := EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}
	if err := EnsureSchema(ctx, conn); err != nil { // idempotent
		t.Fatal(err)
	}
	seven := "7"
	for i, fp := range []string{"aa", "bb", "aa", "aa"} {
		r := Record{Replica: "r1", Fingerprint: fp, Statement: "SELECT v FROM t WHERE id = $1", Params: []*string{&seven, nil},
			ServedBy: "old", ShadowOn: "new", Kind: "rows", Summary: "s", Diff: json.RawMessage(`{"n":` + string(rune('0'+i)) + `}`)}
		if err := Insert(ctx, conn, r); err != nil {
			t.Fatal(err)
		}
	}
	groups, err := List(ctx, conn, ListOptions{Samples: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(groups) != 2 || groups[0].Fingerprint != "aa" || groups[0].Count != 3 || len(groups[0].Samples) != 2 ||
		string(groups[0].Samples[0].Diff) != `{"n": 3}` || groups[1].Count != 1 {
		t.Fatalf("groups %+v", groups)
	}
	if p := groups[0].Samples[0].Params; len(p) != 2 || *p[0] != "7" || p[1] != nil {
		t.Fatalf("params %v", p)
	}
	if g, _ := List(ctx, conn, ListOptions{Fingerprint: "bb"}); len(g) != 1 || g[0].Fingerprint != "bb" {
		t.Fatalf("filtered %+v", g)
	}

	now := time.Now()
	for _, f := range []struct {
		replica string
		at      time.Time
		c       map[string]Counts
	}{
		{"r1", now, map[string]Counts{"aa": {Matched: 90, Mismatched: 3, Transient: 7}, "bb": {Matched: 50, Dropped: 2}}},
		{"r1", now, map[string]Counts{"aa": {Matched: 10}}}, // the same minute: added
		{"r2", now, map[string]Counts{"bb": {Mismatched: 1, Skipped: 4}}},
		{"r1", now.Add(-3 * time.Hour), map[string]Counts{"aa": {Mismatched: 100}}}, // outside the window
	} {
		if err := FlushStats(ctx, conn, f.replica, f.at, f.c); err != nil {
			t.Fatal(err)
		}
	}
	r, err := WindowRate(ctx, conn, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	want := Counts{Matched: 150, Mismatched: 4, Transient: 7, Dropped: 2, Skipped: 4}
	if r.Total != want || r.Total.Compared() != 161 {
		t.Fatalf("total %+v, want %+v", r.Total, want)
	}
	if len(r.Fingerprints) != 2 || r.Fingerprints[0].Fingerprint != "aa" || r.Fingerprints[0].Mismatched != 3 ||
		r.Fingerprints[0].Statement != "SELECT v FROM t WHERE id = $1" {
		t.Fatalf("fingerprints %+v", r.Fingerprints)
	}
	if got := r.Total.MismatchRate(); got < 0.0248 || got > 0.0249 {
		t.Fatalf("rate %v", got)
	}
}
