package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
)

// testFeed plays the change feed's part of the contract on tandem.feed in
// the control database (the old store here): as holder "feed-test" it
// heartbeats and confirms the store's current WAL position less behind
// bytes every 100ms, as an idle feed does from keepalives.
type testFeed struct {
	stop, done chan struct{}
}

// holdFeedElection takes the change feed's election lock on the control
// database for the rest of the test, as a replica running the feed
// elsewhere would: the proxies under test then never run the feed
// themselves, and the test plays the feed's part with startTestFeed.
func holdFeedElection(t *testing.T, control *pgtest.Cluster) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, control.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(ctx) })
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(hashtext('tandem.feed'))"); err != nil {
		t.Fatal(err)
	}
}

func startTestFeed(t *testing.T, control *pgtest.Cluster, store route.Store, walOf *pgtest.Cluster, behind int64) *testFeed {
	t.Helper()
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, control.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	wal, err := pgx.Connect(ctx, walOf.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	if err := route.EnsureFeedSchema(ctx, ctl); err != nil {
		t.Fatal(err)
	}
	f := &testFeed{stop: make(chan struct{}), done: make(chan struct{})}
	tick := func() {
		var lsn string
		if err := wal.QueryRow(ctx, "SELECT (pg_current_wal_lsn() - $1::numeric)::text", behind).Scan(&lsn); err != nil {
			return
		}
		_, _ = ctl.Exec(ctx, `INSERT INTO tandem.feed (store, slot_name, holder, checked_lsn, checked_at) VALUES ($1, $2, 'feed-test', $3, now())
			ON CONFLICT (store) DO UPDATE SET holder = 'feed-test', checked_lsn = $3, checked_at = now(), heartbeat_at = now()`,
			string(store), route.FeedNames{}.Slot(store), lsn)
	}
	tick()
	go func() {
		defer close(f.done)
		defer ctl.Close(ctx)
		defer wal.Close(ctx)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-f.stop:
				return
			case <-t.C:
				tick()
			}
		}
	}()
	t.Cleanup(f.halt)
	return f
}

func (f *testFeed) halt() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	<-f.done
}

// TestFeedGateAndFlip: with feed.enabled, the change feed gate refuses a
// write flip when no feed has run, when it is behind by more than
// gates.feed_max_lag_bytes and when its heartbeat is stale; --force goes
// past it on the record. The flip creates the publication and the slot on
// new before its fence and waits for the feed; route show prints the feed.
// A rollback with no feed on new is refused after routing.feed_wait, and
// --force rolls back and says so.
func TestFeedGateAndFlip(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id serial PRIMARY KEY, note text); CREATE TABLE audit (id int PRIMARY KEY)")
	}
	mustExec(t, oldC, "INSERT INTO orders (note) SELECT 'x' FROM generate_series(1, 10)")
	base, cfg := pairConfig(t, oldC, newC, "feed-proxy")
	file := editConfig(t, base, "feed", feedWait(2*time.Second), feedOn)
	strict := editConfig(t, base, "strict", feedWait(2*time.Second), feedOn, withGates("  feed_max_lag_bytes: 1\n"))
	holdFeedElection(t, oldC) // the test plays the feed
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("dual-write: %v\n%s%s", err, out, errOut)
	}
	backfillAll(t, base)
	verifyAll(t, base)

	refused(t, file, "change feed: no change feed has run on the old store (tandem.feed has no row for it)")
	out, _, err := cli("route", "show", "-c", file)
	if err != nil || !strings.Contains(out, "change feed: on (write flips and rollbacks wait for it)") ||
		!strings.Contains(out, "old (primary)  tandem_feed_old (missing)  (never ran)") {
		t.Fatalf("route show with no feed: %v\n%s", err, out)
	}

	const behind = 1 << 20
	feed := startTestFeed(t, oldC, route.Old, oldC, behind)
	refused(t, strict, "change feed: it is behind on the old store by 10")
	out, _, err = cli("route", "show", "-c", file)
	for _, want := range []string{"change feed: on", "old (primary)", "tandem_feed_old (missing)", "feed-test", " bytes, "} {
		if err != nil || !strings.Contains(out, want) {
			t.Errorf("route show lacks %q (%v):\n%s", want, err, out)
		}
	}
	out, _, err = cli("route", "show", "-c", file, "--json")
	var st control.Status
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.Feed == nil || !st.Feed.Enabled || len(st.Feed.Stores) != 1 ||
		st.Feed.Stores[0].Holder != "feed-test" || !st.Feed.Stores[0].Live || st.Feed.Stores[0].LagBytes == nil ||
		*st.Feed.Stores[0].LagBytes < behind || st.Feed.Stores[0].CurrentLSN == "" || st.Feed.Stores[0].LagSeconds == nil {
		t.Fatalf("route show --json: %v\n%s", err, out)
	}

	// Down: its heartbeat stops.
	feed.halt()
	mustExec(t, oldC, "UPDATE tandem.feed SET heartbeat_at = now() - interval '1 minute', last_error = 'walsender gone'")
	refused(t, file, "change feed: it is down on the old store: the heartbeat of feed-test is older than 5s; its last error: walsender gone")
	mustExec(t, oldC, "UPDATE tandem.feed SET last_error = NULL")

	// Back and keeping up: the gate passes, and the flip waits for the
	// feed to confirm the fence position.
	feed = startTestFeed(t, oldC, route.Old, oldC, 0)
	out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100", "--reason", "cutover")
	if err != nil || !strings.Contains(out, "primary=new") || !strings.Contains(out, "change feed: checked the old store's WAL up to") ||
		strings.Contains(out, "forced") {
		t.Fatalf("flip: %v\n%s%s", err, out, errOut)
	}
	t.Logf("flip waiting for a feed that confirms every 100ms:\n%s", out)
	ctx := context.Background()
	// The flip's prepare step made the publication and the slot on new.
	nc, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close(ctx)
	var plugin string
	var tables []string
	if err := nc.QueryRow(ctx, "SELECT plugin FROM pg_replication_slots WHERE slot_name = 'tandem_feed_new' AND slot_type = 'logical'").Scan(&plugin); err != nil || plugin != "pgoutput" {
		t.Fatalf("slot tandem_feed_new on new: %q %v", plugin, err)
	}
	if err := nc.QueryRow(ctx, "SELECT array_agg(schemaname || '.' || tablename ORDER BY schemaname, tablename) FROM pg_publication_tables WHERE pubname = 'tandem_feed'").Scan(&tables); err != nil ||
		strings.Join(tables, ",") != "public.audit,public.orders" {
		t.Fatalf("publication tandem_feed on new: %v %v", tables, err)
	}
	// Idempotent: the same preparation again changes nothing.
	if err := control.EnsureFeed(ctx, nc, route.FeedNames{}, route.New, control.FeedTables(rp.control.Mappings(), route.New)); err != nil {
		t.Fatalf("ensureFeed again: %v", err)
	}
	out, _, err = cli("route", "show", "-c", file)
	for _, want := range []string{"new (primary)", "tandem_feed_new (inactive)", "(never ran)", "tandem_feed_old (missing)", "feed-test"} {
		if err != nil || !strings.Contains(out, want) {
			t.Errorf("route show after the flip lacks %q (%v):\n%s", want, err, out)
		}
	}

	// Rollback: nobody reads new's WAL; refused after the wait, then forced.
	start := time.Now()
	out, errOut, err = cli("rollback", "-c", file, "--reason", "p99")
	if err == nil || !strings.Contains(err.Error(), "change feed: rollback refused: the change feed has not checked the new store's WAL") ||
		!strings.Contains(err.Error(), "the fence was released and nothing changed") {
		t.Fatalf("rollback without a feed on new: %v\n%s%s", err, out, errOut)
	}
	if took := time.Since(start); took < 2*time.Second {
		t.Errorf("the refused rollback took %s, less than routing.feed_wait", took)
	}
	waitFor(t, func() bool { return rp.srv.State().Fence == 0 })
	if s := rp.srv.State(); s.Primary != route.New {
		t.Fatalf("a refused rollback changed the state: %+v", s)
	}
	out, errOut, err = cli("rollback", "-c", file, "--reason", "p99", "--force")
	if err != nil || !strings.Contains(out, "primary=old") ||
		!strings.Contains(out, "change feed: NOT caught up with the new store's fence position") ||
		!strings.Contains(out, "forced past: the change feed has not checked the new store's WAL") {
		t.Fatalf("forced rollback: %v\n%s%s", err, out, errOut)
	}
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	lastHistory := func() (bool, string) {
		t.Helper()
		var forced bool
		var reason string
		if err := ctl.QueryRow(ctx, "SELECT forced, reason FROM tandem.state_history ORDER BY version DESC LIMIT 1").Scan(&forced, &reason); err != nil {
			t.Fatal(err)
		}
		return forced, reason
	}
	if forced, reason := lastHistory(); !forced || !strings.Contains(reason, "p99 [forced past: the change feed has not checked the new store's WAL") {
		t.Fatalf("history of the forced rollback: %v %q", forced, reason)
	}

	// Behind again: --force goes past the gate (and then the wait), on the record.
	feed.halt()
	startTestFeed(t, oldC, route.Old, oldC, behind)
	out, errOut, err = cli("route", "set", "-c", strict, "--primary", "new", "--reads", "100", "--force", "--reason", "cutover 2")
	if err != nil || !strings.Contains(out, "primary=new") || !strings.Contains(out, "forced past: change feed: it is behind on the old store by 10") {
		t.Fatalf("forced flip: %v\n%s%s", err, out, errOut)
	}
	if forced, reason := lastHistory(); !forced || !strings.Contains(reason, "cutover 2 [forced past: change feed: it is behind on the old store") {
		t.Fatalf("history of the forced flip: %v %q", forced, reason)
	}
}

// TestFeedWaitHoldsWrites: a write that arrives while a flip waits for the
// change feed is held at the fence, not refused, for as long as the flip
// may wait (2 × routing.fence_timeout plus routing.feed_wait), and runs on
// the new primary once the feed has caught up and the flip is done.
func TestFeedWaitHoldsWrites(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id serial PRIMARY KEY, note text)")
	}
	base, _ := pairConfig(t, oldC, newC, "held-proxy")
	// fence_timeout 1s: without the feed, a write held 2s is refused.
	file := editConfig(t, base, "held", func(yaml string) string {
		return strings.Replace(yaml, "  fence_timeout: 2s\n", "  fence_timeout: 1s\n  feed_wait: 8s\n", 1)
	}, feedOn)
	cfg := loadConfig(t, file)
	holdFeedElection(t, oldC) // the test plays the feed
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("dual-write: %v\n%s%s", err, out, errOut)
	}
	// The backfill waits until a feed reads old's WAL: the slot, and the
	// test playing the feed.
	bctx := context.Background()
	oc, err := pgx.Connect(bctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	if err := control.EnsureFeed(bctx, oc, route.FeedNames{}, route.Old, control.FeedTables(rp.control.Mappings(), route.Old)); err != nil {
		t.Fatal(err)
	}
	oc.Close(bctx)
	playing := startTestFeed(t, oldC, route.Old, oldC, 0)
	backfillAll(t, file)
	verifyAll(t, file)
	playing.halt()

	// The feed is alive but 1 MiB behind: the gate (64MiB) lets the flip
	// through, and the flip then waits for it.
	lagging := startTestFeed(t, oldC, route.Old, oldC, 1<<20)
	ctx := context.Background()
	app, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", rp.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(ctx)

	type result struct {
		out string
		err error
	}
	flipped := make(chan result, 1)
	go func() {
		out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100", "--reason", "cutover")
		flipped <- result{out + errOut, err}
	}()
	waitFor(t, func() bool { return rp.srv.State().Fence != 0 })
	wrote := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := app.Exec(ctx, "INSERT INTO orders (note) VALUES ('held')")
		wrote <- err
	}()
	// Held past 2 × fence_timeout: neither run nor refused.
	select {
	case err := <-wrote:
		t.Fatalf("the write ended while the flip waited for the feed, after %s: %v", time.Since(start), err)
	case r := <-flipped:
		t.Fatalf("the flip ended before the feed caught up: %v\n%s", r.err, r.out)
	case <-time.After(3 * time.Second):
	}
	lagging.halt()
	startTestFeed(t, oldC, route.Old, oldC, 0)
	var r result
	select {
	case r = <-flipped:
	case <-time.After(30 * time.Second):
		t.Fatal("the flip did not end within 30s of the feed catching up")
	}
	if r.err != nil || !strings.Contains(r.out, "primary=new") || !strings.Contains(r.out, "change feed: checked the old store's WAL") {
		t.Fatalf("flip: %v\n%s", r.err, r.out)
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatalf("the held write: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the held write did not end within 30s of the flip")
	}
	t.Logf("the write was held %s", time.Since(start))
	var n int
	nc, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close(ctx)
	if err := nc.QueryRow(ctx, "SELECT count(*) FROM orders WHERE note = 'held'").Scan(&n); err != nil || n != 1 {
		t.Fatalf("the held write on new: %d rows, %v", n, err)
	}
}
