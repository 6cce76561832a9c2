package control

import (
	"slices"
	"testing"

	"github.com/tandemdb/tandem/internal/config"
)

// TestGatesOneList: the gates a flip through NewRouting checks are the
// list tandem status evaluates (Routing.Gates), in the playbook's order,
// with the change feed's only when feed.enabled, and the drift gates last.
func TestGatesOneList(t *testing.T) {
	for _, feed := range []bool{false, true} {
		cfg := config.Default()
		cfg.Old.DSN, cfg.New.DSN = "postgres://u@127.0.0.1:1/db", "postgres://u@127.0.0.1:2/db"
		cfg.Feed.Enabled = feed
		rt, err := NewRouting(&cfg, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, g := range rt.Gates() {
			names = append(names, g.Name)
		}
		want := []string{"mapping", "backfill", "verify", "shadow", "drift", "stuck drift"}
		if feed {
			want = slices.Insert(want, 4, "change feed")
		}
		if !slices.Equal(names, want) {
			t.Errorf("feed.enabled=%v: gates %q, want %q", feed, names, want)
		}
		if got := len(rt.options().Gates); got != len(want) {
			t.Errorf("feed.enabled=%v: a flip checks %d gates, status shows %d", feed, got, len(want))
		}
	}
}
