package backfill

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/route"
)

// ErrMirrorOff is returned when the routing state does not mirror writes.
var ErrMirrorOff = errors.New("mirror is off")

// CheckMirror is the backfill's precondition: mirror must be on (and old
// the primary) before the backfill reads its first chunk, so every write
// after that reaches both stores and no copied row can miss one.
func CheckMirror(ctx context.Context, control *pgx.Conn) error {
	st, err := route.Load(ctx, control)
	if err != nil {
		return fmt.Errorf("reading the routing state: %w", err)
	}
	if !st.Mirror {
		return fmt.Errorf("%w (routing state version %d): writes that happen during the backfill would reach only the old store; turn mirror on first (tandem route set --mirror on)", ErrMirrorOff, st.Version)
	}
	if st.Primary != route.Old {
		return fmt.Errorf("the primary is %s (routing state version %d): the backfill copies old -> new and runs before the write flip", st.Primary, st.Version)
	}
	return nil
}

// ErrNotSettled is returned when mirror=on has not settled within the
// backfill's SettleTimeout (see WaitMirrorSettled).
var ErrNotSettled = errors.New("mirror=on has not settled")

// WaitMirrorSettled waits, up to timeout, until mirror=on holds for every
// write the backfill could otherwise miss: every live proxy replica has
// acknowledged the routing state (a replica that has not still relays
// writes to old only), and then no transaction that began before that on
// the primary's database is still open (a session inside a transaction
// when mirror turned on finishes it on old only: its writes reach neither
// the mirror nor, when it commits after the backfill's snapshot, the
// backfill).
func WaitMirrorSettled(ctx context.Context, control, primary *pgx.Conn, live, timeout time.Duration, log *slog.Logger) error {
	if live <= 0 {
		live = 15 * time.Second
	}
	if timeout <= 0 {
		timeout = 5 * time.Minute
	}
	deadline := time.Now().Add(timeout)
	st, err := route.Load(ctx, control)
	if err != nil {
		return fmt.Errorf("reading the routing state: %w", err)
	}
	wait := func(what string, check func() (string, error)) error {
		logged := false
		for {
			pending, err := check()
			if err != nil {
				return err
			}
			if pending == "" {
				return nil
			}
			if !time.Now().Before(deadline) {
				return fmt.Errorf("%w after %s: %s; the backfill would miss their writes", ErrNotSettled, timeout, pending)
			}
			if !logged && log != nil {
				log.Info("the backfill waits for "+what, "pending", pending)
				logged = true
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	err = wait("every live proxy replica to acknowledge mirror=on", func() (string, error) {
		reps, err := route.Replicas(ctx, control, live)
		if err != nil {
			return "", fmt.Errorf("reading the proxy replicas: %w", err)
		}
		var behind []string
		for _, r := range reps {
			if r.AckedVersion < st.Version {
				behind = append(behind, fmt.Sprintf("%s (at version %d)", r.ID, r.AckedVersion))
			}
		}
		if len(behind) == 0 {
			return "", nil
		}
		return fmt.Sprintf("proxy replica(s) %s have not acknowledged routing state version %d", strings.Join(behind, ", "), st.Version), nil
	})
	if err != nil {
		return err
	}
	var since time.Time
	if err := primary.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&since); err != nil {
		return fmt.Errorf("reading the old store's clock: %w", err)
	}
	return wait("transactions older than mirror=on to end", func() (string, error) {
		rows, err := primary.Query(ctx, `SELECT pid::text || coalesce(' (' || nullif(application_name, '') || ')', '') || ' since ' || xact_start::text
			FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
			AND backend_type = 'client backend' AND xact_start < $1 ORDER BY xact_start`, since)
		if err != nil {
			return "", fmt.Errorf("reading the old store's open transactions: %w", err)
		}
		open, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil || len(open) == 0 {
			return "", err
		}
		return fmt.Sprintf("%d transaction(s) on the old store began before mirror=on settled and are still open: backend %s", len(open), strings.Join(open, ", ")), nil
	})
}

// WaitFeedReading waits, up to timeout, until the change feed reads the
// primary's WAL: its slot exists on the primary and tandem.feed shows it
// alive there. Every write committed from then on is checked by the feed;
// what committed before is in the rows the backfill copies. A no-op when
// feed is false.
func WaitFeedReading(ctx context.Context, control, primary *pgx.Conn, feed bool, names route.FeedNames, timeout time.Duration, log *slog.Logger) error {
	if !feed {
		return nil
	}
	if timeout <= 0 {
		timeout = 5 * time.Minute
	}
	st, err := route.Load(ctx, control)
	if err != nil {
		return fmt.Errorf("reading the routing state: %w", err)
	}
	if err := route.EnsureFeedSchema(ctx, control); err != nil {
		return err
	}
	slot := names.Slot(st.Primary)
	deadline := time.Now().Add(timeout)
	logged := false
	for {
		var hasSlot, alive bool
		if err := primary.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database())", slot).Scan(&hasSlot); err != nil {
			return fmt.Errorf("reading the primary's replication slots: %w", err)
		}
		if err := control.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM tandem.feed WHERE store = $1 AND holder IS NOT NULL
				AND checked_lsn IS NOT NULL AND heartbeat_at > now() - $2::interval)`, string(st.Primary), route.FeedLive.String()).Scan(&alive); err != nil {
			return fmt.Errorf("reading tandem.feed: %w", err)
		}
		if hasSlot && alive {
			return nil
		}
		if !time.Now().Before(deadline) {
			return fmt.Errorf("%w after %s: the change feed is not reading the %s store's WAL (slot %s present: %v; a live feed: %v); "+
				"is a tandem proxy with feed.enabled running?", ErrNotSettled, timeout, st.Primary, slot, hasSlot, alive)
		}
		if !logged && log != nil {
			log.Info("the backfill waits for the change feed to read the primary's WAL", "slot", slot)
			logged = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
