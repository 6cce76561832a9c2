package backfill

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/controlschema"
	"github.com/tandemdb/tandem/internal/table"
)

// EnsureControl creates the live control row (tandem.backfill_control: the
// rate and the pause switch every running engine polls) in the control
// database when it is missing: controlschema.Apply.
func EnsureControl(ctx context.Context, control *pgx.Conn) error {
	if err := controlschema.Apply(ctx, control); err != nil {
		return fmt.Errorf("creating tandem.backfill_control: %w", err)
	}
	return nil
}

// Control is the live throttle shared by every process of a backfill.
type Control struct {
	Rate      float64   `json:"rate"` // rows per second; 0 = unlimited
	Paused    bool      `json:"paused"`
	UpdatedAt time.Time `json:"updated_at"`
	UpdatedBy string    `json:"updated_by,omitempty"`
}

// ControlChange is a partial change of the control row: nil fields keep
// their value.
type ControlChange struct {
	Rate   *float64
	Paused *bool
	By     string // who asks, recorded in updated_by
}

// Check reports what is wrong with ch.
func (ch ControlChange) Check() error {
	if ch.Rate == nil && ch.Paused == nil {
		return errors.New("nothing to change: set rate or paused")
	}
	if ch.Rate != nil && (*ch.Rate < 0 || math.IsNaN(*ch.Rate) || math.IsInf(*ch.Rate, 0)) {
		return fmt.Errorf("rate must be a finite number of rows per second >= 0 (0 = unlimited), not %v", *ch.Rate)
	}
	return nil
}

// SetControl applies ch to the control row (creating it if needed) and
// returns the row after the change. Running engines apply it at their next
// poll (Options.ControlPoll).
func SetControl(ctx context.Context, control *pgx.Conn, ch ControlChange) (Control, error) {
	if err := ch.Check(); err != nil {
		return Control{}, err
	}
	if err := EnsureControl(ctx, control); err != nil {
		return Control{}, err
	}
	var c Control
	var by *string
	err := control.QueryRow(ctx, `UPDATE tandem.backfill_control SET rate = coalesce($1, rate), paused = coalesce($2, paused),
			updated_at = now(), updated_by = $3 WHERE id = 1
		RETURNING rate, paused, updated_at, updated_by`, ch.Rate, ch.Paused, ch.By).Scan(&c.Rate, &c.Paused, &c.UpdatedAt, &by)
	if err != nil {
		return Control{}, fmt.Errorf("updating tandem.backfill_control: %w", err)
	}
	if by != nil {
		c.UpdatedBy = *by
	}
	return c, nil
}

// Querier is a connection, a pool or a transaction.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ReadControl reads the control row; the zero Control (unlimited, not
// paused) when it does not exist yet.
func ReadControl(ctx context.Context, q Querier) (Control, error) {
	var c Control
	var by *string
	err := q.QueryRow(ctx, `SELECT rate, paused, updated_at, updated_by FROM tandem.backfill_control WHERE id = 1`).
		Scan(&c.Rate, &c.Paused, &c.UpdatedAt, &by)
	if errors.Is(err, pgx.ErrNoRows) || undefinedTable(err) {
		return Control{}, nil
	}
	if err != nil {
		return Control{}, fmt.Errorf("reading tandem.backfill_control: %w", err)
	}
	if by != nil {
		c.UpdatedBy = *by
	}
	return c, nil
}

func undefinedTable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "42P01"
}

// apply makes the engine follow the control row c where it changed since
// the row last seen (prev; nil at start, when only a set rate or a pause is
// applied), so a process's own Pause or SetRate stands until someone
// changes the row.
func (e *Engine) apply(prev *Control, c Control) {
	if (prev == nil && c.Rate > 0) || (prev != nil && prev.Rate != c.Rate) {
		e.SetRate(c.Rate)
		e.o.Logger.Info("backfill rate set through the control row", "rate", c.Rate, "by", c.UpdatedBy)
	}
	if (prev == nil && !c.Paused) || (prev != nil && prev.Paused == c.Paused) {
		return
	}
	if c.Paused {
		e.Pause()
		e.o.Logger.Warn("backfill paused through the control row (resume: POST /api/v1/backfill {\"paused\": false})", "by", c.UpdatedBy)
	} else {
		e.Resume()
		e.o.Logger.Info("backfill resumed through the control row", "by", c.UpdatedBy)
	}
}

// followControl polls the control row every ControlPoll and applies it,
// until ctx ends. Read errors are logged once per outage and the last
// applied values stay.
func (e *Engine) followControl(ctx context.Context) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.WithoutCancel(ctx))
		}
	}()
	failing := false
	t := time.NewTicker(e.o.ControlPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var err error
		if conn == nil || conn.IsClosed() {
			conn, err = pgx.ConnectConfig(ctx, e.o.Control.Copy())
			if err != nil {
				conn = nil
			}
		}
		var c Control
		if err == nil {
			c, err = ReadControl(ctx, conn)
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if !failing {
				e.o.Logger.Warn("cannot read the backfill control row; keeping the current rate and pause", "error", err)
			}
			failing = true
			if conn != nil {
				conn.Close(context.WithoutCancel(ctx))
				conn = nil
			}
			continue
		}
		failing = false
		e.apply(&e.control, c)
		e.control = c
	}
}

// TableStatus is one table's backfill as the control database records it.
type TableStatus struct {
	Table         table.Name `json:"table"`
	TotalRows     int64      `json:"total_rows"` // estimated at planning
	DoneRows      int64      `json:"done_rows"`  // rows of finished (done or failed) chunks
	Chunks        int        `json:"chunks"`
	ChunksDone    int        `json:"chunks_done"`
	ChunksFailed  int        `json:"chunks_failed"`
	ChunksRunning int        `json:"chunks_running"` // claimed by a live worker now
	Finished      bool       `json:"finished"`
	FinishedAt    *time.Time `json:"finished_at,omitempty"`
}

// RowsLeft is the estimated number of rows not yet copied.
func (t TableStatus) RowsLeft() int64 {
	if t.Finished {
		return 0
	}
	return max(t.TotalRows-t.DoneRows, 0)
}

// State is every planned backfill and the live throttle, as GET
// /api/v1/backfill returns it.
type State struct {
	Tables   []TableStatus `json:"tables"` // in name order
	Finished bool          `json:"finished"`
	Control  Control       `json:"control"`
	// Rate and Paused repeat Control's, the throttle every engine follows.
	Rate   float64 `json:"rate"`
	Paused bool    `json:"paused"`
}

// Status reads the backfill's state from the control database: per table
// its rows and chunks, and the control row. Rows are counted per finished
// chunk (a chunk's rows are recorded when it finishes), so done_rows moves
// in steps of a chunk. It works before any backfill ran (no tables).
//
// Running chunks are those whose claim row is locked by a worker: the
// query takes FOR KEY SHARE SKIP LOCKED on the unfinished chunks for the
// duration of the statement, so a claim that races it skips that chunk
// once and takes it at its next poll.
func Status(ctx context.Context, q Querier) (State, error) {
	var st State
	c, err := ReadControl(ctx, q)
	if err != nil {
		return st, err
	}
	st.Control, st.Rate, st.Paused = c, c.Rate, c.Paused
	rows, err := q.Query(ctx, `WITH free AS (
			SELECT schema_name, table_name, chunk FROM tandem.backfill_chunks WHERE status <> 'done' FOR KEY SHARE SKIP LOCKED
		)
		SELECT t.schema_name, t.table_name, t.total_rows, t.chunks, t.finished_at,
			coalesce(sum(c.rows), 0)::bigint,
			count(*) FILTER (WHERE c.status = 'done'),
			count(*) FILTER (WHERE c.status = 'failed'),
			count(*) FILTER (WHERE c.status <> 'done' AND NOT EXISTS (
				SELECT 1 FROM free f WHERE f.schema_name = c.schema_name AND f.table_name = c.table_name AND f.chunk = c.chunk))
		FROM tandem.backfill_tables t
		LEFT JOIN tandem.backfill_chunks c ON c.schema_name = t.schema_name AND c.table_name = t.table_name
		GROUP BY t.schema_name, t.table_name, t.total_rows, t.chunks, t.finished_at
		ORDER BY t.schema_name, t.table_name`)
	if err != nil {
		if undefinedTable(err) {
			return st, nil
		}
		return st, fmt.Errorf("reading the backfill's chunks: %w", err)
	}
	st.Tables, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (TableStatus, error) {
		var t TableStatus
		err := r.Scan(&t.Table.Schema, &t.Table.Table, &t.TotalRows, &t.Chunks, &t.FinishedAt, &t.DoneRows, &t.ChunksDone, &t.ChunksFailed, &t.ChunksRunning)
		t.Finished = t.FinishedAt != nil
		return t, err
	})
	if err != nil {
		if undefinedTable(err) {
			return st, nil
		}
		return st, fmt.Errorf("reading the backfill's chunks: %w", err)
	}
	if st.Tables == nil {
		st.Tables = []TableStatus{}
	}
	st.Finished = len(st.Tables) > 0
	for _, t := range st.Tables {
		if !t.Finished {
			st.Finished = false
		}
	}
	return st, nil
}

// Unfinished is an in-scope table whose backfill has not finished.
type Unfinished struct {
	Table    table.Name
	Planned  bool  // a backfill has planned it
	RowsLeft int64 // estimated; for an unplanned table, the old store's estimate
}

func (u Unfinished) String() string {
	if !u.Planned {
		return fmt.Sprintf("%s (not backfilled: ~%d rows)", u.Table, u.RowsLeft)
	}
	return fmt.Sprintf("%s (~%d rows left)", u.Table, u.RowsLeft)
}

// UnfinishedTables returns the tables of ms (those in scope with a usable
// mapping and a key, which the backfill copies) whose backfill has not
// finished, in name order. estimate gives an unplanned table's row count
// (nil: 0).
func UnfinishedTables(ctx context.Context, control Querier, ms *table.Mappings, estimate func(context.Context, table.Name) (int64, error)) ([]Unfinished, error) {
	st, err := Status(ctx, control)
	if err != nil {
		return nil, err
	}
	byName := map[table.Name]TableStatus{}
	for _, t := range st.Tables {
		byName[t.Table] = t
	}
	var out []Unfinished
	for _, m := range ms.All() {
		n := m.Old.Name
		if !m.Owner() || m.MergeMember() || !ms.InScope(n) || !m.Old.HasKey() {
			continue
		}
		t, ok := byName[n]
		switch {
		case ok && t.Finished:
			continue
		case ok:
			out = append(out, Unfinished{Table: n, Planned: true, RowsLeft: t.RowsLeft()})
		default:
			u := Unfinished{Table: n}
			if estimate != nil {
				if u.RowsLeft, err = estimate(ctx, n); err != nil {
					return nil, err
				}
			}
			out = append(out, u)
		}
	}
	slices.SortFunc(out, func(a, b Unfinished) int { return strings.Compare(a.Table.String(), b.Table.String()) })
	return out, nil
}

// startControl creates the control row, writes Options.Rate to it when set
// (so every process of the backfill follows the rate the last one was
// started with), and applies the row before the first chunk is claimed.
func (e *Engine) startControl(ctx context.Context, control *pgx.Conn) error {
	if err := EnsureControl(ctx, control); err != nil {
		return err
	}
	var c Control
	var err error
	if e.o.Rate > 0 {
		r := e.o.Rate
		c, err = SetControl(ctx, control, ControlChange{Rate: &r, By: e.o.WorkerID})
	} else {
		c, err = ReadControl(ctx, control)
	}
	if err != nil {
		return err
	}
	e.apply(nil, c)
	e.control = c
	return nil
}
