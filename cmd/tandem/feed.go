package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/feed"
	"github.com/tandemdb/tandem/internal/admin"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// The flip's side of the change feed (design section 10): the feed itself
// runs in the proxy; what is here only follows the contract's names (the
// publication route.FeedPublication, the slots route.FeedSlot, the control
// table tandem.feed).

// feedSlotTimeout bounds the creation of a logical slot: PostgreSQL waits
// for the transactions running on the store to end before it returns.
const feedSlotTimeout = 30 * time.Second

// feedStatusTimeout bounds reading one store's side of the feed's status.
const feedStatusTimeout = 3 * time.Second

// feedTables are the tables in scope under the names store gives them.
func feedTables(ms *table.Mappings, store route.Store) []table.Name {
	var out []table.Name
	for _, m := range ms.All() {
		if !ms.InScope(m.Old.Name) {
			continue
		}
		if store == route.New {
			out = append(out, m.New.Name)
		} else {
			out = append(out, m.Old.Name)
		}
	}
	return out
}

// ensureFeed makes sure store (on conn) has the publication over the
// tables of tables that may be published (a table without a replica
// identity in a publication would make the store refuse its UPDATEs and
// DELETEs: feed.Publishable leaves it out) and the feed's logical slot,
// the publication first: pgoutput cannot decode WAL written before its
// publication existed. It is idempotent and safe against a concurrent
// caller.
func ensureFeed(ctx context.Context, conn *pgx.Conn, store route.Store, tables []table.Name) error {
	ok, _, err := feed.Publishable(ctx, conn, tables) // tandem plan names the others
	if err != nil {
		return err
	}
	if len(ok) > 0 {
		if err := feed.EnsurePublication(ctx, conn, ok); err != nil {
			return err
		}
	}
	sctx, cancel := context.WithTimeout(ctx, feedSlotTimeout)
	defer cancel()
	_, err = feed.EnsureSlot(sctx, conn, feed.SlotName(store))
	return err
}

// prepareFeed is route.FeedWait.Prepare: before the fence goes up, it
// makes sure to, the store becoming primary, has the publication and the
// slot (so the feed finds every write after the flip there), and returns
// the function that reads from's WAL position under the fence.
func prepareFeed(ctx context.Context, cfg *config.Config, from, to route.Store) (func(context.Context) (string, error), func(), error) {
	var conns []*pgx.Conn
	done := func() {
		for _, c := range conns {
			c.Close(context.WithoutCancel(ctx))
		}
	}
	connect := func(s route.Store) (*pgx.Conn, error) {
		cc, err := storeConnConfig(cfg, s)
		if err != nil {
			return nil, err
		}
		c, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			return nil, fmt.Errorf("connecting to the %s store: %w", s, err)
		}
		conns = append(conns, c)
		return c, nil
	}
	fromConn, err := connect(from)
	if err != nil {
		done()
		return nil, nil, err
	}
	toConn, err := connect(to)
	if err != nil {
		done()
		return nil, nil, err
	}
	oldConn, newConn := fromConn, toConn
	if from == route.New {
		oldConn, newConn = toConn, fromConn
	}
	ms, _, err := table.LoadMappings(ctx, cfg.Tables, oldConn, newConn)
	if err != nil {
		done()
		return nil, nil, fmt.Errorf("loading the table mappings: %w", err)
	}
	if err := ensureFeed(ctx, toConn, to, feedTables(ms, to)); err != nil {
		done()
		return nil, nil, fmt.Errorf("on the %s store: %w", to, err)
	}
	position := func(ctx context.Context) (string, error) {
		return fencePosition(ctx, fromConn)
	}
	return position, done, nil
}

// fencePosition is the WAL position that covers every transaction the
// store acknowledged so far: pg_current_wal_lsn() after a commit of our own
// with synchronous_commit=on. A client's commit under synchronous_commit=off
// is acknowledged before its record is written, so it can lie past
// pg_current_wal_lsn(); flushing our own commit flushes every record
// before it.
func fencePosition(ctx context.Context, conn *pgx.Conn) (string, error) {
	if err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = on; SELECT txid_current()")
		return err
	}); err != nil {
		return "", fmt.Errorf("flushing the WAL: %w", err)
	}
	var lsn string
	err := conn.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn)
	return lsn, err
}

// feedStatus reads the change feed's state: tandem.feed on control, and
// the slot and WAL position of each store in stores (every store when
// none is given). A store that cannot be read is reported in its
// StoreError, not as an error.
func feedStatus(ctx context.Context, cfg *config.Config, control *pgx.Conn, stores ...route.Store) (*admin.Feed, error) {
	if len(stores) == 0 {
		stores = []route.Store{route.Old, route.New}
	}
	st, err := route.Load(ctx, control)
	if err != nil {
		return nil, err
	}
	f := &admin.Feed{Enabled: cfg.Feed.Enabled, Stores: []admin.FeedStatus{}}
	for _, s := range stores {
		fs := admin.FeedStatus{Store: string(s), Primary: st.Primary == s, Slot: route.FeedSlot(s)}
		var holder, checked, lastErr *string
		var age *time.Duration
		err := control.QueryRow(ctx, `SELECT slot_name, holder, checked_lsn::text, checked_at, heartbeat_at, now() - heartbeat_at, last_error,
				extract(epoch FROM now() - checked_at)::float8
			FROM tandem.feed WHERE store = $1`, string(s)).Scan(&fs.Slot, &holder, &checked, &fs.CheckedAt, &fs.HeartbeatAt, &age, &lastErr, &fs.LagSeconds)
		var pe *pgconn.PgError
		switch {
		case errors.Is(err, pgx.ErrNoRows), errors.As(err, &pe) && pe.Code == "42P01": // no row, or no feed has run yet
		case err != nil:
			return nil, fmt.Errorf("reading tandem.feed: %w", err)
		}
		if holder != nil {
			fs.Holder = *holder
		}
		if checked != nil {
			fs.CheckedLSN = *checked
		}
		if lastErr != nil {
			fs.LastError = *lastErr
		}
		fs.Live = fs.Holder != "" && age != nil && *age <= route.FeedLive
		if err := storeFeedStatus(ctx, cfg, s, &fs); err != nil {
			fs.StoreError = err.Error()
		}
		if fs.HeartbeatAt == nil && !fs.SlotExists && (!fs.Primary || !cfg.Feed.Enabled) {
			continue // nothing of the feed there, and it is not expected to be
		}
		f.Stores = append(f.Stores, fs)
	}
	return f, nil
}

// storeFeedStatus fills in what store s says: its WAL position, the lag
// of the checked position behind it, and the feed's slot.
func storeFeedStatus(ctx context.Context, cfg *config.Config, s route.Store, fs *admin.FeedStatus) error {
	// A store that is down must not hold up route show or the gate for
	// limits.connect_timeout: the status says it could not be read.
	ctx, cancel := context.WithTimeout(ctx, feedStatusTimeout)
	defer cancel()
	cc, err := storeConnConfig(cfg, s)
	if err != nil {
		return err
	}
	c, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return fmt.Errorf("connecting to the %s store: %w", s, err)
	}
	defer c.Close(context.WithoutCancel(ctx))
	var checked *string
	if fs.CheckedLSN != "" {
		checked = &fs.CheckedLSN
	}
	var retained *int64
	var active *bool
	err = c.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text,
			pg_wal_lsn_diff(pg_current_wal_lsn(), $2::pg_lsn)::bigint,
			(SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1),
			(SELECT active FROM pg_replication_slots WHERE slot_name = $1)`,
		route.FeedSlot(s), checked).Scan(&fs.CurrentLSN, &fs.LagBytes, &retained, &active)
	if err != nil {
		return fmt.Errorf("reading the %s store's WAL position and slot: %w", s, err)
	}
	fs.Retained = retained
	fs.SlotExists = active != nil
	fs.SlotActive = active != nil && *active
	return nil
}

// feedGate refuses a write flip, with the change feed enabled, when the
// feed of the current primary is down (nobody holds it, or its heartbeat
// is older than route.FeedLive) or behind: its checked position last
// moved longer ago than gates.feed_max_lag, or lies more than
// gates.feed_max_lag_bytes behind the primary's WAL. The flip would
// otherwise hold the write fence for routing.feed_wait and then give up.
func feedGate(cfg *config.Config) route.Gate {
	return func(ctx context.Context, control *pgx.Conn, cur, next route.Settings) error {
		if !cfg.Feed.Enabled || cur.Primary == next.Primary {
			return nil
		}
		refuse := func(format string, args ...any) error {
			return &route.IllegalError{Gate: true, Reason: "change feed: " + fmt.Sprintf(format, args...)}
		}
		f, err := feedStatus(ctx, cfg, control, cur.Primary)
		if err != nil {
			return refuse("its state could not be read: %v", err)
		}
		var fs admin.FeedStatus
		if len(f.Stores) > 0 {
			fs = f.Stores[0]
		}
		lastErr := ""
		if fs.LastError != "" {
			lastErr = "; its last error: " + fs.LastError
		}
		switch {
		case fs.HeartbeatAt == nil:
			return refuse("no change feed has run on the %s store (tandem.feed has no row for it): start a proxy with feed.enabled", cur.Primary)
		case !fs.Live && fs.Holder == "":
			return refuse("it is down on the %s store: no replica holds it%s", cur.Primary, lastErr)
		case !fs.Live:
			return refuse("it is down on the %s store: the heartbeat of %s is older than %s%s", cur.Primary, fs.Holder, route.FeedLive, lastErr)
		case fs.StoreError != "":
			return refuse("its lag could not be measured: %s", fs.StoreError)
		case fs.CheckedAt == nil || fs.LagBytes == nil:
			return refuse("it has not checked anything on the %s store yet%s", cur.Primary, lastErr)
		case fs.LagSeconds != nil && *fs.LagSeconds > cfg.Gates.FeedMaxLag.Duration().Seconds():
			return refuse("it is behind on the %s store: it last advanced %.1fs ago (gates.feed_max_lag %s), at %s%s",
				cur.Primary, *fs.LagSeconds, cfg.Gates.FeedMaxLag, fs.CheckedLSN, lastErr)
		case *fs.LagBytes > int64(cfg.Gates.FeedMaxLagBytes):
			return refuse("it is behind on the %s store by %d bytes of WAL (checked %s, WAL at %s; gates.feed_max_lag_bytes %s)%s",
				cur.Primary, *fs.LagBytes, fs.CheckedLSN, fs.CurrentLSN, cfg.Gates.FeedMaxLagBytes, lastErr)
		}
		return nil
	}
}
