package control

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/compare"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// Gate is a cutover gate with the name `tandem status` shows it by. A gate
// that refuses returns a *route.IllegalError with Gate set (refuse): the
// one reason type route.Set, the admin API (409) and `tandem status` read.
type Gate struct {
	Name  string
	Check route.Gate
}

// CutoverGates are the evidence gates a write flip checks, in the order the
// playbook produces their evidence (the change feed's when feed.enabled).
// NewRouting gives them to every flip; Routing.Gates adds the drift gates,
// and `tandem status` evaluates that same list one by one.
func CutoverGates(cfg *config.Config) []Gate {
	gs := []Gate{
		{"mapping", mappingGate(cfg)},
		{"backfill", backfillGate(cfg)},
		{"verify", verifyGate(cfg)},
		{"shadow", shadowGate(cfg)},
	}
	if cfg.Feed.Enabled {
		gs = append(gs, Gate{"change feed", feedGate(cfg)})
	}
	return gs
}

// DriftGates are the gates on the drift ledger every flip checks, whatever
// the configuration: open drift, and drift stuck at attempts.
func DriftGates(attempts int) []Gate {
	return []Gate{{"drift", DriftGate}, {"stuck drift", StuckDriftGate(attempts)}}
}

// checks are the gates' functions, in order.
func checks(gs []Gate) []route.Gate {
	out := make([]route.Gate, len(gs))
	for i, g := range gs {
		out[i] = g.Check
	}
	return out
}

// refuse is a gate's refusal: the reason names what is missing and what to
// do about it.
func refuse(reason string) error { return &route.IllegalError{Gate: true, Reason: reason} }

// mappingGate refuses a write flip to new while a table in scope has a
// mapping problem: after the flip, writes are mirrored back to old through
// the reverse expressions, so a computed column without one would lose
// data on old.
func mappingGate(cfg *config.Config) route.Gate {
	return func(ctx context.Context, _ *pgx.Conn, cur, next route.Settings) error {
		if cur.Primary == next.Primary || next.Primary != route.New {
			return nil
		}
		_, probs, err := LoadMappings(ctx, cfg)
		if err != nil {
			return refuse("table mappings could not be checked: " + err.Error())
		}
		if len(probs) == 0 {
			return nil
		}
		var reasons []string
		for _, p := range probs {
			reasons = append(reasons, p.String())
		}
		return refuse(fmt.Sprintf("%d table mapping problem(s): %s", len(probs), strings.Join(reasons, "; ")))
	}
}

// backfillGate refuses a write flip to new while a table in scope (one the
// backfill copies: a usable mapping and a key) has not finished its
// backfill: rows that existed before mirroring started would be missing on
// the new store of record; and while an index that tandem backfill
// --defer-indexes dropped on new is not rebuilt (its definition is still
// saved), naming each. Rollbacks skip it (route.Set skips the gates);
// --force overrides it and the history records that.
func backfillGate(cfg *config.Config) route.Gate {
	return func(ctx context.Context, control *pgx.Conn, cur, next route.Settings) error {
		if cur.Primary == next.Primary || next.Primary != route.New {
			return nil
		}
		ms, _, err := LoadMappings(ctx, cfg)
		if err != nil {
			return refuse("the backfill could not be checked: " + err.Error())
		}
		occ, err := StoreConnConfig(cfg, route.Old)
		if err != nil {
			return refuse("the backfill could not be checked: " + err.Error())
		}
		old, err := pgx.ConnectConfig(ctx, occ)
		if err != nil {
			return refuse("the backfill could not be checked: connecting to the old store: " + err.Error())
		}
		defer old.Close(context.WithoutCancel(ctx))
		left, err := backfill.UnfinishedTables(ctx, control, ms, func(ctx context.Context, n table.Name) (int64, error) {
			return estimateRows(ctx, old, n)
		})
		if err != nil {
			return refuse("the backfill could not be checked: " + err.Error())
		}
		deferred, err := backfill.DeferredIndexes(ctx, control)
		if err != nil {
			return refuse("the backfill could not be checked: " + err.Error())
		}
		if len(left) == 0 && len(deferred) == 0 {
			return nil
		}
		var reasons []string
		if len(left) > 0 {
			var rows int64
			names := make([]string, 0, len(left))
			for _, u := range left {
				names = append(names, u.String())
				rows += u.RowsLeft
			}
			reasons = append(reasons, fmt.Sprintf("the backfill has not finished on %d table(s) in scope, ~%d rows left: %s; run tandem backfill (GET /api/v1/backfill shows its progress)",
				len(left), rows, strings.Join(names, ", ")))
		}
		if len(deferred) > 0 {
			names := make([]string, 0, len(deferred))
			for _, d := range deferred {
				names = append(names, d.String())
			}
			reasons = append(reasons, fmt.Sprintf("%d index(es) of the new store dropped by tandem backfill --defer-indexes are not rebuilt yet: %s; run tandem backfill again to rebuild them",
				len(deferred), strings.Join(names, ", ")))
		}
		return refuse(strings.Join(reasons, "; "))
	}
}

// estimateRows is the planner's row estimate of an old table, or its
// count when it was never analyzed.
func estimateRows(ctx context.Context, old *pgx.Conn, n table.Name) (int64, error) {
	id := pgx.Identifier{n.Schema, n.Table}.Sanitize()
	var est float64
	if err := old.QueryRow(ctx, "SELECT coalesce((SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)), -1)", id).Scan(&est); err != nil {
		return 0, fmt.Errorf("estimating the rows of %s: %w", n, err)
	}
	if est >= 0 {
		return int64(est), nil
	}
	var count int64
	if err := old.QueryRow(ctx, "SELECT count(*) FROM "+id).Scan(&count); err != nil {
		return 0, fmt.Errorf("counting the rows of %s: %w", n, err)
	}
	return count, nil
}

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
		ms, _, err := LoadMappings(ctx, cfg)
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
			u := m.UnitName() // a split's parts each have their verify
			r, ok := runs[u]
			switch {
			case !ok:
				never = append(never, u.String())
			case !r.Clean:
				dirty = append(dirty, fmt.Sprintf("%s (%d differences, %d repaired)", u, r.Diffs, r.Repaired))
			case now.Sub(r.Finished) > maxAge:
				stale = append(stale, fmt.Sprintf("%s (verified %s ago)", u, now.Sub(r.Finished).Round(time.Minute)))
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
			return refuse("the shadow mismatch rate could not be checked: " + err.Error())
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
			worst = append(worst, fmt.Sprintf("fingerprint %s: %d of %d (%s)", f.Fingerprint, f.Mismatched, f.Compared(), Truncate(f.Statement, 80)))
		}
		return refuse(fmt.Sprintf(
			"shadow reads found %d confirmed mismatch(es) in %d compared reads over the last %s (%.4g%%, gates.shadow_max_mismatch_rate %.4g%%): %s; see GET /api/v1/mismatches",
			t.Mismatched, t.Compared(), window, 100*t.MismatchRate(), 100*bound, strings.Join(worst, "; ")))
	}
}

// Truncate is s on one line, cut to n bytes with an ellipsis.
func Truncate(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// feedGate refuses a write flip, with the change feed enabled, when the
// feed of the current primary is down (nobody holds it, or its heartbeat
// is older than route.FeedLive) or behind: its checked position last
// moved longer ago than gates.feed_max_lag, or lies more than
// gates.feed_max_lag_bytes behind the primary's WAL. The flip would
// otherwise hold the write fence for routing.feed_wait and then give up.
func feedGate(cfg *config.Config) route.Gate {
	return func(ctx context.Context, control *pgx.Conn, cur, next route.Settings) error {
		if !cfg.Feed.Enabled || cur.Primary == next.Primary {
			return nil
		}
		refuse := func(format string, args ...any) error {
			return refuse("change feed: " + fmt.Sprintf(format, args...))
		}
		f, err := FeedState(ctx, cfg, control, cur.Primary)
		if err != nil {
			return refuse("its state could not be read: %v", err)
		}
		var fs FeedStatus
		if len(f.Stores) > 0 {
			fs = f.Stores[0]
		}
		lastErr := ""
		if fs.LastError != "" {
			lastErr = "; its last error: " + fs.LastError
		}
		switch {
		case fs.HeartbeatAt == nil:
			return refuse("no change feed has run on the %s store (tandem.feed has no row for it): start a proxy with feed.enabled", cur.Primary)
		case !fs.Live && fs.Holder == "":
			return refuse("it is down on the %s store: no replica holds it%s", cur.Primary, lastErr)
		case !fs.Live:
			return refuse("it is down on the %s store: the heartbeat of %s is older than %s%s", cur.Primary, fs.Holder, route.FeedLive, lastErr)
		case fs.StoreError != "":
			return refuse("its lag could not be measured: %s", fs.StoreError)
		case fs.CheckedAt == nil || fs.LagBytes == nil:
			return refuse("it has not checked anything on the %s store yet%s", cur.Primary, lastErr)
		case fs.LagSeconds != nil && *fs.LagSeconds > cfg.Gates.FeedMaxLag.Duration().Seconds():
			return refuse("it is behind on the %s store: it last advanced %.1fs ago (gates.feed_max_lag %s), at %s%s",
				cur.Primary, *fs.LagSeconds, cfg.Gates.FeedMaxLag, fs.CheckedLSN, lastErr)
		case *fs.LagBytes > int64(cfg.Gates.FeedMaxLagBytes):
			return refuse("it is behind on the %s store by %d bytes of WAL (checked %s, WAL at %s; gates.feed_max_lag_bytes %s)%s",
				cur.Primary, *fs.LagBytes, fs.CheckedLSN, fs.CurrentLSN, cfg.Gates.FeedMaxLagBytes, lastErr)
		}
		return nil
	}
}

// DriftGate is the cutover gate on open drift: a write flip is refused
// while the drift ledger has open entries, since the store becoming
// primary may miss those writes.
func DriftGate(ctx context.Context, conn *pgx.Conn, cur, next route.Settings) error {
	d, err := openDrift(ctx, conn, table.DefaultStuckAttempts)
	if err != nil || d == nil || d.Open == 0 {
		return err
	}
	names := make([]string, 0, len(d.Tables))
	for n := range d.Tables {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b string) int { return d.Tables[b] - d.Tables[a] })
	if len(names) > 3 {
		names = append(names[:3], "...")
	}
	var stale []string
	for _, s := range []route.Store{route.Old, route.New} {
		if n := d.Stale[string(s)]; n > 0 {
			stale = append(stale, fmt.Sprintf("%d to the %s store", n, s))
		}
	}
	return refuse(fmt.Sprintf("drift is open: %d entries on %d tables (%s): the repairer has not yet copied them (%s)",
		d.Open, len(d.Tables), strings.Join(names, ", "), strings.Join(stale, ", ")))
}

// StuckDriftGate is the cutover gate on stuck drift: a write flip is
// refused while an open drift entry has failed to repair at least attempts
// times, naming the first entries with their error. DriftGate refuses
// while any entry is open; this one says which entries will not close by
// themselves, and what to do about them (issue 10).
func StuckDriftGate(attempts int) route.Gate {
	return func(ctx context.Context, conn *pgx.Conn, cur, next route.Settings) error {
		list, total, err := stuckDrift(ctx, conn, attempts)
		if noLedger(err) || (err == nil && total == 0) {
			return nil
		}
		if err != nil {
			return refuse("stuck drift could not be checked: " + err.Error())
		}
		shown := make([]string, 0, len(list))
		for i, e := range list {
			if i == 3 {
				shown = append(shown, fmt.Sprintf("and %d more", total-3))
				break
			}
			shown = append(shown, e.String())
		}
		return refuse(fmt.Sprintf(
			"drift is stuck: %d entries failed to repair at least %d times (routing.drift_stuck_attempts): %s; "+
				"fix the cause (the table's mapping, or the row the stale store rejects) and the repairer retries each entry within routing.repair_backoff_max; "+
				"an entry that can never apply (a dropped or temporary table) can be closed with UPDATE tandem.drift SET repaired_at = now() WHERE id = <id>; "+
				"tandem route show lists them",
			total, attempts, strings.Join(shown, "; ")))
	}
}
