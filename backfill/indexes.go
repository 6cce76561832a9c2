package backfill

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/sync/errgroup"
)

// DeferredIndex is an index of the new store that tandem backfill
// --defer-indexes dropped for the copy and has not rebuilt yet: its
// definition is saved in tandem.backfill_deferred_indexes.
type DeferredIndex struct {
	Index      table.Name // schema and name of the index
	Table      table.Name // the new table it indexes
	Definition string     // pg_get_indexdef
}

func (d DeferredIndex) String() string { return fmt.Sprintf("%s (on %s)", d.Index, d.Table) }

// deferrableSQL lists the indexes of one new table that --defer-indexes
// drops: plain (not unique, not exclusion) b-tree-or-other indexes of an
// ordinary table that are valid and that nothing depends on. Kept, always:
// the primary key (the key every path writes by: ON CONFLICT, the reconcile,
// the mirror), every unique index (a constraint on the data that mirrored
// writes must meet during the copy, and an arbiter some ON CONFLICT may
// name), exclusion constraints, the replica identity index, a CLUSTER
// index, an index backing any constraint or that any object depends on
// (pg_depend), a partition of a partitioned index, an index in a tablespace
// of its own or with a comment (its definition would not bring those back),
// and every index of a partitioned table or a partition (no CREATE INDEX
// CONCURRENTLY there). Read under search_path = pg_catalog so the
// definitions are schema-qualified.
const deferrableSQL = `SELECT n.nspname, ic.relname, pg_get_indexdef(i.indexrelid)
	FROM pg_index i
	JOIN pg_class ic ON ic.oid = i.indexrelid
	JOIN pg_namespace n ON n.oid = ic.relnamespace
	JOIN pg_class t ON t.oid = i.indrelid
	WHERE i.indrelid = $1::regclass AND t.relkind = 'r' AND NOT t.relispartition AND ic.relkind = 'i' AND NOT ic.relispartition
	  AND NOT i.indisprimary AND NOT i.indisunique AND NOT i.indisexclusion AND NOT i.indisreplident AND NOT i.indisclustered
	  AND i.indisvalid AND i.indisready AND i.indislive AND ic.reltablespace = 0
	  AND obj_description(i.indexrelid, 'pg_class') IS NULL
	  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
	  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indexrelid)
	ORDER BY ic.relname`

// DeferredIndexes lists the saved definitions of indexes not rebuilt yet.
// Before the control schema has the table (an older schema), none.
func DeferredIndexes(ctx context.Context, control Querier) ([]DeferredIndex, error) {
	var exists bool
	if err := control.QueryRow(ctx, `SELECT to_regclass('tandem.backfill_deferred_indexes') IS NOT NULL`).Scan(&exists); err != nil || !exists {
		return nil, err
	}
	rows, err := control.Query(ctx, `SELECT index_schema, index_name, schema_name, table_name, definition FROM tandem.backfill_deferred_indexes ORDER BY 1, 2`)
	if err != nil {
		return nil, fmt.Errorf("reading tandem.backfill_deferred_indexes: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (DeferredIndex, error) {
		var d DeferredIndex
		err := r.Scan(&d.Index.Schema, &d.Index.Table, &d.Table.Schema, &d.Table.Table, &d.Definition)
		return d, err
	})
}

// deferIndexes drops the deferrable indexes of the new tables of ms
// (deferrableSQL), each after its definition, as it is now, is committed
// to the control schema, and drops again any whose definition an earlier
// run saved but did not drop (it died in between). It returns how many it
// dropped.
func (e *Engine) deferIndexes(ctx context.Context, control, secondary *pgx.Conn, ms []*table.Mapping) (n int, err error) {
	unlock, err := lockIndexes(ctx, control)
	if err != nil {
		return 0, err
	}
	defer func() { err = errors.Join(err, unlock()) }()
	var found []DeferredIndex
	for _, m := range ms {
		if m.NewWhere() != "" {
			// The new table is shared with other deployments (a
			// discriminator): its indexes serve their writes and reads too.
			continue
		}
		ds, err := deferrable(ctx, secondary, m.New.Name)
		if err != nil {
			return 0, err
		}
		found = append(found, ds...)
	}
	for _, d := range found {
		if _, err := control.Exec(ctx, `INSERT INTO tandem.backfill_deferred_indexes (index_schema, index_name, schema_name, table_name, definition)
			VALUES ($1, $2, $3, $4, $5) ON CONFLICT (index_schema, index_name) DO UPDATE SET definition = excluded.definition, schema_name = excluded.schema_name,
			table_name = excluded.table_name, saved_at = now()`, d.Index.Schema, d.Index.Table, d.Table.Schema, d.Table.Table, d.Definition); err != nil {
			return 0, fmt.Errorf("saving the definition of %s: %w", d.Index, err)
		}
	}
	saved, err := DeferredIndexes(ctx, control)
	if err != nil {
		return 0, err
	}
	dropped := 0
	for _, d := range saved {
		if !slicesContainsTable(ms, d.Table) {
			continue
		}
		var exists bool
		if err := secondary.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", d.Index.Quoted()).Scan(&exists); err != nil {
			return dropped, fmt.Errorf("reading %s on the new store: %w", d, err)
		}
		if !exists { // dropped by an earlier run already
			continue
		}
		if _, err := secondary.Exec(ctx, "DROP INDEX CONCURRENTLY IF EXISTS "+d.Index.Quoted()); err != nil {
			return dropped, fmt.Errorf("dropping %s for the copy: %w", d, err)
		}
		dropped++
		e.o.Logger.Info("backfill: index dropped for the copy; rebuilt after it", "index", d.Index.String(), "table", d.Table.String())
	}
	return dropped, nil
}

// indexesLock serialises deferring and rebuilding indexes across
// processes: a definition saved by one while another rebuilt the same
// index and forgot its row could otherwise be dropped with no row left.
const indexesLock = "tandem.backfill.indexes"

// lockIndexes takes indexesLock on control (waiting for it) and returns
// its release.
func lockIndexes(ctx context.Context, control *pgx.Conn) (func() error, error) {
	if _, err := control.Exec(ctx, "SELECT pg_advisory_lock(hashtext($1))", indexesLock); err != nil {
		return nil, fmt.Errorf("taking the deferred indexes' lock: %w", err)
	}
	return func() error {
		_, err := control.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock(hashtext($1))", indexesLock)
		return err
	}, nil
}

func slicesContainsTable(ms []*table.Mapping, n table.Name) bool {
	for _, m := range ms {
		if m.New.Name == n {
			return true
		}
	}
	return false
}

// deferrable reads the deferrable indexes of the new table n.
func deferrable(ctx context.Context, secondary *pgx.Conn, n table.Name) ([]DeferredIndex, error) {
	var out []DeferredIndex
	err := pgx.BeginFunc(ctx, secondary, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL search_path = pg_catalog"); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, deferrableSQL, n.Quoted())
		if err != nil {
			return err
		}
		out, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (DeferredIndex, error) {
			d := DeferredIndex{Table: n}
			err := r.Scan(&d.Index.Schema, &d.Index.Table, &d.Definition)
			return d, err
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("reading the indexes of %s on the new store: %w", n, err)
	}
	// Only what can be rebuilt concurrently from its definition.
	kept := out[:0]
	for _, d := range out {
		if strings.HasPrefix(d.Definition, "CREATE INDEX ") {
			kept = append(kept, d)
		}
	}
	return kept, nil
}

// rebuildIndexes rebuilds the saved indexes of the tables for which keep
// is true (nil: every table), with CREATE INDEX CONCURRENTLY, the tables
// up to Workers at once, each on its own connection to the new store, and
// one table's indexes one after the other: two concurrent builds on one
// table deadlock (each waits for the other's transaction while holding the
// table's SHARE UPDATE EXCLUSIVE lock). An index that exists and is valid
// already is only forgotten; one left INVALID by a build that was killed
// is dropped and built again. A definition is deleted once its index is
// valid. It returns how many it built.
func (e *Engine) rebuildIndexes(ctx context.Context, control *pgx.Conn, keep func(table.Name) bool) (n int, err error) {
	unlock, err := lockIndexes(ctx, control)
	if err != nil {
		return 0, err
	}
	defer func() { err = errors.Join(err, unlock()) }()
	saved, err := DeferredIndexes(ctx, control)
	if err != nil {
		return 0, err
	}
	var order []table.Name
	byTable := map[table.Name][]DeferredIndex{}
	for _, d := range saved {
		if keep != nil && !keep(d.Table) {
			continue
		}
		if byTable[d.Table] == nil {
			order = append(order, d.Table)
		}
		byTable[d.Table] = append(byTable[d.Table], d)
	}
	if len(order) == 0 {
		return 0, nil
	}
	var mu sync.Mutex // control is one connection; built is shared
	built := 0
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(min(e.o.Workers, len(order)))
	for _, n := range order {
		g.Go(func() error {
			conn, err := pgx.ConnectConfig(gctx, e.o.Secondary.Copy())
			if err != nil {
				return fmt.Errorf("connecting to the new store: %w", err)
			}
			defer conn.Close(context.WithoutCancel(gctx))
			for _, d := range byTable[n] {
				b, err := rebuildIndex(gctx, conn, d)
				if err != nil {
					return err
				}
				mu.Lock()
				if b {
					built++
				}
				_, err = control.Exec(gctx, `DELETE FROM tandem.backfill_deferred_indexes WHERE index_schema = $1 AND index_name = $2`,
					d.Index.Schema, d.Index.Table)
				mu.Unlock()
				if err != nil {
					return fmt.Errorf("forgetting the definition of %s: %w", d.Index, err)
				}
				e.o.Logger.Info("backfill: index back", "index", d.Index.String(), "table", d.Table.String(), "built", b)
			}
			return nil
		})
	}
	err = g.Wait()
	return built, err
}

// rebuildIndex makes d's index exist and be valid on the new store;
// built is false when it already was.
func rebuildIndex(ctx context.Context, conn *pgx.Conn, d DeferredIndex) (built bool, err error) {
	var valid *bool
	err = conn.QueryRow(ctx, `SELECT (SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1))`, d.Index.Quoted()).Scan(&valid)
	if err != nil {
		return false, fmt.Errorf("reading %s on the new store: %w", d, err)
	}
	if valid != nil && *valid {
		return false, nil
	}
	if valid != nil { // INVALID: a CREATE INDEX CONCURRENTLY that did not finish
		if _, err := conn.Exec(ctx, "DROP INDEX CONCURRENTLY IF EXISTS "+d.Index.Quoted()); err != nil {
			return false, fmt.Errorf("dropping the invalid %s: %w", d, err)
		}
	}
	def, ok := strings.CutPrefix(d.Definition, "CREATE INDEX ")
	if !ok {
		return false, fmt.Errorf("rebuilding %s: unexpected definition %q", d, d.Definition)
	}
	if _, err := conn.Exec(ctx, "CREATE INDEX CONCURRENTLY "+def); err != nil {
		return false, fmt.Errorf("rebuilding %s: %w", d, err)
	}
	return true, nil
}
