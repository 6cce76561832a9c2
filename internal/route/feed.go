package route

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/controlschema"
)

// The change feed (design section 10) is built elsewhere; the flip knows it
// only through the contract below: the slot and publication names and the
// control table tandem.feed, one row per store whose WAL is read.

// FeedNames are the names of the change feed's publication and slots, from
// its name (feed.name): empty, the publication tandem_feed and the slots
// tandem_feed_old and tandem_feed_new; "shop", tandem_feed_shop and
// tandem_feed_shop_old, tandem_feed_shop_new. Deployments that share a store
// (a consolidation's new store, or service databases on one cluster, where
// slot names are cluster-wide) each need a name of their own, or they would
// read and confirm one slot and each miss what the other confirmed.
type FeedNames struct{ Name string }

// Publication is the publication of the tables in scope on each store.
func (f FeedNames) Publication() string {
	if f.Name == "" {
		return "tandem_feed"
	}
	return "tandem_feed_" + f.Name
}

// Slot is the name of the change feed's logical slot on store s.
func (f FeedNames) Slot(s Store) string { return f.Publication() + "_" + string(s) }

// FeedLive is how recent the feed's heartbeat must be for it to count as
// running: it writes one at least every second.
const FeedLive = 5 * time.Second

// EnsureFeedSchema creates tandem.feed when it is missing: the feed
// (package feed) writes it, the write flip waits on it. It is
// controlschema.Apply, as EnsureSchema.
func EnsureFeedSchema(ctx context.Context, conn *pgx.Conn) error {
	return controlschema.Apply(ctx, conn)
}

// FeedWait makes every write flip and rollback wait for the change feed, so
// that nothing committed on the current primary before the write fence is
// missing on the store becoming primary (design section 10).
type FeedWait struct {
	// Prepare is called before the fence is raised. It makes sure the
	// publication and the slot exist on to, the store becoming primary, so
	// that every write after the flip is in the feed's reach, and returns
	// position, which reads the current WAL position (pg_current_wal_lsn())
	// of from, the current primary; Set calls it with writes fenced and
	// drained. done is called when the flip ends.
	Prepare func(ctx context.Context, from, to Store) (position func(context.Context) (string, error), done func(), err error)
	// Timeout bounds the wait under the fence (routing.feed_wait; default
	// 5s). A flip that runs out of it releases the fence and changes
	// nothing, with a *FeedError, unless Change.Force is set.
	Timeout time.Duration
	// Live is how recent the feed's heartbeat must be (default FeedLive).
	Live time.Duration
}

// FeedReport says what a flip's wait for the change feed found.
type FeedReport struct {
	Store      Store   `json:"store"`                 // the store whose WAL the feed had to check (the primary before the flip)
	FenceLSN   string  `json:"fence_lsn"`             // its WAL position with writes fenced and drained
	CheckedLSN string  `json:"checked_lsn,omitempty"` // how far the feed had checked when the wait ended
	Holder     string  `json:"holder,omitempty"`      // the replica running the feed
	WaitedMS   float64 `json:"waited_ms"`
	CaughtUp   bool    `json:"caught_up"`        // checked_lsn reached FenceLSN with a live heartbeat
	Drift      int64   `json:"drift"`            // open drift entries stale on the store becoming primary after the repair, when the flip went on (forced)
	Forced     bool    `json:"forced,omitempty"` // the flip went on without the feed (Change.Force)
}

// FeedError is a write flip or rollback that gave up because the change
// feed did not check the primary's WAL up to the fence in time, or left
// drift the store becoming primary misses. The fence was released and
// nothing changed.
type FeedError struct {
	Report   FeedReport
	Timeout  time.Duration
	Rollback bool
	// Why says what was missing, in words: "its heartbeat is 12s old", ...
	Why string
}

func (e *FeedError) Error() string {
	what := "write flip"
	if e.Rollback {
		what = "rollback"
	}
	return fmt.Sprintf("change feed: %s refused: %s; the fence was released and nothing changed; "+
		"check the change feed (tandem route show), raise routing.feed_wait, or pass --force to go on without it "+
		"(writes committed on the %s store that the feed has not checked may then be missing on the other until verify finds them)",
		what, e.Why, e.Report.Store)
}

// feedRow is a row of tandem.feed as the flip reads it.
type feedRow struct {
	present    bool
	holder     string
	checkedLSN string
	reached    bool // checked_lsn >= the target
	live       bool // heartbeat within Live
	heartbeat  time.Duration
	lastError  string
}

func readFeed(ctx context.Context, conn *pgx.Conn, store Store, target string, live time.Duration) (feedRow, error) {
	var r feedRow
	var holder, checked, lastErr *string
	var age time.Duration
	err := conn.QueryRow(ctx, `SELECT holder, checked_lsn::text, COALESCE(checked_lsn >= $2::pg_lsn, false),
			now() - heartbeat_at, last_error
		FROM tandem.feed WHERE store = $1`, string(store), target).Scan(&holder, &checked, &r.reached, &age, &lastErr)
	if errors.Is(err, pgx.ErrNoRows) {
		return r, nil
	}
	if err != nil {
		return r, err
	}
	r.present = true
	if holder != nil {
		r.holder = *holder
	}
	if checked != nil {
		r.checkedLSN = *checked
	}
	if lastErr != nil {
		r.lastError = *lastErr
	}
	r.heartbeat = age
	r.live = r.holder != "" && age <= live
	return r, nil
}

// why says, for an operator, why the feed has not reached target.
func (r feedRow) why(store Store, target string, waited time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "the change feed has not checked the %s store's WAL up to the fence's position %s within %s", store, target, waited.Round(time.Millisecond))
	switch {
	case !r.present:
		b.WriteString(" (no change feed has run: tandem.feed has no row for it)")
	case r.holder == "":
		b.WriteString(" (no replica runs it)")
	default:
		checked := r.checkedLSN
		if checked == "" {
			checked = "nothing yet"
		}
		fmt.Fprintf(&b, " (checked up to %s by %s, heartbeat %s ago)", checked, r.holder, r.heartbeat.Round(time.Millisecond))
	}
	if r.lastError != "" {
		fmt.Fprintf(&b, "; its last error: %s", r.lastError)
	}
	return b.String()
}

// feedPoll is how often the flip re-reads tandem.feed while it waits: the
// fence is up, so the wait should end soon after the feed gets there.
const feedPoll = 20 * time.Millisecond

// wait waits, with writes fenced, until the feed has checked store's WAL
// up to target with a live heartbeat, or timeout passes.
func (f *FeedWait) wait(ctx context.Context, conn *pgx.Conn, store Store, target string, timeout time.Duration) (FeedReport, string, error) {
	rep := FeedReport{Store: store, FenceLSN: target}
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		r, err := readFeed(ctx, conn, store, target, f.Live)
		if err != nil {
			return rep, "", fmt.Errorf("reading the change feed's progress (tandem.feed): %w", err)
		}
		rep.CheckedLSN, rep.Holder = r.checkedLSN, r.holder
		rep.WaitedMS = float64(time.Since(start).Microseconds()) / 1000
		if r.reached && r.live {
			rep.CaughtUp = true
			return rep, "", nil
		}
		if !time.Now().Before(deadline) {
			return rep, r.why(store, target, time.Since(start)), nil
		}
		t := time.NewTimer(min(feedPoll, time.Until(deadline)))
		select {
		case <-ctx.Done():
			t.Stop()
			return rep, "", ctx.Err()
		case <-t.C:
		}
	}
}

// openDriftStaleOn counts the open drift entries stale on store, 0 when the
// drift ledger does not exist.
func openDriftStaleOn(ctx context.Context, conn *pgx.Conn, store Store) (int64, error) {
	var n int64
	err := conn.QueryRow(ctx, `SELECT count(*) FROM tandem.drift WHERE repaired_at IS NULL AND stale = $1`, string(store)).Scan(&n)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42P01" {
		return 0, nil
	}
	return n, err
}
