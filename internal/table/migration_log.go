package table

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/controlschema"
)

// The sources of migration log entries.
const (
	LogSourceBackfill = "backfill"
	LogSourceCompare  = "compare"
)

// The statuses of migration log entries.
const (
	LogDone     = "done"     // a backfill unit copied its rows
	LogFailed   = "failed"   // a unit failed; Error says why
	LogRepaired = "repaired" // a verify repaired the keys of the entry
)

// EnsureMigrationLog creates or upgrades the migration log (and the rest of
// the control schema) on conn, the control database: controlschema.Apply.
// A log made by an older Tandem, before the source column and the
// 'repaired' status, is upgraded by migration 1.
func EnsureMigrationLog(ctx context.Context, conn *pgx.Conn) error {
	if err := controlschema.Apply(ctx, conn); err != nil {
		return fmt.Errorf("creating the migration log: %w", err)
	}
	return nil
}

// LogEntry is one unit of work in the migration log: a key range (or one
// key, Lo = Hi with LoInclusive) of a table, copied, failed or repaired.
type LogEntry struct {
	Table       Name
	Lo, Hi      []string // the key range, as text in key order; nil = unbounded
	LoInclusive bool
	Rows        int
	// Status is LogDone, LogFailed or LogRepaired; empty means LogFailed
	// when Err is set and LogDone otherwise.
	Status   string
	Err      error
	Duration time.Duration
	Attempt  int    // from 1; 0 means 1
	Worker   string // who ran the unit
	Source   string // LogSourceBackfill (when empty) or LogSourceCompare
}

// LogUnit appends e to the migration log through q, a connection to the
// control database or a transaction on it.
func LogUnit(ctx context.Context, q Execer, e LogEntry) error {
	status := e.Status
	var msg *string
	if e.Err != nil {
		s := e.Err.Error()
		msg = &s
		if status == "" {
			status = LogFailed
		}
	}
	if status == "" {
		status = LogDone
	}
	if e.Source == "" {
		e.Source = LogSourceBackfill
	}
	if e.Attempt < 1 {
		e.Attempt = 1
	}
	_, err := q.Exec(ctx, `INSERT INTO tandem.migration_log (schema_name, table_name, lo, lo_inclusive, hi, rows, status, error, duration_ms, attempt, worker_id, source)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)`,
		e.Table.Schema, e.Table.Table, e.Lo, e.LoInclusive, e.Hi, e.Rows, status, msg, float64(e.Duration.Microseconds())/1000, e.Attempt, e.Worker, e.Source)
	if err != nil {
		return fmt.Errorf("writing the migration log: %w", err)
	}
	return nil
}
