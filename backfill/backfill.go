package backfill

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/sync/errgroup"
	"golang.org/x/time/rate"
)

// Options configure a backfill. Control, Primary and Secondary are
// connection configs: each worker opens its own connections.
type Options struct {
	Control, Primary, Secondary *pgx.ConnConfig
	// Mappings are the migration's table mappings (table.LoadMappings).
	Mappings *table.Mappings
	// Tables are the old tables to backfill; empty = every usable mapping.
	Tables []table.Name
	// Key, when set, copies exactly the row with this key (one table only).
	Key []string
	// RangeLo and RangeHi, when set, copy the keys from RangeLo to RangeHi
	// inclusive (one table only). Neither Key nor a range uses the chunk
	// table; both are logged in the migration log.
	RangeLo, RangeHi []string

	Workers   int     // goroutines in this process; default 4
	Chunk     int     // rows per locked-copy unit; default 1000
	RangeRows int     // rows per claimed chunk when planning; default 50000
	Rate      float64 // rows per second; 0 = unlimited
	Restart   bool    // forget the tables' chunks and checkpoints and start over
	DryRun    bool    // plan and report, write nothing

	MaxAttempts int           // claims of a failing chunk per run; default 3
	Backoff     time.Duration // before a failed chunk's next claim, doubled per attempt; default 1s
	// LatencyBound, when positive, pauses the copy while a SELECT 1 probe on
	// the primary, every ProbeEvery (default 1s), takes longer than it.
	LatencyBound time.Duration
	ProbeEvery   time.Duration
	// Poll is how often an idle worker looks for a claimable chunk while
	// others still work; default 200ms.
	Poll time.Duration
	// ControlPoll is how often the engine reads the live control row
	// (tandem.backfill_control: rate and pause, shared by every process);
	// default 1s.
	ControlPoll time.Duration

	WorkerID string // prefix of the worker ids; default host:pid
	Logger   *slog.Logger

	// Live is how recently a proxy replica must have been heard from to
	// count as live (see WaitMirrorSettled); default 15s.
	Live time.Duration
	// SettleTimeout bounds the wait, before the first chunk, for every
	// live replica to acknowledge mirror=on and for every transaction
	// that began before that on the primary to end; default 5 minutes.
	SettleTimeout time.Duration
	// Feed: the change feed is enabled (feed.enabled). The first chunk
	// then also waits until the feed reads the primary's WAL: a write
	// committed after a chunk was copied and before the feed's slot
	// existed would otherwise be seen by neither (a trigger's side-write,
	// a write that bypasses the proxy).
	Feed bool
	// FeedNames are the feed's slot names (feed.name), whose slot on the
	// primary the first chunk waits for.
	FeedNames route.FeedNames

	// Path chooses how chunks are copied: PathAuto (the default) takes
	// the snapshot path where the old store allows it, PathSnapshot and
	// PathLocked force one. A key or a range is always copied under lock.
	Path Path

	// DeferIndexes drops the new tables' deferrable indexes (see
	// deferrableSQL: never a key, unique, exclusion, replica identity or
	// constraint index) before the copy, their definitions saved first in
	// tandem.backfill_deferred_indexes, and rebuilds them with CREATE INDEX
	// CONCURRENTLY, up to Workers at once, once the tables are finished. A
	// run without it rebuilds, before it copies, whatever a deferred run
	// left dropped.
	DeferIndexes bool

	hooks snapshotHooks
}

func (o *Options) defaults() {
	if o.Workers < 1 {
		o.Workers = 4
	}
	if o.Chunk < 1 {
		o.Chunk = 1000
	}
	if o.RangeRows < 1 {
		o.RangeRows = 50000
	}
	if o.MaxAttempts < 1 {
		o.MaxAttempts = 3
	}
	if o.Backoff <= 0 {
		o.Backoff = time.Second
	}
	if o.ProbeEvery <= 0 {
		o.ProbeEvery = time.Second
	}
	if o.Poll <= 0 {
		o.Poll = 200 * time.Millisecond
	}
	if o.ControlPoll <= 0 {
		o.ControlPoll = time.Second
	}
	if o.WorkerID == "" {
		h, _ := os.Hostname()
		o.WorkerID = fmt.Sprintf("%s:%d", h, os.Getpid())
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Path == "" {
		o.Path = PathAuto
	}
}

// TableProgress is one table's progress, as the CLI's bars show it.
type TableProgress struct {
	Table        table.Name `json:"table"`
	Total        int64      `json:"total_rows"` // estimated at planning
	Done         int64      `json:"done_rows"`
	Chunks       int        `json:"chunks"`
	ChunksDone   int        `json:"chunks_done"`
	ChunksFailed int        `json:"chunks_failed"`
	FailedKeys   int        `json:"failed_keys"`
	// The snapshot path's chunks by how they were loaded: StraightChunks
	// with COPY straight into the table (its range was empty on new),
	// StagedChunks through the staging table; StraightRaced of the staged
	// ones had a mirrored write race into their range during the straight
	// COPY, which failed rather than overwrite it.
	StraightChunks int    `json:"chunks_straight"`
	StagedChunks   int    `json:"chunks_staged"`
	StraightRaced  int    `json:"chunks_straight_raced"`
	Skipped        string `json:"skipped,omitempty"` // why the table is not copied (finished, no key, ...)
}

// Engine runs one backfill. Its methods are safe for concurrent use; Run
// is called once.
type Engine struct {
	o       Options
	limiter *rate.Limiter

	mu       sync.Mutex
	paused   bool
	guarded  bool
	probe    time.Duration
	changed  chan struct{} // closed and replaced when paused or guarded change
	progress map[table.Name]*tableState
	order    []table.Name
	control  Control // the control row last applied; only Run's goroutines use it, in turn

	path       Path // the copy path taken, and why (Path)
	pathReason string
	slot       *slotState // the snapshot backfill's slot, when one is recorded
	snap       *snapshot  // the snapshot the workers load from; nil on the locked path
	reconciled bool       // the slot's changes were reconciled and the slot dropped
	// slotForeign: another process owns the slot (and its reconcile).
	slotForeign bool
}

type tableState struct {
	p    TableProgress
	done atomic.Int64
	m    *table.Mapping
}

// New checks opts and returns an engine.
func New(opts Options) (*Engine, error) {
	opts.defaults()
	if opts.Control == nil || opts.Primary == nil || opts.Secondary == nil {
		return nil, errors.New("backfill: the control, primary and secondary connection configs are required")
	}
	if opts.Mappings == nil {
		return nil, errors.New("backfill: the mappings are required")
	}
	if opts.Key != nil && opts.RangeLo != nil {
		return nil, errors.New("backfill: a key and a range exclude each other")
	}
	if (opts.RangeLo == nil) != (opts.RangeHi == nil) {
		return nil, errors.New("backfill: a range needs both ends")
	}
	if (opts.Key != nil || opts.RangeLo != nil) && len(opts.Tables) != 1 {
		return nil, errors.New("backfill: a key or a range needs exactly one table")
	}
	if _, err := ParsePath(string(opts.Path)); err != nil {
		return nil, err
	}
	if opts.Path == PathSnapshot && (opts.Key != nil || opts.RangeLo != nil) {
		return nil, errors.New("backfill: a key or a range is copied under lock, not from a snapshot")
	}
	if opts.Rate < 0 {
		return nil, fmt.Errorf("backfill: the rate must be >= 0, got %v", opts.Rate)
	}
	e := &Engine{o: opts, changed: make(chan struct{}), progress: map[table.Name]*tableState{}}
	e.limiter = rate.NewLimiter(rate.Inf, opts.Chunk)
	e.SetRate(opts.Rate)
	return e, nil
}

// Progress returns every table's progress, in the order planned.
func (e *Engine) Progress() []TableProgress {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]TableProgress, 0, len(e.order))
	for _, n := range e.order {
		ts := e.progress[n]
		p := ts.p
		p.Done = ts.done.Load()
		out = append(out, p)
	}
	return out
}

// Summary is what a run did.
type Summary struct {
	Tables   []TableProgress
	Duration time.Duration
	Failed   bool // some key or chunk failed: see the migration log (Report)
	// IndexesDeferred is how many indexes of the new store this run
	// dropped for the copy (DeferIndexes), IndexesRebuilt how many it built
	// again (its own, or those an earlier run left).
	IndexesDeferred int
	IndexesRebuilt  int
}

// stores are Run's own connections.
type stores struct {
	control, primary, secondary *pgx.Conn
}

func (s *stores) close(ctx context.Context) {
	for _, c := range []*pgx.Conn{s.control, s.primary, s.secondary} {
		if c != nil {
			c.Close(context.WithoutCancel(ctx))
		}
	}
}

// Run runs the backfill until every claimable chunk is done or has failed
// MaxAttempts times, or ctx ends. A chunk's claim lasts as long as the
// worker's control transaction: when the process dies, the chunk becomes
// claimable again and resumes from its checkpoint.
func (e *Engine) Run(ctx context.Context) (Summary, error) {
	start := time.Now()
	o := &e.o
	st, err := e.open(ctx)
	defer st.close(ctx)
	if err != nil {
		return Summary{}, err
	}
	tables, err := e.tables()
	if err != nil {
		return Summary{}, err
	}
	if o.Key != nil || o.RangeLo != nil {
		e.usePath(PathLocked, "a key or a range is copied under lock")
		err := e.single(ctx, st.control, st.primary, st.secondary, tables[0])
		return Summary{Tables: e.Progress(), Duration: time.Since(start), Failed: err != nil}, err
	}
	for _, m := range tables {
		// Progress reads what plan writes: planning holds the lock.
		e.mu.Lock()
		err := e.plan(ctx, st.control, st.primary, st.secondary, m)
		e.mu.Unlock()
		if err != nil {
			return Summary{}, err
		}
	}
	if o.DryRun {
		return Summary{Tables: e.Progress(), Duration: time.Since(start)}, nil
	}
	run := e.runnable()
	var sum Summary
	if err := e.prepareRun(ctx, st, run, &sum); err != nil {
		return sum, err
	}
	defer e.closeSnapshot(ctx)
	werr := e.copyRun(ctx, st, run)
	if werr == nil {
		werr = e.finish(ctx, st.control, run)
	}
	if werr == nil && o.DeferIndexes {
		var n int
		n, werr = e.rebuildIndexes(ctx, st.control, e.finishedFilter(ctx, st.control))
		sum.IndexesRebuilt += n
	}
	sum.Tables, sum.Duration = e.Progress(), time.Since(start)
	for _, t := range sum.Tables {
		if t.ChunksFailed > 0 || t.FailedKeys > 0 {
			sum.Failed = true
		}
	}
	return sum, werr
}

// open connects Run's stores and checks what must hold before anything is
// planned or copied: mirror on (the ordering rule: before the backfill
// reads its first chunk), mirror=on settled and the feed reading; then it
// creates the backfill's tables and applies the control row.
func (e *Engine) open(ctx context.Context) (*stores, error) {
	o := &e.o
	st := &stores{}
	var err error
	if st.control, err = pgx.ConnectConfig(ctx, o.Control.Copy()); err != nil {
		return st, fmt.Errorf("connecting to the control database: %w", err)
	}
	if err := CheckMirror(ctx, st.control); err != nil {
		return st, err
	}
	if st.secondary, err = pgx.ConnectConfig(ctx, o.Secondary.Copy()); err != nil {
		return st, fmt.Errorf("connecting to the new store: %w", err)
	}
	if st.primary, err = pgx.ConnectConfig(ctx, o.Primary.Copy()); err != nil {
		return st, fmt.Errorf("connecting to the old store: %w", err)
	}
	if o.DryRun {
		return st, nil
	}
	if err := WaitMirrorSettled(ctx, st.control, st.primary, o.Live, o.SettleTimeout, o.Logger); err != nil {
		return st, err
	}
	if err := WaitFeedReading(ctx, st.control, st.primary, o.Feed, o.FeedNames, o.SettleTimeout, o.Logger); err != nil {
		return st, err
	}
	if err := EnsureSchema(ctx, st.control, st.secondary); err != nil {
		return st, err
	}
	return st, e.startControl(ctx, st.control)
}

// runnable returns the planned tables that are not skipped.
func (e *Engine) runnable() []table.Name {
	var run []table.Name
	for _, n := range e.order {
		if e.progress[n].p.Skipped == "" {
			run = append(run, n)
		}
	}
	return run
}

// prepareRun readies the copy of run: the chunks a previous run gave up on
// are retried, the new store's indexes are deferred (DeferIndexes) or
// those an earlier deferred run left dropped are rebuilt first (without
// it), and the copy path is chosen (prepareSnapshot).
func (e *Engine) prepareRun(ctx context.Context, st *stores, run []table.Name, sum *Summary) error {
	schemas, names := split(run)
	if _, err := st.control.Exec(ctx, `UPDATE tandem.backfill_chunks SET attempts = 0, next_attempt_at = NULL
		WHERE status = 'failed' AND (schema_name, table_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))`, schemas, names); err != nil {
		return fmt.Errorf("resetting failed chunks: %w", err)
	}
	if e.o.DeferIndexes {
		ms := make([]*table.Mapping, 0, len(run))
		for _, n := range run {
			ms = append(ms, e.progress[n].m)
		}
		n, err := e.deferIndexes(ctx, st.control, st.secondary, ms)
		sum.IndexesDeferred += n
		if err != nil {
			return err
		}
	} else {
		n, err := e.rebuildIndexes(ctx, st.control, nil)
		sum.IndexesRebuilt += n
		if err != nil {
			return err
		}
	}
	return e.prepareSnapshot(ctx, st.control, st.primary, st.secondary, run)
}

// copyRun runs the workers over run with the throttle (the latency guard,
// on a connection of its own, and the live control row), then the
// reconcile of the snapshot's slot when this process owns it.
func (e *Engine) copyRun(ctx context.Context, st *stores, run []table.Name) error {
	o := &e.o
	g, gctx := errgroup.WithContext(ctx)
	guardCtx, stopGuard := context.WithCancel(ctx)
	var bg sync.WaitGroup
	defer func() { stopGuard(); bg.Wait() }()
	if o.LatencyBound > 0 {
		probe, err := pgx.ConnectConfig(ctx, o.Primary.Copy())
		if err != nil {
			return fmt.Errorf("connecting to the old store: %w", err)
		}
		defer probe.Close(context.WithoutCancel(ctx))
		bg.Go(func() { e.guard(guardCtx, probe) })
	}
	bg.Go(func() { e.followControl(guardCtx) })
	for i := range o.Workers {
		id := fmt.Sprintf("%s:%d", o.WorkerID, i)
		g.Go(func() error { return e.worker(gctx, id, run) })
	}
	werr := g.Wait()
	e.closeSnapshot(ctx)
	if werr == nil && e.slot != nil && !e.slotForeign {
		werr = e.reconcile(ctx, st.control, st.primary, st.secondary)
	}
	return werr
}

// finishedFilter reports, per new table, whether its old table's backfill
// has finished (false when that cannot be read).
func (e *Engine) finishedFilter(ctx context.Context, control *pgx.Conn) func(table.Name) bool {
	done := map[table.Name]bool{}
	rows, err := control.Query(ctx, `SELECT schema_name, table_name FROM tandem.backfill_tables WHERE finished_at IS NOT NULL`)
	if err == nil {
		names, cerr := pgx.CollectRows(rows, func(r pgx.CollectableRow) (table.Name, error) {
			var n table.Name
			return n, r.Scan(&n.Schema, &n.Table)
		})
		for _, n := range names {
			done[n] = true
		}
		err = cerr
	}
	if err != nil {
		e.o.Logger.Warn("backfill: reading the finished tables", "err", err)
	}
	return func(n table.Name) bool {
		m := e.o.Mappings.ForNew(n)
		return m != nil && done[m.Old.Name]
	}
}

// tables returns the mappings to backfill, registering each in the progress.
func (e *Engine) tables() ([]*table.Mapping, error) {
	var ms []*table.Mapping
	if len(e.o.Tables) == 0 {
		// One unit per old table: a split's owner copies every part, a
		// merge's owner every member's rows of its keys.
		for _, m := range e.o.Mappings.All() {
			if m.Owner() && !m.MergeMember() {
				ms = append(ms, m)
			}
		}
	} else {
		for _, n := range e.o.Tables {
			if !e.o.Mappings.InScope(n) {
				return nil, fmt.Errorf("table %s is not in the migration's scope (tables.include / tables.exclude)", n)
			}
			m := e.o.Mappings.ForOld(n)
			if m == nil {
				return nil, fmt.Errorf("table %s has no usable mapping (see tandem mappings check)", n)
			}
			if m.MergeMember() {
				return nil, fmt.Errorf("table %s is merged into %s, whose rows the backfill of %s (the merge's owner) copies with its own: backfill %s",
					n, m.New.Name, m.Members()[0].Old.Name, m.Members()[0].Old.Name)
			}
			ms = append(ms, m)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, m := range ms {
		n := m.Old.Name
		e.progress[n] = &tableState{p: TableProgress{Table: n}, m: m}
		e.order = append(e.order, n)
	}
	return ms, nil
}

// onNew is the name the old table n's progress is recorded under in the
// tables the new store holds (tandem.backfill_checkpoints and
// backfill_recheck): with a discriminator, the deployment's
// (table.Mapping.CheckpointName), so two deployments consolidating tables
// of one old name into one new store keep their checkpoints apart.
func (e *Engine) onNew(n table.Name) table.Name {
	if m := e.o.Mappings.ForOld(n); m != nil {
		return m.CheckpointName()
	}
	return n
}

// onNewAll is onNew of each of ns.
func (e *Engine) onNewAll(ns []table.Name) []table.Name {
	out := make([]table.Name, len(ns))
	for i, n := range ns {
		out[i] = e.onNew(n)
	}
	return out
}

func split(ns []table.Name) (schemas, names []string) {
	for _, n := range ns {
		schemas = append(schemas, n.Schema)
		names = append(names, n.Table)
	}
	return schemas, names
}

// plan creates the table's chunks unless they exist (resume) or the table
// is finished (skipped); Restart forgets both first. Planning is
// serialised across processes with an advisory lock.
func (e *Engine) plan(ctx context.Context, control, primary, secondary *pgx.Conn, m *table.Mapping) error {
	o := &e.o
	n := m.Old.Name
	ts := e.progress[n]
	if !m.Old.HasKey() {
		ts.p.Skipped = "no primary key: the backfill copies in key order"
		return nil
	}
	if o.DryRun {
		_, rows, err := table.SplitKeys(ctx, primary, m, 1, 0)
		if err != nil {
			return err
		}
		ts.p.Total, ts.p.Chunks = rows, e.chunks(rows)
		var fin *time.Time
		err = control.QueryRow(ctx, `SELECT finished_at FROM tandem.backfill_tables WHERE schema_name = $1 AND table_name = $2`, n.Schema, n.Table).Scan(&fin)
		if err == nil && fin != nil && !o.Restart {
			ts.p.Skipped = "finished at " + fin.Format(time.RFC3339)
		}
		return nil
	}
	if o.Restart {
		ck := e.onNew(n)
		if _, err := secondary.Exec(ctx, `DELETE FROM tandem.backfill_checkpoints WHERE schema_name = $1 AND table_name = $2`, ck.Schema, ck.Table); err != nil {
			return fmt.Errorf("restarting %s: %w", n, err)
		}
	}
	return pgx.BeginFunc(ctx, control, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('tandem.backfill.plan'))"); err != nil {
			return err
		}
		if o.Restart {
			for _, t := range []string{"backfill_chunks", "backfill_tables"} {
				if _, err := tx.Exec(ctx, "DELETE FROM tandem."+t+" WHERE schema_name = $1 AND table_name = $2", n.Schema, n.Table); err != nil {
					return fmt.Errorf("restarting %s: %w", n, err)
				}
			}
		}
		var total int64
		var chunks int
		var fin *time.Time
		err := tx.QueryRow(ctx, `SELECT total_rows, chunks, finished_at FROM tandem.backfill_tables WHERE schema_name = $1 AND table_name = $2`,
			n.Schema, n.Table).Scan(&total, &chunks, &fin)
		switch {
		case err == nil:
			ts.p.Total, ts.p.Chunks = total, chunks
			if fin != nil {
				ts.p.Skipped = "finished at " + fin.Format(time.RFC3339) + " (--restart copies it again)"
				ts.done.Store(total)
				ts.p.ChunksDone = chunks
				return nil
			}
			return e.loadDone(ctx, tx, secondary, ts)
		case !errors.Is(err, pgx.ErrNoRows):
			return fmt.Errorf("planning %s: %w", n, err)
		}
		_, rows, err := table.SplitKeys(ctx, primary, m, 1, 0)
		if err != nil {
			return err
		}
		nChunks := e.chunks(rows)
		bounds, _, err := table.SplitKeys(ctx, primary, m, nChunks, sampleRows(nChunks))
		if err != nil {
			return err
		}
		if bounds == nil {
			bounds = [][]string{}
		}
		b, err := json.Marshal(bounds)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO tandem.backfill_tables (schema_name, table_name, total_rows, chunks) VALUES ($1, $2, $3, $4)`,
			n.Schema, n.Table, rows, len(bounds)+1); err != nil {
			return fmt.Errorf("planning %s: %w", n, err)
		}
		// Chunk i covers (bound i-1, bound i]: the first from the start,
		// the last to the end.
		if _, err := tx.Exec(ctx, `INSERT INTO tandem.backfill_chunks (schema_name, table_name, chunk, lo, hi)
			SELECT $1, $2, i - 1,
				CASE WHEN i > 1 THEN ARRAY(SELECT jsonb_array_elements_text(b->(i - 2))) END,
				CASE WHEN i <= jsonb_array_length(b) THEN ARRAY(SELECT jsonb_array_elements_text(b->(i - 1))) END
			FROM (SELECT coalesce($3::jsonb, '[]'::jsonb) AS b) x, generate_series(1, jsonb_array_length(b) + 1) AS i`,
			n.Schema, n.Table, string(b)); err != nil {
			return fmt.Errorf("planning %s: %w", n, err)
		}
		ts.p.Total, ts.p.Chunks = rows, len(bounds)+1
		return nil
	})
}

// chunks is how many chunks a table of rows rows is split into: one per
// RangeRows, at least two per worker, at most one per Chunk rows.
func (e *Engine) chunks(rows int64) int {
	n := int(math.Ceil(float64(rows) / float64(e.o.RangeRows)))
	n = max(n, 2*e.o.Workers)
	n = min(n, int(rows/int64(e.o.Chunk)))
	return max(n, 1)
}

func sampleRows(chunks int) int { return max(10000, 100*chunks) }

// loadDone reads a resumed table's progress: the chunks done and failed
// from the control database, the rows copied from the checkpoints.
func (e *Engine) loadDone(ctx context.Context, tx pgx.Tx, secondary *pgx.Conn, ts *tableState) error {
	n := ts.p.Table
	if err := tx.QueryRow(ctx, `SELECT count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed')
		FROM tandem.backfill_chunks WHERE schema_name = $1 AND table_name = $2`, n.Schema, n.Table).Scan(&ts.p.ChunksDone, &ts.p.ChunksFailed); err != nil {
		return fmt.Errorf("resuming %s: %w", n, err)
	}
	ts.p.ChunksFailed = 0 // retried by this run
	var rows int64
	ck := e.onNew(n)
	if err := secondary.QueryRow(ctx, `SELECT coalesce(sum(rows), 0) FROM tandem.backfill_checkpoints WHERE schema_name = $1 AND table_name = $2`,
		ck.Schema, ck.Table).Scan(&rows); err != nil {
		return fmt.Errorf("resuming %s: %w", n, err)
	}
	ts.done.Store(rows)
	return nil
}

// finish marks the tables whose chunks are all done as finished; the
// tables of an unreconciled snapshot backfill wait for its reconcile.
func (e *Engine) finish(ctx context.Context, control *pgx.Conn, run []table.Name) error {
	if e.slot != nil && e.reconciled {
		run = append(slices.Clone(run), e.slot.tables...)
	} else if e.slot != nil {
		run = slices.DeleteFunc(slices.Clone(run), func(n table.Name) bool { return slices.Contains(e.slot.tables, n) })
	}
	schemas, names := split(run)
	_, err := control.Exec(ctx, `UPDATE tandem.backfill_tables t SET finished_at = now()
		WHERE finished_at IS NULL AND (schema_name, table_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))
		AND NOT EXISTS (SELECT 1 FROM tandem.backfill_chunks c WHERE c.schema_name = t.schema_name AND c.table_name = t.table_name AND c.status <> 'done')`,
		schemas, names)
	if err != nil {
		return fmt.Errorf("marking finished tables: %w", err)
	}
	return nil
}

func keysEqual(a, b []string) bool { return a != nil && b != nil && slices.Equal(a, b) }
