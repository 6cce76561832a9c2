package table

// The drift ledger, tandem.drift: the writes a store may have missed
// (RecordDrift), read as open and stuck drift (OpenDrift, StuckDrift). The
// repairer that closes its entries is repair.go.

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/controlschema"
)

// EnsureSchema creates the drift ledger (and the rest of the control
// schema) when missing: controlschema.Apply.
func EnsureSchema(ctx context.Context, conn *pgx.Conn) error {
	return controlschema.Apply(ctx, conn)
}

// Execer runs a statement. *pgx.Conn, pgx.Tx and *pgxpool.Pool satisfy it.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// The stores a drift entry can name as stale. They are the routing
// state's store names (route.Old and route.New).
const (
	StaleOld = "old"
	StaleNew = "new"
)

// DriftEntry is one write that a store may have missed.
type DriftEntry struct {
	Table  Name
	Key    []string // the key values as text, in key order; nil = the whole table
	Reason string
	// Stale names the store that missed the write: the secondary when the
	// write ran, StaleOld or StaleNew. Empty means StaleNew (the secondary
	// before any write flip).
	Stale string
}

func checkStore(what, s string) error {
	if s != StaleOld && s != StaleNew {
		return fmt.Errorf("%s must be %q or %q, not %q", what, StaleOld, StaleNew, s)
	}
	return nil
}

// RecordDrift adds entries to the drift ledger in one statement, so they are
// recorded all or none.
func RecordDrift(ctx context.Context, q Execer, entries []DriftEntry) error {
	if len(entries) == 0 {
		return nil
	}
	type entry struct {
		Schema string   `json:"s"`
		Table  string   `json:"t"`
		Key    []string `json:"k"` // null = whole table
		Reason string   `json:"r"`
		Stale  string   `json:"x"`
	}
	list := make([]entry, len(entries))
	for i, e := range entries {
		if e.Stale == "" {
			e.Stale = StaleNew
		}
		if err := checkStore("recording drift: the stale store", e.Stale); err != nil {
			return err
		}
		list[i] = entry{Schema: e.Table.Schema, Table: e.Table.Table, Reason: e.Reason, Stale: e.Stale}
		if len(e.Key) > 0 {
			list[i].Key = e.Key
		}
	}
	b, err := json.Marshal(list)
	if err != nil {
		return fmt.Errorf("recording drift: %w", err)
	}
	_, err = q.Exec(ctx, `INSERT INTO tandem.drift (schema_name, table_name, key, reason, stale)
		SELECT e->>'s', e->>'t',
			CASE WHEN jsonb_typeof(e->'k') = 'array' THEN ARRAY(SELECT jsonb_array_elements_text(e->'k')) END,
			e->>'r', e->>'x'
		FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS x(e, n)
		ORDER BY n`, string(b))
	if err != nil {
		return fmt.Errorf("recording drift: %w", err)
	}
	return nil
}

// OpenDrift returns the number of open (unrepaired) entries per table,
// whichever store they are stale on; an entry for the whole table counts as
// one.
func OpenDrift(ctx context.Context, q Querier) (map[Name]int, error) {
	byStore, err := OpenDriftByStore(ctx, q)
	if err != nil {
		return nil, err
	}
	out := map[Name]int{}
	for _, m := range byStore {
		for n, c := range m {
			out[n] += c
		}
	}
	return out, nil
}

// OpenDriftByStore returns the number of open entries per stale store
// (StaleOld, StaleNew) and table. A store with no open entry is absent.
func OpenDriftByStore(ctx context.Context, q Querier) (map[string]map[Name]int, error) {
	rows, err := q.Query(ctx, `SELECT stale, schema_name, table_name, count(*) FROM tandem.drift
		WHERE repaired_at IS NULL GROUP BY stale, schema_name, table_name`)
	if err != nil {
		return nil, fmt.Errorf("reading open drift: %w", err)
	}
	defer rows.Close()
	out := map[string]map[Name]int{}
	for rows.Next() {
		var stale string
		var n Name
		var c int
		if err := rows.Scan(&stale, &n.Schema, &n.Table, &c); err != nil {
			return nil, fmt.Errorf("reading open drift: %w", err)
		}
		if out[stale] == nil {
			out[stale] = map[Name]int{}
		}
		out[stale][n] = c
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading open drift: %w", err)
	}
	return out, nil
}

// OpenDriftTotal returns the number of open entries.
func OpenDriftTotal(ctx context.Context, q Querier) (int64, error) {
	var n int64
	if err := q.QueryRow(ctx, "SELECT count(*) FROM tandem.drift WHERE repaired_at IS NULL").Scan(&n); err != nil {
		return 0, fmt.Errorf("reading open drift: %w", err)
	}
	return n, nil
}

// DefaultStuckAttempts is the failed repair attempts after which an open
// drift entry counts as stuck, when not configured
// (routing.drift_stuck_attempts).
const DefaultStuckAttempts = 5

// StuckEntry is an open drift entry that the repairer has failed to repair
// at least the stuck bound of times in a row: it needs an operator.
type StuckEntry struct {
	ID           int64
	Table        Name
	Key          []string // nil = the whole table
	Stale        string   // the store that missed the write
	Reason       string
	Attempts     int
	LastError    string
	FailingSince time.Time
	NextAttempt  time.Time
}

// StuckDrift returns up to limit open entries with at least minAttempts
// failed repair attempts (at least 1), those failing longest first, and
// how many there are in all.
func StuckDrift(ctx context.Context, q Querier, minAttempts, limit int) ([]StuckEntry, int64, error) {
	minAttempts = max(minAttempts, 1)
	var total int64
	if err := q.QueryRow(ctx, "SELECT count(*) FROM tandem.drift WHERE repaired_at IS NULL AND attempts >= $1", minAttempts).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("reading stuck drift: %w", err)
	}
	if total == 0 || limit <= 0 {
		return nil, total, nil
	}
	rows, err := q.Query(ctx, `SELECT id, schema_name, table_name, key, stale, reason, attempts, coalesce(last_error, ''),
			coalesce(failing_since, recorded_at), coalesce(next_attempt_at, now())
		FROM tandem.drift WHERE repaired_at IS NULL AND attempts >= $1
		ORDER BY failing_since NULLS FIRST, id LIMIT $2`, minAttempts, limit)
	if err != nil {
		return nil, 0, fmt.Errorf("reading stuck drift: %w", err)
	}
	defer rows.Close()
	var out []StuckEntry
	for rows.Next() {
		var e StuckEntry
		if err := rows.Scan(&e.ID, &e.Table.Schema, &e.Table.Table, &e.Key, &e.Stale, &e.Reason, &e.Attempts, &e.LastError,
			&e.FailingSince, &e.NextAttempt); err != nil {
			return nil, 0, fmt.Errorf("reading stuck drift: %w", err)
		}
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("reading stuck drift: %w", err)
	}
	return out, total, nil
}
