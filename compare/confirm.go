package compare

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

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
