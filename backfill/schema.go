// Package backfill copies the rows that exist before mirroring started from
// the old store to the new one while live writes continue (design section
// 4). Each unit is internal/table's locked-copy unit over one chunk of a
// key range, through the table's mapping; the units are claimed from a
// chunk table in the control schema, so several workers and processes share
// one backfill, and every unit is logged in the migration log.
package backfill

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// controlSchemaSQL creates the backfill's tables in the control schema. It
// is idempotent. The migration log is table.MigrationLogSchemaSQL, run with
// it.
const controlSchemaSQL = `
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.backfill_tables (
	schema_name text NOT NULL,
	table_name  text NOT NULL,
	total_rows  bigint NOT NULL,
	chunks      int NOT NULL,
	planned_at  timestamptz NOT NULL DEFAULT now(),
	finished_at timestamptz,
	PRIMARY KEY (schema_name, table_name)
);
COMMENT ON TABLE tandem.backfill_tables IS 'one row per table a backfill has planned; finished_at is set when every chunk is done';
CREATE TABLE IF NOT EXISTS tandem.backfill_chunks (
	schema_name     text NOT NULL,
	table_name      text NOT NULL,
	chunk           int NOT NULL,
	lo              text[],
	hi              text[],
	status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
	claimed_by      text,
	claimed_at      timestamptz,
	attempts        int NOT NULL DEFAULT 0,
	next_attempt_at timestamptz,
	last_error      text,
	failed_keys     jsonb NOT NULL DEFAULT '[]',
	rows            bigint NOT NULL DEFAULT 0,
	created_at      timestamptz NOT NULL DEFAULT now(),
	updated_at      timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (schema_name, table_name, chunk)
);
COMMENT ON COLUMN tandem.backfill_chunks.lo IS 'the chunk covers keys after lo (NULL: from the start) up to hi inclusive (NULL: to the end), as text in key order';
CREATE TABLE IF NOT EXISTS tandem.backfill_slots (
	slot_name      text PRIMARY KEY,
	consistent_lsn pg_lsn NOT NULL,
	schemas        text[] NOT NULL,
	tables         text[] NOT NULL,
	created_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tandem.backfill_slots IS 'the logical slot on the old store of a snapshot backfill: its changes from consistent_lsn on are reconciled before its tables are finished; dropped with the row after the reconcile';
COMMENT ON COLUMN tandem.backfill_chunks.status IS 'a worker claims a chunk by locking its row FOR UPDATE for as long as it works on it; running without a lock means the claim died';
`

// checkpointSchemaSQL creates the checkpoint table on the secondary (the
// new store): a unit writes its checkpoint in the transaction that writes
// its rows, so both commit or neither.
const checkpointSchemaSQL = `
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.backfill_checkpoints (
	schema_name text NOT NULL,
	table_name  text NOT NULL,
	chunk       int NOT NULL,
	cursor      text[],
	rows        bigint NOT NULL DEFAULT 0,
	updated_at  timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (schema_name, table_name, chunk)
);
CREATE TABLE IF NOT EXISTS tandem.backfill_recheck (
	schema_name text NOT NULL,
	table_name  text NOT NULL,
	key         text[] NOT NULL,
	PRIMARY KEY (schema_name, table_name, key)
);
COMMENT ON TABLE tandem.backfill_recheck IS 'keys the new store already held in a chunk''s range when the snapshot backfill loaded it (not overwritten): the reconcile copies them again under lock';
COMMENT ON TABLE tandem.backfill_checkpoints IS 'written by tandem backfill in the same transaction as the rows it copies; cursor = the last key copied of the chunk';
`

// schemaLock is the advisory lock every creator of the control schema
// takes (the one internal/route and internal/table take).
const schemaLock = "tandem.route.schema"

// EnsureSchema creates the backfill's tables in the control database and
// the checkpoint table on the secondary when they are missing.
func EnsureSchema(ctx context.Context, control, secondary *pgx.Conn) error {
	for _, s := range []struct {
		conn *pgx.Conn
		sql  string
		what string
	}{{control, controlSchemaSQL + table.MigrationLogSchemaSQL, "control database"}, {secondary, checkpointSchemaSQL, "new store"}} {
		err := pgx.BeginFunc(ctx, s.conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", schemaLock); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, s.sql)
			return err
		})
		if err != nil {
			return fmt.Errorf("creating the backfill tables in the %s: %w", s.what, err)
		}
	}
	return nil
}
