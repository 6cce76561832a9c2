// Package controlschema is the one versioned list of migrations of the
// control schema (schema tandem: the routing state, replicas, drift ledger,
// migration log, backfill tables, verify runs, shadow-read mismatches, the
// change feed's progress) and the one place they are applied (Apply).
//
// Every package that owns control tables (internal/route, internal/table,
// internal/mismatch, backfill, compare, feed) reaches them through Apply,
// so the schema a binary finds is always the one it knows, whichever of its
// commands runs first. The version applied is in tandem.schema_version; a
// schema newer than the binary knows is refused (NewerSchemaError) rather
// than used, so an older replica left running during an upgrade of Tandem
// stops writing to tables whose meaning it does not know.
//
// It imports no other package of the module, so each owner can import it.
package controlschema

import (
	"context"
	_ "embed"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// Migration is one step of the control schema. Its SQL runs once, in the
// transaction that records Version in tandem.schema_version.
type Migration struct {
	Version int
	Name    string
	SQL     string
}

//go:embed 0001_control_schema.sql
var v1 string

//go:embed 0002_backfill_slots.sql
var v2 string

//go:embed 0003_backfill_deferred_indexes.sql
var v3 string

// Migrations are every step, in order. Append; never edit an entry that
// has shipped (a schema that applied it will not run it again).
var Migrations = []Migration{
	{1, "the control schema as created before it was versioned", v1},
	{2, "the snapshot backfill's slot", v2},
	{3, "the backfill's deferred indexes", v3},
}

// Latest is the version of the control schema this binary knows.
func Latest() int { return Migrations[len(Migrations)-1].Version }

// Lock is the advisory lock (hashtext of it) every creator of the control
// schema takes: this package, and every release before it, so an older and
// a newer binary starting at once are serialised too.
const Lock = "tandem.route.schema"

// versionSQL creates the version table. It runs under Lock before any
// migration; a schema made before the versions has no row in it (version 0).
const versionSQL = `
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.schema_version (
	version    int PRIMARY KEY,
	name       text NOT NULL,
	applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tandem.schema_version IS 'one row per control-schema migration applied (internal/controlschema); a Tandem binary refuses a schema newer than it knows'`

// DB is what Apply needs: a *pgx.Conn or a *pgxpool.Pool (a pgx.Tx works
// too, as a savepoint).
type DB interface {
	Begin(ctx context.Context) (pgx.Tx, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// NewerSchemaError is the refusal of a control schema newer than this
// binary: it is shaped as PostgreSQL's errors are (SQLSTATE, message,
// hint), so it reads like the others an operator sees.
type NewerSchemaError struct {
	Found, Known int
}

// Code is the error's SQLSTATE: 55000, object_not_in_prerequisite_state.
func (e *NewerSchemaError) Code() string { return "55000" }

// Hint says what to do.
func (e *NewerSchemaError) Hint() string {
	return "a newer Tandem created or upgraded this control schema: run that release (or a later one) on every replica and CLI; a schema is never downgraded"
}

func (e *NewerSchemaError) Error() string {
	return fmt.Sprintf("ERROR: the control schema tandem is at version %d, newer than this Tandem knows (%d) (SQLSTATE %s)\nHINT: %s",
		e.Found, e.Known, e.Code(), e.Hint())
}

// Version reads the version of the control schema on db: 0 when it has
// none (no schema, or one made before the versions).
func Version(ctx context.Context, db DB) (int, error) {
	// Looked up first rather than read and caught: an error would abort
	// the transaction db may be.
	var exists bool
	if err := db.QueryRow(ctx, "SELECT to_regclass('tandem.schema_version') IS NOT NULL").Scan(&exists); err != nil || !exists {
		return 0, err
	}
	var v int
	err := db.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM tandem.schema_version").Scan(&v)
	return v, err
}

// Apply brings the control schema on db up to Latest: it creates it, or
// upgrades one made by an older release (with or without a version), and
// refuses one newer than it knows with a *NewerSchemaError. Concurrent
// callers, in this process or others, are serialised by the advisory lock
// Lock; the first applies, the others find the work done. When the schema
// is already current it costs one query and takes no lock.
func Apply(ctx context.Context, db DB) error {
	v, err := Version(ctx, db)
	if err != nil {
		return fmt.Errorf("reading the control schema's version: %w", err)
	}
	if err := check(v); err != nil || v == Latest() {
		return err
	}
	return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", Lock); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, versionSQL); err != nil {
			return fmt.Errorf("creating tandem.schema_version: %w", err)
		}
		v, err := Version(ctx, tx) // again, under the lock: another caller may have applied meanwhile
		if err != nil {
			return err
		}
		if err := check(v); err != nil {
			return err
		}
		for _, m := range Migrations {
			if m.Version <= v {
				continue
			}
			if _, err := tx.Exec(ctx, m.SQL); err != nil {
				return fmt.Errorf("control schema migration %d (%s): %w", m.Version, m.Name, err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO tandem.schema_version (version, name) VALUES ($1, $2)", m.Version, m.Name); err != nil {
				return fmt.Errorf("recording control schema migration %d: %w", m.Version, err)
			}
		}
		return nil
	})
}

func check(v int) error {
	if v > Latest() {
		return &NewerSchemaError{Found: v, Known: Latest()}
	}
	return nil
}
