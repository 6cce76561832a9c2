package route

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/controlschema"
)

// Channel is the NOTIFY channel that announces a new state version.
const Channel = "tandem_state"

// State is a versioned routing state as stored.
type State struct {
	Version int64 `json:"version"`
	Settings
	// Fence is non-zero while a write flip holds the write fence: new write
	// transactions wait until it is released. A fence whose lease has
	// expired (its flip died) reads as 0.
	Fence     int64     `json:"fence"`
	ChangedAt time.Time `json:"changed_at"`
	ChangedBy string    `json:"changed_by"`
}

// EnsureSchema creates or upgrades the control schema (controlschema.Apply:
// the routing tables and the initial passthrough state among the rest).
func EnsureSchema(ctx context.Context, conn *pgx.Conn) error {
	return controlschema.Apply(ctx, conn)
}

// Querier is what Load and the listing functions need: a *pgx.Conn, a
// pgx.Tx or a *pgxpool.Pool.
type Querier interface {
	QueryRow(context.Context, string, ...any) pgx.Row
	Query(context.Context, string, ...any) (pgx.Rows, error)
}

// Load reads the current state.
func Load(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (State, error) {
	var s State
	var primary string
	err := q.QueryRow(ctx, `SELECT version, primary_store, mirror, reads, shadow,
			CASE WHEN fence_expires IS NULL OR fence_expires > now() THEN fence ELSE 0 END, changed_at, changed_by
		FROM tandem.state WHERE id = 1`).Scan(&s.Version, &primary, &s.Mirror, &s.Reads, &s.Shadow, &s.Fence, &s.ChangedAt, &s.ChangedBy)
	var pe *pgconn.PgError
	if errors.Is(err, pgx.ErrNoRows) || errors.As(err, &pe) && (pe.Code == "42P01" || pe.Code == "3F000") { // undefined_table, invalid_schema_name
		return s, errors.New("the control schema has no routing state yet: it is created by tandem proxy (with a new store) or by tandem route set")
	}
	s.Primary = Store(primary)
	return s, err
}

// Change is one requested routing change.
type Change struct {
	// Next is the settings to move to, unless Edit or Rollback is set.
	Next Settings
	// Edit, if set, computes the next settings from the current ones, under
	// the state lock (e.g. to change only the reads share).
	Edit func(cur Settings) Settings
	// Rollback moves to Rollback(current settings). Set skips the caller's
	// cutover gates for it: a rollback must always be possible.
	Rollback bool
	By       string // who: user@host, or the replica
	Reason   string // why, for the history
	Force    bool   // override gates (recorded in the history)
	// Gate, if set, runs inside the transaction after the legality checks and
	// may refuse the change (with an *IllegalError with Gate set, which Force
	// overrides).
	Gate func(ctx context.Context, tx pgx.Tx, cur, next Settings) error
}

// target is the settings ch moves cur to.
func (ch Change) target(cur Settings) Settings {
	switch {
	case ch.Rollback:
		return Rollback(cur)
	case ch.Edit != nil:
		return ch.Edit(cur)
	}
	return ch.Next
}

// Apply checks and applies a change in one transaction: lock the state row,
// check the transition, bump the version, record the history, and NOTIFY the
// replicas on commit. It returns the new state; a change to identical
// settings returns the current state without a new version. Apply is the
// low-level step: it does not raise a write fence or wait for replicas (Set
// does), and it refuses to run while another process holds the fence.
func Apply(ctx context.Context, conn *pgx.Conn, ch Change) (State, error) {
	return apply(ctx, conn, ch, guard{})
}

// guard is what Set holds while it applies a change.
type guard struct {
	version int64 // refuse unless the state is still at this version (0: any)
	fence   int64 // the write fence held (0: none)
}

// ErrConcurrentChange reports that the state changed between a change's
// checks and its application; nothing was applied.
var ErrConcurrentChange = errors.New("the routing state was changed concurrently; nothing was applied: check it and retry")

func apply(ctx context.Context, conn *pgx.Conn, ch Change, g guard) (State, error) {
	var out State
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT 1 FROM tandem.state WHERE id = 1 FOR UPDATE"); err != nil {
			return err
		}
		cur, err := Load(ctx, tx)
		if err != nil {
			return err
		}
		if g.version != 0 && cur.Version != g.version {
			return fmt.Errorf("version %d became %d: %w", g.version, cur.Version, ErrConcurrentChange)
		}
		if cur.Fence != g.fence {
			if g.fence != 0 {
				return fmt.Errorf("the write fence %d is no longer held (its lease expired); nothing was applied", g.fence)
			}
			return &IllegalError{Reason: fmt.Sprintf("a write flip is in progress (fence %d); retry when it has ended", cur.Fence)}
		}
		next := ch.target(cur.Settings)
		if cur.Settings == next {
			out = cur
			return nil
		}
		if err := CheckTransition(cur.Settings, next, ch.Force); err != nil {
			return err
		}
		if ch.Gate != nil {
			if err := ch.Gate(ctx, tx, cur.Settings, next); err != nil {
				var ie *IllegalError
				if !(ch.Force && errors.As(err, &ie) && ie.Gate) {
					return err
				}
			}
		}
		v := cur.Version + 1
		if _, err := tx.Exec(ctx, `UPDATE tandem.state SET version = $1, primary_store = $2, mirror = $3, reads = $4,
			shadow = $5, changed_at = now(), changed_by = $6 WHERE id = 1`,
			v, string(next.Primary), next.Mirror, next.Reads, next.Shadow, ch.By); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO tandem.state_history (version, primary_store, mirror, reads, shadow, changed_by, reason, forced)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
			v, string(next.Primary), next.Mirror, next.Reads, next.Shadow, ch.By, ch.Reason, ch.Force); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT pg_notify($1, $2)", Channel, fmt.Sprint(v)); err != nil {
			return err
		}
		out, err = Load(ctx, tx)
		return err
	})
	return out, err
}

// AckChannel is the NOTIFY channel on which replicas announce that they
// acknowledged a version or a write fence, so a flip waiting for them
// wakes at once.
const AckChannel = "tandem_ack"

// ReplicaStatus is what a replica reports with each heartbeat.
type ReplicaStatus struct {
	Breaker string `json:"breaker"` // the secondary store's circuit breaker: "closed", "half-open" or "open"
	Writers int64  `json:"writers"` // sessions in a transaction or a write
}

// Ack records replica's heartbeat: the version it applies, the write fence
// it has drained (0: none) and its status. With notify, it also wakes the
// processes waiting for acknowledgements.
func Ack(ctx context.Context, conn *pgx.Conn, replica string, version, fence int64, status ReplicaStatus, notify bool) error {
	if status.Breaker == "" {
		status.Breaker = "closed"
	}
	_, err := conn.Exec(ctx, `INSERT INTO tandem.replicas (replica_id, acked_version, fence_acked, breaker, writers)
		VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (replica_id) DO UPDATE SET acked_version = excluded.acked_version, fence_acked = excluded.fence_acked,
			breaker = excluded.breaker, writers = excluded.writers, heartbeat_at = now()`,
		replica, version, fence, status.Breaker, status.Writers)
	if err == nil && notify {
		_, err = conn.Exec(ctx, "SELECT pg_notify($1, $2)", AckChannel, replica)
	}
	return err
}

// Replica is one proxy replica as last heard from.
type Replica struct {
	ID           string    `json:"id"`
	AckedVersion int64     `json:"acked_version"`
	FenceAcked   int64     `json:"fence_acked"` // the last write fence it drained
	HeartbeatAt  time.Time `json:"heartbeat_at"`
	StartedAt    time.Time `json:"started_at"`
	ReplicaStatus
	Live bool `json:"live"` // heard from within the liveness window
}

// Replicas lists the replicas heard from within live.
func Replicas(ctx context.Context, q Querier, live time.Duration) ([]Replica, error) {
	all, err := ListReplicas(ctx, q, live)
	if err != nil {
		return nil, err
	}
	out := all[:0]
	for _, r := range all {
		if r.Live {
			out = append(out, r)
		}
	}
	return out, nil
}

// ListReplicas lists every replica ever recorded, marking those heard from
// within live.
func ListReplicas(ctx context.Context, q Querier, live time.Duration) ([]Replica, error) {
	rows, err := q.Query(ctx, `SELECT replica_id, acked_version, fence_acked, heartbeat_at, started_at, breaker, writers,
			heartbeat_at > now() - $1::interval
		FROM tandem.replicas ORDER BY replica_id`, live.String())
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Replica, error) {
		var rep Replica
		err := r.Scan(&rep.ID, &rep.AckedVersion, &rep.FenceAcked, &rep.HeartbeatAt, &rep.StartedAt, &rep.Breaker, &rep.Writers, &rep.Live)
		return rep, err
	})
}

// HistoryEntry is one version in tandem.state_history.
type HistoryEntry struct {
	Version int64 `json:"version"`
	Settings
	ChangedAt time.Time `json:"changed_at"`
	ChangedBy string    `json:"changed_by"`
	Reason    string    `json:"reason"`
	Forced    bool      `json:"forced"`
	// FenceMS is how long the write fence was held, for a write flip.
	FenceMS *float64 `json:"fence_ms,omitempty"`
}

// History returns the last n versions, newest first.
func History(ctx context.Context, q Querier, n int) ([]HistoryEntry, error) {
	rows, err := q.Query(ctx, `SELECT version, primary_store, mirror, reads, shadow, changed_at, changed_by, reason, forced, fence_ms
		FROM tandem.state_history ORDER BY version DESC LIMIT $1`, n)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (HistoryEntry, error) {
		var h HistoryEntry
		var primary string
		err := r.Scan(&h.Version, &primary, &h.Mirror, &h.Reads, &h.Shadow, &h.ChangedAt, &h.ChangedBy, &h.Reason, &h.Forced, &h.FenceMS)
		h.Primary = Store(primary)
		return h, err
	})
}

// PruneReplicas deletes the rows of replicas not heard from for longer
// than olderThan (which must be at least live, so that no replica a flip
// waits for is removed) and returns their ids. A pruned replica that comes
// back registers again with its next heartbeat.
func PruneReplicas(ctx context.Context, conn *pgx.Conn, olderThan, live time.Duration) ([]string, error) {
	if olderThan < live {
		return nil, fmt.Errorf("prune: %s is shorter than the liveness window %s: a live replica could be removed", olderThan, live)
	}
	rows, err := conn.Query(ctx, `DELETE FROM tandem.replicas WHERE heartbeat_at < now() - $1::interval RETURNING replica_id`, olderThan.String())
	if err != nil {
		return nil, err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	slices.Sort(ids)
	return ids, nil
}
