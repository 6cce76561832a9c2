package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/compare"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/route"
)

// verifyGate refuses a write flip to new unless every table in scope that
// compare can verify (a usable mapping and a key) has a finished verify
// younger than gates.verify_max_age that left no unrepaired difference:
// "is the new store right?" must have been answered, recently, with rows.
func verifyGate(cfg *config.Config) route.Gate {
	return func(ctx context.Context, control *pgx.Conn, cur, next route.Settings) error {
		maxAge := cfg.Gates.VerifyMaxAge.Duration()
		if maxAge <= 0 || cur.Primary == next.Primary || next.Primary != route.New {
			return nil
		}
		refuse := func(reason string) error { return &route.IllegalError{Gate: true, Reason: reason} }
		ms, _, err := loadMappings(ctx, cfg)
		if err != nil {
			return refuse("the last verify could not be checked: " + err.Error())
		}
		runs, err := compare.LastRuns(ctx, control)
		if err != nil {
			return refuse("the last verify could not be checked: " + err.Error())
		}
		var now time.Time
		if err := control.QueryRow(ctx, "SELECT now()").Scan(&now); err != nil {
			return refuse("the last verify could not be checked: " + err.Error())
		}
		var never, dirty, stale []string
		for _, m := range ms.All() {
			n := m.Old.Name
			if !ms.InScope(n) || !m.Old.HasKey() {
				continue
			}
			r, ok := runs[n]
			switch {
			case !ok:
				never = append(never, n.String())
			case !r.Clean:
				dirty = append(dirty, fmt.Sprintf("%s (%d differences, %d repaired)", n, r.Diffs, r.Repaired))
			case now.Sub(r.Finished) > maxAge:
				stale = append(stale, fmt.Sprintf("%s (verified %s ago)", n, now.Sub(r.Finished).Round(time.Minute)))
			}
		}
		var parts []string
		if len(never) > 0 {
			parts = append(parts, fmt.Sprintf("%d table(s) never verified: %s", len(never), strings.Join(never, ", ")))
		}
		if len(dirty) > 0 {
			parts = append(parts, fmt.Sprintf("%d table(s) whose last verify was not clean: %s", len(dirty), strings.Join(dirty, ", ")))
		}
		if len(stale) > 0 {
			parts = append(parts, fmt.Sprintf("%d table(s) verified longer ago than gates.verify_max_age=%s: %s", len(stale), maxAge, strings.Join(stale, ", ")))
		}
		if len(parts) == 0 {
			return nil
		}
		return refuse(strings.Join(parts, "; ") + "; run tandem compare (with --repair to fix what differs)")
	}
}

// shadowGate refuses a write flip to new when the confirmed shadow-read
// mismatch rate over gates.shadow_window is above
// gates.shadow_max_mismatch_rate, naming the worst fingerprints.
func shadowGate(cfg *config.Config) route.Gate {
	return func(ctx context.Context, control *pgx.Conn, cur, next route.Settings) error {
		if cur.Primary == next.Primary || next.Primary != route.New {
			return nil
		}
		window, bound := cfg.Gates.ShadowWindow.Duration(), cfg.Gates.ShadowMaxMismatchRate
		rate, err := mismatch.WindowRate(ctx, control, window)
		if err != nil {
			return &route.IllegalError{Gate: true, Reason: "the shadow mismatch rate could not be checked: " + err.Error()}
		}
		t := rate.Total
		if t.Mismatched == 0 || t.MismatchRate() <= bound {
			return nil
		}
		var worst []string
		for _, f := range rate.Fingerprints {
			if f.Mismatched == 0 || len(worst) == 3 {
				break
			}
			worst = append(worst, fmt.Sprintf("fingerprint %s: %d of %d (%s)", f.Fingerprint, f.Mismatched, f.Compared(), truncate(f.Statement, 80)))
		}
		return &route.IllegalError{Gate: true, Reason: fmt.Sprintf(
			"shadow reads found %d confirmed mismatch(es) in %d compared reads over the last %s (%.4g%%, gates.shadow_max_mismatch_rate %.4g%%): %s; see GET /api/v1/mismatches",
			t.Mismatched, t.Compared(), window, 100*t.MismatchRate(), 100*bound, strings.Join(worst, "; "))}
	}
}

func truncate(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
