package route

import (
	"context"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
)

// DefaultPoll is the Follower's poll and heartbeat interval when none is set.
const DefaultPoll = 5 * time.Second

// Follower keeps a replica's view of the routing state current: it LISTENs
// on Channel, re-reads the state at once on every notification and at least
// every Poll (the fallback when a notification is lost, e.g. across a
// reconnect), calls Apply for each new version or write fence, and
// acknowledges both with a heartbeat.
//
// When the state carries a write fence this replica has not acknowledged,
// the Follower first calls Apply (so the replica holds new writes), then
// Drain, concurrently with following: Drain's context ends when the fence
// is released or replaced, or the Follower stops. When Drain returns nil
// the replica acknowledges the fence.
type Follower struct {
	DSN string
	// Config, if set, is used to connect instead of DSN (e.g. with a
	// password from a password file).
	Config  *pgx.ConnConfig
	Replica string        // this replica's id, recorded with each acknowledgement
	Poll    time.Duration // fallback poll interval and heartbeat (default DefaultPoll)
	// Apply is called with each new state (a new version, or the same
	// version with a different Fence), in order, from one goroutine.
	Apply func(State)
	// Drain blocks until the replica has no write in flight, or ctx ends.
	// nil: the fence is acknowledged as soon as Apply returns.
	Drain func(ctx context.Context) error
	// Status, if set, is reported with every heartbeat.
	Status func() ReplicaStatus
	// Joined, if set, is called once, after the first heartbeat is
	// written: from then on flips wait for this replica.
	Joined func()
	// Heard, if set, is called after each heartbeat with the time just
	// before the state it acknowledged was read: the replica's view is at
	// least that fresh, and its heartbeat_at is no earlier (self-fencing,
	// issue 12).
	Heard func(readAt time.Time)

	Logger *slog.Logger
}

// followed is what a Follower carries across reconnects.
type followed struct {
	applied    State // last state passed to Apply
	hasApplied bool
	fenceAcked int64                          // last fence drained
	sent       struct{ version, fence int64 } // last acknowledgement written
	joined     bool                           // Joined has been called
}

// drain is one run of Follower.Drain for a fence token.
type drain struct {
	token  int64
	cancel context.CancelFunc
	done   chan struct{}
	err    error // valid after done is closed
}

func (d *drain) finished() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// Run follows the state until ctx ends. It reconnects after errors with a
// bounded backoff. When ctx ends it removes the replica from
// tandem.replicas, so flips stop waiting for it, and returns ctx's error.
func (f *Follower) Run(ctx context.Context) error {
	poll := f.Poll
	if poll <= 0 {
		poll = DefaultPoll
	}
	log := f.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var fs followed
	backoff := 100 * time.Millisecond
	for {
		err := f.session(ctx, poll, &fs, log)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Warn("routing state follower lost its connection; retrying", "error", err, "backoff", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (f *Follower) connect(ctx context.Context) (*pgx.Conn, error) {
	if f.Config != nil {
		return pgx.ConnectConfig(ctx, f.Config.Copy())
	}
	return pgx.Connect(ctx, f.DSN)
}

// session runs one connection's worth of following. A drain it started is
// stopped before it returns.
func (f *Follower) session(ctx context.Context, poll time.Duration, fs *followed, log *slog.Logger) error {
	conn, err := f.connect(ctx)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		if ctx.Err() != nil {
			f.leave(cctx, conn)
		}
		conn.Close(cctx)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+Channel); err != nil {
		return err
	}
	var d *drain
	defer func() {
		if d != nil {
			d.cancel()
			<-d.done
		}
	}()
	var retryDrain time.Time // after a failed drain, not before this
	for {
		readAt := time.Now()
		st, err := Load(ctx, conn)
		if err != nil {
			return err
		}
		a := fs.applied
		if !fs.hasApplied || st.Version > a.Version || (st.Version == a.Version && st.Fence != a.Fence) {
			f.Apply(st)
			fs.applied, fs.hasApplied = st, true
		}
		fence := fs.applied.Fence

		// The fence this replica must drain, if any.
		if d != nil && d.token != fence {
			d.cancel() // released or replaced: stop waiting for it
			<-d.done
			d = nil
		}
		if d != nil && d.finished() {
			if d.err == nil {
				fs.fenceAcked = d.token
			} else {
				log.Warn("write fence not drained", "fence", d.token, "error", d.err)
				retryDrain = time.Now().Add(poll)
			}
			d = nil
		}
		if fence != 0 && fence != fs.fenceAcked && d == nil && !time.Now().Before(retryDrain) {
			if f.Drain == nil {
				fs.fenceAcked = fence
			} else {
				d = f.startDrain(ctx, fence)
			}
		}

		var status ReplicaStatus
		if f.Status != nil {
			status = f.Status()
		}
		changed := fs.sent.version != fs.applied.Version || fs.sent.fence != fs.fenceAcked
		if err := Ack(ctx, conn, f.Replica, fs.applied.Version, fs.fenceAcked, status, changed); err != nil {
			return err
		}
		fs.sent.version, fs.sent.fence = fs.applied.Version, fs.fenceAcked
		if f.Heard != nil {
			f.Heard(readAt)
		}
		if !fs.joined {
			fs.joined = true
			if f.Joined != nil {
				f.Joined()
			}
		}

		if err := f.wait(ctx, conn, poll, d); err != nil {
			return err
		}
	}
}

// leave removes the replica from tandem.replicas as it stops, so no flip
// waits for it. conn may have been closed by the cancellation; then a new
// connection is made.
func (f *Follower) leave(ctx context.Context, conn *pgx.Conn) {
	const q = "DELETE FROM tandem.replicas WHERE replica_id = $1"
	if !conn.IsClosed() {
		if _, err := conn.Exec(ctx, q, f.Replica); err == nil {
			return
		}
	}
	c, err := f.connect(ctx)
	if err != nil {
		return
	}
	defer c.Close(ctx)
	_, _ = c.Exec(ctx, q, f.Replica)
}

// startDrain runs f.Drain for token in its own goroutine.
func (f *Follower) startDrain(ctx context.Context, token int64) *drain {
	dctx, cancel := context.WithCancel(ctx)
	d := &drain{token: token, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(d.done)
		d.err = f.Drain(dctx)
	}()
	return d
}

// wait returns at the next notification, after poll, or when d finishes.
func (f *Follower) wait(ctx context.Context, conn *pgx.Conn, poll time.Duration, d *drain) error {
	wctx, cancel := context.WithTimeout(ctx, poll)
	defer cancel()
	if d != nil {
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			select {
			case <-d.done:
				cancel()
			case <-stop:
			}
		}()
	}
	_, err := conn.WaitForNotification(wctx)
	if err != nil && ctx.Err() == nil && wctx.Err() != nil {
		return nil // poll interval, or the drain finished
	}
	return err
}
