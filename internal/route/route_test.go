package route

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

func TestCheck(t *testing.T) {
	cases := []struct {
		s    Settings
		want string // substring of the refusal, "" = legal
	}{
		{Passthrough(), ""},
		{Settings{Primary: Old, Mirror: true}, ""},
		{Settings{Primary: Old, Mirror: true, Reads: 50, Shadow: 10}, ""},
		{Settings{Primary: New, Mirror: true, Reads: 100, Shadow: 100}, ""},
		{Settings{Primary: New, Mirror: true, Reads: 0}, ""},
		{Settings{Primary: New, Reads: 100}, ""},
		{Settings{Primary: Old, Reads: 1}, "reads from new need mirror=on"},
		{Settings{Primary: New, Reads: 99}, "reads must be 100"},
		{Settings{Primary: Old, Shadow: 5}, "shadow reads need mirror=on"},
		{Settings{Primary: "both"}, "primary must be old or new"},
		{Settings{Primary: Old, Mirror: true, Reads: 101}, "reads must be 0..100"},
		{Settings{Primary: Old, Mirror: true, Shadow: -1}, "shadow must be 0..100"},
	}
	for _, tc := range cases {
		err := tc.s.Check()
		if tc.want == "" && err != nil {
			t.Errorf("%s: refused: %v", tc.s, err)
		}
		if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !IsIllegal(err)) {
			t.Errorf("%s: got %v, want a refusal mentioning %q", tc.s, err, tc.want)
		}
	}
}

func TestCheckTransition(t *testing.T) {
	dual := Settings{Primary: Old, Mirror: true}
	flipped := Settings{Primary: New, Mirror: true, Reads: 100}
	finished := Settings{Primary: New, Reads: 100}
	cases := []struct {
		name      string
		cur, next Settings
		force     bool
		want      string
	}{
		{"start dual-write", Passthrough(), dual, false, ""},
		{"shift reads", dual, Settings{Primary: Old, Mirror: true, Reads: 50}, false, ""},
		{"write flip", dual, flipped, false, ""},
		{"rollback", flipped, Rollback(flipped), false, ""},
		{"finish", flipped, finished, false, ""},
		{"flip without mirror", Passthrough(), Settings{Primary: New, Reads: 100}, false, "only while mirror is on"},
		{"flip and stop mirroring at once", dual, finished, false, "only while mirror is on"},
		{"flip back after finish", finished, Settings{Primary: Old, Mirror: true}, true, "only while mirror is on"},
		{"mirror back on after finish", finished, flipped, false, "missed every write"},
		{"mirror back on after finish, forced", finished, flipped, true, ""},
		{"incoherent target", dual, Settings{Primary: Old, Reads: 10}, true, "reads from new need mirror=on"},
	}
	for _, tc := range cases {
		err := CheckTransition(tc.cur, tc.next, tc.force)
		if tc.want == "" && err != nil {
			t.Errorf("%s: refused: %v", tc.name, err)
		}
		if tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: got %v, want a refusal mentioning %q", tc.name, err, tc.want)
		}
	}
	if r := Rollback(flipped); r.Primary != Old || r.Reads != 0 || !r.Mirror {
		t.Errorf("Rollback(%s) = %s", flipped, r)
	}
}

// newControlStore starts a cluster of the test's own with the control
// schema, and returns it and a connection to it.
func newControlStore(t *testing.T) (*pgtest.Cluster, *pgx.Conn) {
	t.Helper()
	c := pgtest.New(t)
	conn := connect(t, c)
	if err := EnsureSchema(t.Context(), conn); err != nil {
		t.Fatal(err)
	}
	return c, conn
}

func connect(t *testing.T, c *pgtest.Cluster) *pgx.Conn {
	t.Helper()
	return harness.Connect(t, c, "postgres")
}

// TestControlSchema applies changes against a real store: versions advance
// one by one, history records who, why and whether forced, illegal changes
// leave no trace, and concurrent changes are serialised.
func TestControlSchema(t *testing.T) {
	c := pgtest.New(t)
	ctx := context.Background()
	conn := connect(t, c)
	for range 2 { // idempotent
		if err := EnsureSchema(ctx, conn); err != nil {
			t.Fatal(err)
		}
	}
	st, err := Load(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != 1 || st.Settings != Passthrough() {
		t.Fatalf("initial state %d %s", st.Version, st.Settings)
	}
	dual := Settings{Primary: Old, Mirror: true}
	st, err = Apply(ctx, conn, Change{Next: dual, By: "ops@test", Reason: "start dual-write"})
	if err != nil || st.Version != 2 || st.Settings != dual || st.ChangedBy != "ops@test" {
		t.Fatalf("dual-write: %+v, %v", st, err)
	}
	if again, err := Apply(ctx, conn, Change{Next: dual, By: "ops@test"}); err != nil || again.Version != 2 {
		t.Fatalf("no-op change made version %d (%v)", again.Version, err)
	}
	_, err = Apply(ctx, conn, Change{Next: Settings{Primary: New, Reads: 100}, By: "ops@test"})
	if !IsIllegal(err) {
		t.Fatalf("flip that stops mirroring: %v, want refusal", err)
	}
	// A gate refuses; force overrides a gate and is recorded.
	gate := func(ctx context.Context, tx pgx.Tx, cur, next Settings) error {
		return &IllegalError{Gate: true, Reason: "drift is open on table orders (3 keys)"}
	}
	flipped := Settings{Primary: New, Mirror: true, Reads: 100}
	if _, err := Apply(ctx, conn, Change{Next: flipped, By: "ops@test", Gate: gate}); err == nil || !strings.Contains(err.Error(), "drift is open") {
		t.Fatalf("gated flip: %v", err)
	}
	st, err = Apply(ctx, conn, Change{Next: flipped, By: "ops@test", Reason: "accepted drift", Force: true, Gate: gate})
	if err != nil || st.Version != 3 {
		t.Fatalf("forced flip: %+v %v", st, err)
	}
	var forced bool
	var reason string
	if err := conn.QueryRow(ctx, "SELECT forced, reason FROM tandem.state_history WHERE version = 3").Scan(&forced, &reason); err != nil {
		t.Fatal(err)
	}
	if !forced || reason != "accepted drift" {
		t.Fatalf("history of version 3: forced=%v reason=%q", forced, reason)
	}
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM tandem.state_history").Scan(&n); err != nil || n != 3 {
		t.Fatalf("history rows = %d (%v), want 3 (refused changes leave none)", n, err)
	}

	// Concurrent changes: each succeeds once with its own version.
	var wg sync.WaitGroup
	versions := make(chan int64, 20)
	for i := range 20 {
		wg.Go(func() {
			cc, err := pgx.Connect(ctx, c.DSN("postgres"))
			if err != nil {
				t.Error(err)
				return
			}
			defer cc.Close(ctx)
			st, err := Apply(ctx, cc, Change{Next: Settings{Primary: New, Mirror: true, Reads: 100, Shadow: i + 1}, By: "racer"})
			if err != nil {
				t.Error(err)
				return
			}
			versions <- st.Version
		})
	}
	wg.Wait()
	close(versions)
	seen := map[int64]bool{}
	for v := range versions {
		if seen[v] {
			t.Fatalf("version %d handed out twice", v)
		}
		seen[v] = true
	}
	if st, _ := Load(ctx, conn); st.Version != 23 {
		t.Fatalf("after 20 concurrent changes version = %d, want 23", st.Version)
	}
}

// TestFollower: a replica sees a change through NOTIFY well before its poll
// interval, falls back to polling when a change is made without NOTIFY, and
// acknowledges each version it applied.
func TestFollower(t *testing.T) {
	c, conn := newControlStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	seen := make(chan State, 10)
	run := func(poll time.Duration, replica string) chan error {
		f := &Follower{DSN: c.DSN("postgres"), Replica: replica, Poll: poll, Apply: func(s State) { seen <- s }}
		done := make(chan error, 1)
		go func() { done <- f.Run(ctx) }()
		return done
	}
	waitVersion := func(v int64, within time.Duration) {
		t.Helper()
		deadline := time.After(within)
		for {
			select {
			case s := <-seen:
				if s.Version == v {
					return
				}
			case <-deadline:
				t.Fatalf("version %d not applied within %s", v, within)
			}
		}
	}
	done := run(time.Minute, "replica-a") // a poll so long that only NOTIFY can explain a quick update
	waitVersion(1, 10*time.Second)
	start := time.Now()
	if _, err := Apply(ctx, conn, Change{Next: Settings{Primary: Old, Mirror: true}, By: "test"}); err != nil {
		t.Fatal(err)
	}
	waitVersion(2, 5*time.Second)
	t.Logf("NOTIFY delivered version 2 in %s", time.Since(start))
	waitAck(t, conn, "replica-a", 2)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("follower ended with %v", err)
	}

	// Poll fallback: a change that bypasses NOTIFY is still picked up.
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	done = run(200*time.Millisecond, "replica-b")
	waitVersion(2, 10*time.Second)
	if _, err := conn.Exec(ctx, "UPDATE tandem.state SET version = 3, reads = 25"); err != nil {
		t.Fatal(err)
	}
	waitVersion(3, 5*time.Second)
	waitAck(t, conn, "replica-b", 3)
	cancel()
	<-done
}

// waitAck waits until replica has acknowledged version.
func waitAck(t *testing.T, conn *pgx.Conn, replica string, version int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		reps, err := Replicas(context.Background(), conn, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range reps {
			if r.ID == replica && r.AckedVersion == version {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not acknowledge version %d: %+v", replica, version, reps)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
