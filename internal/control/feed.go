package control

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/feed"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// Feed is the change feed's state as GET /api/v1/state and `tandem route
// show` report it (design section 10).
type Feed struct {
	Enabled bool         `json:"enabled"` // feed.enabled: flips wait for it and its gate refuses when it is down or behind
	Stores  []FeedStatus `json:"stores"`  // each store with a row in tandem.feed or a feed slot, old first
}

// FeedStatus is the change feed on one store: its row in tandem.feed and
// its slot in the store's pg_replication_slots.
type FeedStatus struct {
	Store       string     `json:"store"`   // the store whose WAL is read
	Primary     bool       `json:"primary"` // it is the primary: the feed should be reading it
	Slot        string     `json:"slot"`
	Holder      string     `json:"holder"`               // the replica running the feed; "" = nobody
	Live        bool       `json:"live"`                 // a holder with a heartbeat within route.FeedLive
	CheckedLSN  string     `json:"checked_lsn"`          // every change committed up to here is checked
	CheckedAt   *time.Time `json:"checked_at"`           // when it last advanced or was confirmed
	HeartbeatAt *time.Time `json:"heartbeat_at"`         // null when tandem.feed has no row for the store
	LastError   string     `json:"last_error,omitempty"` // the feed's last error
	CurrentLSN  string     `json:"current_lsn"`          // the store's WAL position now
	LagBytes    *int64     `json:"lag_bytes"`            // current_lsn - checked_lsn
	LagSeconds  *float64   `json:"lag_seconds"`          // now - checked_at
	SlotExists  bool       `json:"slot_exists"`
	SlotActive  bool       `json:"slot_active"`           // a walsender is streaming from it
	Retained    *int64     `json:"retained_bytes"`        // WAL the slot holds on the store: current_lsn - restart_lsn
	StoreError  string     `json:"store_error,omitempty"` // the store could not be read
}

// The flip's side of the change feed (design section 10): the feed itself
// runs in the proxy; what is here only follows the contract's names (the
// publication and slots route.FeedNames gives for feed.name, the control
// table tandem.feed).

// feedSlotTimeout bounds the creation of a logical slot: PostgreSQL waits
// for the transactions running on the store to end before it returns.
const feedSlotTimeout = 30 * time.Second

// feedStatusTimeout bounds reading one store's side of the feed's status.
const feedStatusTimeout = 3 * time.Second

// FeedNamesOf are the feed's publication and slot names under cfg's
// feed.name.
func FeedNamesOf(cfg *config.Config) route.FeedNames { return route.FeedNames{Name: cfg.Feed.Name} }

// FeedTables are the tables in scope under the names store gives them.
func FeedTables(ms *table.Mappings, store route.Store) []table.Name {
	var out []table.Name
	for _, m := range ms.All() {
		if !ms.InScope(m.Old.Name) {
			continue
		}
		switch {
		case store == route.New:
			if !slices.Contains(out, m.New.Name) { // a merge's tables share the new table
				out = append(out, m.New.Name)
			}
		case m.Owner(): // a split's parts share the old table
			out = append(out, m.Old.Name)
		}
	}
	return out
}

// EnsureFeed makes sure store (on conn) has the publication over the
// tables of tables that may be published (a table without a replica
// identity in a publication would make the store refuse its UPDATEs and
// DELETEs: feed.Publishable leaves it out) and the feed's logical slot,
// the publication first: pgoutput cannot decode WAL written before its
// publication existed. It is idempotent and safe against a concurrent
// caller.
func EnsureFeed(ctx context.Context, conn *pgx.Conn, names route.FeedNames, store route.Store, tables []table.Name) error {
	ok, _, err := feed.Publishable(ctx, conn, tables) // tandem plan names the others
	if err != nil {
		return err
	}
	if len(ok) > 0 {
		if err := feed.EnsurePublication(ctx, conn, names.Publication(), ok); err != nil {
			return err
		}
	}
	sctx, cancel := context.WithTimeout(ctx, feedSlotTimeout)
	defer cancel()
	_, err = feed.EnsureSlot(sctx, conn, names.Slot(store))
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
		cc, err := StoreConnConfig(cfg, s)
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
	if err := EnsureFeed(ctx, toConn, FeedNamesOf(cfg), to, FeedTables(ms, to)); err != nil {
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

// FeedState reads the change feed's state: tandem.feed on control, and
// the slot and WAL position of each store in stores (every store when
// none is given). A store that cannot be read is reported in its
// StoreError, not as an error.
func FeedState(ctx context.Context, cfg *config.Config, control *pgx.Conn, stores ...route.Store) (*Feed, error) {
	if len(stores) == 0 {
		stores = []route.Store{route.Old, route.New}
	}
	st, err := route.Load(ctx, control)
	if err != nil {
		return nil, err
	}
	f := &Feed{Enabled: cfg.Feed.Enabled, Stores: []FeedStatus{}}
	for _, s := range stores {
		fs := FeedStatus{Store: string(s), Primary: st.Primary == s, Slot: FeedNamesOf(cfg).Slot(s)}
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
func storeFeedStatus(ctx context.Context, cfg *config.Config, s route.Store, fs *FeedStatus) error {
	// A store that is down must not hold up route show or the gate for
	// limits.connect_timeout: the status says it could not be read.
	ctx, cancel := context.WithTimeout(ctx, feedStatusTimeout)
	defer cancel()
	cc, err := StoreConnConfig(cfg, s)
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
		FeedNamesOf(cfg).Slot(s), checked).Scan(&fs.CurrentLSN, &fs.LagBytes, &retained, &active)
	if err != nil {
		return fmt.Errorf("reading the %s store's WAL position and slot: %w", s, err)
	}
	fs.Retained = retained
	fs.SlotExists = active != nil
	fs.SlotActive = active != nil && *active
	return nil
}
