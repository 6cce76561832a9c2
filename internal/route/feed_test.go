package route

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

// fakeFeed plays the change feed's part of the contract on tandem.feed: it
// heartbeats every 100ms as holder "feed-test" and sets checked_lsn only
// when the test says so.
type fakeFeed struct {
	t    *testing.T
	conn *pgx.Conn // its own connection to the control database
	stop chan struct{}
	done chan struct{}
}

func startFakeFeed(t *testing.T, c *pgtest.Cluster, store Store) *fakeFeed {
	t.Helper()
	f := &fakeFeed{t: t, conn: connect(t, c), stop: make(chan struct{}), done: make(chan struct{})}
	ctx := context.Background()
	if err := EnsureFeedSchema(ctx, f.conn); err != nil {
		t.Fatal(err)
	}
	if _, err := f.conn.Exec(ctx, `INSERT INTO tandem.feed (store, slot_name, holder, checked_lsn, checked_at) VALUES ($1, $2, 'feed-test', '0/0', now())
		ON CONFLICT (store) DO UPDATE SET holder = 'feed-test', checked_lsn = '0/0', checked_at = now(), heartbeat_at = now(), last_error = NULL`,
		string(store), FeedNames{}.Slot(store)); err != nil {
		t.Fatal(err)
	}
	hb := connect(t, c)
	go func() {
		defer close(f.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-f.stop:
				return
			case <-tick.C:
				_, _ = hb.Exec(ctx, "UPDATE tandem.feed SET heartbeat_at = now() WHERE store = $1", string(store))
			}
		}
	}()
	t.Cleanup(f.halt)
	return f
}

// halt stops the heartbeat: the feed is then down.
func (f *fakeFeed) halt() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	<-f.done
}

// check sets checked_lsn of store to the expression lsn (SQL, e.g. '0/0' or
// $2::pg_lsn - 1).
func (f *fakeFeed) check(store Store, expr string, args ...any) {
	f.t.Helper()
	if _, err := f.conn.Exec(context.Background(), "UPDATE tandem.feed SET checked_lsn = "+expr+", checked_at = now() WHERE store = $1",
		append([]any{string(store)}, args...)...); err != nil {
		f.t.Fatal(err)
	}
}

// feedPrepare is a FeedWait.Prepare on one cluster that plays both stores:
// it records the fence it ran under and hands the position it read to lsns.
func feedPrepare(t *testing.T, c *pgtest.Cluster, fenceAtPrepare *atomic.Int64, lsns chan<- string) func(ctx context.Context, from, to Store) (func(context.Context) (string, error), func(), error) {
	return func(ctx context.Context, from, to Store) (func(context.Context) (string, error), func(), error) {
		pc := connect(t, c)
		st, err := Load(ctx, pc)
		if err != nil {
			return nil, nil, err
		}
		fenceAtPrepare.Store(st.Fence)
		return func(ctx context.Context) (string, error) {
				var lsn string
				err := pc.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn)
				if err == nil {
					select {
					case lsns <- lsn:
					default:
					}
				}
				return lsn, err
			}, func() {
				pc.Close(context.Background())
			}, nil
	}
}

// TestFlipWaitsForFeed: with the change feed enabled, a write flip reads the
// primary's WAL position under the fence and does not complete until
// tandem.feed says every change up to it is checked (a position one byte
// short is not enough); it completes right after.
func TestFlipWaitsForFeed(t *testing.T) {
	c, conn := newControlStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runReplica(t, ctx, c, "replica-a")
	waitAck(t, conn, "replica-a", 1)
	if _, _, err := Set(ctx, conn, Change{Next: Settings{Primary: Old, Mirror: true}, By: "test"}, Options{Live: time.Second}); err != nil {
		t.Fatal(err)
	}
	feed := startFakeFeed(t, c, Old)

	var fenceAtPrepare atomic.Int64
	fenceAtPrepare.Store(-1)
	lsns := make(chan string, 1)
	opts := Options{FenceTimeout: 2 * time.Second, AckTimeout: 5 * time.Second, Live: time.Second,
		Feed: &FeedWait{Timeout: 20 * time.Second, Prepare: feedPrepare(t, c, &fenceAtPrepare, lsns)}}

	type result struct {
		st   State
		rep  Report
		err  error
		done time.Time
	}
	res := make(chan result, 1)
	go func() {
		st, rep, err := Set(ctx, conn, Change{Next: Settings{Primary: New, Mirror: true, Reads: 100}, By: "test", Reason: "flip"}, opts)
		res <- result{st, rep, err, time.Now()}
	}()
	var lsn string
	select {
	case lsn = <-lsns:
	case r := <-res:
		t.Fatalf("the flip ended before it read the WAL position: %+v %v", r.rep, r.err)
	case <-time.After(15 * time.Second):
		t.Fatal("the flip did not read the WAL position within 15s")
	}
	if fenceAtPrepare.Load() != 0 {
		t.Fatalf("the feed was prepared under fence %d, want before the fence", fenceAtPrepare.Load())
	}
	// The feed is one byte short, then idle: the flip keeps waiting, fenced.
	feed.check(Old, "$2::pg_lsn - 1", lsn)
	other := connect(t, c)
	for range 5 {
		select {
		case r := <-res:
			t.Fatalf("the flip completed before the feed reached %s: %+v %v", lsn, r.rep, r.err)
		case <-time.After(100 * time.Millisecond):
		}
		st, err := Load(ctx, other)
		if err != nil || st.Version != 2 || st.Primary != Old || st.Fence == 0 {
			t.Fatalf("while the flip waits for the feed: %+v %v, want version 2, primary old, fence raised", st, err)
		}
	}
	caughtUp := time.Now()
	feed.check(Old, "$2::pg_lsn", lsn)
	var r result
	select {
	case r = <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("the flip did not complete within 10s of the feed reaching the fence position")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if !r.done.After(caughtUp) {
		t.Fatal("the flip completed before the feed reached the fence position")
	}
	t.Logf("the flip completed %s after the feed reached %s", r.done.Sub(caughtUp), lsn)
	if r.st.Primary != New || r.st.Version != 3 || r.rep.Feed == nil || !r.rep.Feed.CaughtUp || r.rep.Feed.FenceLSN != lsn ||
		r.rep.Feed.CheckedLSN != lsn || r.rep.Feed.Holder != "feed-test" || r.rep.Feed.Store != Old || len(r.rep.Forced) != 0 {
		t.Fatalf("after the flip: %+v feed %+v", r.st, r.rep.Feed)
	}
}

// TestFlipFeedNeverCatchesUp: a feed that never checks up to the fence
// position makes the flip give up within routing.feed_wait: the fence is
// released, nothing changed, and the error names the change feed. A
// rollback waits the same way and is refused too, unless forced: then it
// goes on and the report and the history say so. Open drift stale on the
// store becoming primary after the wait refuses the flip as well.
func TestFlipFeedNeverCatchesUp(t *testing.T) {
	c, conn := newControlStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a := runReplica(t, ctx, c, "replica-a")
	waitAck(t, conn, "replica-a", 1)
	if _, _, err := Set(ctx, conn, Change{Next: Settings{Primary: Old, Mirror: true}, By: "test"}, Options{Live: time.Second}); err != nil {
		t.Fatal(err)
	}
	feed := startFakeFeed(t, c, Old)
	var fenceAtPrepare atomic.Int64
	opts := Options{FenceTimeout: 2 * time.Second, AckTimeout: 5 * time.Second, Live: time.Second,
		Feed: &FeedWait{Timeout: time.Second, Prepare: feedPrepare(t, c, &fenceAtPrepare, make(chan string, 1))}}
	flip := Change{Next: Settings{Primary: New, Mirror: true, Reads: 100}, By: "test", Reason: "flip"}

	start := time.Now()
	st, rep, err := Set(ctx, conn, flip, opts)
	var fe *FeedError
	if !errors.As(err, &fe) || fe.Rollback || fe.Report.CaughtUp || !strings.Contains(err.Error(), "change feed: write flip refused") ||
		!strings.Contains(err.Error(), "has not checked the old store's WAL up to the fence's position") ||
		!strings.Contains(err.Error(), "checked up to 0/0 by feed-test") || !strings.Contains(err.Error(), "the fence was released and nothing changed") {
		t.Fatalf("flip with a feed that never catches up: %v", err)
	}
	if took := time.Since(start); took > 8*time.Second {
		t.Fatalf("the refused flip took %s with a 1s feed wait", took)
	}
	if st.Version != 2 || rep.ToVersion != 2 || rep.Feed == nil || rep.Feed.FenceLSN == "" || rep.FenceToken == 0 {
		t.Fatalf("refused flip: %+v %+v", st, rep)
	}
	unchanged := func(version int64, primary Store) {
		t.Helper()
		if st, err := Load(ctx, conn); err != nil || st.Version != version || st.Primary != primary || st.Fence != 0 {
			t.Fatalf("after a refused flip: %+v %v, want version %d, primary %s, no fence", st, err, version, primary)
		}
		harness.SucceedsSoon(t, 10*time.Second, func() error {
			if l := a.last(); l.Fence != 0 || l.Version != version {
				return errors.New("the replica did not see the fence released")
			}
			return nil
		})
	}
	unchanged(2, Old)

	// The feed is down: the error says so; forced, the flip goes on.
	feed.halt()
	if _, err := conn.Exec(ctx, "UPDATE tandem.feed SET heartbeat_at = now() - interval '1 minute', last_error = 'slot is gone'"); err != nil {
		t.Fatal(err)
	}
	flip.Force = true
	st, rep, err = Set(ctx, conn, flip, opts)
	if err != nil || st.Primary != New || rep.Feed == nil || !rep.Feed.Forced || rep.Feed.CaughtUp || len(rep.Forced) != 1 ||
		!strings.Contains(rep.Forced[0], "its last error: slot is gone") {
		t.Fatalf("forced flip past a down feed: %+v %+v %v", st, rep, err)
	}

	// A rollback waits for the feed of new: it never caught up, so the
	// rollback is refused (not for a gate: for the feed) until forced.
	_, _, err = Set(ctx, conn, Change{Rollback: true, By: "test", Reason: "rollback"}, opts)
	if !errors.As(err, &fe) || !fe.Rollback || fe.Report.Store != New || !strings.Contains(err.Error(), "change feed: rollback refused") ||
		!strings.Contains(err.Error(), "(no change feed has run: tandem.feed has no row for it)") {
		t.Fatalf("rollback without a feed on new: %v", err)
	}
	unchanged(3, New)
	st, rep, err = Set(ctx, conn, Change{Rollback: true, By: "test", Reason: "rollback", Force: true}, opts)
	if err != nil || st.Primary != Old || !rep.Feed.Forced {
		t.Fatalf("forced rollback: %+v %+v %v", st, rep, err)
	}
	var forced bool
	var reason string
	if err := conn.QueryRow(ctx, "SELECT forced, reason FROM tandem.state_history WHERE version = $1", st.Version).Scan(&forced, &reason); err != nil {
		t.Fatal(err)
	}
	if !forced || !strings.Contains(reason, "rollback [forced past: the change feed has not checked the new store's WAL") {
		t.Fatalf("history of the forced rollback: %v %q", forced, reason)
	}

	// The feed caught up, but left drift the store becoming primary misses
	// and nothing repaired it: refused.
	// (EnsureSchema made the drift ledger: the control schema is one.)
	if _, err := conn.Exec(ctx, `INSERT INTO tandem.drift (schema_name, table_name, key, stale) VALUES ('public', 't', '{1}', 'new')`); err != nil {
		t.Fatal(err)
	}
	var lsn string
	if err := conn.QueryRow(ctx, "SELECT (pg_current_wal_lsn() + 1000000000)::text").Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "UPDATE tandem.feed SET heartbeat_at = now() + interval '1 hour', holder = 'feed-test', checked_lsn = $1", lsn); err != nil {
		t.Fatal(err)
	}
	flip.Force = false
	_, rep, err = Set(ctx, conn, flip, opts)
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), "1 drift entries stale on the new store are still open after the repair under the fence") ||
		rep.Feed == nil || !rep.Feed.CaughtUp || rep.Feed.Drift != 1 {
		t.Fatalf("flip with open drift after the feed's wait: %+v %v", rep.Feed, err)
	}
	unchanged(4, Old)
}
