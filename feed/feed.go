// Package feed is the change feed (design section 10): one elected proxy
// replica reads the store of record's WAL through a logical replication
// slot (pgoutput, the publication tandem_feed over the tables in scope;
// the names follow feed.name, route.FeedNames)
// and checks, for every committed transaction, that the other store holds
// the same row for each key it changed. A key whose row differs is
// re-checked with the verify's race-free protocol (compare.Checker) and a
// confirmed difference goes to the drift ledger with reason "change feed",
// where the repairer fixes it. The slot's position is confirmed, and
// tandem.feed.checked_lsn advanced, only after a transaction's keys are
// checked or recorded: a crash re-checks, it never skips.
//
// The feed is a job like compare, not part of the proxy: it talks to the
// stores and the control database, and shares internal/table's mappings
// and ledger with the other jobs.
package feed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// Reason is the drift ledger reason of every entry the feed records.
const Reason = "change feed"

// electionLock is the session advisory lock the running feed holds on its
// control connection: one replica at a time, and the lock goes with the
// session when its holder dies.
const electionLock = "tandem.feed"

// Options configure a Runner.
type Options struct {
	Control  *pgx.ConnConfig // the control database (tandem schema)
	Old, New *pgx.ConnConfig // the stores, as a user that may replicate on the primary
	Tables   config.Tables   // the tables in scope and their mappings
	Replica  string          // this replica's id, written to tandem.feed.holder
	// Names are the publication's and the slots' names (feed.name).
	Names route.FeedNames

	// WALWarn and WALMax are the slot's retained WAL (bytes) past which
	// the feed warns, and past which it drops the slot and records
	// whole-table drift for every table in scope; 0 = no limit.
	WALWarn, WALMax int64
	// Retry is how often a replica that is not elected tries again, and
	// how long a failed feed waits before it restarts (default 1s).
	Retry time.Duration
	// Settle bounds the re-check's wait for in-flight mirror writes (see
	// compare.Options.Settle; default 1s).
	Settle time.Duration
	// Delay is how long after a transaction arrives the feed waits before
	// it checks its keys, so that the secondary's side of every mirrored
	// transaction that committed on the primary before it has committed
	// too, or been recorded as drift by the proxy (the proxy commits the
	// secondary right after the primary, within routing.mirror_budget).
	// Default 500ms; the proxy passes routing.mirror_budget.
	Delay time.Duration
	// Batch is the most keys checked together (default 1000): committed
	// transactions that arrive together are checked in one batch.
	Batch int
	// Rescope is how often the tables in scope are re-read (default 30s,
	// as the proxy reloads its mappings): a table that joined the scope
	// is added to the publication, and checked from then on.
	Rescope time.Duration

	Logger  *slog.Logger
	Metrics *metrics.Feed // nil records nothing
	Knobs   *TestingKnobs
}

// TestingKnobs are injection points for tests.
type TestingKnobs struct {
	// BeforeCheck is called before a batch of committed transactions is
	// checked, with the end LSN of its last transaction; an error ends
	// the feed's session as a store failure would.
	BeforeCheck func(ctx context.Context, end pglogrepl.LSN) error
	// Detected is called when a drift entry has been recorded for a
	// change, with the commit time of the transaction that made it.
	Detected func(committed time.Time)
}

func (o Options) withDefaults() Options {
	if o.Retry <= 0 {
		o.Retry = time.Second
	}
	if o.Delay <= 0 {
		o.Delay = 500 * time.Millisecond
	}
	if o.Settle <= 0 {
		o.Settle = time.Second
	}
	if o.Batch <= 0 {
		o.Batch = 1000
	}
	if o.Rescope <= 0 {
		o.Rescope = 30 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Knobs == nil {
		o.Knobs = &TestingKnobs{}
	}
	return o
}

// Runner runs the change feed on whichever replica wins the election.
type Runner struct {
	opts Options
	log  *slog.Logger
}

// New returns a Runner; Run starts it.
func New(opts Options) *Runner {
	opts = opts.withDefaults()
	return &Runner{opts: opts, log: opts.Logger.With("component", "change feed")}
}

// Run takes part in the election until ctx ends: it tries to take the
// election lock every Retry, and while it holds it, runs the feed on the
// routing state's primary whenever mirroring is on. Errors are logged and
// the feed restarts after Retry; Run returns only when ctx ends.
func (r *Runner) Run(ctx context.Context) {
	for ctx.Err() == nil {
		led, err := r.elect(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			r.log.Warn("change feed stopped; retrying", "error", err, "after", r.opts.Retry)
		}
		if !led || err != nil {
			_ = waitCtx(ctx, r.opts.Retry)
		}
	}
}

// elect connects to the control database and, when it wins the lock,
// leads until an error or the end of ctx. led is false when another
// replica holds the lock.
func (r *Runner) elect(ctx context.Context) (led bool, err error) {
	conn, err := pgx.ConnectConfig(ctx, r.opts.Control.Copy())
	if err != nil {
		return false, fmt.Errorf("connecting to the control database: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for {
		var ok bool
		if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtext($1))", electionLock).Scan(&ok); err != nil {
			return false, fmt.Errorf("the change feed's election: %w", err)
		}
		if ok {
			break
		}
		r.opts.Metrics.Leader(false)
		if err := waitCtx(ctx, r.opts.Retry); err != nil {
			return false, err
		}
	}
	r.log.Info("elected to run the change feed", "replica", r.opts.Replica)
	r.opts.Metrics.Leader(true)
	defer r.opts.Metrics.Leader(false)
	err = r.lead(ctx, conn)
	// Stepping down: nobody holds the feed until the next is elected. (A
	// replica killed outright leaves its name, with a heartbeat that
	// stops.)
	r.stepDown(ctx, conn)
	return true, err
}

// stepDown clears holder if it still names this replica: on conn, or on a
// new connection when ending the feed closed conn (the lock went with it,
// and a successor may already have written its own name).
func (r *Runner) stepDown(ctx context.Context, conn *pgx.Conn) {
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	const clear = "UPDATE tandem.feed SET holder = NULL WHERE holder = $1"
	if !conn.IsClosed() {
		if _, err := conn.Exec(uctx, clear, r.opts.Replica); err == nil {
			return
		}
	}
	c, err := pgx.ConnectConfig(uctx, r.opts.Control.Copy())
	if err != nil {
		return
	}
	defer c.Close(uctx)
	_, _ = c.Exec(uctx, clear, r.opts.Replica)
}

// lead runs the feed while this replica holds the election lock on
// control; every control write goes through control, so a lost session
// (and with it the lock) stops the feed within a heartbeat.
func (r *Runner) lead(ctx context.Context, control *pgx.Conn) error {
	if err := EnsureSchema(ctx, control); err != nil {
		return fmt.Errorf("creating tandem.feed: %w", err)
	}
	if err := table.EnsureSchema(ctx, control); err != nil {
		return fmt.Errorf("creating the drift ledger: %w", err)
	}
	var prev route.Store // the primary the last session read, to drop its slot
	drained := false     // the last session read prev's WAL to the flip (session.follow)
	idle := false        // mirroring is off and the primary's slot dropped
	for {
		st, err := route.Load(ctx, control)
		if err != nil {
			return fmt.Errorf("reading the routing state: %w", err)
		}
		if !st.Mirror {
			// Nothing to compare: the feed waits, alive, for mirroring.
			// The slot would only hold the primary's WAL meanwhile: drop it
			// (turning mirroring on again creates a new one, and what was
			// written while it was off is the backfill's, as at the start).
			if !idle {
				if err := r.retire(ctx, control, st.Primary); err != nil {
					return err
				}
				prev, idle = "", true
			}
			if err := heartbeat(ctx, control, st.Primary, r.opts.Names.Slot(st.Primary), r.opts.Replica, 0); err != nil {
				return err
			}
			if err := waitCtx(ctx, r.opts.Retry); err != nil {
				return err
			}
			continue
		}
		idle = false
		if prev != "" && prev != st.Primary {
			if !drained {
				// The last session ended for another reason before it saw
				// the flip: read the former primary's WAL to its end first.
				if err := r.drain(ctx, control, prev); err != nil {
					return err
				}
			}
			if err := r.retire(ctx, control, prev); err != nil {
				return err
			}
		}
		prev = st.Primary
		s, err := r.open(ctx, control, st.Primary)
		if err != nil {
			return err
		}
		err = s.run(ctx)
		drained = s.until != 0 && s.checked >= s.until
		s.close(context.WithoutCancel(ctx))
		if errors.Is(err, errFollow) {
			continue
		}
		if err != nil {
			r.recordError(ctx, control, st.Primary, err)
		}
		return err
	}
}

// drain reads store's slot, store being no longer the primary, up to its
// current WAL end (see session.follow).
func (r *Runner) drain(ctx context.Context, control *pgx.Conn, store route.Store) error {
	s, err := r.open(ctx, control, store)
	if err != nil {
		return err
	}
	defer s.close(context.WithoutCancel(ctx))
	if err := s.follow(ctx); err != nil && !errors.Is(err, errFollow) {
		return err
	}
	if s.until == 0 { // mirroring went off, or the primary is back: nothing to drain
		return nil
	}
	if err := s.run(ctx); !errors.Is(err, errFollow) {
		return err
	}
	return nil
}

// errFollow ends a session whose store is no longer the primary, or when
// mirroring turned off.
var errFollow = errors.New("the routing state changed")

// retire drops the slot on store, which stopped being the primary (the
// session on it checked its WAL up to the position read when the change
// was seen, see session.follow) or whose WAL is not read while mirroring
// is off: the slot is of no more use, and would hold WAL.
func (r *Runner) retire(ctx context.Context, control *pgx.Conn, store route.Store) error {
	cc := r.opts.Old
	if store == route.New {
		cc = r.opts.New
	}
	conn, err := pgx.ConnectConfig(ctx, cc.Copy())
	if err != nil {
		return fmt.Errorf("connecting to the %s store to drop its slot: %w", store, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := DropSlot(ctx, conn, r.opts.Names.Slot(store)); err != nil {
		return err
	}
	if _, err := control.Exec(ctx, "UPDATE tandem.feed SET holder = NULL, last_error = NULL WHERE store = $1", string(store)); err != nil {
		return fmt.Errorf("updating tandem.feed: %w", err)
	}
	r.log.Info("dropped the change feed's slot: its store is not the primary, or mirroring is off", "store", store, "slot", r.opts.Names.Slot(store))
	return nil
}

func (r *Runner) recordError(ctx context.Context, control *pgx.Conn, store route.Store, err error) {
	if control.IsClosed() || ctx.Err() != nil {
		return
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	_, _ = control.Exec(wctx, "UPDATE tandem.feed SET last_error = $2 WHERE store = $1", string(store), err.Error())
}

// waitCtx waits d or until ctx ends.
func waitCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// isCopyData reports whether msg is replication data, and returns it.
func isCopyData(msg pgproto3.BackendMessage) (*pgproto3.CopyData, bool) {
	cd, ok := msg.(*pgproto3.CopyData)
	return cd, ok
}

// joinKey makes a map key of a key's values; \x00 cannot occur in text.
func joinKey(k []string) string { return strings.Join(k, "\x00") }
