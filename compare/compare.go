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
	"github.com/tandemdb/tandem/internal/jsonout"
	"golang.org/x/sync/errgroup"
	"log/slog"
	"math/big"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/table"
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
	// Workers is how many key ranges are hashed at once, each on both
	// stores and on a connection pair of its own (default 2).
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
	WholeTable bool             `json:"whole_table,omitempty"`
	Duration   jsonout.Duration `json:"duration"`          // this session's, as text ("1.5s")
	Skipped    string           `json:"skipped,omitempty"` // why the table was not verified
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

// side is the SQL of one store's half of the verify.
type side struct {
	name  table.Name
	key   []table.Column
	hash  string // the row hash expression over alias t, as text
	order string // t."k1", t."k2"
	// rowHash is the row hash as it is aggregated; agg aggregates a
	// range's row hashes ($ stands for them) into one text.
	rowHash, agg string
	// record: the range hash is a sum of row hashes (see rangeHash.minus).
	record bool
}

// newSide builds one store's SQL. With record (both stores on PostgreSQL
// 14 or later) the row hash is hash_record_extended's bigint and a range's
// hash their sum, which needs no sort; otherwise the md5 of the row's text
// and the md5 of those in key order.
func newSide(name table.Name, key []table.Column, hash string, record bool) side {
	cols := make([]string, len(key))
	for i, c := range key {
		cols[i] = "t." + quoteIdent(c.Name)
	}
	s := side{name: name, key: key, hash: hash, rowHash: hash, order: strings.Join(cols, ", "), record: record}
	if record {
		s.hash = hash + "::text"
		s.agg = "coalesce(sum($)::text, '')"
	} else {
		s.agg = "coalesce(md5(string_agg($, '' ORDER BY %s)), '')"
	}
	return s
}

// aggregate is the range hash over the row hashes h, ordered by order when
// the aggregate needs an order.
func (s side) aggregate(h, order string) string {
	a := strings.Replace(s.agg, "$", h, 1)
	if strings.Contains(a, "%s") {
		a = fmt.Sprintf(a, order)
	}
	return a
}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// keyText is ARRAY[t."k1"::text, ...].
func (s side) keyText() string {
	parts := make([]string, len(s.key))
	for i, c := range s.key {
		parts[i] = "t." + quoteIdent(c.Name) + "::text"
	}
	return "ARRAY[" + strings.Join(parts, ", ") + "]"
}

// tuple returns ($n::t1, ...) for a key given as parameters from n.
func (s side) tuple(n int) string {
	parts := make([]string, len(s.key))
	for i, c := range s.key {
		parts[i] = "$" + strconv.Itoa(n+i) + "::" + c.ParamType
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

// cond returns the condition "after lo, at most hi" (nil = unbounded) and
// its arguments.
func (s side) cond(lo, hi []string) (string, []any) {
	var conds []string
	var args []any
	if lo != nil {
		conds = append(conds, "("+s.order+") > "+s.tuple(len(args)+1))
		for _, v := range lo {
			args = append(args, v)
		}
	}
	if hi != nil {
		conds = append(conds, "("+s.order+") <= "+s.tuple(len(args)+1))
		for _, v := range hi {
			args = append(args, v)
		}
	}
	if len(conds) == 0 {
		return "true", nil
	}
	return strings.Join(conds, " AND "), args
}

// rangeHash is a range's row count and hash on one store.
type rangeHash struct {
	n    int64
	hash string
}

// minus returns the hash of r's rows that are not in part, a subrange of
// r, when range hashes are sums of row hashes (side.record): counts and
// sums subtract. An empty range's sum is "".
func (r rangeHash) minus(part rangeHash) rangeHash {
	sum := func(s string) *big.Int {
		n, ok := new(big.Int).SetString(s, 10)
		if !ok {
			return new(big.Int)
		}
		return n
	}
	out := rangeHash{n: r.n - part.n}
	if out.n > 0 {
		out.hash = new(big.Int).Sub(sum(r.hash), sum(part.hash)).String()
	}
	return out
}

// hashRange hashes the rows after lo and at most hi.
func (s side) hashRange(ctx context.Context, q table.Querier, lo, hi []string) (rangeHash, error) {
	cond, args := s.cond(lo, hi)
	sql := "SELECT count(*), " + s.aggregate(s.rowHash, s.order) + " FROM " + s.name.Quoted() + " t WHERE " + cond
	var r rangeHash
	if err := q.QueryRow(ctx, sql, args...).Scan(&r.n, &r.hash); err != nil {
		return r, fmt.Errorf("hashing %s: %w", s.name, err)
	}
	return r, nil
}

// rangeEnd returns the last key of the limit rows after lo, found with a
// key-only query (an index-only scan), or nil when no more than limit rows
// are left: the range then runs to the end of the table.
func (s side) rangeEnd(ctx context.Context, q table.Querier, lo []string, limit int) ([]string, error) {
	cond, args := s.cond(lo, nil)
	sql := "SELECT " + s.keyText() + " FROM " + s.name.Quoted() + " t WHERE " + cond + " ORDER BY " + s.order +
		" OFFSET " + strconv.Itoa(limit-1) + " LIMIT 1"
	var last []string
	if err := q.QueryRow(ctx, sql, args...).Scan(&last); errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("finding the next range of %s: %w", s.name, err)
	}
	return last, nil
}

// midKey returns the key of the n-th row (from 0) after lo and at most hi.
func (s side) midKey(ctx context.Context, q table.Querier, lo, hi []string, n int64) ([]string, error) {
	cond, args := s.cond(lo, hi)
	sql := "SELECT " + s.keyText() + " FROM " + s.name.Quoted() + " t WHERE " + cond + " ORDER BY " + s.order +
		" OFFSET " + strconv.FormatInt(n, 10) + " LIMIT 1"
	var k []string
	if err := q.QueryRow(ctx, sql, args...).Scan(&k); err != nil {
		return nil, fmt.Errorf("splitting a range of %s: %w", s.name, err)
	}
	return k, nil
}

// bounds returns, for a one-column key, the key of every every-th row
// after lo and at most hi, in key order (an index-only scan): the ends of
// the subranges hashGroups hashes.
func (s side) bounds(ctx context.Context, q table.Querier, lo, hi []string, every int) ([]string, error) {
	cond, args := s.cond(lo, hi)
	sql := "SELECT k FROM (SELECT t." + quoteIdent(s.key[0].Name) + "::text AS k, row_number() OVER (ORDER BY " + s.order + ") AS rn FROM " +
		s.name.Quoted() + " t WHERE " + cond + ") AS r WHERE rn % " + strconv.Itoa(every) + " = 0 ORDER BY rn"
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("splitting a range of %s: %w", s.name, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("splitting a range of %s: %w", s.name, err)
	}
	return out, nil
}

// hashGroups hashes, in one query, the subranges of the range after lo
// and at most hi that ends (one-column keys, ascending) cut: subrange j
// holds the keys after ends[j-1] and at most ends[j] (lo and hi beyond
// either end). Empty subranges are missing from the map.
func (s side) hashGroups(ctx context.Context, q table.Querier, lo, hi, ends []string) (map[int]rangeHash, error) {
	cond, args := s.cond(lo, hi)
	args = append(args, ends)
	k := "t." + quoteIdent(s.key[0].Name)
	arr := "$" + strconv.Itoa(len(args)) + "::text[]::" + s.key[0].ParamType + "[]"
	// width_bucket counts the ends at or below the key; an end itself
	// belongs to the subrange it closes.
	b := "width_bucket(" + k + ", " + arr + ") - (" + k + " = ANY(" + arr + "))::int"
	sql := "SELECT " + b + ", count(*), " + s.aggregate(s.rowHash, s.order) + " FROM " + s.name.Quoted() + " t WHERE " + cond + " GROUP BY 1"
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("hashing %s: %w", s.name, err)
	}
	defer rows.Close()
	out := map[int]rangeHash{}
	for rows.Next() {
		var j int
		var r rangeHash
		if err := rows.Scan(&j, &r.n, &r.hash); err != nil {
			return nil, fmt.Errorf("hashing %s: %w", s.name, err)
		}
		out[j] = r
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("hashing %s: %w", s.name, err)
	}
	return out, nil
}

// rowHashes returns the key (joined) -> row hash of the rows after lo and
// at most hi, and the keys in key order.
func (s side) rowHashes(ctx context.Context, q table.Querier, lo, hi []string) (map[string]string, [][]string, error) {
	cond, args := s.cond(lo, hi)
	return s.collect(ctx, q, "SELECT "+s.keyText()+", "+s.hash+" FROM "+s.name.Quoted()+" t WHERE "+cond+" ORDER BY "+s.order, args)
}

// keysHashes returns the row hashes of the rows with these keys; lock adds
// FOR SHARE.
func (s side) keysHashes(ctx context.Context, q table.Querier, keys [][]string, lock bool) (map[string]string, error) {
	cols := make([]string, len(s.key))
	casts := make([]string, len(s.key))
	args := make([]any, len(s.key))
	for i, c := range s.key {
		cols[i] = "c" + strconv.Itoa(i)
		casts[i] = "x.c" + strconv.Itoa(i) + "::" + c.ParamType
		col := make([]string, len(keys))
		for j, k := range keys {
			col[j] = k[i]
		}
		args[i] = col
	}
	params := make([]string, len(s.key))
	for i := range params {
		params[i] = "$" + strconv.Itoa(i+1) + "::text[]"
	}
	sql := "SELECT " + s.keyText() + ", " + s.hash + " FROM " + s.name.Quoted() + " t WHERE (" + s.order + ") IN (SELECT " +
		strings.Join(casts, ", ") + " FROM unnest(" + strings.Join(params, ", ") + ") AS x(" + strings.Join(cols, ", ") + "))"
	if lock {
		sql += " FOR SHARE OF t"
	}
	m, _, err := s.collect(ctx, q, sql, args)
	return m, err
}

func (s side) collect(ctx context.Context, q table.Querier, sql string, args []any) (map[string]string, [][]string, error) {
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", s.name, err)
	}
	defer rows.Close()
	out := map[string]string{}
	var keys [][]string
	for rows.Next() {
		var k []string
		var h string
		if err := rows.Scan(&k, &h); err != nil {
			return nil, nil, fmt.Errorf("reading %s: %w", s.name, err)
		}
		out[joinKey(k)] = h
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", s.name, err)
	}
	return out, keys, nil
}

// bothAtLeast reports whether every connection's server is at least
// version (server_version_num).
func bothAtLeast(ctx context.Context, version int, conns ...*pgx.Conn) (bool, error) {
	for _, c := range conns {
		var v int
		if err := c.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&v); err != nil {
			return false, fmt.Errorf("reading the server version: %w", err)
		}
		if v < version {
			return false, nil
		}
	}
	return true, nil
}

// joinKey makes a map key of a key's values; \x00 cannot occur in text.
func joinKey(k []string) string { return strings.Join(k, "\x00") }

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
	v := &verifier{m: m, old: old, new: new, o: newSide(m.Old.Name, oldKey, ho, record), n: newSide(m.New.Name, newKey, hn, record), opts: opts, sum: &sum,
		seen: map[string]struct{}{}}
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
	var est float64
	if err := q.QueryRow(ctx, "SELECT reltuples FROM pg_class WHERE oid = $1::regclass", n.Quoted()).Scan(&est); err != nil {
		return 0, fmt.Errorf("estimating the rows of %s: %w", n, err)
	}
	if est >= 0 {
		return int64(est), nil
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
		done, err := v.whole(ctx)
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

// bisect finds the differing rows of the range after lo and at most hi,
// whose hashes differ, on the connection pair pr; it returns them (to be
// confirmed) and how many ranges it found differing, this one included.
// Both stores are queried at once. With summed record hashes a range's
// hash is its two halves' summed, so only the lower half is hashed and
// the upper half's hash is the difference.
func (v *verifier) bisect(ctx context.Context, pr connPair, lo, hi []string, oh, nh rangeHash) ([]Difference, int, error) {
	v.opts.Logger.Debug("range differs", "table", v.sum.Table, "after", lo, "upto", hi, "old_rows", oh.n, "new_rows", nh.n)
	if max(oh.n, nh.n) <= int64(v.opts.Leaf) {
		d, err := v.diffRows(ctx, pr, lo, hi)
		return d, 1, err
	}
	// Split at the middle row of the side with more rows.
	s, q, n := v.o, pr.old, oh.n
	if nh.n > oh.n {
		s, q, n = v.n, pr.new, nh.n
	}
	if len(s.key) == 1 {
		return v.split(ctx, pr, s, q, lo, hi)
	}
	mid, err := s.midKey(ctx, q, lo, hi, n/2-1)
	if err != nil {
		return nil, 0, err
	}
	a, b, err := v.hashBoth(ctx, pr, lo, mid)
	if err != nil {
		return nil, 0, err
	}
	var c, d rangeHash
	if v.o.record {
		c, d = oh.minus(a), nh.minus(b)
	} else if c, d, err = v.hashBoth(ctx, pr, mid, hi); err != nil {
		return nil, 0, err
	}
	var out []Difference
	bisected := 1
	for _, r := range []struct {
		lo, hi []string
		a, b   rangeHash
	}{{lo, mid, a, b}, {mid, hi, c, d}} {
		if r.a != r.b {
			found, k, err := v.bisect(ctx, pr, r.lo, r.hi, r.a, r.b)
			if err != nil {
				return nil, 0, err
			}
			out = append(out, found...)
			bisected += k
		}
	}
	return out, bisected, nil
}

// split is bisect's step for a one-column key, in three round trips
// instead of one or two per halving: the ends of subranges of Leaf rows
// (on s, the side with more rows, over q), then every subrange hashed on
// both stores at once in one query each, then each differing subrange
// bisected (at most Leaf rows on s: diffed by rows).
func (v *verifier) split(ctx context.Context, pr connPair, s side, q *pgx.Conn, lo, hi []string) ([]Difference, int, error) {
	ends, err := s.bounds(ctx, q, lo, hi, v.opts.Leaf)
	if err != nil {
		return nil, 0, err
	}
	if len(ends) == 0 {
		// Fewer than Leaf rows now (a write since the range was hashed).
		d, err := v.diffRows(ctx, pr, lo, hi)
		return d, 1, err
	}
	var og, ng map[int]rangeHash
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { og, err = v.o.hashGroups(gctx, pr.old, lo, hi, ends); return })
	g.Go(func() (err error) { ng, err = v.n.hashGroups(gctx, pr.new, lo, hi, ends); return })
	if err := g.Wait(); err != nil {
		return nil, 0, err
	}
	var out []Difference
	bisected := 1
	for j := 0; j <= len(ends); j++ {
		a, b := og[j], ng[j]
		if a == b {
			continue
		}
		sublo, subhi := lo, hi
		if j > 0 {
			sublo = []string{ends[j-1]}
		}
		if j < len(ends) {
			subhi = []string{ends[j]}
		}
		found, k, err := v.bisect(ctx, pr, sublo, subhi, a, b)
		if err != nil {
			return nil, 0, err
		}
		out = append(out, found...)
		bisected += k
	}
	return out, bisected, nil
}

// hashBoth hashes the range after lo and at most hi on both stores of pr
// at once.
func (v *verifier) hashBoth(ctx context.Context, pr connPair, lo, hi []string) (oh, nh rangeHash, err error) {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { oh, err = v.o.hashRange(gctx, pr.old, lo, hi); return })
	g.Go(func() (err error) { nh, err = v.n.hashRange(gctx, pr.new, lo, hi); return })
	err = g.Wait()
	return oh, nh, err
}

// diffRows fetches a small range's row hashes from both stores at once and
// returns the keys that differ.
func (v *verifier) diffRows(ctx context.Context, pr connPair, lo, hi []string) ([]Difference, error) {
	var om, nm map[string]string
	var okeys, nkeys [][]string
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { om, okeys, err = v.o.rowHashes(gctx, pr.old, lo, hi); return })
	g.Go(func() (err error) { nm, nkeys, err = v.n.rowHashes(gctx, pr.new, lo, hi); return })
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return diff(om, nm, okeys, nkeys), nil
}

// diff types the differences between two key -> hash maps, in old's key
// order, then new's for the keys old lacks.
func diff(om, nm map[string]string, okeys, nkeys [][]string) []Difference {
	var out []Difference
	for _, k := range okeys {
		h, ok := nm[joinKey(k)]
		switch {
		case !ok:
			out = append(out, Difference{Kind: MissingOnNew, Key: k})
		case h != om[joinKey(k)]:
			out = append(out, Difference{Kind: ValueDiff, Key: k})
		}
	}
	for _, k := range nkeys {
		if _, ok := om[joinKey(k)]; !ok {
			out = append(out, Difference{Kind: MissingOnOld, Key: k})
		}
	}
	return out
}

// confirm re-reads the found differences and keeps those that persist.
//
// Writes reach the primary first and the secondary right after, within
// the mirror budget. To re-read both stores at one point of that stream it
// holds the primary's table IN SHARE MODE (writers to it wait; lock_timeout
// 1s), so no new write can start, then waits until no other transaction
// holds a write lock on the secondary's table (the in-flight mirrors have
// committed; at most Settle), then reads both. A difference still there is
// the stores disagreeing. An insert still uncommitted on the secondary is
// invisible to a row lock, which is why a row lock on the keys is not
// enough. If the table lock cannot be had, the keys are read under FOR
// SHARE and the secondary re-read until it agrees or Settle has passed.
func (v *verifier) confirm(ctx context.Context, found []Difference) ([]Difference, error) {
	const per = 1000
	if v.opts.Knobs != nil && v.opts.Knobs.BeforeConfirm != nil {
		v.opts.Knobs.BeforeConfirm(found)
	}
	var out []Difference
	for start := 0; start < len(found); start += per {
		part := found[start:min(start+per, len(found))]
		keys := make([][]string, len(part))
		for i, d := range part {
			keys[i] = d.Key
		}
		diffs, err := v.recheck(ctx, keys)
		if err != nil {
			return nil, err
		}
		kinds := map[string]Kind{}
		for _, d := range diffs {
			kinds[joinKey(d.Key)] = d.Kind
		}
		for _, d := range part {
			// A difference whose kind changed is still a difference: report
			// what the re-read saw.
			if k, ok := kinds[joinKey(d.Key)]; ok {
				d.Kind = k
				v.sum.Diffs = append(v.sum.Diffs, d)
				v.sum.Counts[k]++
				out = append(out, d)
			} else {
				v.sum.Transient++
			}
		}
	}
	return out, nil
}

// recheck is one confirmation of keys (see confirm).
func (v *verifier) recheck(ctx context.Context, keys [][]string) ([]Difference, error) {
	// The primary is old unless the routing says new (after a write flip).
	pconn, sconn, pside, sside := v.old, v.new, v.o, v.n
	if v.opts.PrimaryNew {
		pconn, sconn, pside, sside = v.new, v.old, v.n, v.o
	}
	tx, err := pconn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted})
	if err != nil {
		return nil, fmt.Errorf("re-checking %s: %w", v.sum.Table, err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // the transaction only holds locks
	_, err = tx.Exec(ctx, "SET LOCAL lock_timeout = '1s'; LOCK TABLE "+pside.name.Quoted()+" IN SHARE MODE")
	if err != nil {
		var pe *pgconn.PgError
		if !errors.As(err, &pe) {
			return nil, fmt.Errorf("re-checking %s: %w", v.sum.Table, err)
		}
		v.opts.Logger.Debug("re-check without the table lock", "table", pside.name, "error", err)
		tx.Rollback(ctx) //nolint:errcheck // the lock failed the transaction
		return v.recheckRows(ctx, keys)
	}
	deadline := time.Now().Add(v.opts.Settle)
	for {
		var writers int
		if err := sconn.QueryRow(ctx, `SELECT count(*) FROM pg_catalog.pg_locks WHERE relation = to_regclass($1)
			AND mode = 'RowExclusiveLock' AND granted AND pid <> pg_catalog.pg_backend_pid()`, sside.name.Quoted()).Scan(&writers); err != nil {
			return nil, fmt.Errorf("re-checking %s: %w", v.sum.Table, err)
		}
		if writers == 0 || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	pm, err := pside.keysHashes(ctx, tx, keys, false)
	if err != nil {
		return nil, err
	}
	sm, err := sside.keysHashes(ctx, sconn, keys, false)
	if err != nil {
		return nil, err
	}
	if v.opts.PrimaryNew {
		return diffKeys(sm, pm, keys), nil
	}
	return diffKeys(pm, sm, keys), nil
}

// recheckRows is the re-check without a table lock: old's rows FOR SHARE,
// new re-read until it agrees or Settle has passed.
func (v *verifier) recheckRows(ctx context.Context, keys [][]string) ([]Difference, error) {
	tx, err := v.old.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted})
	if err != nil {
		return nil, fmt.Errorf("re-checking %s: %w", v.sum.Table, err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // the transaction only holds locks
	om, err := v.o.keysHashes(ctx, tx, keys, true)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(v.opts.Settle)
	for left := keys; ; {
		nm, err := v.newHashes(ctx, left)
		if err != nil {
			return nil, err
		}
		diffs := diffKeys(om, nm, left)
		if len(diffs) == 0 || time.Now().After(deadline) {
			return diffs, nil
		}
		left = left[:0:0]
		for _, d := range diffs {
			left = append(left, d.Key)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// newHashes reads the row hashes of keys on new under FOR SHARE, while
// confirm holds old's rows FOR SHARE. Writes commit on the primary (old)
// first and on new next, and a mirrored write holds its row lock on new
// until it commits there: so once old's rows are locked, a write that
// committed on old and not yet on new still holds its row on new, and
// this read waits for it instead of reporting a difference that the mirror
// is about to close. A writer can hold a row on new while it waits for
// one that confirm holds on old; lock_timeout breaks that wait across the
// stores, and the rows are then read without locks.
func (v *verifier) newHashes(ctx context.Context, keys [][]string) (map[string]string, error) {
	tx, err := v.new.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted})
	if err != nil {
		return nil, fmt.Errorf("re-checking %s: %w", v.sum.Table, err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // the transaction only held locks
	if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '1s'"); err != nil {
		return nil, fmt.Errorf("re-checking %s: %w", v.sum.Table, err)
	}
	m, err := v.n.keysHashes(ctx, tx, keys, true)
	if pgErr := (*pgconn.PgError)(nil); errors.As(err, &pgErr) && pgErr.Code == "55P03" {
		tx.Rollback(ctx) //nolint:errcheck // the lock wait failed the transaction
		return v.n.keysHashes(ctx, v.new, keys, false)
	}
	return m, err
}

// diffKeys types the differences among keys between two key -> hash maps
// read for those keys.
func diffKeys(om, nm map[string]string, keys [][]string) []Difference {
	var okeys, nkeys [][]string
	for _, k := range keys {
		if _, ok := om[joinKey(k)]; ok {
			okeys = append(okeys, k)
		}
		if _, ok := nm[joinKey(k)]; ok {
			nkeys = append(nkeys, k)
		}
	}
	return diff(om, nm, okeys, nkeys)
}
