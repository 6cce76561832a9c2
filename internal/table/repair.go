package table

// The drift repairer: it closes the drift ledger's entries (ledger.go) by
// copying their rows with the locked-copy unit (copy.go) from the store that
// has them to the store that missed them, backing off entries that fail.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// repairChunk is the chunk size Repair copies whole tables with.
const repairChunk = 500

// Repair drains up to limit open entries of the drift ledger on control
// that are stale on target, named targetName (StaleOld or StaleNew): it
// copies their rows from source, the other store, which has them. It
// claims the entries with FOR UPDATE SKIP LOCKED in a control transaction
// held until they are settled, so concurrent repairers never take the same
// entry. Entries are grouped per table and copied with the locked-copy
// unit: CopyTable when the table has a whole-table entry, CopyKeys
// otherwise. A repaired entry gets repaired_at. An entry that fails fails
// alone (see RepairWith): it stays open with attempts bumped, last_error
// set and a backoff before it is claimed again, and the other entries are
// still repaired.
//
// The unit locks source's rows before it writes target's, the order in
// which writers take locks when source is the primary: use Repair when
// target is the secondary (or no writer runs), and RepairPrimary when
// target is the current primary.
//
// control may be connected to source's or target's database, but must be
// its own connection. Repair returns the number of entries repaired.
func Repair(ctx context.Context, control, source, target *pgx.Conn, targetName string, limit int) (int, error) {
	return RepairWith(ctx, control, source, target, RepairOptions{Target: targetName, Limit: limit})
}

// RepairPrimary is Repair for entries stale on the current primary (target),
// copied from the secondary (source): after a write flip or a rollback, the
// store that missed a write as secondary has become primary.
//
// Writers lock the primary first, so a unit that locked the secondary's
// rows first could deadlock with them across the two stores, or overwrite a
// newer write on the primary with an older row. Each unit therefore first
// locks the table on target IN SHARE ROW EXCLUSIVE MODE (new writes to it
// wait), then on source IN SHARE MODE, which waits for writes that have
// committed on the primary but not yet on the secondary. Source is then
// complete and still, and the unit copies from it without the re-read.
// Writes to a table wait while one of its units runs.
func RepairPrimary(ctx context.Context, control, source, target *pgx.Conn, targetName string, limit int) (int, error) {
	return RepairWith(ctx, control, source, target, RepairOptions{Target: targetName, Limit: limit, TargetIsPrimary: true})
}

// RepairOptions say which drift entries RepairWith repairs and how.
type RepairOptions struct {
	// Target is the store the entries are stale on, and that the target
	// connection reaches: StaleOld or StaleNew. The source connection
	// reaches the other store.
	Target string
	// Limit is the most entries claimed in one call (at least 1).
	Limit int
	// TargetIsPrimary selects RepairPrimary's lock order, for entries stale
	// on the current primary.
	TargetIsPrimary bool
	// Mappings, when set, are the migration's table mappings: a table in
	// their scope is copied through its mapping (CopyKeysMapped), and one
	// in scope without a usable mapping fails. Tables out of scope, and
	// every table when Mappings is nil, map to the table of the same name.
	//
	// An entry names the table and key of the store that had the write,
	// which is source: old names and keys when Target is StaleNew (copied
	// old -> new), new ones when Target is StaleOld (copied back new ->
	// old through the reverse expressions).
	Mappings *Mappings
	// Backoff is how long an entry that failed is left alone before it is
	// claimed again; the zero value is DefaultBackoff.
	Backoff Backoff
	// IgnoreBackoff claims entries whose backoff has not ended too. The
	// repair that runs under a write flip's fence uses it: every entry
	// stale on the store becoming primary must be tried then.
	IgnoreBackoff bool
}

// Backoff is the wait between repair attempts of a failing drift entry:
// Base·2^n after its n-th consecutive failure, at most Max. Base is the
// repair interval, so the first retry skips one pass, and Max bounds how
// long a fixed cause (a mapping corrected, a row fixed on the target)
// waits to be noticed.
//
// The schedule is a function of the entry's stored attempts, computed by
// the control database when the failure is recorded, rather than an
// in-process retry loop (such as github.com/cenkalti/backoff's): entries
// are claimed by whichever replica's repairer gets there first, and the
// schedule must survive restarts. No jitter is added: a claimed entry is
// locked (SKIP LOCKED), so repairers never retry the same entry at once.
type Backoff struct {
	Base, Max time.Duration
}

// DefaultBackoff is the backoff of RepairOptions without one: 2s, 4s,
// 8s... up to 5 minutes.
var DefaultBackoff = Backoff{Base: time.Second, Max: 5 * time.Minute}

// Delay is the wait after the n-th consecutive failure (n >= 1).
func (b Backoff) Delay(n int) time.Duration {
	b = b.orDefault()
	d := b.Base
	for i := 0; i < n && d < b.Max; i++ {
		d *= 2
	}
	return min(d, b.Max)
}

func (b Backoff) orDefault() Backoff {
	if b.Base <= 0 {
		b.Base = DefaultBackoff.Base
	}
	if b.Max <= 0 {
		b.Max = max(DefaultBackoff.Max, b.Base)
	}
	return b
}

// EntryFailures are the drift entries that RepairWith could not repair
// although both stores answered: a table without a usable mapping, a key
// that does not fit, a row the target rejects. Each is recorded on its
// entry (attempts, last_error, next_attempt_at); the other entries were
// repaired.
type EntryFailures struct {
	Entries int     // entries that failed
	Errs    []error // one per table, or per entry when a table's entries failed apart
}

// Error names the first few failures: a pass may claim a thousand entries.
func (e *EntryFailures) Error() string {
	const shown = 5
	msgs := make([]string, 0, shown+1)
	for i, err := range e.Errs {
		if i == shown {
			msgs = append(msgs, fmt.Sprintf("and %d more", len(e.Errs)-shown))
			break
		}
		msgs = append(msgs, err.Error())
	}
	return fmt.Sprintf("%d drift entries could not be repaired: %s", e.Entries, strings.Join(msgs, "; "))
}

func (e *EntryFailures) Unwrap() []error { return e.Errs }

// storeError reports whether err, from copying between source and target,
// is a failure of a store or a session rather than of the entries being
// copied: a session lost or cancelled, a store shutting down, refusing
// connections, out of resources or read-only. Such an error says nothing
// about the entries, so it is not recorded on them: the pass ends and is
// retried on fresh connections.
func storeError(err error, conns ...*pgx.Conn) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	for _, c := range conns {
		if c.IsClosed() {
			return true
		}
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch pe.Code[:2] {
		case "08", // connection exception
			"53", // insufficient resources: disk full, out of memory, too many connections
			"58": // system error: I/O error
			return true
		}
		return strings.HasPrefix(pe.Code, "57P") || // admin or crash shutdown, cannot connect now
			pe.Code == "25006" || // read-only transaction: a standby or a read-only store
			pe.Code == "25P03" // idle in transaction timeout
	}
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || pgconn.Timeout(err)
}

// RepairWith is Repair, or RepairPrimary when opts.TargetIsPrimary, with
// the options opts; see RepairOptions for the table mappings.
//
// Failures are isolated (issue 10). A table whose entries cannot be
// planned (no usable mapping, gone) fails alone, and when copying a
// table's keys fails, each key is copied alone, so only the entries that
// cannot be repaired fail. A failed entry gets attempts + 1, last_error,
// failing_since and a next_attempt_at opts.Backoff away; it is not claimed
// again before then (unless opts.IgnoreBackoff). The other entries are
// repaired in the same call, and the error is then an *EntryFailures.
//
// A store error (see storeError: the session lost, the store shutting down
// or refusing) is not the entries' fault: RepairWith records the entries
// settled so far, leaves the rest as they were, and returns the error
// wrapped, never an *EntryFailures. So does a failure to update the ledger.
func RepairWith(ctx context.Context, control, source, target *pgx.Conn, opts RepairOptions) (int, error) {
	targetName, limit := opts.Target, opts.Limit
	if err := checkStore("repairing drift: the target store", targetName); err != nil {
		return 0, err
	}
	if limit < 1 {
		return 0, fmt.Errorf("repairing drift: limit must be at least 1, got %d", limit)
	}
	pass := &repairPass{source: source, target: target, targetName: targetName, opts: opts,
		backoff: opts.Backoff.orDefault(), failures: &EntryFailures{}}
	tx, err := control.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("repairing drift: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op after commit
	pass.tx = tx

	order, groups, err := claimDrift(ctx, tx, opts)
	if err != nil {
		return 0, err
	}
	held, err := heldTables(ctx, source, target)
	if err != nil {
		return 0, err
	}

	var stopped error // a store error that ended the pass
	for _, n := range order {
		g := groups[n]
		if held[n] {
			continue
		}
		err := pass.repairTable(ctx, n, g)
		var sf *storeFailure
		if errors.As(err, &sf) {
			stopped = sf.err
			break
		}
		if err != nil {
			// The ledger update failed, so the transaction is lost.
			return 0, fmt.Errorf("repairing drift: updating the ledger: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("repairing drift: updating the ledger: %w", err)
	}
	if stopped != nil {
		return pass.repaired, fmt.Errorf("repairing drift on %s: %w", targetName, stopped)
	}
	if pass.failures.Entries > 0 {
		return pass.repaired, pass.failures
	}
	return pass.repaired, nil
}

// driftGroup is one table's claimed entries: their ids, their keys, and
// whether one of them is the whole table (a nil key).
type driftGroup struct {
	ids   []int64
	keys  [][]string
	whole bool
}

// claimDrift claims, in tx, up to opts.Limit open entries stale on
// opts.Target whose backoff has ended (all with opts.IgnoreBackoff), locked
// and skipping those another pass holds, grouped by table in the order of
// their first entry.
func claimDrift(ctx context.Context, tx pgx.Tx, opts RepairOptions) (order []Name, groups map[Name]*driftGroup, err error) {
	limit, targetName := opts.Limit, opts.Target
	groups = map[Name]*driftGroup{}
	rows, err := tx.Query(ctx, `SELECT id, schema_name, table_name, key FROM tandem.drift
		WHERE repaired_at IS NULL AND stale = $2 AND ($3 OR next_attempt_at IS NULL OR next_attempt_at <= now())
		ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED`, limit, targetName, opts.IgnoreBackoff)
	if err != nil {
		return nil, nil, fmt.Errorf("claiming drift: %w", err)
	}
	for rows.Next() {
		var id int64
		var n Name
		var key []string
		if err := rows.Scan(&id, &n.Schema, &n.Table, &key); err != nil {
			rows.Close()
			return nil, nil, fmt.Errorf("claiming drift: %w", err)
		}
		g := groups[n]
		if g == nil {
			g = &driftGroup{}
			groups[n] = g
			order = append(order, n)
		}
		g.ids = append(g.ids, id)
		if key == nil {
			g.whole = true
		} else {
			g.keys = append(g.keys, key)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("claiming drift: %w", err)
	}
	return order, groups, nil
}

// heldTables are the tables a prepared transaction holds on either store.
//
// A prepared transaction (PREPARE TRANSACTION) on either store holds
// its rows until COMMIT or ROLLBACK PREPARED: repairing its table now
// would wait for its row locks, or settle its entries against rows it
// has not made visible yet, closing them before COMMIT PREPARED makes
// the write real on one store only. Its tables are left alone, their
// entries open, until it ends.
func heldTables(ctx context.Context, source, target *pgx.Conn) (map[Name]bool, error) {
	held := map[Name]bool{}
	for _, c := range []*pgx.Conn{source, target} {
		if err := preparedTables(ctx, c, held); err != nil {
			return nil, fmt.Errorf("repairing drift: reading prepared transactions: %w", err)
		}
	}
	return held, nil
}

// repairPass is one RepairWith call: the claimed entries are settled in
// tx, and what it repaired and what failed is counted.
type repairPass struct {
	tx             pgx.Tx
	source, target *pgx.Conn
	targetName     string
	opts           RepairOptions
	backoff        Backoff

	repaired int
	failures *EntryFailures
}

// settle closes the entries ids when copyErr is nil, or records their
// failure and backoff. A store error is returned as a *storeFailure (the
// pass stops) and records nothing; any other error is the ledger's.
func (r *repairPass) settle(ctx context.Context, ids []int64, copyErr error) error {
	tx, backoff, failures := r.tx, r.backoff, r.failures
	switch {
	case copyErr == nil:
		r.repaired += len(ids)
		_, err := tx.Exec(ctx, "UPDATE tandem.drift SET repaired_at = now() WHERE id = ANY($1)", ids)
		return err
	case storeError(copyErr, r.source, r.target):
		return &storeFailure{copyErr}
	}
	failures.Entries += len(ids)
	failures.Errs = append(failures.Errs, copyErr)
	_, err := tx.Exec(ctx, `UPDATE tandem.drift SET attempts = attempts + 1, last_error = $2,
		failing_since = coalesce(failing_since, now()),
		next_attempt_at = now() + least($3::float8 * power(2, least(attempts + 1, 40)), $4::float8) * interval '1 microsecond'
		WHERE id = ANY($1)`,
		ids, copyErr.Error(), float64(backoff.Base.Microseconds()), float64(backoff.Max.Microseconds()))
	return err
}

// repairTable copies table n's claimed entries g (the whole table, or by
// key) and settles them.
func (r *repairPass) repairTable(ctx context.Context, n Name, g *driftGroup) error {
	source, target, targetName := r.source, r.target, r.targetName
	settle := func(ids []int64, copyErr error) error { return r.settle(ctx, ids, copyErr) }
	p, err := repairCopier(ctx, source, target, n, targetName, r.opts.Mappings)
	if p != nil {
		p.lockTables = r.opts.TargetIsPrimary
	}
	switch {
	case err != nil:
		err = settle(g.ids, fmt.Errorf("repairing %s on %s: %w", n, targetName, err))
	case g.whole:
		_, err = p.copyAll(ctx, source, target, repairChunk)
		if isUniqueViolation(err) && p.src.HasKey() {
			// A key changed (the old key's row on the target still holds
			// a unique value the new key's row takes), or a unique
			// column's values moved between rows: remove the target's
			// rows the source has lost, then replace rather than upsert.
			if _, err = p.deleteAbsentAll(ctx, source, target, repairChunk); err == nil {
				p.replace = true
				_, err = p.copyAll(ctx, source, target, repairChunk)
			}
			if isUniqueViolation(err) {
				err = p.replaceWhole(ctx, source, target, err)
			}
		}
		if err != nil {
			err = fmt.Errorf("repairing %s on %s: %w", n, targetName, err)
		}
		err = settle(g.ids, err)
	default:
		err = repairKeys(ctx, source, target, p, g.ids, g.keys, settle)
	}
	return err
}

// repairWholeMaxRows is the most rows a table may have for replaceWhole to
// rewrite it in one unit (a variable for the tests).
var repairWholeMaxRows = 100_000

// replaceWhole is the last resort of a whole-table repair whose chunked
// replace still met a unique_violation (chunkErr): a unique value moved
// between two rows that lie in different chunks, so each chunk's rows
// collide with a row of another chunk that still holds the value on the
// target. It rewrites the table in one unit: the source's table locked IN
// SHARE MODE (writers wait for the unit), the target's rows deleted and the
// source's inserted. A table above repairWholeMaxRows rows, or a split's
// owner or a dependent part, is not rewritten: the entry fails with
// chunkErr and a hint, and stays open for its backoff.
func (p *copier) replaceWhole(ctx context.Context, source, target *pgx.Conn, chunkErr error) error {
	if len(p.deps) > 0 || p.update {
		return chunkErr
	}
	// Counted, up to one past the bound: a table never analyzed has no
	// estimate.
	var rows int
	if err := source.QueryRow(ctx, "SELECT count(*) FROM (SELECT FROM "+p.srcFrom()+" r LIMIT $1) c", repairWholeMaxRows+1).Scan(&rows); err != nil {
		return fmt.Errorf("%w (and counting the rows of %s: %v)", chunkErr, p.src.Name, err)
	}
	if rows > repairWholeMaxRows {
		return fmt.Errorf("%w: unique values moved between rows of %s far apart in key order, and the table has more than %d rows, too many to rewrite in one locked unit; "+
			"hint: record the moved rows' keys as drift (they are repaired together), or run tandem compare --table %s --repair", chunkErr, p.src.Name, repairWholeMaxRows, p.src.Name)
	}
	_, err := p.copyWhole(ctx, source, target, repairChunk)
	return err
}

// preparedTables adds to held the tables on which a prepared transaction
// of c's database holds a lock (pg_locks shows them without a pid).
func preparedTables(ctx context.Context, c *pgx.Conn, held map[Name]bool) error {
	rows, err := c.Query(ctx, `SELECT DISTINCT n.nspname, r.relname FROM pg_locks l
		JOIN pg_class r ON r.oid = l.relation JOIN pg_namespace n ON n.oid = r.relnamespace
		WHERE l.locktype = 'relation' AND l.pid IS NULL
		AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var n Name
		if err := rows.Scan(&n.Schema, &n.Table); err != nil {
			return err
		}
		held[n] = true
	}
	return rows.Err()
}

// storeFailure carries a store error out of settle: the pass stops there.
type storeFailure struct{ err error }

func (e *storeFailure) Error() string { return e.err.Error() }

// repairKeys copies one table's keyed entries and settles them. An entry
// whose key does not fit the table's primary key fails alone, and when the
// copy of the others fails for a reason of their own (a row the target
// rejects), each key is copied alone, so one bad entry cannot hold the
// others back.
func repairKeys(ctx context.Context, source, target *pgx.Conn, p *copier, ids []int64, keys [][]string,
	settle func([]int64, error) error) error {
	var goodIDs []int64
	var goodKeys [][]string
	for i, k := range keys {
		if len(k) != len(p.srcKey) {
			err := fmt.Errorf("repairing %s: the entry's key has %d values, the primary key has %d", p.src.Name, len(k), len(p.srcKey))
			if !p.src.HasKey() {
				err = fmt.Errorf("repairing %s by key: %w", p.src.Name, ErrNoKey)
			}
			if err := settle(ids[i:i+1], err); err != nil {
				return err
			}
			continue
		}
		goodIDs = append(goodIDs, ids[i])
		goodKeys = append(goodKeys, k)
	}
	if len(goodIDs) == 0 {
		return nil
	}
	_, err := p.copyKeys(ctx, source, target, goodKeys)
	if isUniqueViolation(err) {
		// Unique values moved between the rows of these keys (a swap the
		// target saw only in part): replace the rows instead.
		p.replace = true
		_, err = p.copyKeys(ctx, source, target, goodKeys)
	}
	if err == nil || len(goodIDs) == 1 || storeError(err, source, target) {
		if err != nil {
			err = fmt.Errorf("repairing %s: %w", p.src.Name, err)
		}
		return settle(goodIDs, err)
	}
	// Units that committed before the failure are copied again: harmless.
	for i, k := range goodKeys {
		_, err := p.copyKeys(ctx, source, target, [][]string{k})
		if err != nil {
			err = fmt.Errorf("repairing %s key (%s): %w", p.src.Name, strings.Join(k, ", "), err)
		}
		if err := settle(goodIDs[i:i+1], err); err != nil {
			return err
		}
	}
	return nil
}

// repairCopier returns the copier that copies the table n of source (the store
// that is not stale, whose names the entries carry) to target, the store
// stale is.
func repairCopier(ctx context.Context, source, target *pgx.Conn, n Name, stale string, ms *Mappings) (*copier, error) {
	if ms == nil {
		return loadCopier(ctx, source, target, n, n)
	}
	forward := stale == StaleNew // source is old
	var m *Mapping
	if forward {
		m = ms.ForOld(n)
	} else {
		m = ms.ForNew(n)
	}
	switch {
	case m != nil:
		return newMappedCopier(m, forward)
	case forward && ms.InScope(n):
		return nil, fmt.Errorf("%s is in the migration's scope but has no usable mapping (see the mapping's problems)", n)
	case !forward && ms.InScope(n):
		return nil, fmt.Errorf("no mapping has %s as its new table", n)
	}
	return loadCopier(ctx, source, target, n, n)
}

// isUniqueViolation reports whether err is the target's unique_violation
// (23505).
func isUniqueViolation(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505"
}
