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
	"github.com/tandemdb/tandem/internal/controlschema"
)

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
// takes; the checkpoint table on the new store is created under it too.
const schemaLock = controlschema.Lock

// EnsureSchema creates the backfill's tables in the control database (the
// control schema's migrations: controlschema.Apply) and the checkpoint
// table on the secondary when they are missing.
func EnsureSchema(ctx context.Context, control, secondary *pgx.Conn) error {
	if err := controlschema.Apply(ctx, control); err != nil {
		return fmt.Errorf("creating the backfill tables in the control database: %w", err)
	}
	err := pgx.BeginFunc(ctx, secondary, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", schemaLock); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, checkpointSchemaSQL)
		return err
	})
	if err != nil {
		return fmt.Errorf("creating the backfill tables in the new store: %w", err)
	}
	return nil
}
