package route

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Gate is a cutover gate: it refuses a write flip from cur to next by
// returning an *IllegalError with Gate set, which Change.Force overrides.
// Any other error aborts the change. conn is the control database.
type Gate func(ctx context.Context, conn *pgx.Conn, cur, next Settings) error

// Options configure Set.
type Options struct {
	// FenceTimeout bounds how long a write flip waits for every live
	// replica to drain its in-flight writes (default 5s).
	FenceTimeout time.Duration
	// AckTimeout bounds how long Set waits for every live replica to
	// acknowledge the new version (default 10s).
	AckTimeout time.Duration
	// Live is how recent a heartbeat must be for a replica to count as
	// live (default 3 × DefaultPoll; use 3 × the replicas' poll).
	Live time.Duration
	// FenceLease bounds how long a fence outlives a flip that died holding
	// it: replicas then read it as released (default FenceTimeout + 30s).
	// A flip whose lease ran out before its step 5 applies nothing.
	FenceLease time.Duration
	// Gates are the caller's cutover gates, checked before a write flip
	// other than a rollback (e.g. open drift).
	Gates []Gate
	// PrepareSequences, if set, is called at a write flip before the fence
	// is raised, to get ready (e.g. connect to both stores) to bring the
	// sequences of the store becoming primary (to) up to the other store's.
	// Set calls the returned sync at step 4, with writes fenced, so the
	// fence covers only the sync itself; it calls done when the flip ends.
	PrepareSequences func(ctx context.Context, to Store) (sync func(context.Context) (SequenceSync, error), done func(), err error)
	// Feed, if set (feed.enabled), makes every write flip and rollback wait
	// for the change feed under the fence: see FeedWait and Set.
	Feed   *FeedWait
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.FenceTimeout <= 0 {
		o.FenceTimeout = 5 * time.Second
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = 10 * time.Second
	}
	if o.Live <= 0 {
		o.Live = 3 * DefaultPoll
	}
	if o.Feed != nil {
		f := *o.Feed
		if f.Timeout <= 0 {
			f.Timeout = 5 * time.Second
		}
		if f.Live <= 0 {
			f.Live = FeedLive
		}
		o.Feed = &f
	}
	if o.FenceLease <= 0 {
		o.FenceLease = o.FenceTimeout + 30*time.Second
		if o.Feed != nil {
			o.FenceLease += o.Feed.Timeout
		}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// Report says what Set did.
type Report struct {
	FromVersion int64 `json:"from_version"`
	ToVersion   int64 `json:"to_version"` // equal to FromVersion when nothing changed
	Flip        bool  `json:"flip"`       // primary changed: the write fence was raised
	// Fence is how long the write fence was held, for a flip; FenceMS is the same in milliseconds.
	Fence      time.Duration `json:"-"`
	FenceMS    float64       `json:"fence_ms,omitempty"`
	FenceHeld  string        `json:"fence,omitempty"` // Fence as text ("1.2ms")
	FenceToken int64         `json:"fence_token,omitempty"`
	Drained    []string      `json:"drained,omitempty"`   // live replicas that drained the fence
	Acked      []string      `json:"acked"`               // live replicas that acknowledged ToVersion
	NotAcked   []string      `json:"not_acked,omitempty"` // live replicas that did not within AckTimeout
	Sequences  *SequenceSync `json:"sequences,omitempty"`
	Feed       *FeedReport   `json:"feed,omitempty"`   // the wait for the change feed, when it is enabled
	Forced     []string      `json:"forced,omitempty"` // gate refusals overridden by Force

	// SelfFenced are replicas that neither drained the fence nor were heard
	// from again: the flip waited until they left the liveness window, by
	// when they refuse writes (routing.self_fence).
	SelfFenced []string `json:"self_fenced,omitempty"`
}

// FenceError is a write flip that gave up because live replicas did not
// drain their in-flight writes within the fence timeout. The fence was
// released and nothing changed.
type FenceError struct {
	Timeout time.Duration
	Pending []Replica
}

func (e *FenceError) Error() string {
	names := make([]string, len(e.Pending))
	for i, r := range e.Pending {
		names[i] = fmt.Sprintf("%s (%d writers)", r.ID, r.Writers)
	}
	return fmt.Sprintf("write fence not drained within %s by %s: the fence was released and nothing changed; "+
		"retry when long transactions have ended, or raise routing.fence_timeout", e.Timeout, strings.Join(names, ", "))
}

// Set runs one routing change with the protocol of design section 8 and
// waits for the live replicas to follow it.
//
// A change that keeps the primary is applied (version bump and history),
// then Set waits up to AckTimeout for every live replica to acknowledge
// the new version and reports the ones that did not.
//
// A write flip (the primary changes) goes: 1. check the gates (Options.Gates
// unless it is a rollback, then the built-in ones: a live replica whose
// breaker is open, or that has not acknowledged the current version), all
// overridden by Force and recorded in the history; 2. raise the write fence
// and NOTIFY; 3. wait up to FenceTimeout until every live replica has
// drained it, else release it and return a *FenceError; 4. sync sequences;
// 5. apply the settings and wait for the replicas' acknowledgements;
// 6. release the fence and record its duration in the history.
//
// With Options.Feed (the change feed is enabled), a write flip or rollback
// also, before step 2, has the publication and the slot made on the store
// becoming primary; after step 3, reads the current primary's WAL position
// and waits up to Feed.Timeout until tandem.feed says the feed has checked
// that store's WAL up to it (every change committed before the fence is
// then equal on the other store or in the drift ledger) with a live
// heartbeat; after step 4 (whose preparation repairs the drift stale on the
// store becoming primary, under the fence, as the background repairer is
// paused by it), checks that no such drift is left open. Either failure
// releases the fence and changes nothing, with a *FeedError, unless
// Change.Force is set: then the flip goes on, and the report and the
// history say so. A rollback waits the same way.
//
// Refusals are *IllegalError (see IsIllegal). The fence is released on
// every path, even when ctx ends. conn is the control database; Set uses
// it exclusively until it returns.
func Set(ctx context.Context, conn *pgx.Conn, ch Change, opts Options) (State, Report, error) {
	opts = opts.withDefaults()
	cur, err := Load(ctx, conn)
	if err != nil {
		return State{}, Report{}, err
	}
	rep := Report{FromVersion: cur.Version, ToVersion: cur.Version, Acked: []string{}}
	if cur.Fence != 0 {
		return cur, rep, &IllegalError{Reason: fmt.Sprintf("a write flip is in progress (fence %d); retry when it has ended", cur.Fence)}
	}
	next := ch.target(cur.Settings)
	if next == cur.Settings {
		return cur, rep, nil
	}
	if err := CheckTransition(cur.Settings, next, ch.Force); err != nil {
		return cur, rep, err
	}
	rollback := ch.Rollback
	ch.Next, ch.Edit, ch.Rollback = next, nil, false
	if _, err := conn.Exec(ctx, "LISTEN "+AckChannel); err != nil {
		return cur, rep, err
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_, _ = conn.Exec(uctx, "UNLISTEN "+AckChannel)
	}()

	if next.Primary == cur.Primary {
		st, err := apply(ctx, conn, ch, guard{version: cur.Version})
		if err != nil {
			return cur, rep, err
		}
		rep.ToVersion = st.Version
		err = opts.waitVersion(ctx, conn, st.Version, &rep)
		return st, rep, err
	}
	return opts.flip(ctx, conn, cur, ch, rollback, &rep)
}

// flip runs steps 1 to 6 of a write flip (see Set and design section 8),
// one flipRun method per step, in this order. Every failure after step 2
// releases the fence on its way out (flipRun.fail).
func (o Options) flip(ctx context.Context, conn *pgx.Conn, cur State, ch Change, rollback bool, rep *Report) (State, Report, error) {
	rep.Flip = true
	f := &flipRun{o: o, conn: conn, cur: cur, ch: ch, rollback: rollback, rep: rep}
	// 1. Gates.
	if err := f.checkGates(ctx); err != nil {
		return cur, *rep, err
	}

	// Before the fence: get ready to sync the sequences (step 4) and, with
	// the feed, make its publication and slot on the store becoming
	// primary (step 3b), so the fence covers neither.
	doneSequences, err := f.prepareSequences(ctx)
	if err != nil {
		return cur, *rep, err
	}
	defer doneSequences()
	doneFeed, err := f.prepareFeed(ctx)
	if err != nil {
		return cur, *rep, err
	}
	defer doneFeed()

	// 2. Raise the fence.
	if err := f.raise(ctx); err != nil {
		return cur, *rep, err
	}
	defer func() { _ = f.release(ctx) }() // a panic in a callback

	// 3. Wait for every live replica to drain.
	if err := f.drain(ctx); err != nil {
		return f.fail(ctx, err)
	}

	// 3b. Writes are fenced and drained: wait until the change feed has
	// checked everything the current primary committed before the fence.
	if err := f.waitFeed(ctx); err != nil {
		return f.fail(ctx, err)
	}

	// 4. Make the store becoming primary ready: the caller's sync repairs
	// what it missed and brings its sequences up. A failure is a gate:
	// --force goes past it (and the history says so).
	if err := f.syncStore(ctx); err != nil {
		return f.fail(ctx, err)
	}

	// 4b. With the feed: what it found the store becoming primary misses
	// must have been repaired by step 4, since no repairer runs under the
	// fence.
	if err := f.checkStaleDrift(ctx); err != nil {
		return f.fail(ctx, err)
	}

	// 5. Bump the version and wait for the replicas to acknowledge it.
	st, err := apply(ctx, conn, f.ch, guard{version: cur.Version, fence: f.token})
	if err != nil {
		return f.fail(ctx, err)
	}
	rep.ToVersion = st.Version
	waitErr := o.waitVersion(ctx, conn, st.Version, rep)

	// 6. Release the fence.
	return f.finish(ctx, st, waitErr)
}

// flipRun is one write flip in progress: what its steps share.
type flipRun struct {
	o        Options
	conn     *pgx.Conn
	cur      State
	ch       Change // its Reason grows with what Force goes past
	rollback bool
	rep      *Report

	syncSequences func(context.Context) (SequenceSync, error) // step 4, from Options.PrepareSequences
	feedPosition  func(context.Context) (string, error)       // step 3b, from Options.Feed.Prepare

	// The fence (step 2): when it was raised, its token, when its lease
	// ends, and whether it has been released.
	start    time.Time
	token    int64
	expires  time.Time
	released bool
}

// checkGates is step 1: the gates' refusals refuse the flip, unless
// Change.Force goes past them (recorded in the report and the history).
func (f *flipRun) checkGates(ctx context.Context) error {
	refusals, err := f.o.gates(ctx, f.conn, f.cur, f.ch.Next, f.rollback)
	if err != nil {
		return err
	}
	if len(refusals) > 0 {
		if !f.ch.Force {
			return &IllegalError{Gate: true, Reason: strings.Join(refusals, "; ") + " (--force overrides)"}
		}
		f.rep.Forced = refusals
		f.ch.Reason = strings.TrimSpace(f.ch.Reason + " [forced past: " + strings.Join(refusals, "; ") + "]")
	}
	return nil
}

// prepareSequences gets ready for step 4 with Options.PrepareSequences;
// done is to be called when the flip ends.
func (f *flipRun) prepareSequences(ctx context.Context) (done func(), err error) {
	if f.o.PrepareSequences == nil {
		return func() {}, nil
	}
	sync, done, err := f.o.PrepareSequences(ctx, f.ch.Next.Primary)
	if err != nil {
		return nil, fmt.Errorf("preparing to sync sequences to %s: %w; nothing changed", f.ch.Next.Primary, err)
	}
	f.syncSequences = sync
	return done, nil
}

// prepareFeed, with Options.Feed, creates tandem.feed and has the feed's
// publication and slot made for step 3b; done is to be called when the
// flip ends.
func (f *flipRun) prepareFeed(ctx context.Context) (done func(), err error) {
	if f.o.Feed == nil {
		return func() {}, nil
	}
	if err := EnsureFeedSchema(ctx, f.conn); err != nil {
		return nil, fmt.Errorf("creating tandem.feed: %w; nothing changed", err)
	}
	if f.o.Feed.Prepare == nil {
		return nil, errors.New("the change feed is enabled but the flip cannot prepare it (no FeedWait.Prepare); nothing changed")
	}
	pos, done, err := f.o.Feed.Prepare(ctx, f.cur.Primary, f.ch.Next.Primary)
	if err != nil {
		return nil, fmt.Errorf("preparing the change feed's publication and slot on the %s store: %w; nothing changed", f.ch.Next.Primary, err)
	}
	f.feedPosition = pos
	return done, nil
}

// forced records a failure Force goes past, in the report and the history.
func (f *flipRun) forced(msg string) {
	f.rep.Forced = append(f.rep.Forced, msg)
	f.ch.Reason = strings.TrimSpace(f.ch.Reason + " [forced past: " + msg + "]")
}

// raise is step 2: it raises the write fence (and NOTIFYs).
func (f *flipRun) raise(ctx context.Context) error {
	f.start = time.Now()
	token, expires, err := raiseFence(ctx, f.conn, f.cur.Version, f.o.FenceLease)
	if err != nil {
		return err
	}
	f.token, f.expires = token, expires
	f.rep.FenceToken = token
	return nil
}

// release releases the fence once, however often it is called, and
// records how long it was held.
func (f *flipRun) release(ctx context.Context) error {
	if f.released {
		return nil
	}
	f.released = true
	err := releaseFence(ctx, f.conn, f.token)
	f.rep.Fence = time.Since(f.start)
	f.rep.FenceMS = float64(f.rep.Fence.Microseconds()) / 1000
	f.rep.FenceHeld = f.rep.Fence.Round(time.Microsecond).String()
	if err != nil {
		return fmt.Errorf("releasing write fence %d (it expires by itself at %s): %w", f.token, f.expires.Format(time.RFC3339), err)
	}
	return nil
}

// fail ends a flip that failed with the fence up: the fence is released
// and nothing changed.
func (f *flipRun) fail(ctx context.Context, err error) (State, Report, error) {
	return f.cur, *f.rep, errors.Join(err, f.release(ctx))
}

// drain is step 3: it waits for every live replica to drain the fence.
func (f *flipRun) drain(ctx context.Context) error {
	o, rep := f.o, f.rep
	ok, pending, err := waitReplicas(ctx, f.conn, o.Live, o.FenceTimeout, func(r Replica) bool { return r.FenceAcked == f.token })
	rep.Drained = ids(ok)
	if err != nil {
		return fmt.Errorf("waiting for the write fence to drain: %w", err)
	}
	if len(pending) > 0 {
		// Some may be cut off, not slow: wait for their self-fence (selffence.go).
		silent, still, err := o.waitSilent(ctx, f.conn, pending, f.token, f.expires.Add(-5*time.Second))
		if err != nil {
			return fmt.Errorf("waiting for silent replicas to fence themselves: %w", err)
		}
		if len(still) > 0 {
			return &FenceError{Timeout: o.FenceTimeout, Pending: still}
		}
		rep.SelfFenced = ids(silent)
	}
	return nil
}

// waitFeed is step 3b, with the feed: it waits for the feed to have
// checked the current primary's WAL up to its position under the fence.
func (f *flipRun) waitFeed(ctx context.Context) error {
	if f.feedPosition == nil {
		return nil
	}
	o, rep := f.o, f.rep
	fctx, cancel := context.WithDeadline(ctx, f.expires.Add(-2*time.Second))
	frep, why, err := o.feedWait(fctx, f.conn, f.cur.Primary, f.feedPosition)
	cancel()
	rep.Feed = &frep
	if err != nil {
		return err
	}
	if why != "" {
		if !f.ch.Force {
			return &FeedError{Report: frep, Timeout: o.Feed.Timeout, Rollback: f.rollback, Why: why}
		}
		rep.Feed.Forced = true
		f.forced(why)
		o.Logger.Warn("write flip forced past the change feed", "reason", why)
	}
	return nil
}

// syncStore is step 4: the caller's sync (Options.PrepareSequences) makes
// the store becoming primary ready.
func (f *flipRun) syncStore(ctx context.Context) error {
	if f.syncSequences == nil {
		return nil
	}
	o, rep, to := f.o, f.rep, f.ch.Next.Primary
	sctx, cancel := context.WithDeadline(ctx, f.expires.Add(-2*time.Second))
	seq, err := f.syncSequences(sctx)
	cancel()
	if err != nil && !f.ch.Force {
		return &IllegalError{Gate: true, Reason: fmt.Sprintf("preparing the %s store to become primary failed: %v; nothing changed (--force overrides)", to, err)}
	}
	if err != nil {
		f.forced(fmt.Sprintf("preparing the %s store: %v", to, err))
		o.Logger.Warn("write flip forced past a failed preparation of the new primary", "error", err)
	}
	rep.Sequences = &seq
	if len(seq.Missing) > 0 {
		o.Logger.Warn("sequences missing on the new primary were not synced", "store", to, "sequences", seq.Missing)
	}
	return nil
}

// checkStaleDrift is step 4b, with the feed: no drift stale on the store
// becoming primary may be left open.
func (f *flipRun) checkStaleDrift(ctx context.Context) error {
	rep, to := f.rep, f.ch.Next.Primary
	if rep.Feed == nil {
		return nil
	}
	n, err := openDriftStaleOn(ctx, f.conn, to)
	if err != nil {
		return fmt.Errorf("reading the drift ledger: %w", err)
	}
	rep.Feed.Drift = n
	if n > 0 {
		why := fmt.Sprintf("%d drift entries stale on the %s store are still open after the repair under the fence", n, to)
		if !f.ch.Force {
			return &FeedError{Report: *rep.Feed, Timeout: f.o.Feed.Timeout, Rollback: f.rollback, Why: why}
		}
		rep.Feed.Forced = true
		f.forced(why)
		f.o.Logger.Warn("write flip forced past open drift after the change feed's wait", "entries", n, "stale", to)
	}
	return nil
}

// finish is step 6: it releases the fence and records how long it was
// held in the history. waitErr is step 5's wait for acknowledgements.
func (f *flipRun) finish(ctx context.Context, st State, waitErr error) (State, Report, error) {
	rep := f.rep
	if err := f.release(ctx); err != nil {
		return st, *rep, errors.Join(waitErr, err)
	}
	st.Fence = 0
	f.o.Logger.Info("write flip done", "from", f.cur.Settings.String(), "to", st.Settings.String(), "version", st.Version,
		"fence", rep.Fence, "acked", rep.Acked, "not_acked", rep.NotAcked)
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if _, err := f.conn.Exec(hctx, "UPDATE tandem.state_history SET fence_ms = $1 WHERE version = $2", rep.FenceMS, st.Version); err != nil {
		waitErr = errors.Join(waitErr, fmt.Errorf("recording the fence time in the history: %w", err))
	}
	return st, *rep, waitErr
}

// feedWait reads the current primary's WAL position with writes fenced and
// waits for the change feed to have checked it. why is non-empty when it
// did not in time.
func (o Options) feedWait(ctx context.Context, conn *pgx.Conn, primary Store, position func(context.Context) (string, error)) (FeedReport, string, error) {
	lsn, err := position(ctx)
	if err != nil {
		return FeedReport{Store: primary}, "", fmt.Errorf("reading the %s store's WAL position for the change feed: %w", primary, err)
	}
	timeout := o.Feed.Timeout
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < timeout {
		timeout = time.Until(dl)
	}
	frep, why, err := o.Feed.wait(ctx, conn, primary, lsn, timeout)
	if err == nil {
		o.Logger.Info("change feed wait", "store", primary, "fence_lsn", lsn, "checked_lsn", frep.CheckedLSN, "waited_ms", frep.WaitedMS, "caught_up", frep.CaughtUp)
	}
	return frep, why, err
}

// gates returns the refusals of the cutover gates and the built-in ones.
func (o Options) gates(ctx context.Context, conn *pgx.Conn, cur State, next Settings, rollback bool) ([]string, error) {
	var refusals []string
	if !rollback {
		for _, g := range o.Gates {
			err := g(ctx, conn, cur.Settings, next)
			var ie *IllegalError
			switch {
			case err == nil:
			case errors.As(err, &ie) && ie.Gate:
				refusals = append(refusals, ie.Reason)
			default:
				return nil, err
			}
		}
	}
	builtin, err := BuiltinRefusals(ctx, conn, cur, o.withDefaults().Live)
	if err != nil {
		return nil, err
	}
	return append(refusals, builtin...), nil
}

// BuiltinRefusals are the refusals of the gates every write flip has,
// forced or not, other than the caller's: a live replica whose breaker is
// open, and live replicas that have not acknowledged cur's version. live is
// how recent a heartbeat must be.
func BuiltinRefusals(ctx context.Context, conn *pgx.Conn, cur State, live time.Duration) ([]string, error) {
	var refusals []string
	reps, err := Replicas(ctx, conn, live)
	if err != nil {
		return nil, err
	}
	var open, behind []string
	for _, r := range reps {
		if r.Breaker == "open" {
			open = append(open, r.ID)
		}
		if r.AckedVersion < cur.Version {
			behind = append(behind, fmt.Sprintf("%s (at %d)", r.ID, r.AckedVersion))
		}
	}
	if len(open) > 0 {
		refusals = append(refusals, fmt.Sprintf("the breaker is open on %d of %d live replicas (%s): the %s store is failing and writes to it are recorded as drift",
			len(open), len(reps), strings.Join(open, ", "), cur.Secondary()))
	}
	if len(behind) > 0 {
		refusals = append(refusals, fmt.Sprintf("%d of %d live replicas have not acknowledged version %d: %s",
			len(behind), len(reps), cur.Version, strings.Join(behind, ", ")))
	}
	return refusals, nil
}

// raiseFence sets a new fence token on the state at version, unless another
// flip holds a fence, and notifies the replicas: one statement, so one
// round trip to the control database while writes are about to be held.
func raiseFence(ctx context.Context, conn *pgx.Conn, version int64, lease time.Duration) (token int64, expires time.Time, err error) {
	err = conn.QueryRow(ctx, `WITH t AS (SELECT nextval('tandem.fence_token') AS token),
		u AS (UPDATE tandem.state SET fence = t.token, fence_expires = now() + $1::interval FROM t
			WHERE id = 1 AND version = $2 AND (fence = 0 OR fence_expires <= now())
			RETURNING fence, fence_expires)
		SELECT fence, fence_expires, pg_notify($3, 'fence') IS NULL FROM u`, lease.String(), version, Channel).Scan(&token, &expires, new(bool))
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, time.Time{}, fmt.Errorf("raising the write fence: another change or flip got there first: %w", ErrConcurrentChange)
	}
	return token, expires, err
}

// releaseFence clears token, if it is still the fence, and notifies the
// replicas. It runs even when ctx has ended, on a new connection if conn
// is broken.
func releaseFence(ctx context.Context, conn *pgx.Conn, token int64) error {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	const q = `WITH r AS (UPDATE tandem.state SET fence = 0, fence_expires = NULL WHERE id = 1 AND fence = $1 RETURNING 1)
		SELECT pg_notify($2, 'fence') FROM r`
	if !conn.IsClosed() {
		if _, err := conn.Exec(rctx, q, token, Channel); err == nil {
			return nil
		}
	}
	c, err := pgx.ConnectConfig(rctx, conn.Config())
	if err != nil {
		return err
	}
	defer c.Close(rctx)
	_, err = c.Exec(rctx, q, token, Channel)
	return err
}

// waitVersion waits for the live replicas to acknowledge version and
// fills rep.Acked and rep.NotAcked.
func (o Options) waitVersion(ctx context.Context, conn *pgx.Conn, version int64, rep *Report) error {
	ok, pending, err := waitReplicas(ctx, conn, o.Live, o.AckTimeout, func(r Replica) bool { return r.AckedVersion >= version })
	rep.Acked, rep.NotAcked = ids(ok), ids(pending)
	if rep.Acked == nil {
		rep.Acked = []string{}
	}
	if err != nil {
		return fmt.Errorf("waiting for replicas to acknowledge version %d: %w", version, err)
	}
	return nil
}

// waitReplicas waits up to timeout until every live replica satisfies done.
// It wakes on AckChannel (the caller LISTENs) and re-reads at least every
// 200ms, so a replica that stops heartbeating stops counting. It returns
// the live replicas that satisfied done and those that did not.
func waitReplicas(ctx context.Context, conn *pgx.Conn, live, timeout time.Duration, done func(Replica) bool) (ok, pending []Replica, err error) {
	deadline := time.Now().Add(timeout)
	for {
		reps, err := Replicas(ctx, conn, live)
		if err != nil {
			return nil, nil, err
		}
		ok, pending = ok[:0], pending[:0]
		for _, r := range reps {
			if done(r) {
				ok = append(ok, r)
			} else {
				pending = append(pending, r)
			}
		}
		if len(pending) == 0 || !time.Now().Before(deadline) {
			return ok, pending, nil
		}
		if err := awaitNotification(ctx, conn, deadline); err != nil {
			return ok, pending, err
		}
	}
}

// awaitNotification waits for the next notification on conn (the caller
// LISTENs), for at most 200ms and not past deadline, so that the caller
// re-reads at least that often. The wait's own timeout is not an error.
func awaitNotification(ctx context.Context, conn *pgx.Conn, deadline time.Time) error {
	next := time.Now().Add(200 * time.Millisecond)
	if deadline.Before(next) {
		next = deadline
	}
	wctx, cancel := context.WithDeadline(ctx, next)
	_, err := conn.WaitForNotification(wctx)
	// Read before cancel, after which wctx.Err is always set: the wait
	// ran out on its own deadline, the caller's context still live.
	timedOut := wctx.Err() != nil && ctx.Err() == nil
	cancel()
	if err != nil && !timedOut {
		return err
	}
	return nil
}

func ids(rs []Replica) []string {
	if len(rs) == 0 {
		return nil
	}
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.ID
	}
	return out
}
