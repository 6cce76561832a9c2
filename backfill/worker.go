package backfill

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// conns are one worker's connections: claim holds the claim transaction,
// log writes the migration log outside it (a unit's entry survives the
// claim's rollback).
type conns struct {
	claim, log, primary, secondary *pgx.Conn
	// snap holds snapTx, the worker's transaction in the exported
	// snapshot (the snapshot path only; nil when lost).
	snap   *pgx.Conn
	snapTx pgx.Tx
}

func (e *Engine) connect(ctx context.Context) (*conns, error) {
	var c conns
	for _, x := range []struct {
		dst  **pgx.Conn
		cfg  *pgx.ConnConfig
		what string
	}{{&c.claim, e.o.Control, "the control database"}, {&c.log, e.o.Control, "the control database"},
		{&c.primary, e.o.Primary, "the old store"}, {&c.secondary, e.o.Secondary, "the new store"}} {
		conn, err := pgx.ConnectConfig(ctx, x.cfg.Copy())
		if err != nil {
			c.close(ctx)
			return nil, fmt.Errorf("connecting to %s: %w", x.what, err)
		}
		*x.dst = conn
	}
	return &c, nil
}

func (c *conns) close(ctx context.Context) {
	for _, x := range []*pgx.Conn{c.claim, c.log, c.primary, c.secondary, c.snap} {
		if x != nil {
			x.Close(context.WithoutCancel(ctx))
		}
	}
}

// chunkRow is a claimed chunk.
type chunkRow struct {
	table      table.Name
	chunk      int
	lo, hi     []string
	attempt    int
	failedKeys [][]string
}

// worker claims chunks and copies them until none is left to claim.
func (e *Engine) worker(ctx context.Context, id string, run []table.Name) error {
	if len(run) == 0 {
		return nil
	}
	c, err := e.connect(ctx)
	if err != nil {
		return err
	}
	defer c.close(ctx)
	if e.snap != nil {
		if err := e.importSnapshot(ctx, c); err != nil {
			return err
		}
	}
	schemas, names := split(run)
	tick := time.NewTicker(e.o.Poll)
	defer tick.Stop()
	for {
		tx, ch, err := e.claim(ctx, c.claim, id, schemas, names)
		if err != nil {
			return err
		}
		if tx == nil {
			// Nothing claimable: done unless another worker still holds a
			// chunk or a failed one waits for its backoff.
			var left int
			if err := c.log.QueryRow(ctx, `SELECT count(*) FROM tandem.backfill_chunks
				WHERE status <> 'done' AND attempts < $3 AND (schema_name, table_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))`,
				schemas, names, e.o.MaxAttempts).Scan(&left); err != nil {
				return fmt.Errorf("counting chunks: %w", err)
			}
			if left == 0 {
				return nil
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-tick.C:
			}
			continue
		}
		if c.snapTx != nil && e.snap.loaders[ch.table] != nil && len(ch.failedKeys) == 0 {
			err = e.runSnapshotChunk(ctx, c, tx, id, ch)
		} else {
			err = e.runChunk(ctx, c, tx, id, ch)
		}
		_ = tx.Rollback(context.WithoutCancel(ctx)) // a no-op after commit
		if err != nil {
			return err
		}
	}
}

// claim locks the next claimable chunk FOR UPDATE SKIP LOCKED and marks it
// running in the returned transaction, which the worker holds until the
// chunk is finished: if the worker dies, the claim rolls back. nil: none.
func (e *Engine) claim(ctx context.Context, conn *pgx.Conn, id string, schemas, names []string) (pgx.Tx, *chunkRow, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("claiming a chunk: %w", err)
	}
	var ch chunkRow
	var fk []byte
	err = tx.QueryRow(ctx, `SELECT schema_name, table_name, chunk, lo, hi, attempts, failed_keys FROM tandem.backfill_chunks
		WHERE status <> 'done' AND attempts < $3 AND (next_attempt_at IS NULL OR next_attempt_at <= now())
		  AND (schema_name, table_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))
		ORDER BY attempts, schema_name, table_name, chunk LIMIT 1 FOR UPDATE SKIP LOCKED`, schemas, names, e.o.MaxAttempts).
		Scan(&ch.table.Schema, &ch.table.Table, &ch.chunk, &ch.lo, &ch.hi, &ch.attempt, &fk)
	if errors.Is(err, pgx.ErrNoRows) {
		_ = tx.Rollback(ctx)
		return nil, nil, nil
	}
	if err == nil {
		err = json.Unmarshal(fk, &ch.failedKeys)
	}
	if err == nil {
		ch.attempt++
		_, err = tx.Exec(ctx, `UPDATE tandem.backfill_chunks SET status = 'running', claimed_by = $4, claimed_at = now(), updated_at = now(), attempts = $5
			WHERE schema_name = $1 AND table_name = $2 AND chunk = $3`, ch.table.Schema, ch.table.Table, ch.chunk, id, ch.attempt)
	}
	if err != nil {
		_ = tx.Rollback(ctx)
		return nil, nil, fmt.Errorf("claiming a chunk: %w", err)
	}
	return tx, &ch, nil
}

// unitLog is one migration log entry.
type unitLog struct {
	table       table.Name
	lo, hi      []string
	loInclusive bool
	rows        int
	err         error
	duration    time.Duration
	attempt     int
	worker      string
}

func writeLog(ctx context.Context, conn *pgx.Conn, l unitLog) error {
	return table.LogUnit(ctx, conn, table.LogEntry{Table: l.table, Lo: l.lo, Hi: l.hi, LoInclusive: l.loInclusive, Rows: l.rows,
		Err: l.err, Duration: l.duration, Attempt: l.attempt, Worker: l.worker, Source: table.LogSourceBackfill})
}

// runChunk copies one claimed chunk from its checkpoint and records the
// outcome in the claim transaction, then commits it. A failing key is
// logged and kept in failed_keys; the chunk is then failed, and claimed
// again after a backoff (its failed keys first).
func (e *Engine) runChunk(ctx context.Context, c *conns, claim pgx.Tx, id string, ch *chunkRow) error {
	r := &chunkRun{e: e, c: c, id: id, ch: ch, ts: e.progress[ch.table],
		log: e.o.Logger.With("table", ch.table.String(), "chunk", ch.chunk, "worker", id, "attempt", ch.attempt)}
	cursor, found, err := r.checkpoint(ctx)
	if err != nil {
		return err
	}
	// Keys that failed before go first, one unit each.
	if err := r.failedKeys(ctx); err != nil {
		return err
	}
	// A chunk whose checkpoint reached its end is copied already.
	if !(found && ch.hi != nil && keysEqual(cursor, ch.hi)) {
		lo := ch.lo
		if found && cursor != nil {
			lo = cursor
		}
		if err := r.copyRange(ctx, lo); err != nil {
			return err
		}
	}
	return r.record(ctx, claim)
}

// chunkRun is one chunk copied under lock: what failed so far.
type chunkRun struct {
	e       *Engine
	c       *conns
	id      string
	ch      *chunkRow
	ts      *tableState
	log     *slog.Logger
	failed  [][]string
	lastErr error
}

// checkpoint reads the chunk's checkpoint on new: its cursor, and whether
// there is one.
func (r *chunkRun) checkpoint(ctx context.Context) ([]string, bool, error) {
	ch := r.ch
	var cursor []string
	var rows int64
	ck := r.e.onNew(ch.table)
	err := r.c.secondary.QueryRow(ctx, `SELECT cursor, rows FROM tandem.backfill_checkpoints WHERE schema_name = $1 AND table_name = $2 AND chunk = $3`,
		ck.Schema, ck.Table, ch.chunk).Scan(&cursor, &rows)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("reading the checkpoint of %s chunk %d: %w", ch.table, ch.chunk, err)
	}
	return cursor, true, nil
}

// keyFailed logs a key that failed and keeps it for failed_keys.
func (r *chunkRun) keyFailed(ctx context.Context, key []string, err error) error {
	r.log.Warn("backfill key failed", "key", key, "err", err)
	r.failed = append(r.failed, key)
	r.lastErr = fmt.Errorf("key %q: %w", key, err)
	return writeLog(ctx, r.c.log, unitLog{table: r.ch.table, lo: key, loInclusive: true, hi: key, err: err, attempt: r.ch.attempt, worker: r.id})
}

// failedKeys copies the keys that failed in an earlier claim, one unit each.
func (r *chunkRun) failedKeys(ctx context.Context) error {
	ch := r.ch
	for _, k := range ch.failedKeys {
		start := time.Now()
		res, err := table.CopyKeysMapped(ctx, r.c.primary, r.c.secondary, r.ts.m, true, [][]string{k})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			if kerr := r.keyFailed(ctx, k, err); kerr != nil {
				return kerr
			}
			continue
		}
		r.ts.done.Add(int64(res.Upserted))
		if err := writeLog(ctx, r.c.log, unitLog{table: ch.table, lo: k, loInclusive: true, hi: k, rows: res.Upserted, duration: time.Since(start), attempt: ch.attempt, worker: r.id}); err != nil {
			return err
		}
	}
	return nil
}

// copyRange copies the chunk from lo to its end with the locked-copy unit,
// each unit's checkpoint in its new-store transaction. A failure that is
// not a row's (a lost connection, ...) is logged and fails the chunk, for
// a later claim to retry; the worker's connections are renewed.
func (r *chunkRun) copyRange(ctx context.Context, lo []string) error {
	ch, e := r.ch, r.e
	ck := e.onNew(ch.table)
	_, _, err := table.CopyRangeMapped(ctx, r.c.primary, r.c.secondary, r.ts.m, true, table.RangeOptions{
		Lo: lo, Hi: ch.hi, Chunk: e.o.Chunk,
		Checkpoint: func(ctx context.Context, tx pgx.Tx, cur []string, n int) error {
			_, err := tx.Exec(ctx, `INSERT INTO tandem.backfill_checkpoints AS c (schema_name, table_name, chunk, cursor, rows) VALUES ($1, $2, $3, $4, $5)
				ON CONFLICT (schema_name, table_name, chunk) DO UPDATE SET cursor = excluded.cursor, rows = c.rows + excluded.rows, updated_at = now()`,
				ck.Schema, ck.Table, ch.chunk, cur, n)
			return err
		},
		Done: func(ctx context.Context, u table.UnitReport) error {
			r.ts.done.Add(int64(u.Rows))
			if err := writeLog(ctx, r.c.log, unitLog{table: ch.table, lo: u.Lo, loInclusive: u.LoInclusive, hi: u.Hi, rows: u.Rows,
				duration: u.Duration, attempt: ch.attempt, worker: r.id}); err != nil {
				return err
			}
			return e.pace(ctx, u.Rows)
		},
		KeyFailed: r.keyFailed,
	})
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	r.log.Warn("backfill chunk failed", "err", err)
	r.lastErr = err
	if lerr := writeLog(ctx, r.c.log, unitLog{table: ch.table, lo: lo, hi: ch.hi, err: err, attempt: ch.attempt, worker: r.id}); lerr != nil {
		return errors.Join(err, lerr)
	}
	if r.c.primary.IsClosed() || r.c.secondary.IsClosed() {
		if e2 := e.reconnect(ctx, r.c); e2 != nil {
			return errors.Join(err, e2)
		}
	}
	return nil
}

// record writes the chunk's outcome (done or failed, rows from the
// checkpoints, failed keys, the backoff) in the claim transaction, commits
// it and counts it.
func (r *chunkRun) record(ctx context.Context, claim pgx.Tx) error {
	ch, e := r.ch, r.e
	var total int64
	ck := e.onNew(ch.table)
	if err := r.c.secondary.QueryRow(ctx, `SELECT coalesce(sum(rows), 0) FROM tandem.backfill_checkpoints WHERE schema_name = $1 AND table_name = $2 AND chunk = $3`,
		ck.Schema, ck.Table, ch.chunk).Scan(&total); err != nil {
		return fmt.Errorf("reading the checkpoint of %s chunk %d: %w", ch.table, ch.chunk, err)
	}
	fk, _ := json.Marshal(r.failed)
	status, errText := "done", (*string)(nil)
	if r.lastErr != nil {
		status = "failed"
		s := r.lastErr.Error()
		errText = &s
	}
	backoff := e.o.Backoff * time.Duration(1<<min(ch.attempt-1, 10))
	if _, err := claim.Exec(ctx, `UPDATE tandem.backfill_chunks SET status = $4, last_error = $5, failed_keys = $6::jsonb, rows = $7, updated_at = now(),
			next_attempt_at = CASE WHEN $4 = 'failed' THEN now() + $8::interval END
		WHERE schema_name = $1 AND table_name = $2 AND chunk = $3`,
		ch.table.Schema, ch.table.Table, ch.chunk, status, errText, string(fk), total, backoff.String()); err != nil {
		return fmt.Errorf("finishing %s chunk %d: %w", ch.table, ch.chunk, err)
	}
	if err := claim.Commit(ctx); err != nil {
		return fmt.Errorf("finishing %s chunk %d: %w", ch.table, ch.chunk, err)
	}
	e.mu.Lock()
	if status == "done" {
		r.ts.p.ChunksDone++
	} else if ch.attempt >= e.o.MaxAttempts {
		r.ts.p.ChunksFailed++
		r.ts.p.FailedKeys += len(r.failed)
	}
	e.mu.Unlock()
	return nil
}

// reconnect replaces the worker's closed store connections.
func (e *Engine) reconnect(ctx context.Context, c *conns) error {
	for _, x := range []struct {
		conn **pgx.Conn
		cfg  *pgx.ConnConfig
	}{{&c.primary, e.o.Primary}, {&c.secondary, e.o.Secondary}} {
		if !(*x.conn).IsClosed() {
			continue
		}
		conn, err := pgx.ConnectConfig(ctx, x.cfg.Copy())
		if err != nil {
			return fmt.Errorf("reconnecting: %w", err)
		}
		*x.conn = conn
	}
	return nil
}

// single copies Options.Key or Options.Range of one table, without the
// chunk table, logging each unit.
func (e *Engine) single(ctx context.Context, control, primary, secondary *pgx.Conn, m *table.Mapping) error {
	o := &e.o
	ts := e.progress[m.Old.Name]
	id := o.WorkerID + ":single"
	if o.DryRun {
		return nil
	}
	if o.Key != nil {
		start := time.Now()
		r, err := table.CopyKeysMapped(ctx, primary, secondary, m, true, [][]string{o.Key})
		ts.done.Add(int64(r.Upserted))
		if lerr := writeLog(ctx, control, unitLog{table: m.Old.Name, lo: o.Key, loInclusive: true, hi: o.Key, rows: r.Upserted,
			err: err, duration: time.Since(start), attempt: 1, worker: id}); lerr != nil {
			return errors.Join(err, lerr)
		}
		if err != nil {
			ts.p.FailedKeys++
		}
		return err
	}
	_, _, err := table.CopyRangeMapped(ctx, primary, secondary, m, true, table.RangeOptions{
		Lo: o.RangeLo, LoInclusive: true, Hi: o.RangeHi, Chunk: o.Chunk,
		Done: func(ctx context.Context, u table.UnitReport) error {
			ts.done.Add(int64(u.Rows))
			if err := writeLog(ctx, control, unitLog{table: m.Old.Name, lo: u.Lo, loInclusive: u.LoInclusive, hi: u.Hi, rows: u.Rows,
				duration: u.Duration, attempt: 1, worker: id}); err != nil {
				return err
			}
			return e.pace(ctx, u.Rows)
		},
	})
	if err != nil {
		ts.p.FailedKeys++
		if lerr := writeLog(ctx, control, unitLog{table: m.Old.Name, lo: o.RangeLo, loInclusive: true, hi: o.RangeHi, err: err, attempt: 1, worker: id}); lerr != nil {
			return errors.Join(err, lerr)
		}
	}
	return err
}

// Failure is one failed unit in the migration log, with how often it
// failed and whether a later unit copied it.
type Failure struct {
	Table    table.Name `json:"table"`
	Lo       []string   `json:"lo"` // the unit's key range, as text
	Hi       []string   `json:"hi"`
	Error    string     `json:"error"`
	Attempts int        `json:"attempts"`
	Last     time.Time  `json:"last"`
	Fixed    bool       `json:"fixed"` // a later unit with the same range succeeded
}

// Report summarises the failures in the migration log, newest first.
// Before the first backfill there is no log, and so no failure.
func Report(ctx context.Context, control *pgx.Conn) ([]Failure, error) {
	var exists bool
	if err := control.QueryRow(ctx, `SELECT to_regclass('tandem.migration_log') IS NOT NULL`).Scan(&exists); err != nil {
		return nil, err
	}
	if !exists {
		return []Failure{}, nil
	}
	rows, err := control.Query(ctx, `SELECT f.schema_name, f.table_name, f.lo, f.hi, f.error, f.n, f.last,
			EXISTS (SELECT 1 FROM tandem.migration_log d WHERE d.status = 'done' AND d.schema_name = f.schema_name AND d.table_name = f.table_name
				AND d.lo IS NOT DISTINCT FROM f.lo AND d.hi IS NOT DISTINCT FROM f.hi AND d.logged_at > f.last)
		FROM (SELECT schema_name, table_name, lo, hi, (array_agg(error ORDER BY id DESC))[1] AS error, count(*) AS n, max(logged_at) AS last
			FROM tandem.migration_log WHERE status = 'failed' GROUP BY 1, 2, 3, 4) f
		ORDER BY f.last DESC`)
	if err != nil {
		return nil, fmt.Errorf("reading the migration log: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Failure, error) {
		var f Failure
		err := r.Scan(&f.Table.Schema, &f.Table.Table, &f.Lo, &f.Hi, &f.Error, &f.Attempts, &f.Last, &f.Fixed)
		return f, err
	})
	if err != nil {
		return nil, fmt.Errorf("reading the migration log: %w", err)
	}
	return out, nil
}
