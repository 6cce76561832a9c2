package table

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// MigrationLogSchemaSQL creates the migration log in the control schema,
// and upgrades one created before the source column and the 'repaired'
// status. It is idempotent; run it under the control schema's advisory
// lock (EnsureMigrationLog does).
//
// The status check is replaced by name: a log created by an older Tandem
// has the auto-named check (status IN ('done', 'failed')), which is dropped
// with every other check on status before migration_log_status_allowed is
// added, once.
const MigrationLogSchemaSQL = `
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.migration_log (
	id          bigserial PRIMARY KEY,
	schema_name text NOT NULL,
	table_name  text NOT NULL,
	lo          text[],
	lo_inclusive boolean NOT NULL DEFAULT false,
	hi          text[],
	rows        bigint NOT NULL DEFAULT 0,
	status      text NOT NULL CONSTRAINT migration_log_status_allowed CHECK (status IN ('done', 'failed', 'repaired')),
	error       text,
	duration_ms double precision NOT NULL DEFAULT 0,
	attempt     int NOT NULL DEFAULT 1,
	worker_id   text NOT NULL,
	logged_at   timestamptz NOT NULL DEFAULT now(),
	source      text NOT NULL DEFAULT 'backfill'
);
ALTER TABLE tandem.migration_log ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT 'backfill';
DO $tandem$
DECLARE
	c record;
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'tandem.migration_log'::regclass
			AND contype = 'c' AND conname = 'migration_log_status_allowed') THEN
		FOR c IN SELECT conname FROM pg_constraint WHERE conrelid = 'tandem.migration_log'::regclass
				AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%status%' LOOP
			EXECUTE format('ALTER TABLE tandem.migration_log DROP CONSTRAINT %I', c.conname);
		END LOOP;
		ALTER TABLE tandem.migration_log ADD CONSTRAINT migration_log_status_allowed
			CHECK (status IN ('done', 'failed', 'repaired'));
	END IF;
END
$tandem$;
COMMENT ON COLUMN tandem.migration_log.source IS 'the tool that ran the unit: backfill or compare (a verify repair)';
CREATE INDEX IF NOT EXISTS migration_log_failed ON tandem.migration_log (schema_name, table_name) WHERE status = 'failed';
`

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

// EnsureMigrationLog creates or upgrades the migration log (and the control
// schema) on conn, the control database, under the control schema's
// advisory lock.
func EnsureMigrationLog(ctx context.Context, conn *pgx.Conn) error {
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", schemaLock); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, MigrationLogSchemaSQL)
		return err
	})
	if err != nil {
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
