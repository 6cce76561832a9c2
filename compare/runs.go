package compare

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/controlschema"
	"github.com/tandemdb/tandem/internal/table"
)

// Run is one table's latest finished verify.
type Run struct {
	Table, NewTable table.Name
	Finished        time.Time
	Clean           bool // no unrepaired difference
	Diffs           int  // confirmed differences, repaired or not
	Repaired        int
	Rows            int64
	ID              int64
}

// LastRuns returns, per old table, the latest run with status 'done' (nil map entry when never verified). It returns an empty map, not an error, when tandem.verify_runs does not exist yet.
func LastRuns(ctx context.Context, q table.Querier) (map[table.Name]Run, error) {
	out := map[table.Name]Run{}
	var exists bool
	if err := q.QueryRow(ctx, "SELECT to_regclass('tandem.verify_runs') IS NOT NULL").Scan(&exists); err != nil {
		return nil, fmt.Errorf("reading the verify runs: %w", err)
	}
	if !exists {
		return out, nil
	}
	rows, err := q.Query(ctx, `SELECT DISTINCT ON (schema_name, table_name) id, schema_name, table_name, new_schema, new_table,
			finished_at, coalesce(clean, false), missing_on_new + missing_on_old + value_diff, repaired, rows
		FROM tandem.verify_runs WHERE status = 'done' ORDER BY schema_name, table_name, id DESC`)
	if err != nil {
		return nil, fmt.Errorf("reading the verify runs: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var r Run
		var fin *time.Time
		if err := rows.Scan(&r.ID, &r.Table.Schema, &r.Table.Table, &r.NewTable.Schema, &r.NewTable.Table, &fin, &r.Clean, &r.Diffs,
			&r.Repaired, &r.Rows); err != nil {
			return nil, fmt.Errorf("reading the verify runs: %w", err)
		}
		if fin != nil {
			r.Finished = *fin
		}
		out[r.Table] = r
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading the verify runs: %w", err)
	}
	return out, nil
}

// run is one table's row in tandem.verify_runs, on a control connection
// of its own that holds the table's verify lock.
type run struct {
	cfg    *pgx.ConnConfig
	conn   *pgx.Conn
	id     int64
	table  table.Name
	worker string
}

// startRun connects to the control database, creates the verify's tables
// when missing, takes the table's verify lock, and starts a run or, with
// resume, continues the table's latest unfinished one: it then loads the
// run's counts into sum and returns its checkpoint.
func startRun(ctx context.Context, cfg *pgx.ConnConfig, m *table.Mapping, resume bool, sum *TableSummary) (*run, []string, error) {
	name := m.UnitName() // a split's dependent parts verify under names of their own
	conn, err := pgx.ConnectConfig(ctx, cfg.Copy())
	if err != nil {
		return nil, nil, fmt.Errorf("verifying %s: connecting to the control database: %w", name, err)
	}
	host, _ := os.Hostname()
	r := &run{cfg: cfg, conn: conn, table: name, worker: fmt.Sprintf("compare %s/%d", host, os.Getpid())}
	fail := func(err error) (*run, []string, error) {
		r.close()
		return nil, nil, fmt.Errorf("verifying %s: %w", name, err)
	}
	if err := ensureSchema(ctx, conn); err != nil {
		return fail(err)
	}
	// A session lock, released when the connection closes, so two
	// verifies of one table cannot share (and garble) its run.
	if err := verifyLock(ctx, conn, name); err != nil {
		return fail(err)
	}
	var cp []string
	if resume {
		var status string
		var c struct{ mon, moo, vd, tr, rep, dk, ranges int64 }
		err := conn.QueryRow(ctx, `SELECT id, status, checkpoint, rows, ranges, missing_on_new, missing_on_old, value_diff, transient, repaired, drift_keys
			FROM tandem.verify_runs WHERE schema_name = $1 AND table_name = $2 ORDER BY id DESC LIMIT 1`, name.Schema, name.Table).
			Scan(&r.id, &status, &cp, &sum.Rows, &c.ranges, &c.mon, &c.moo, &c.vd, &c.tr, &c.rep, &c.dk)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			r.id = 0
		case err != nil:
			return fail(fmt.Errorf("reading the last run: %w", err))
		case status == "done":
			r.id, cp, sum.Rows = 0, nil, 0
		default:
			sum.Resumed = true
			sum.Ranges, sum.Transient, sum.Repaired, sum.DriftKeys = int(c.ranges), int(c.tr), int(c.rep), int(c.dk)
			for k, n := range map[Kind]int64{MissingOnNew: c.mon, MissingOnOld: c.moo, ValueDiff: c.vd} {
				if n > 0 {
					sum.Counts[k] = int(n)
				}
			}
			if _, err := conn.Exec(ctx, `UPDATE tandem.verify_runs SET status = 'running', error = NULL, updated_at = now() WHERE id = $1`, r.id); err != nil {
				return fail(fmt.Errorf("resuming run %d: %w", r.id, err))
			}
		}
	}
	if r.id == 0 {
		err := conn.QueryRow(ctx, `INSERT INTO tandem.verify_runs (schema_name, table_name, new_schema, new_table) VALUES ($1, $2, $3, $4) RETURNING id`,
			name.Schema, name.Table, m.New.Name.Schema, m.New.Name.Table).Scan(&r.id)
		if err != nil {
			return fail(fmt.Errorf("recording the run: %w", err))
		}
	}
	sum.RunID = r.id
	return r, cp, nil
}

// ensureSchema creates tandem.verify_runs and the migration log (the
// control schema's migrations: controlschema.Apply).
// verifyLock takes the session-level advisory lock of name's verify on
// conn. It waits up to 2s: a verify that has just ended (or was
// interrupted) releases the lock when its server session exits, a moment
// after its connection closed; one still running holds it, and the verify
// is refused.
func verifyLock(ctx context.Context, conn *pgx.Conn, name table.Name) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return fmt.Errorf("taking the verify lock: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit, a no-op
	if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '2s'"); err != nil {
		return fmt.Errorf("taking the verify lock: %w", err)
	}
	// A session-level lock taken in a transaction outlives its commit.
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_lock(hashtext($1))", "tandem.verify "+name.String()); err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "55P03" {
			return errors.New("another tandem compare is verifying this table")
		}
		return fmt.Errorf("taking the verify lock: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("taking the verify lock: %w", err)
	}
	return nil
}

func ensureSchema(ctx context.Context, conn *pgx.Conn) error {
	if err := controlschema.Apply(ctx, conn); err != nil {
		return fmt.Errorf("creating the verify tables in the control database: %w", err)
	}
	return nil
}

const updateRunSQL = `UPDATE tandem.verify_runs SET checkpoint = coalesce($2, checkpoint), rows = $3, ranges = $4, missing_on_new = $5,
	missing_on_old = $6, value_diff = $7, transient = $8, repaired = $9, drift_keys = $10, updated_at = now()`

func runArgs(id int64, cp []string, s *TableSummary) []any {
	return []any{id, cp, s.Rows, s.Ranges, s.Counts[MissingOnNew], s.Counts[MissingOnOld], s.Counts[ValueDiff], s.Transient, s.Repaired, s.DriftKeys}
}

// checkpoint records that every range up to cp is verified, with the
// counts so far.
func (r *run) checkpoint(ctx context.Context, cp []string, s *TableSummary) error {
	if _, err := r.conn.Exec(ctx, updateRunSQL+" WHERE id = $1", runArgs(r.id, cp, s)...); err != nil {
		return fmt.Errorf("verifying %s: writing the checkpoint: %w", r.table, err)
	}
	return nil
}

// finish records the run's end: done when runErr is nil, interrupted when
// ctx was cancelled, failed otherwise. It uses a fresh short context, as
// ctx may be done, and a new connection if the run's was broken by the
// cancellation.
func (r *run) finish(ctx context.Context, s *TableSummary, runErr error) error {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	status, msg, clean := "done", (*string)(nil), (*bool)(nil)
	switch {
	case runErr == nil:
		c := s.Clean()
		clean = &c
	case ctx.Err() != nil:
		status = "interrupted"
	default:
		status = "failed"
	}
	if runErr != nil {
		e := runErr.Error()
		msg = &e
	}
	conn := r.conn
	if conn.IsClosed() {
		c, err := pgx.ConnectConfig(fctx, r.cfg.Copy())
		if err != nil {
			return fmt.Errorf("verifying %s: recording the run as %s: %w", r.table, status, err)
		}
		defer c.Close(fctx)
		conn = c
	}
	args := append(runArgs(r.id, nil, s), status, msg, clean)
	_, err := conn.Exec(fctx, updateRunSQL+`, status = $11, error = $12, clean = $13,
		finished_at = CASE WHEN $11 = 'done' THEN now() END WHERE id = $1`, args...)
	if err != nil {
		return fmt.Errorf("verifying %s: recording the run as %s: %w", r.table, status, err)
	}
	return nil
}

func (r *run) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r.conn.Close(ctx) //nolint:errcheck // closing releases the verify lock either way
}
