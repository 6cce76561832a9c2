package compare

import (
	"context"
	"fmt"

	"github.com/tandemdb/tandem/internal/table"
)

// driftPage is the number of drift entries checked at a time.
const driftPage = 1000

// driftFirst verifies the keys of the table's open drift entries that are
// stale on new, before the walk: they are where a difference is most
// likely. Each is hashed on both stores and confirmed like a difference
// the walk finds; the walk does not report these keys again. With
// Options.Repair, every such key is copied with the locked-copy unit
// (which settles the key whether or not it differed) and its entries are
// marked repaired; the entries are claimed FOR UPDATE SKIP LOCKED in a
// control transaction held until then, as table.RepairWith claims them,
// so a concurrent drift repairer never takes the same entry. Without
// Repair, the entries stay open. Entries for the whole table (NULL key)
// need nothing more: the walk covers the whole table. Entries stale on
// old are left to the drift repairer, whose direction they need.
func (v *verifier) driftFirst(ctx context.Context) error {
	var exists bool
	if err := v.run.conn.QueryRow(ctx, "SELECT to_regclass('tandem.drift') IS NOT NULL").Scan(&exists); err != nil {
		return fmt.Errorf("verifying %s: reading the drift ledger: %w", v.sum.Table, err)
	}
	if !exists {
		return nil
	}
	sql := `SELECT id, key FROM tandem.drift WHERE repaired_at IS NULL AND stale = $1 AND schema_name = $2 AND table_name = $3
		AND key IS NOT NULL AND id > $4 ORDER BY id LIMIT $5`
	if v.opts.Repair {
		sql += " FOR UPDATE SKIP LOCKED"
	}
	var after int64
	for {
		n, err := v.driftPage(ctx, sql, &after)
		if err != nil {
			return fmt.Errorf("verifying %s: checking the drift keys: %w", v.sum.Table, err)
		}
		if n < driftPage {
			return nil
		}
	}
}

// driftPage checks one page of entries after *after and advances it. It
// returns the number of entries read.
func (v *verifier) driftPage(ctx context.Context, sql string, after *int64) (int, error) {
	tx, err := v.run.conn.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op after commit
	rows, err := tx.Query(ctx, sql, table.StaleNew, v.m.Old.Name.Schema, v.m.Old.Name.Table, *after, driftPage)
	if err != nil {
		return 0, err
	}
	var ids []int64
	var keys [][]string
	n := 0
	for rows.Next() {
		var id int64
		var key []string
		if err := rows.Scan(&id, &key); err != nil {
			rows.Close()
			return 0, err
		}
		n++
		*after = id
		// An entry whose key does not fit the primary key stays open for
		// the drift repairer, which reports it.
		if len(key) != len(v.o.key) {
			continue
		}
		ids = append(ids, id)
		if _, ok := v.seen[joinKey(key)]; !ok {
			v.seen[joinKey(key)] = struct{}{}
			keys = append(keys, key)
		}
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	if len(keys) == 0 {
		return n, tx.Commit(ctx)
	}
	v.sum.DriftKeys += len(keys)
	om, err := v.o.keysHashes(ctx, v.old, keys, false)
	if err != nil {
		return 0, err
	}
	nm, err := v.n.keysHashes(ctx, v.new, keys, false)
	if err != nil {
		return 0, err
	}
	diffs, err := v.confirm(ctx, diffKeys(om, nm, keys))
	if err != nil {
		return 0, err
	}
	if !v.opts.Repair {
		return n, tx.Commit(ctx)
	}
	if err := v.repair(ctx, keys, tx); err != nil {
		return 0, err
	}
	v.sum.Repaired += len(diffs)
	if _, err := tx.Exec(ctx, "UPDATE tandem.drift SET repaired_at = now() WHERE id = ANY($1)", ids); err != nil {
		return 0, err
	}
	return n, tx.Commit(ctx)
}
