package route

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

// fakeReplica is a Follower with a fake proxy behind it: it records the
// states applied and lets the test control Drain and the breaker.
type fakeReplica struct {
	id      string
	breaker atomic.Value // string
	writers atomic.Int64
	// drain, if set, replaces the default Drain (which returns at once).
	drain atomic.Pointer[func(context.Context) error]

	mu      sync.Mutex
	applied []State
	drains  []int64 // the Fence applied when each Drain started
	done    chan error
}

func runReplica(t *testing.T, ctx context.Context, c *pgtest.Cluster, id string) *fakeReplica {
	t.Helper()
	r := &fakeReplica{id: id, done: make(chan error, 1)}
	r.breaker.Store("closed")
	f := &Follower{
		DSN: c.DSN("postgres"), Replica: id, Poll: 100 * time.Millisecond,
		Apply: func(s State) {
			r.mu.Lock()
			r.applied = append(r.applied, s)
			r.mu.Unlock()
		},
		Drain: func(ctx context.Context) error {
			r.mu.Lock()
			r.drains = append(r.drains, r.applied[len(r.applied)-1].Fence)
			r.mu.Unlock()
			if d := r.drain.Load(); d != nil {
				return (*d)(ctx)
			}
			return nil
		},
		Status: func() ReplicaStatus {
			return ReplicaStatus{Breaker: r.breaker.Load().(string), Writers: r.writers.Load()}
		},
	}
	go func() { r.done <- f.Run(ctx) }()
	return r
}

func (r *fakeReplica) last() State {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.applied) == 0 {
		return State{}
	}
	return r.applied[len(r.applied)-1]
}

func (r *fakeReplica) history() ([]State, []int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]State(nil), r.applied...), append([]int64(nil), r.drains...)
}

// driftGate refuses every flip, as open drift would.
func driftGate(calls *atomic.Int32) Gate {
	return func(ctx context.Context, conn *pgx.Conn, cur, next Settings) error {
		calls.Add(1)
		return &IllegalError{Gate: true, Reason: "drift is open: 12 entries on 2 tables"}
	}
}

// TestWriteFlip runs the write flip protocol against two live followers:
// gates refuse with their reasons, --force overrides them and is recorded,
// the fence is raised, drained, and released around the version bump, and
// a rollback skips the drift gate.
func TestWriteFlip(t *testing.T) {
	c, conn := newControlStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, b := runReplica(t, ctx, c, "replica-a"), runReplica(t, ctx, c, "replica-b")
	waitAck(t, conn, "replica-a", 1)
	waitAck(t, conn, "replica-b", 1)

	var synced []Store
	opts := Options{
		FenceTimeout: 2 * time.Second, AckTimeout: 5 * time.Second, Live: time.Second,
		PrepareSequences: func(ctx context.Context, to Store) (func(context.Context) (SequenceSync, error), func(), error) {
			return func(context.Context) (SequenceSync, error) {
				synced = append(synced, to)
				return SequenceSync{Synced: 3, Missing: []string{"public.only_on_one"}}, nil
			}, func() {}, nil
		},
	}
	var gateCalls atomic.Int32
	gated := opts
	gated.Gates = []Gate{driftGate(&gateCalls)}

	// A change that keeps the primary: applied, acknowledged by both, no fence.
	st, rep, err := Set(ctx, conn, Change{Next: Settings{Primary: Old, Mirror: true, Reads: 50}, By: "test", Reason: "dual-write"}, gated)
	if err != nil || st.Version != 2 || rep.Flip || strings.Join(rep.Acked, ",") != "replica-a,replica-b" || len(rep.NotAcked) != 0 {
		t.Fatalf("dual-write: %+v %+v %v", st, rep, err)
	}
	if gateCalls.Load() != 0 {
		t.Fatal("cutover gates ran for a change that is not a flip")
	}
	// Unchanged settings: nothing happens.
	if st, rep, err := Set(ctx, conn, Change{Edit: func(s Settings) Settings { return s }, By: "test"}, gated); err != nil || st.Version != 2 || rep.ToVersion != 2 {
		t.Fatalf("no-op: %+v %+v %v", st, rep, err)
	}
	// Illegal: primary=new needs mirror on; not overridable.
	if _, _, err := Set(ctx, conn, Change{Next: Settings{Primary: New, Reads: 100}, By: "test", Force: true}, gated); !IsIllegal(err) || !strings.Contains(err.Error(), "mirror is on") {
		t.Fatalf("flip without mirror: %v", err)
	}

	flip := Change{Edit: func(s Settings) Settings { s.Primary, s.Reads = New, 100; return s }, By: "test", Reason: "write flip"}
	expectRefusal := func(opts Options, want string) {
		t.Helper()
		_, _, err := Set(ctx, conn, flip, opts)
		var ie *IllegalError
		if !errors.As(err, &ie) || !ie.Gate || !strings.Contains(err.Error(), want) {
			t.Fatalf("got %v, want a gate refusal mentioning %q", err, want)
		}
		if st, _ := Load(ctx, conn); st.Version != 2 || st.Fence != 0 {
			t.Fatalf("a refused flip changed the state: %+v", st)
		}
	}
	// Gate 1: the caller's drift gate.
	expectRefusal(gated, "drift is open: 12 entries on 2 tables")
	// Gate 2: a live replica's breaker is open.
	a.breaker.Store("open")
	breakerIs := func(state string) {
		t.Helper()
		harness.SucceedsSoon(t, 10*time.Second, func() error {
			reps, err := Replicas(ctx, conn, time.Second)
			if err != nil || len(reps) != 2 || reps[0].Breaker != state {
				return fmt.Errorf("breaker %s not reported: %+v %v", state, reps, err)
			}
			return nil
		})
	}
	breakerIs("open")
	expectRefusal(opts, "the breaker is open on 1 of 2 live replicas (replica-a)")
	a.breaker.Store("closed")
	breakerIs("closed")
	// Gate 3: a live replica that has not acknowledged the current version.
	if _, err := conn.Exec(ctx, "INSERT INTO tandem.replicas (replica_id, acked_version) VALUES ('replica-stale', 1)"); err != nil {
		t.Fatal(err)
	}
	expectRefusal(opts, "have not acknowledged version 2: replica-stale (at 1)")
	if _, err := conn.Exec(ctx, "DELETE FROM tandem.replicas WHERE replica_id = 'replica-stale'"); err != nil {
		t.Fatal(err)
	}

	// Forced past the drift gate: the flip runs the whole protocol.
	forced := flip
	forced.Force = true
	st, rep, err = Set(ctx, conn, forced, gated)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("write flip: fence held %s", rep.Fence)
	if st.Version != 3 || st.Primary != New || st.Reads != 100 || st.Fence != 0 || !rep.Flip || rep.FenceToken == 0 {
		t.Fatalf("after the flip: %+v %+v", st, rep)
	}
	if strings.Join(rep.Drained, ",") != "replica-a,replica-b" || strings.Join(rep.Acked, ",") != "replica-a,replica-b" ||
		len(rep.Forced) != 1 || rep.Fence <= 0 || rep.Sequences == nil || rep.Sequences.Synced != 3 || len(synced) != 1 || synced[0] != New {
		t.Fatalf("report: %+v (synced %v)", rep, synced)
	}
	var forcedFlag bool
	var reason string
	var fenceMS *float64
	if err := conn.QueryRow(ctx, "SELECT forced, reason, fence_ms FROM tandem.state_history WHERE version = 3").Scan(&forcedFlag, &reason, &fenceMS); err != nil {
		t.Fatal(err)
	}
	if !forcedFlag || !strings.Contains(reason, "write flip [forced past: drift is open: 12 entries on 2 tables") || fenceMS == nil || *fenceMS <= 0 {
		t.Fatalf("history of the flip: forced=%v reason=%q fence_ms=%v", forcedFlag, reason, fenceMS)
	}
	// Each replica saw: the fence raised on version 2, drained it under the
	// fence, then version 3 under the fence, then the fence released.
	for _, r := range []*fakeReplica{a, b} {
		harness.SucceedsSoon(t, 10*time.Second, func() error {
			if l := r.last(); l.Version != 3 || l.Fence != 0 {
				return fmt.Errorf("%s last applied %+v", r.id, l)
			}
			return nil
		})
		applied, drains := r.history()
		var seq []string
		for _, s := range applied {
			if s.Version >= 2 {
				seq = append(seq, fmt.Sprintf("v%d/%t", s.Version, s.Fence != 0))
			}
		}
		if got := strings.Join(seq, " "); got != "v2/false v2/true v3/true v3/false" {
			t.Errorf("%s applied %s", r.id, got)
		}
		if len(drains) != 1 || drains[0] != rep.FenceToken {
			t.Errorf("%s drained %v, want once under fence %d", r.id, drains, rep.FenceToken)
		}
	}

	// A replica whose in-flight writes never end: the flip gives up within
	// the fence timeout, releases the fence and changes nothing.
	stuck := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	b.drain.Store(&stuck)
	b.writers.Store(3)
	short := gated
	short.FenceTimeout = 500 * time.Millisecond
	start := time.Now()
	_, rep, err = Set(ctx, conn, Change{Rollback: true, By: "test", Reason: "rollback"}, short)
	var fe *FenceError
	if !errors.As(err, &fe) || len(fe.Pending) != 1 || fe.Pending[0].ID != "replica-b" ||
		!strings.Contains(err.Error(), "write fence not drained within 500ms by replica-b (3 writers)") {
		t.Fatalf("stuck drain: %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("the failed flip took %s with a 500ms fence timeout", took)
	}
	if st, _ := Load(ctx, conn); st.Version != 3 || st.Primary != New || st.Fence != 0 {
		t.Fatalf("after the failed flip: %+v", st)
	}
	if strings.Join(rep.Drained, ",") != "replica-a" || rep.Fence <= 0 {
		t.Fatalf("failed flip report: %+v", rep)
	}
	harness.SucceedsSoon(t, 10*time.Second, func() error { // both replicas saw the fence released
		for _, r := range []*fakeReplica{a, b} {
			if l := r.last(); l.Fence != 0 || l.Version != 3 {
				return fmt.Errorf("%s last applied %+v", r.id, l)
			}
		}
		return nil
	})
	b.drain.Store(nil)
	b.writers.Store(0)

	// Rollback: the drift gate does not hold it back; sequences go new -> old.
	before := gateCalls.Load()
	st, rep, err = Set(ctx, conn, Change{Rollback: true, By: "test", Reason: "rollback"}, gated)
	if err != nil || st.Primary != Old || st.Reads != 0 || !st.Mirror || st.Version != 4 || !rep.Flip || len(rep.Forced) != 0 {
		t.Fatalf("rollback: %+v %+v %v", st, rep, err)
	}
	if gateCalls.Load() != before || synced[len(synced)-1] != Old {
		t.Fatalf("rollback ran the drift gate (%d calls) or synced to %v", gateCalls.Load()-before, synced)
	}

	// A fence held by someone else blocks every change; an expired one is no fence.
	if _, err := conn.Exec(ctx, "UPDATE tandem.state SET fence = 99, fence_expires = now() + interval '1 minute'"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Set(ctx, conn, Change{Next: Settings{Primary: Old, Mirror: true, Reads: 10}, By: "test"}, opts); !IsIllegal(err) || !strings.Contains(err.Error(), "write flip is in progress (fence 99)") {
		t.Fatalf("change during someone else's fence: %v", err)
	}
	if _, err := Apply(ctx, conn, Change{Next: Settings{Primary: Old, Mirror: true, Reads: 10}, By: "test"}); !IsIllegal(err) {
		t.Fatalf("Apply during someone else's fence: %v", err)
	}
	if _, err := conn.Exec(ctx, "UPDATE tandem.state SET fence_expires = now() - interval '1 second'"); err != nil {
		t.Fatal(err)
	}
	if st, err := Load(ctx, conn); err != nil || st.Fence != 0 {
		t.Fatalf("expired fence: %+v %v", st, err)
	}
	if st, _, err := Set(ctx, conn, Change{Next: Settings{Primary: Old, Mirror: true, Reads: 10}, By: "test"}, opts); err != nil || st.Version != 5 {
		t.Fatalf("change after the fence expired: %+v %v", st, err)
	}

	// Replicas leave the live set when they stop.
	cancel()
	for _, r := range []*fakeReplica{a, b} {
		if err := <-r.done; !errors.Is(err, context.Canceled) {
			t.Fatalf("%s ended with %v", r.id, err)
		}
	}
	if reps, err := Replicas(context.Background(), conn, time.Minute); err != nil || len(reps) != 0 {
		t.Fatalf("replicas after stop: %+v %v", reps, err)
	}
}

// TestFlipWithoutReplicas: with no live replica the flip still runs its
// steps, and an upgraded schema gains the fence columns.
func TestFlipWithoutReplicas(t *testing.T) {
	c := pgtest.New(t)
	ctx := context.Background()
	conn := connect(t, c)
	if err := EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}
	// An older schema, without the columns the write flip added (and made
	// before the control schema was versioned), upgrades in place.
	if _, err := conn.Exec(ctx, `DROP TABLE tandem.schema_version;
		ALTER TABLE tandem.state DROP COLUMN fence, DROP COLUMN fence_expires;
		ALTER TABLE tandem.state_history DROP COLUMN fence_ms;
		ALTER TABLE tandem.replicas DROP COLUMN fence_acked, DROP COLUMN breaker, DROP COLUMN writers;
		DROP SEQUENCE tandem.fence_token`); err != nil {
		t.Fatal(err)
	}
	if err := EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}
	if _, err := Apply(ctx, conn, Change{Next: Settings{Primary: Old, Mirror: true}, By: "test"}); err != nil {
		t.Fatal(err)
	}
	st, rep, err := Set(ctx, conn, Change{Next: Settings{Primary: New, Mirror: true, Reads: 100}, By: "test"}, Options{})
	if err != nil || st.Version != 3 || !rep.Flip || len(rep.Acked) != 0 || rep.Acked == nil {
		t.Fatalf("flip: %+v %+v %v", st, rep, err)
	}
	h, err := History(ctx, conn, 2)
	if err != nil || len(h) != 2 || h[0].Version != 3 || h[0].FenceMS == nil || h[1].FenceMS != nil {
		t.Fatalf("history: %+v %v", h, err)
	}
}

// TestSyncSequences syncs sequences between two clusters: behind ones move
// to the old value plus the margin, ahead ones stay, descending ones move
// down, missing ones are listed, and the control schema's are left alone.
func TestSyncSequences(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	ctx := context.Background()
	from, to := connect(t, oldC), connect(t, newC)
	common := `CREATE TABLE orders (id bigserial PRIMARY KEY, note text);
		CREATE SEQUENCE ahead;
		CREATE SEQUENCE down INCREMENT -1 MINVALUE -1000000 MAXVALUE -1 START -1;
		CREATE SEQUENCE unused;
		CREATE SEQUENCE near_max MAXVALUE 1000;
		CREATE SCHEMA tandem; CREATE SEQUENCE tandem.fence_token;`
	if _, err := from.Exec(ctx, common+`CREATE SEQUENCE only_old;
		INSERT INTO orders (note) SELECT 'x' FROM generate_series(1, 500);
		SELECT setval('ahead', 50), setval('down', -700), setval('only_old', 5), setval('near_max', 990), setval('tandem.fence_token', 77)`); err != nil {
		t.Fatal(err)
	}
	if _, err := to.Exec(ctx, common+`SELECT setval('ahead', 10000)`); err != nil {
		t.Fatal(err)
	}
	res, err := SyncSequences(ctx, from, to, 100)
	if err != nil {
		t.Fatal(err)
	}
	if res.Synced != 4 || strings.Join(res.Missing, ",") != "public.only_old" {
		t.Fatalf("result %+v", res)
	}
	next := func(seq string) int64 {
		var v int64
		if err := to.QueryRow(ctx, "SELECT nextval($1::text::regclass)", seq).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	for seq, want := range map[string]int64{"orders_id_seq": 601, "ahead": 10001, "down": -801, "unused": 1, "tandem.fence_token": 1} {
		if got := next(seq); got != want {
			t.Errorf("nextval(%s) on new = %d, want %d", seq, got, want)
		}
	}
	var last int64
	if err := to.QueryRow(ctx, "SELECT last_value FROM near_max").Scan(&last); err != nil || last != 1000 {
		t.Errorf("near_max on new = %d (%v), want clamped to its max 1000", last, err)
	}
	// Syncing again is harmless: nothing moves backwards.
	if _, err := SyncSequences(ctx, from, to, 100); err != nil {
		t.Fatal(err)
	}
	if got := next("ahead"); got != 10002 {
		t.Errorf("after a second sync nextval(ahead) = %d, want 10002", got)
	}
}
