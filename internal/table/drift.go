package table

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// driftSchemaSQL creates the drift ledger in the control schema. It is
// idempotent.
const driftSchemaSQL = `
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.drift (
	id          bigserial PRIMARY KEY,
	schema_name text NOT NULL,
	table_name  text NOT NULL,
	key         text[],
	reason      text NOT NULL DEFAULT '',
	recorded_at timestamptz NOT NULL DEFAULT now(),
	repaired_at timestamptz,
	attempts    int NOT NULL DEFAULT 0,
	last_error  text,
	stale       text NOT NULL DEFAULT 'new' CHECK (stale IN ('old', 'new'))
);
-- Ledgers created before the stale column: every entry then was a write the
-- new store (the only secondary before a write flip existed) missed.
ALTER TABLE tandem.drift ADD COLUMN IF NOT EXISTS stale text NOT NULL DEFAULT 'new' CHECK (stale IN ('old', 'new'));
COMMENT ON COLUMN tandem.drift.key IS 'the key values as text, in key order; NULL = the whole table';
COMMENT ON COLUMN tandem.drift.stale IS 'the store that missed the write (old or new); the repairer copies to it from the other';
CREATE INDEX IF NOT EXISTS drift_open ON tandem.drift (repaired_at) WHERE repaired_at IS NULL;
`

// schemaLock is the advisory lock every creator of the control schema
// takes, so concurrent CREATE SCHEMA IF NOT EXISTS cannot collide. It is
// the one internal/route takes for its tables.
const schemaLock = "tandem.route.schema"

// EnsureSchema creates the drift ledger (and the control schema) when
// missing. Concurrent callers are serialised with an advisory lock.
func EnsureSchema(ctx context.Context, conn *pgx.Conn) error {
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", schemaLock); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, driftSchemaSQL)
		return err
	})
}

// Execer runs a statement. *pgx.Conn, pgx.Tx and *pgxpool.Pool satisfy it.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// The stores a drift entry can name as stale. They are the routing
// state's store names (route.Old and route.New).
const (
	StaleOld = "old"
	StaleNew = "new"
)

// DriftEntry is one write that a store may have missed.
type DriftEntry struct {
	Table  Name
	Key    []string // the key values as text, in key order; nil = the whole table
	Reason string
	// Stale names the store that missed the write: the secondary when the
	// write ran, StaleOld or StaleNew. Empty means StaleNew (the secondary
	// before any write flip).
	Stale string
}

func checkStore(what, s string) error {
	if s != StaleOld && s != StaleNew {
		return fmt.Errorf("%s must be %q or %q, not %q", what, StaleOld, StaleNew, s)
	}
	return nil
}

// RecordDrift adds entries to the drift ledger in one statement, so they are
// recorded all or none.
func RecordDrift(ctx context.Context, q Execer, entries []DriftEntry) error {
	if len(entries) == 0 {
		return nil
	}
	type entry struct {
		Schema string   `json:"s"`
		Table  string   `json:"t"`
		Key    []string `json:"k"` // null = whole table
		Reason string   `json:"r"`
		Stale  string   `json:"x"`
	}
	list := make([]entry, len(entries))
	for i, e := range entries {
		if e.Stale == "" {
			e.Stale = StaleNew
		}
		if err := checkStore("recording drift: the stale store", e.Stale); err != nil {
			return err
		}
		list[i] = entry{Schema: e.Table.Schema, Table: e.Table.Table, Reason: e.Reason, Stale: e.Stale}
		if len(e.Key) > 0 {
			list[i].Key = e.Key
		}
	}
	b, err := json.Marshal(list)
	if err != nil {
		return fmt.Errorf("recording drift: %w", err)
	}
	_, err = q.Exec(ctx, `INSERT INTO tandem.drift (schema_name, table_name, key, reason, stale)
		SELECT e->>'s', e->>'t',
			CASE WHEN jsonb_typeof(e->'k') = 'array' THEN ARRAY(SELECT jsonb_array_elements_text(e->'k')) END,
			e->>'r', e->>'x'
		FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS x(e, n)
		ORDER BY n`, string(b))
	if err != nil {
		return fmt.Errorf("recording drift: %w", err)
	}
	return nil
}

// OpenDrift returns the number of open (unrepaired) entries per table,
// whichever store they are stale on; an entry for the whole table counts as
// one.
func OpenDrift(ctx context.Context, q Querier) (map[Name]int, error) {
	byStore, err := OpenDriftByStore(ctx, q)
	if err != nil {
		return nil, err
	}
	out := map[Name]int{}
	for _, m := range byStore {
		for n, c := range m {
			out[n] += c
		}
	}
	return out, nil
}

// OpenDriftByStore returns the number of open entries per stale store
// (StaleOld, StaleNew) and table. A store with no open entry is absent.
func OpenDriftByStore(ctx context.Context, q Querier) (map[string]map[Name]int, error) {
	rows, err := q.Query(ctx, `SELECT stale, schema_name, table_name, count(*) FROM tandem.drift
		WHERE repaired_at IS NULL GROUP BY stale, schema_name, table_name`)
	if err != nil {
		return nil, fmt.Errorf("reading open drift: %w", err)
	}
	defer rows.Close()
	out := map[string]map[Name]int{}
	for rows.Next() {
		var stale string
		var n Name
		var c int
		if err := rows.Scan(&stale, &n.Schema, &n.Table, &c); err != nil {
			return nil, fmt.Errorf("reading open drift: %w", err)
		}
		if out[stale] == nil {
			out[stale] = map[Name]int{}
		}
		out[stale][n] = c
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading open drift: %w", err)
	}
	return out, nil
}

// OpenDriftTotal returns the number of open entries.
func OpenDriftTotal(ctx context.Context, q Querier) (int64, error) {
	var n int64
	if err := q.QueryRow(ctx, "SELECT count(*) FROM tandem.drift WHERE repaired_at IS NULL").Scan(&n); err != nil {
		return 0, fmt.Errorf("reading open drift: %w", err)
	}
	return n, nil
}

// repairChunk is the chunk size Repair copies whole tables with.
const repairChunk = 500

// Repair drains up to limit open entries of the drift ledger on control
// that are stale on target, named targetName (StaleOld or StaleNew): it
// copies their rows from source, the other store, which has them. It
// claims the entries with FOR UPDATE SKIP LOCKED in a control transaction
// held until they are settled, so concurrent repairers never take the same
// entry. Entries are grouped per table and copied with the locked-copy
// unit: CopyTable when the table has a whole-table entry, CopyKeys
// otherwise. A repaired entry gets repaired_at; a failed one stays open
// with attempts bumped and last_error set, and its error is returned
// (joined with the others) after the ledger is updated.
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
}

// RepairWith is Repair, or RepairPrimary when opts.TargetIsPrimary, with
// the options opts; see RepairOptions for the table mappings.
func RepairWith(ctx context.Context, control, source, target *pgx.Conn, opts RepairOptions) (int, error) {
	targetName, limit, targetIsPrimary := opts.Target, opts.Limit, opts.TargetIsPrimary
	if err := checkStore("repairing drift: the target store", targetName); err != nil {
		return 0, err
	}
	if limit < 1 {
		return 0, fmt.Errorf("repairing drift: limit must be at least 1, got %d", limit)
	}
	tx, err := control.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("repairing drift: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op after commit

	type group struct {
		ids   []int64
		keys  [][]string
		whole bool
	}
	var order []Name
	groups := map[Name]*group{}
	rows, err := tx.Query(ctx, `SELECT id, schema_name, table_name, key FROM tandem.drift
		WHERE repaired_at IS NULL AND stale = $2 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED`, limit, targetName)
	if err != nil {
		return 0, fmt.Errorf("claiming drift: %w", err)
	}
	for rows.Next() {
		var id int64
		var n Name
		var key []string
		if err := rows.Scan(&id, &n.Schema, &n.Table, &key); err != nil {
			rows.Close()
			return 0, fmt.Errorf("claiming drift: %w", err)
		}
		g := groups[n]
		if g == nil {
			g = &group{}
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
		return 0, fmt.Errorf("claiming drift: %w", err)
	}

	repaired := 0
	var errs []error
	settle := func(ids []int64, copyErr error) error {
		if copyErr == nil {
			repaired += len(ids)
			_, err := tx.Exec(ctx, "UPDATE tandem.drift SET repaired_at = now() WHERE id = ANY($1)", ids)
			return err
		}
		errs = append(errs, copyErr)
		_, err := tx.Exec(ctx, "UPDATE tandem.drift SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)", ids, copyErr.Error())
		return err
	}
	for _, n := range order {
		g := groups[n]
		p, err := repairPlan(ctx, source, target, n, targetName, opts.Mappings)
		if p != nil {
			p.lockTables = targetIsPrimary
		}
		switch {
		case err != nil:
			err = settle(g.ids, fmt.Errorf("repairing %s on %s: %w", n, targetName, err))
		case g.whole:
			_, err = p.copyAll(ctx, source, target, repairChunk)
			if err != nil {
				err = fmt.Errorf("repairing %s on %s: %w", n, targetName, err)
			}
			err = settle(g.ids, err)
		default:
			err = repairKeys(ctx, source, target, p, g.ids, g.keys, settle)
		}
		if err != nil {
			// The ledger update failed, so the transaction is lost.
			return 0, fmt.Errorf("repairing drift: updating the ledger: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("repairing drift: updating the ledger: %w", err)
	}
	return repaired, errors.Join(errs...)
}

// repairKeys copies one table's keyed entries and settles them. An entry
// whose key does not fit the table's primary key fails alone, so it cannot
// hold the others back.
func repairKeys(ctx context.Context, source, target *pgx.Conn, p *plan, ids []int64, keys [][]string,
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
	if err != nil {
		err = fmt.Errorf("repairing %s: %w", p.src.Name, err)
	}
	return settle(goodIDs, err)
}

// repairPlan returns the plan that copies the table n of source (the store
// that is not stale, whose names the entries carry) to target, the store
// stale is.
func repairPlan(ctx context.Context, source, target *pgx.Conn, n Name, stale string, ms *Mappings) (*plan, error) {
	if ms == nil {
		return loadPlan(ctx, source, target, n, n)
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
		return newMappedPlan(m, forward)
	case forward && ms.InScope(n):
		return nil, fmt.Errorf("%s is in the migration's scope but has no usable mapping (see the mapping's problems)", n)
	case !forward && ms.InScope(n):
		return nil, fmt.Errorf("no mapping has %s as its new table", n)
	}
	return loadPlan(ctx, source, target, n, n)
}
