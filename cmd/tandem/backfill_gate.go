package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// backfillGate refuses a write flip to new while a table in scope (one the
// backfill copies: a usable mapping and a key) has not finished its
// backfill: rows that existed before mirroring started would be missing on
// the new store of record. Rollbacks skip it (route.Set skips the gates);
// --force overrides it and the history records that.
func backfillGate(cfg *config.Config) route.Gate {
	return func(ctx context.Context, control *pgx.Conn, cur, next route.Settings) error {
		if cur.Primary == next.Primary || next.Primary != route.New {
			return nil
		}
		refuse := func(reason string) error { return &route.IllegalError{Gate: true, Reason: reason} }
		ms, _, err := loadMappings(ctx, cfg)
		if err != nil {
			return refuse("the backfill could not be checked: " + err.Error())
		}
		occ, err := storeConnConfig(cfg, route.Old)
		if err != nil {
			return refuse("the backfill could not be checked: " + err.Error())
		}
		old, err := pgx.ConnectConfig(ctx, occ)
		if err != nil {
			return refuse("the backfill could not be checked: connecting to the old store: " + err.Error())
		}
		defer old.Close(context.WithoutCancel(ctx))
		left, err := backfill.UnfinishedTables(ctx, control, ms, func(ctx context.Context, n table.Name) (int64, error) {
			return estimateRows(ctx, old, n)
		})
		if err != nil {
			return refuse("the backfill could not be checked: " + err.Error())
		}
		if len(left) == 0 {
			return nil
		}
		var rows int64
		names := make([]string, 0, len(left))
		for _, u := range left {
			names = append(names, u.String())
			rows += u.RowsLeft
		}
		return refuse(fmt.Sprintf("the backfill has not finished on %d table(s) in scope, ~%d rows left: %s; run tandem backfill (GET /api/v1/backfill shows its progress)",
			len(left), rows, strings.Join(names, ", ")))
	}
}

// estimateRows is the planner's row estimate of an old table, or its
// count when it was never analyzed.
func estimateRows(ctx context.Context, old *pgx.Conn, n table.Name) (int64, error) {
	id := pgx.Identifier{n.Schema, n.Table}.Sanitize()
	var est float64
	if err := old.QueryRow(ctx, "SELECT coalesce((SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)), -1)", id).Scan(&est); err != nil {
		return 0, fmt.Errorf("estimating the rows of %s: %w", n, err)
	}
	if est >= 0 {
		return int64(est), nil
	}
	var count int64
	if err := old.QueryRow(ctx, "SELECT count(*) FROM "+id).Scan(&count); err != nil {
		return 0, fmt.Errorf("counting the rows of %s: %w", n, err)
	}
	return count, nil
}

// refreshBackfill reads the backfill's state from the control schema every
// poll interval into the backfill metrics, whichever process runs it.
func (cp *controlPlane) refreshBackfill(ctx context.Context, bm *metrics.Backfill) {
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
