package route

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Channel is the NOTIFY channel that announces a new state version.
const Channel = "tandem_state"

// schemaSQL creates the control schema's routing tables. It is idempotent.
const schemaSQL = `
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.state (
	id         int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
	version    bigint NOT NULL,
	primary_store text NOT NULL CHECK (primary_store IN ('old', 'new')),
	mirror     boolean NOT NULL,
	reads      int NOT NULL CHECK (reads BETWEEN 0 AND 100),
	shadow     int NOT NULL CHECK (shadow BETWEEN 0 AND 100),
	changed_at timestamptz NOT NULL DEFAULT now(),
	changed_by text NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem.state_history (
	version    bigint PRIMARY KEY,
	primary_store text NOT NULL,
	mirror     boolean NOT NULL,
	reads      int NOT NULL,
	shadow     int NOT NULL,
	changed_at timestamptz NOT NULL DEFAULT now(),
	changed_by text NOT NULL,
	reason     text NOT NULL DEFAULT '',
	forced     boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS tandem.replicas (
	replica_id    text PRIMARY KEY,
	acked_version bigint NOT NULL,
	heartbeat_at  timestamptz NOT NULL DEFAULT now(),
	started_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tandem.state (id, version, primary_store, mirror, reads, shadow, changed_by)
VALUES (1, 1, 'old', false, 0, 0, 'tandem: initial passthrough')
ON CONFLICT (id) DO NOTHING;
INSERT INTO tandem.state_history (version, primary_store, mirror, reads, shadow, changed_by, reason)
VALUES (1, 'old', false, 0, 0, 'tandem: initial passthrough', 'control schema created')
ON CONFLICT (version) DO NOTHING;
`

// State is a versioned routing state as stored.
type State struct {
	Version int64 `json:"version"`
	Settings
	ChangedAt time.Time `json:"changed_at"`
	ChangedBy string    `json:"changed_by"`
}

// EnsureSchema creates the control schema's routing tables and the initial
// passthrough state when they are missing. Concurrent callers are serialised
// with an advisory lock.
func EnsureSchema(ctx context.Context, conn *pgx.Conn) error {
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('tandem.route.schema'))"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, schemaSQL)
		return err
	})
}

// Load reads the current state.
func Load(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (State, error) {
	var s State
	var primary string
	err := q.QueryRow(ctx, `SELECT version, primary_store, mirror, reads, shadow, changed_at, changed_by
		FROM tandem.state WHERE id = 1`).Scan(&s.Version, &primary, &s.Mirror, &s.Reads, &s.Shadow, &s.ChangedAt, &s.ChangedBy)
	if errors.Is(err, pgx.ErrNoRows) {
		return s, errors.New("the control schema has no routing state; run EnsureSchema (tandem proxy does) first")
	}
	s.Primary = Store(primary)
	return s, err
}

// Change is one requested routing change.
type Change struct {
	Next   Settings
	By     string // who: user@host, or the replica
	Reason string // why, for the history
	Force  bool   // override gates (recorded in the history)
	// Gate, if set, runs inside the transaction after the legality checks and
	// may refuse the change (with an *IllegalError with Gate set, which Force
	// overrides).
	Gate func(ctx context.Context, tx pgx.Tx, cur, next Settings) error
}

// Apply checks and applies a change in one transaction: lock the state row,
// check the transition, bump the version, record the history, and NOTIFY the
// replicas on commit. It returns the new state; a change to identical
// settings returns the current state without a new version.
func Apply(ctx context.Context, conn *pgx.Conn, ch Change) (State, error) {
	var out State
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT 1 FROM tandem.state WHERE id = 1 FOR UPDATE"); err != nil {
			return err
		}
		cur, err := Load(ctx, tx)
		if err != nil {
			return err
		}
		if cur.Settings == ch.Next {
			out = cur
			return nil
		}
		if err := CheckTransition(cur.Settings, ch.Next, ch.Force); err != nil {
			return err
		}
		if ch.Gate != nil {
			if err := ch.Gate(ctx, tx, cur.Settings, ch.Next); err != nil {
				var ie *IllegalError
				if !(ch.Force && errors.As(err, &ie) && ie.Gate) {
					return err
				}
			}
		}
		next := cur.Version + 1
		if _, err := tx.Exec(ctx, `UPDATE tandem.state SET version = $1, primary_store = $2, mirror = $3, reads = $4,
			shadow = $5, changed_at = now(), changed_by = $6 WHERE id = 1`,
			next, string(ch.Next.Primary), ch.Next.Mirror, ch.Next.Reads, ch.Next.Shadow, ch.By); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO tandem.state_history (version, primary_store, mirror, reads, shadow, changed_by, reason, forced)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
			next, string(ch.Next.Primary), ch.Next.Mirror, ch.Next.Reads, ch.Next.Shadow, ch.By, ch.Reason, ch.Force); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT pg_notify($1, $2)", Channel, fmt.Sprint(next)); err != nil {
			return err
		}
		out, err = Load(ctx, tx)
		return err
	})
	return out, err
}

// Ack records that replica applied version, as its heartbeat.
func Ack(ctx context.Context, conn *pgx.Conn, replica string, version int64) error {
	_, err := conn.Exec(ctx, `INSERT INTO tandem.replicas (replica_id, acked_version) VALUES ($1, $2)
		ON CONFLICT (replica_id) DO UPDATE SET acked_version = excluded.acked_version, heartbeat_at = now()`, replica, version)
	return err
}

// Replica is one proxy replica as last heard from.
type Replica struct {
	ID           string
	AckedVersion int64
	HeartbeatAt  time.Time
}

// Replicas lists the replicas heard from within live.
func Replicas(ctx context.Context, conn *pgx.Conn, live time.Duration) ([]Replica, error) {
	rows, err := conn.Query(ctx, `SELECT replica_id, acked_version, heartbeat_at FROM tandem.replicas
		WHERE heartbeat_at > now() - $1::interval ORDER BY replica_id`, live.String())
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Replica, error) {
		var rep Replica
		err := r.Scan(&rep.ID, &rep.AckedVersion, &rep.HeartbeatAt)
		return rep, err
	})
}
