// Package compare verifies that a table on the new store holds what the
// mapping makes of the old store's table (design section 5, "Table
// verify"), and repairs what differs.
//
// Key ranges are hashed on each store, server-side, with the mapping's
// hash expressions (table.Mapping.HashSQL), so only a count and an md5 per
// range cross the network. A range whose hashes differ is bisected until it
// is small enough to fetch its keys and row hashes from both sides and diff
// them. Each difference is re-read on both stores before it is reported, so
// a live write between the two reads is counted as transient, not as a
// difference. Repair reuses the backfill's locked-copy unit
// (table.CopyKeysMapped), not a second implementation.
//
// compare shares internal/table with the backfill and never imports it.
package compare

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/sync/errgroup"
	"golang.org/x/time/rate"
)

// Kind is the type of one difference between the stores.
type Kind string

// The kinds of difference, as Ghostferry's inline verifier names them.
const (
	MissingOnNew Kind = "MissingOnNew" // the key is on old, not on new
	MissingOnOld Kind = "MissingOnOld" // the key is on new, not on old
	ValueDiff    Kind = "ValueDiff"    // both have the key, the mapped rows differ
)

// Difference is one confirmed difference: a key (the old table's key
// values as text, in key order) and how the stores disagree on it.
type Difference struct {
	Kind Kind     `json:"kind"`
	Key  []string `json:"key"`
}

// Options tune a verify. The zero value is usable.
type Options struct {
	// Batch is the number of old rows per top-level key range (default
	// 10000). Each range costs one hashing query on each store.
	Batch int
	// Leaf is the row count at or under which a mismatching range is
	// fetched as keys and row hashes and diffed, instead of bisected
	// further (default 1024: fetching 1024 rows' hashes costs less than bisecting further).
	Leaf int
	// Settle bounds how long a re-check waits for writes in flight to the
	// secondary to commit there, with the primary's table held: a write
	// committed on the primary reaches the secondary within the mirror
	// budget (default 1s).
	Settle time.Duration
	// PrimaryNew says new is the store of record (after a write flip): the
	// re-check then holds new's table and waits for writes to old.
	PrimaryNew bool
	// RangesOnly skips the first pass that hashes each whole table in one
	// query per store (see verifier.whole) and walks key ranges at once:
	// for tables under heavy writes, where that pass rarely agrees. A rate
	// limit implies it.
	RangesOnly bool
	// FetchMax bounds the bucketed pass, the first pass on stores that
	// hash records (verifier.bucketed): when the key buckets that differ hold more rows than this (default
	// 500000), their rows are not fetched and the range walk finds what
	// differs instead.
	FetchMax int
	// Workers is how many key ranges are hashed at once, each on both
	// stores and on a connection pair of its own, and how many page ranges
	// of each store the bucketed pass hashes at once (default 2).
	Workers int
	// Repair copies each confirmed difference from old to new with the
	// locked-copy unit.
	Repair bool
	// Rate is the most old rows per second the verify hashes (0 =
	// unlimited): after each top-level range the verify waits on a token
	// bucket for the range's row count. Table makes a bucket of its own
	// unless Limiter is set.
	Rate float64
	// Limiter, when set, is the token bucket Rate describes, shared by
	// every Table call given it, so a rate holds across a whole verify of
	// several tables (see NewLimiter).
	Limiter *rate.Limiter
	// Control is the connection config of the control database (the old
	// store unless configured elsewhere). With it, the verify records its
	// run in tandem.verify_runs with a checkpoint after every top-level
	// range, checks the table's open drift entries first, and logs each
	// repair in tandem.migration_log. Without it, the verify records
	// nothing and cannot be resumed. Table opens its own connection.
	Control *pgx.ConnConfig
	// Resume continues the table's latest run when it did not finish
	// (status running, interrupted or failed): from its checkpoint, with
	// its counts. Otherwise, and when there is no such run, a new run
	// starts from the beginning. Needs Control.
	Resume bool
	// Progress, when set, is called after every top-level range (and once
	// before the first), from the goroutine running Table.
	Progress func(Progress)
	// Logger receives one line per mismatching range; nil discards.
	Logger *slog.Logger
	// Knobs are injection points for tests; nil in production.
	Knobs *TestingKnobs
}

// TestingKnobs are the hooks tests use to observe a verify.
type TestingKnobs struct {
	// BeforePace is called each time the verify consults the rate
	// limiter, with the rows it waits for.
	BeforePace func(rows int)
	// TextHash hashes rows as md5 of their text even where both stores
	// could hash records, to test that path.
	TextHash bool
	// BeforeConfirm is called with the differences a pass found, before
	// their race-free re-check.
	BeforeConfirm func(found []Difference)
	// PageRanges is called with the page ranges (conditions on t.ctid)
	// the bucketed pass scans on old and on new, one connection each.
	PageRanges func(old, new []string)
}

// Progress is a table's verify so far.
type Progress struct {
	Table, NewTable table.Name
	Total           int64 // the old table's estimated rows (pg_class.reltuples, or count(*) when never analysed)
	Rows            int64 // old rows compared, including a resumed run's
	Ranges          int   // top-level ranges done, including a resumed run's
	Diffs           int   // confirmed differences so far
}

func (o Options) withDefaults() Options {
	if o.Batch < 1 {
		o.Batch = 10000
	}
	if o.Workers < 1 {
		o.Workers = 2
	}
	if o.Settle <= 0 {
		o.Settle = time.Second
	}
	if o.Leaf < 1 {
		o.Leaf = 1024
	}
	if o.FetchMax < 1 {
		o.FetchMax = 500000
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Limiter == nil && o.Rate > 0 {
		o.Limiter = NewLimiter(o.Rate, o.Batch)
	}
	return o
}

// NewLimiter returns a token bucket for Options.Limiter: r rows per
// second, with a burst of one batch (or of one second's rows when more).
func NewLimiter(r float64, batch int) *rate.Limiter {
	return rate.NewLimiter(rate.Limit(r), max(batch, int(r), 1))
}

// TableSummary is the result of verifying one table. A resumed run's
// counts include those of its sessions before; Diffs lists only the
// differences this session found.
type TableSummary struct {
	Table     string       `json:"table"`     // the old table
	NewTable  string       `json:"new_table"` // the new table
	Rows      int64        `json:"rows"`      // rows compared (old's count)
	Ranges    int          `json:"ranges"`    // top-level key ranges hashed
	Bisected  int          `json:"bisected"`  // ranges whose hashes differed, at any level (this session)
	Counts    map[Kind]int `json:"counts"`    // confirmed differences by kind
	Diffs     []Difference `json:"differences"`
	Transient int          `json:"transient"`  // differences that vanished on re-read
	Repaired  int          `json:"repaired"`   // differences fixed by --repair
	DriftKeys int          `json:"drift_keys"` // keys of open drift entries checked before the walk
	RunID     int64        `json:"run_id,omitempty"`
	Resumed   bool         `json:"resumed,omitempty"` // the run continued from a checkpoint
	// WholeTable: the whole table hashed equal on both stores in one pass.
	WholeTable bool `json:"whole_table,omitempty"`
	// Buckets is the number of key buckets the table was hashed in, when
	// that pass verified it without a range walk (stores that hash
	// records; Options.FetchMax).
	Buckets  int              `json:"buckets,omitempty"`
	Duration jsonout.Duration `json:"duration"`          // this session's, as text ("1.5s")
	Skipped  string           `json:"skipped,omitempty"` // why the table was not verified
}

// Differences returns the number of confirmed differences (Counts summed).
func (s TableSummary) Differences() int {
	n := 0
	for _, c := range s.Counts {
		n += c
	}
	return n
}

// Clean reports whether the table has no unrepaired difference: repaired
// differences count as clean, the data is now right.
func (s TableSummary) Clean() bool {
	return s.Skipped == "" && s.Differences() == s.Repaired
}

// SessionSQL is run on both connections by Table so that the rows' text,
// and so their hashes, are rendered the same way on both stores.
const SessionSQL = "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC'; SET extra_float_digits = 1"

// ErrNotComparable is wrapped when a table cannot be verified by key: it
// has no primary key, or the mapping does not carry the key column for
// column.
var ErrNotComparable = errors.New("table cannot be verified by key")

// verifier holds one table's verify.
type verifier struct {
	m        *table.Mapping
	old, new *pgx.Conn
	o, n     side
	opts     Options
	sum      *TableSummary
	found    []Difference
	run      *run                // nil without Options.Control
	seen     map[string]struct{} // keys checked as drift, not reported again by the walk
	total    int64               // the old table's estimated rows, for Progress
	pairs    []connPair          // the walk's connections: old and new first, then Workers-1 more
}

// Table verifies m's new table on new against its old table on old and,
// with opts.Repair, repairs the confirmed differences from old to new.
// It sets the session settings SessionSQL on both connections, which must
// not be in a transaction.
//
// With opts.Control, the open drift entries of the table (stale on new)
// are verified first, then the table is walked in key order from the
// start, or from the checkpoint of its unfinished run with opts.Resume;
// the run is recorded in tandem.verify_runs and ends done, failed, or
// interrupted when ctx is cancelled.
//
// It returns the summary; the error is for failures to read or record,
// and wraps ErrNotComparable for a table without a key or whose mapping
// does not preserve the key (then the summary says Skipped).
func Table(ctx context.Context, old, new *pgx.Conn, m *table.Mapping, opts Options) (TableSummary, error) {
	start := time.Now()
	opts = opts.withDefaults()
	sum := TableSummary{Table: m.Old.Name.String(), NewTable: m.New.Name.String(), Counts: map[Kind]int{}}
	newKey, ok := m.KeyPreserving()
	if !ok || !m.Old.HasKey() {
		sum.Skipped = "no primary key carried column for column from old to new"
		return sum, fmt.Errorf("verifying %s: %w", m.Old.Name, ErrNotComparable)
	}
	if opts.Resume && opts.Control == nil {
		return sum, fmt.Errorf("verifying %s: resuming needs the control database", m.Old.Name)
	}
	oldKey := make([]table.Column, len(m.Old.Key))
	for i, k := range m.Old.Key {
		oldKey[i] = m.Old.Columns[k]
	}
	record, err := bothAtLeast(ctx, 140000, old, new)
	if err != nil {
		return sum, fmt.Errorf("verifying %s: %w", m.Old.Name, err)
	}
	if opts.Knobs != nil && opts.Knobs.TextHash {
		record = false
	}
	hashSQL := m.HashSQL
	if record {
		hashSQL = m.RecordHashSQL
	}
	ho, err := hashSQL("old")
	if err != nil {
		return sum, err
	}
	hn, err := hashSQL("new")
	if err != nil {
		return sum, err
	}
	for _, c := range []*pgx.Conn{old, new} {
		if _, err := c.Exec(ctx, SessionSQL); err != nil {
			return sum, fmt.Errorf("verifying %s: session settings: %w", m.Old.Name, err)
		}
	}
	v := &verifier{m: m, old: old, new: new, o: newSide(m.Old.Name, oldKey, ho, record).filtered(m.Where()), n: newSide(m.New.Name, newKey, hn, record).filtered(m.NewWhere()), opts: opts, sum: &sum,
		seen: map[string]struct{}{}}
	if record {
		if v.o.seed, err = m.RecordHashSeedSQL("old"); err != nil {
			return sum, err
		}
		if v.n.seed, err = m.RecordHashSeedSQL("new"); err != nil {
			return sum, err
		}
	}
	if opts.Progress != nil {
		if v.total, err = estimate(ctx, old, m.Old.Name); err != nil {
			return sum, err
		}
	}
	var lo []string
	if opts.Control != nil {
		if v.run, lo, err = startRun(ctx, opts.Control, m, opts.Resume, &sum); err != nil {
			return sum, err
		}
		defer v.run.close()
	}
	pairs, closePairs, err := openPairs(ctx, old, new, opts.Workers)
	if err != nil {
		return sum, fmt.Errorf("verifying %s: %w", m.Old.Name, err)
	}
	defer closePairs()
	v.pairs = pairs
	err = v.verify(ctx, lo)
	sum.Duration = jsonout.Duration(time.Since(start))
	if v.run != nil {
		if ferr := v.run.finish(ctx, &sum, err); ferr != nil {
			err = errors.Join(err, ferr)
		}
	}
	slices.SortStableFunc(sum.Diffs, func(a, b Difference) int { return strings.Compare(string(a.Kind), string(b.Kind)) })
	return sum, err
}

// estimate returns n's row estimate from pg_class, or its count when the
// table was never analysed.
func estimate(ctx context.Context, q table.Querier, n table.Name) (int64, error) {
	if est, err := reltuples(ctx, q, n); err != nil || est >= 0 {
		return est, err
	}
	var c int64
	if err := q.QueryRow(ctx, "SELECT count(*) FROM "+n.Quoted()).Scan(&c); err != nil {
		return 0, fmt.Errorf("counting the rows of %s: %w", n, err)
	}
	return c, nil
}

// verify checks the drift keys (for a new run) and walks the table after
// lo (nil: from the start).
func (v *verifier) verify(ctx context.Context, lo []string) error {
	if v.run != nil && !v.sum.Resumed {
		if err := v.driftFirst(ctx); err != nil {
			return err
		}
	}
	v.progress()
	// A rate limit asks for a gentle verify: no whole-table scans.
	if lo == nil && !v.opts.RangesOnly && v.opts.Limiter == nil {
		// With record hashes, one bucketed pass verifies the table and
		// finds the differing rows, unless too many differ; with text
		// hashes, one whole-table pass, and the walk when it disagrees.
		var done bool
		var err error
		if v.o.seed != "" {
			done, err = v.bucketed(ctx)
		} else {
			done, err = v.whole(ctx)
		}
		if err != nil || done {
			return err
		}
	}
	return v.walk(ctx, lo)
}

// whole hashes the whole table on both stores at once, one query each
// (PostgreSQL may scan it in parallel). When the hashes agree the table is
// verified in that one pass; otherwise the range walk finds what differs
// (a live write between the two scans is enough), and the pass cost one
// scan of each store.
func (v *verifier) whole(ctx context.Context) (bool, error) {
	var oh, nh rangeHash
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { oh, err = v.o.hashRange(gctx, v.old, nil, nil); return })
	g.Go(func() (err error) { nh, err = v.n.hashRange(gctx, v.new, nil, nil); return })
	if err := g.Wait(); err != nil {
		return false, err
	}
	if oh != nh {
		v.opts.Logger.Debug("whole-table hashes differ; walking key ranges", "table", v.sum.Table, "old_rows", oh.n, "new_rows", nh.n)
		return false, nil
	}
	v.sum.Ranges, v.sum.Rows, v.sum.WholeTable = 1, oh.n, true
	v.progress()
	return true, nil
}

func (v *verifier) progress() {
	if v.opts.Progress == nil {
		return
	}
	v.opts.Progress(Progress{Table: v.m.Old.Name, NewTable: v.m.New.Name, Total: v.total, Rows: v.sum.Rows, Ranges: v.sum.Ranges,
		Diffs: v.sum.Differences()})
}

// pace waits on the rate limiter for n rows.
func (v *verifier) pace(ctx context.Context, n int) error {
	lim := v.opts.Limiter
	if lim == nil || n <= 0 {
		return nil
	}
	if v.opts.Knobs != nil && v.opts.Knobs.BeforePace != nil {
		v.opts.Knobs.BeforePace(n)
	}
	for n > 0 {
		k := min(n, lim.Burst())
		if err := lim.WaitN(ctx, k); err != nil {
			return fmt.Errorf("verifying %s: waiting for the rate limit: %w", v.sum.Table, err)
		}
		n -= k
	}
	return nil
}

// walk walks old in key order after lo, Batch rows per range; the last
// range runs to the end on new, so rows past old's last key are seen too.
// The cursor lo strictly advances: each range starts after the previous
// range's last key.
//
// Ranges go in windows of Workers: their ends are found on old with
// key-only queries (cheap, an index-only scan), then each range is hashed
// on both stores at once, the window's ranges in parallel on a pair of
// connections each. A range whose hashes differ is bisected on its pair,
// the window's at once. The window's differences are then confirmed (and
// repaired) together before any of its checkpoints is written, so a
// resumed run never skips a difference that was found but not yet
// settled.
func (v *verifier) walk(ctx context.Context, lo []string) error {
	type span struct {
		lo, hi []string
		final  bool
		oh, nh rangeHash
		// found are the differences bisect found, to be confirmed.
		found    []Difference
		bisected int
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		// The window's ranges.
		var win []*span
		cur := lo
		for len(win) < len(v.pairs) {
			last, err := v.o.rangeEnd(ctx, v.old, cur, v.opts.Batch)
			if err != nil {
				return err
			}
			win = append(win, &span{lo: cur, hi: last, final: last == nil})
			if last == nil {
				break
			}
			if cur != nil && joinKey(last) == joinKey(cur) {
				return fmt.Errorf("verifying %s: the key cursor did not advance past %v", v.sum.Table, cur)
			}
			cur = last
		}
		// Hash them: every range on both stores at once.
		g, gctx := errgroup.WithContext(ctx)
		for k, sp := range win {
			pr := v.pairs[k]
			g.Go(func() (err error) { sp.oh, err = v.o.hashRange(gctx, pr.old, sp.lo, sp.hi); return })
			g.Go(func() (err error) { sp.nh, err = v.n.hashRange(gctx, pr.new, sp.lo, sp.hi); return })
		}
		if err := g.Wait(); err != nil {
			return err
		}
		// Bisect the differing ones, each on its pair, all at once.
		g, gctx = errgroup.WithContext(ctx)
		for k, sp := range win {
			if sp.oh != sp.nh {
				g.Go(func() (err error) {
					sp.found, sp.bisected, err = v.bisect(gctx, v.pairs[k], sp.lo, sp.hi, sp.oh, sp.nh)
					return
				})
			}
		}
		if err := g.Wait(); err != nil {
			return err
		}
		// Confirm (and repair) the window's differences in one re-check,
		// then record its ranges in key order.
		for _, sp := range win {
			v.sum.Bisected += sp.bisected
			v.found = append(v.found, sp.found...)
		}
		if err := v.settle(ctx); err != nil {
			return err
		}
		for _, sp := range win {
			v.sum.Ranges++
			v.sum.Rows += sp.oh.n
			if sp.final {
				v.progress()
				return nil
			}
			lo = sp.hi
			if v.run != nil {
				if err := v.run.checkpoint(ctx, lo, v.sum); err != nil {
					return err
				}
			}
			v.progress()
			if err := v.pace(ctx, int(sp.oh.n)); err != nil {
				return err
			}
		}
	}
}

// connPair is one connection to each store.
type connPair struct{ old, new *pgx.Conn }

// openPairs returns n connection pairs for the walk: the main connections
// and n-1 more, with the session settings; close closes the extra ones.
func openPairs(ctx context.Context, old, new *pgx.Conn, n int) (pairs []connPair, close func(), err error) {
	pairs = []connPair{{old, new}}
	close = func() {
		for _, p := range pairs[1:] {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			_ = p.old.Close(cctx)
			_ = p.new.Close(cctx)
			cancel()
		}
	}
	for len(pairs) < n {
		var p connPair
		if p.old, err = pgx.ConnectConfig(ctx, old.Config().Copy()); err != nil {
			close()
			return nil, nil, fmt.Errorf("connecting to the old store: %w", err)
		}
		if p.new, err = pgx.ConnectConfig(ctx, new.Config().Copy()); err != nil {
			_ = p.old.Close(ctx)
			close()
			return nil, nil, fmt.Errorf("connecting to the new store: %w", err)
		}
		pairs = append(pairs, p)
		for _, c := range []*pgx.Conn{p.old, p.new} {
			if _, err := c.Exec(ctx, SessionSQL); err != nil {
				close()
				return nil, nil, fmt.Errorf("session settings: %w", err)
			}
		}
	}
	return pairs, close, nil
}

// settle confirms the differences found so far, minus the keys already
// checked as drift, and repairs them with Options.Repair.
func (v *verifier) settle(ctx context.Context) error {
	found := v.found[:0:0]
	for _, d := range v.found {
		if _, ok := v.seen[joinKey(d.Key)]; !ok {
			found = append(found, d)
		}
	}
	v.found = v.found[:0]
	diffs, err := v.confirm(ctx, found)
	if err != nil || !v.opts.Repair || len(diffs) == 0 {
		return err
	}
	keys := make([][]string, len(diffs))
	for i, d := range diffs {
		keys[i] = d.Key
	}
	if err := v.repair(ctx, keys, nil); err != nil {
		return err
	}
	v.sum.Repaired += len(diffs)
	return nil
}

// repair copies keys from old to new with the locked-copy unit and logs
// the batch in the migration log through logTo (the run's control
// connection when nil; nothing without a run).
func (v *verifier) repair(ctx context.Context, keys [][]string, logTo table.Execer) error {
	start := time.Now()
	if _, err := table.CopyKeysMapped(ctx, v.old, v.new, v.m, true, keys); err != nil {
		return fmt.Errorf("repairing %s: %w", v.m.Old.Name, err)
	}
	if v.run == nil {
		return nil
	}
	if logTo == nil {
		logTo = v.run.conn
	}
	return table.LogUnit(ctx, logTo, table.LogEntry{Table: v.m.Old.Name, Lo: keys[0], Hi: keys[len(keys)-1], LoInclusive: true,
		Rows: len(keys), Status: table.LogRepaired, Duration: time.Since(start), Worker: v.run.worker, Source: table.LogSourceCompare})
}
