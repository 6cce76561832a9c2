package route

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
)

// Follower keeps a replica's view of the routing state current: it LISTENs
// on Channel, re-reads the state on every notification and at least every
// Poll (the fallback when a notification is lost, e.g. across a reconnect),
// calls Apply for each new version, and acknowledges it.
type Follower struct {
	DSN     string
	Replica string        // this replica's id, recorded with each acknowledgement
	Poll    time.Duration // fallback poll interval (default 5s); also the heartbeat
	Apply   func(State)   // called with each new state, in version order, from one goroutine
	Logger  *slog.Logger
}

// Run follows the state until ctx ends. It reconnects after errors with a
// bounded backoff; it returns ctx's error.
func (f *Follower) Run(ctx context.Context) error {
	poll := f.Poll
	if poll <= 0 {
		poll = 5 * time.Second
	}
	log := f.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var applied int64
	backoff := 100 * time.Millisecond
	for {
		err := f.session(ctx, poll, &applied)
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

// session runs one connection's worth of following.
func (f *Follower) session(ctx context.Context, poll time.Duration, applied *int64) error {
	conn, err := pgx.Connect(ctx, f.DSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+Channel); err != nil {
		return err
	}
	for {
		st, err := Load(ctx, conn)
		if err != nil {
			return err
		}
		if st.Version > *applied {
			f.Apply(st)
			*applied = st.Version
		}
		if err := Ack(ctx, conn, f.Replica, *applied); err != nil {
			return err
		}
		wctx, cancel := context.WithTimeout(ctx, poll)
		_, err = conn.WaitForNotification(wctx)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
	}
}
