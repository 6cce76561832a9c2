package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/feed"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/controlschema"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/sync/errgroup"
)

// Plane is what a proxy with a new store runs next to the server:
// the state follower, the open-drift refresher and the drift repairer, on
// a pool of connections to the control database.
type Plane struct {
	cfg     *config.Config
	log     *slog.Logger
	cc      *pgx.ConnConfig
	pool    *pgxpool.Pool
	initial route.State
	replica string       // this proxy's id in tandem.replicas and the shadow tables
	srv     Server       // set by Start
	drift   atomic.Int64 // open drift entries, as last read; -1 unknown

	// initialAt is when the read of initial started: the replica's view is
	// that fresh until the follower's first heartbeat (routing.self_fence).
	initialAt time.Time

	mappings atomic.Pointer[table.Mappings] // as last loaded; the repairer copies through them

	// A repair pass copies rows in the lock order of the routing it started
	// on, so a write fence must not be acknowledged while one runs: the
	// fence's drain cancels the pass and waits for it (repairSlot).
	repairMu     sync.Mutex
	repairCancel context.CancelFunc // of the running pass, if any
	repairSlot   chan struct{}      // holds a token while a pass runs

	feedMetrics *metrics.Feed // the change feed's instruments (feed.enabled); set by Start

	cancel context.CancelFunc
	g      *errgroup.Group
}

// Open connects to the control database, creates or upgrades the
// control schema and reads the routing state. It fails when the control
// database cannot be reached: a proxy that cannot follow the routing state
// must not serve.
func Open(cfg *config.Config, log *slog.Logger) (*Plane, error) {
	cc, err := ControlConnConfig(cfg)
	if err != nil {
		return nil, err
	}
	where := config.RedactDSN(cc.ConnString())
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Limits.ConnectTimeout.Duration()+10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cc.Copy())
	if err != nil {
		return nil, fmt.Errorf("the control database %s (control.dsn, else old.dsn) is unreachable: %w", where, err)
	}
	defer conn.Close(ctx)
	if err := controlschema.Apply(ctx, conn); err != nil {
		return nil, fmt.Errorf("creating or upgrading the control schema in %s: %w", where, err)
	}
	readAt := time.Now()
	st, err := route.Load(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("reading the routing state from %s: %w", where, err)
	}
	pc, err := pgxpool.ParseConfig("")
	if err != nil {
		return nil, err
	}
	pc.ConnConfig = cc.Copy()
	pc.MaxConns = 8
	pool, err := pgxpool.NewWithConfig(context.Background(), pc)
	if err != nil {
		return nil, err
	}
	replica := ReplicaID(cfg)
	cp := &Plane{cfg: cfg, log: log, cc: cc, pool: pool, initial: st, initialAt: readAt, replica: replica, repairSlot: make(chan struct{}, 1)}
	cp.drift.Store(-1)
	return cp, nil
}

// ReplicaID is this proxy's name in tandem.replicas and in its metrics:
// routing.replica_id, else host:pid.
func ReplicaID(cfg *config.Config) string {
	if cfg.Routing.ReplicaID != "" {
		return cfg.Routing.ReplicaID
	}
	host, _ := os.Hostname()
	return fmt.Sprintf("%s:%d", host, os.Getpid())
}

// mappingRefresh is how often a proxy reloads its table mappings.
const mappingRefresh = 30 * time.Second

// RefreshMappings reloads the table mappings into the proxy; on failure the
// previous ones stay.
func (cp *Plane) RefreshMappings(ctx context.Context, srv Server) {
	lctx, cancel := context.WithTimeout(ctx, cp.cfg.Limits.ConnectTimeout.Duration()+10*time.Second)
	defer cancel()
	ms, probs, err := LoadMappings(lctx, cp.cfg)
	if err != nil {
		cp.log.Warn("could not load the table mappings; keeping the previous ones", "error", err)
		return
	}
	LogProblems(cp.log, probs)
	srv.SetMappings(ms)
	cp.mappings.Store(ms)
}

// RecordDrift writes drift ledger entries; the proxy calls it before it
// acknowledges a write whose mirror was skipped or failed.
func (cp *Plane) RecordDrift(ctx context.Context, entries []table.DriftEntry) error {
	return table.RecordDrift(ctx, cp.pool, entries)
}

// Start runs the follower, the drift refresher and the repairer until stop.
func (cp *Plane) Start(srv Server, pm *metrics.Proxy, bm *metrics.Backfill, fm *metrics.Feed) {
	ctx, cancel := context.WithCancel(context.Background())
	cp.cancel = cancel
	cp.g = &errgroup.Group{}
	cp.feedMetrics = fm
	replica := cp.replica
	cp.srv = srv
	joined := make(chan struct{})
	f := &route.Follower{
		Joined:  func() { close(joined) },
		Heard:   srv.HeardState,
		Config:  cp.cc,
		Replica: replica,
		Poll:    cp.cfg.Routing.Poll.Duration(),
		Apply: func(st route.State) {
			// Turning mirroring on: bring the table mappings up to the
			// stores' schemas first (they are also reloaded periodically).
			if prev := srv.State(); st.Mirror && !prev.Mirror {
				cp.RefreshMappings(ctx, srv)
			}
			srv.ApplyState(st)
		},
		Drain: func(ctx context.Context) error {
			if err := cp.stopRepair(ctx); err != nil {
				return err
			}
			return srv.DrainWrites(ctx)
		},
		Status: func() route.ReplicaStatus {
			b := srv.BreakerState()
			pm.R().Breaker(b)
			return route.ReplicaStatus{Breaker: b, Writers: srv.Writers()}
		},
		Logger: cp.log,
	}
	cp.g.Go(func() error { _ = f.Run(ctx); return nil })
	cp.g.Go(func() error { cp.refreshDrift(ctx, srv, pm); return nil })
	cp.g.Go(func() error { cp.repair(ctx, srv); return nil })
	cp.g.Go(func() error { cp.refreshBackfill(ctx, bm); return nil })
	if cp.cfg.Feed.Enabled {
		if err := cp.startFeed(ctx); err != nil {
			cp.log.Error("the change feed cannot start; the proxy runs without it", "error", err)
		}
	}
	cp.g.Go(func() error {
		every(ctx, ShadowFlush, func() { cp.flushShadow(ctx) })
		return nil
	})
	cp.g.Go(func() error {
		// Schemas change during a migration: reload the mappings now and then.
		t := time.NewTicker(mappingRefresh)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
				cp.RefreshMappings(ctx, srv)
			}
		}
	})
	// A proxy that serves must be one the next flip waits for: hold the
	// start until the first heartbeat is written (bounded, the follower
	// keeps retrying on its own if the control store is slow).
	select {
	case <-joined:
	case <-time.After(joinTimeout):
		cp.log.Warn("routing state follower has not registered this replica yet; flips will not wait for it until it does", "replica", replica, "waited", joinTimeout)
	}
	cp.log.Info("following the routing state", "replica", replica, "version", cp.initial.Version, "state", cp.initial.Settings.String())
}

// joinTimeout bounds how long a starting proxy waits for its first heartbeat.
const joinTimeout = 10 * time.Second

// Stop ends the background work and closes the pool. Call it after the
// server has shut down: sessions record drift through the pool.
func (cp *Plane) Stop() {
	if cp.cancel != nil {
		cp.cancel()
		_ = cp.g.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		cp.flushShadow(ctx) // the last counts
		cancel()
	}
	cp.pool.Close()
}

// ShadowFlush is how often a proxy adds its shadow-read counts to
// tandem.shadow_stats, where the write-flip gate reads them.
const ShadowFlush = 5 * time.Second

// flushShadow stores the shadow-read counts gathered since the last call.
func (cp *Plane) flushShadow(ctx context.Context) {
	if cp.srv == nil {
		return
	}
	counts := cp.srv.TakeShadowCounts()
	if err := mismatch.FlushStats(ctx, cp.pool, cp.replica, time.Now(), counts); err != nil && ctx.Err() == nil {
		cp.log.Warn("could not store the shadow-read counts; they are lost", "error", err)
	}
}

// RecordMismatch stores a confirmed shadow-read mismatch; the proxy's
// shadow workers call it.
func (cp *Plane) RecordMismatch(ctx context.Context, r mismatch.Record) error {
	r.Replica = cp.replica
	return mismatch.Insert(ctx, cp.pool, r)
}

// every calls f now and then every d until ctx ends.
func every(ctx context.Context, d time.Duration, f func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		f()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refreshDrift reads the open drift every poll interval: tables with open
// drift are not served from the new store.
func (cp *Plane) refreshDrift(ctx context.Context, srv Server, pm *metrics.Proxy) {
	failing := false
	every(ctx, cp.cfg.Routing.Poll.Duration(), func() {
		m, err := table.OpenDrift(ctx, cp.pool)
		if err != nil {
			if ctx.Err() == nil && !failing {
				cp.log.Warn("cannot read the drift ledger; keeping the last known open drift", "error", err)
			}
			failing = true
			return
		}
		if failing {
			cp.log.Info("drift ledger readable again")
		}
		failing = false
		names := make([]string, 0, len(m))
		var total int64
		for n, c := range m {
			names = append(names, n.String())
			total += int64(c)
		}
		srv.SetDriftTables(names)
		pm.R().DriftOpen(total)
		cp.drift.Store(total)
		if _, stuck, err := table.StuckDrift(ctx, cp.pool, cp.cfg.Routing.DriftStuckAttempts, 0); err == nil {
			pm.R().DriftStuck(stuck)
		} else if ctx.Err() == nil {
			cp.log.Warn("cannot read the stuck drift entries", "error", err)
		}
	})
}

// repair drains the drift ledger every repair interval while mirroring is
// on, no write fence is up and the breaker is not open. Entries stale on
// the secondary are copied from the primary; entries stale on the primary
// (writes it missed as the secondary, before a write flip or a rollback)
// are copied from the secondary, first, with the lock order RepairPrimary
// keeps. An entry that fails is recorded on the entry and backs off
// (table.RepairWith); the pass goes on with the other entries and the
// other store (issue 10). A store error ends the pass, and the next one
// runs on fresh connections. Failures never stop the proxy.
func (cp *Plane) repair(ctx context.Context, srv Server) {
	conns := map[route.Store]*pgx.Conn{}
	closeAll := func() {
		for s, c := range conns {
			c.Close(context.WithoutCancel(ctx))
			delete(conns, s)
		}
	}
	defer closeAll()
	every(ctx, cp.cfg.Routing.RepairInterval.Duration(), func() {
		if srv.BreakerState() == "open" || cp.drift.Load() == 0 {
			return
		}
		select {
		case cp.repairSlot <- struct{}{}:
		case <-ctx.Done():
			return
		}
		defer func() { <-cp.repairSlot }()
		// The state is read and the pass made cancellable in one step, so
		// a fence applied after the read finds the pass to cancel.
		cp.repairMu.Lock()
		st := srv.State()
		if !st.Mirror || st.Fence != 0 {
			cp.repairMu.Unlock()
			return
		}
		pctx, cancel := context.WithCancel(ctx)
		defer cancel()
		cp.repairCancel = cancel
		cp.repairMu.Unlock()
		defer func() {
			cp.repairMu.Lock()
			cp.repairCancel = nil
			cp.repairMu.Unlock()
		}()

		if !cp.RepairPass(pctx, st, conns) {
			closeAll() // a store error, or a cancelled pass that may have left them mid-transaction
		}
	})
}

// RepairPass repairs the entries stale on st's primary, then those stale on
// its secondary, on conns (connecting what is missing). Entries that fail
// do not end it (their failures are on the entries); it returns false when
// a store error or the end of ctx did, and the connections must be
// replaced.
func (cp *Plane) RepairPass(ctx context.Context, st route.State, conns map[route.Store]*pgx.Conn) bool {
	for _, target := range []route.Store{st.Primary, st.Secondary()} {
		n, err := cp.repairOnce(ctx, st, target, conns)
		var failed *table.EntryFailures
		switch {
		case ctx.Err() != nil:
			return false
		case errors.As(err, &failed):
			cp.log.Warn("drift entries could not be repaired; each is retried after its backoff (tandem route show lists those stuck)",
				"failed", failed.Entries, "repaired", n, "stale", target, "error", err)
		case err != nil:
			cp.log.Warn("drift repair failed; retrying on fresh connections", "error", err, "stale", target, "repaired", n)
			return false
		case n > 0:
			cp.log.Info("drift repaired", "entries", n, "stale", target, "primary", st.Primary)
		}
	}
	return true
}

// stopRepair cancels a running repair pass and waits until it has ended,
// or ctx ends. The write fence is applied before it is called, so no new
// pass starts until the fence is released.
func (cp *Plane) stopRepair(ctx context.Context) error {
	cp.repairMu.Lock()
	if cp.repairCancel != nil {
		cp.repairCancel()
	}
	cp.repairMu.Unlock()
	select {
	case cp.repairSlot <- struct{}{}:
		<-cp.repairSlot
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// repairOnce repairs up to 1000 entries stale on target, from the other
// store, with the lock order that st's primary requires.
func (cp *Plane) repairOnce(ctx context.Context, st route.State, target route.Store, conns map[route.Store]*pgx.Conn) (int, error) {
	for _, s := range []route.Store{route.Old, route.New} {
		if conns[s] != nil && !conns[s].IsClosed() {
			continue
		}
		cc, err := StoreConnConfig(cp.cfg, s)
		if err != nil {
			return 0, err
		}
		c, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			return 0, fmt.Errorf("connecting to the %s store: %w", s, err)
		}
		conns[s] = c
	}
	pc, err := cp.pool.Acquire(ctx)
	if err != nil {
		return 0, fmt.Errorf("control database: %w", err)
	}
	defer pc.Release()
	source := route.Old
	if target == route.Old {
		source = route.New
	}
	return table.RepairWith(ctx, pc.Conn(), conns[source], conns[target], table.RepairOptions{
		Target: string(target), Limit: 1000, TargetIsPrimary: target == st.Primary, Mappings: cp.mappings.Load(),
		Backoff: table.Backoff{Base: cp.cfg.Routing.RepairInterval.Duration(), Max: cp.cfg.Routing.RepairBackoffMax.Duration()},
	})
}

// startFeed runs the change feed's election (and, when elected, the feed)
// until ctx ends: docs/change-feed.md.
func (cp *Plane) startFeed(ctx context.Context) error {
	oldCC, err := StoreConnConfig(cp.cfg, route.Old)
	if err != nil {
		return err
	}
	newCC, err := StoreConnConfig(cp.cfg, route.New)
	if err != nil {
		return err
	}
	r := feed.New(feed.Options{
		Control: cp.cc, Old: oldCC, New: newCC, Tables: cp.cfg.Tables, Replica: cp.replica, Names: FeedNamesOf(cp.cfg),
		WALWarn: int64(cp.cfg.Feed.WALWarn), WALMax: int64(cp.cfg.Feed.WALMax),
		// As tandem compare: a mirrored write reaches the secondary within
		// the mirror budget; twice that before a difference is confirmed.
		Settle: 2 * cp.cfg.Routing.MirrorBudget.Duration(),
		Delay:  cp.cfg.Routing.MirrorBudget.Duration(),
		Logger: cp.log, Metrics: cp.feedMetrics,
	})
	cp.g.Go(func() error { r.Run(ctx); return nil })
	return nil
}

// refreshBackfill reads the backfill's state from the control schema every
// poll interval into the backfill metrics, whichever process runs it.
func (cp *Plane) refreshBackfill(ctx context.Context, bm *metrics.Backfill) {
	failing := false
	every(ctx, cp.cfg.Routing.Poll.Duration(), func() {
		st, err := backfill.Status(ctx, cp.pool)
		if err != nil {
			if ctx.Err() == nil && !failing {
				cp.log.Warn("cannot read the backfill's state; keeping the last known metrics", "error", err)
			}
			failing = true
			return
		}
		failing = false
		snap := metrics.BackfillSnapshot{Rate: st.Rate, Paused: st.Paused}
		for _, t := range st.Tables {
			snap.Tables = append(snap.Tables, metrics.BackfillTable{Table: t.Table.String(), TotalRows: t.TotalRows, DoneRows: t.DoneRows,
				ChunksDone: int64(t.ChunksDone), ChunksFailed: int64(t.ChunksFailed), ChunksRunning: int64(t.ChunksRunning)})
		}
		bm.Set(snap)
	})
}

// Server is the part of the proxy (proxy.Server) the control plane drives:
// it applies the routing state the follower reads, drains writes for a
// fence, and takes the mappings, the open drift and the shadow counts. An
// interface, so the control plane does not import the proxy.
type Server interface {
	State() route.State
	ApplyState(st route.State)
	HeardState(readAt time.Time)
	DrainWrites(ctx context.Context) error
	BreakerState() string
	Writers() int64
	SetMappings(ms *table.Mappings)
	SetDriftTables(tables []string)
	TakeShadowCounts() map[string]mismatch.Counts
}

// Initial is the routing state Open read and when the read started: a
// proxy applies it before its first client (never serving on a routing
// state older than the stored one) and is that fresh until the follower's
// first heartbeat (routing.self_fence).
func (cp *Plane) Initial() (route.State, time.Time) { return cp.initial, cp.initialAt }

// Pool is the plane's pool of control-database connections.
func (cp *Plane) Pool() *pgxpool.Pool { return cp.pool }

// Mappings are the table mappings as last loaded (nil before the first
// load).
func (cp *Plane) Mappings() *table.Mappings { return cp.mappings.Load() }
