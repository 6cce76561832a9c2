// Package mismatch keeps the evidence shadow reads produce in the control
// schema (design section 7): one row per confirmed mismatch, with the
// statement's fingerprint, its parameters (unless redacted) and a compact
// diff, and per-minute counters per replica and fingerprint, from which the
// write-flip gate computes the mismatch rate over a window.
//
// Every proxy replica writes its own rows; readers (the admin API, the gate)
// sum over replicas.
package mismatch

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/tandemdb/tandem/internal/jsonout"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/controlschema"
)

// Querier is what the package needs of a connection or pool.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// EnsureSchema creates the mismatch tables (tandem.mismatches,
// tandem.shadow_stats) if they are missing: controlschema.Apply.
func EnsureSchema(ctx context.Context, db controlschema.DB) error {
	if err := controlschema.Apply(ctx, db); err != nil {
		return fmt.Errorf("creating the mismatch tables: %w", err)
	}
	return nil
}

// Record is one confirmed shadow-read mismatch.
type Record struct {
	ID          int64           `json:"id"`
	At          time.Time       `json:"at"`
	Replica     string          `json:"replica"`
	Fingerprint string          `json:"fingerprint"`
	Statement   string          `json:"statement"`
	Params      []*string       `json:"params,omitempty"` // nil: none or redacted
	ServedBy    string          `json:"served_by"`        // the store whose result the client got
	ShadowOn    string          `json:"shadow_on"`        // the store the shadow ran on (the same one in A/A mode)
	AA          bool            `json:"aa"`
	Kind        string          `json:"kind"` // rows, columns, error
	Summary     string          `json:"summary"`
	Diff        json.RawMessage `json:"diff"`
}

// Insert stores r.
func Insert(ctx context.Context, q Querier, r Record) error {
	var params any
	if r.Params != nil {
		b, err := json.Marshal(r.Params)
		if err != nil {
			return err
		}
		params = string(b)
	}
	diff := r.Diff
	if len(diff) == 0 {
		diff = json.RawMessage("{}")
	}
	_, err := q.Exec(ctx, `INSERT INTO tandem.mismatches (replica, fingerprint, statement, params, served_by, shadow_on, aa, kind, summary, diff)
		VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10::jsonb)`,
		r.Replica, r.Fingerprint, r.Statement, params, r.ServedBy, r.ShadowOn, r.AA, r.Kind, r.Summary, string(diff))
	if err != nil {
		return fmt.Errorf("recording a shadow mismatch: %w", err)
	}
	return nil
}

// Counts are shadow-read outcomes. A compared read ends as exactly one of
// Matched, Mismatched (confirmed after the re-read) or Transient (the
// difference went away on the re-read: a race with a write, not a
// mismatch). Dropped samples found the queue full; Skipped ones could not
// be compared faithfully (a volatile function, LIMIT without ORDER BY, a
// result over the size bound...).
type Counts struct {
	Matched       int64   `json:"matched"`
	Mismatched    int64   `json:"mismatched"`
	Transient     int64   `json:"transient"`
	Dropped       int64   `json:"dropped"`
	Skipped       int64   `json:"skipped"`
	ServedSeconds float64 `json:"served_seconds"` // total latency of the served reads that were compared
	ShadowSeconds float64 `json:"shadow_seconds"` // total latency of their shadow runs
}

// Compared is the number of reads whose comparison finished.
func (c Counts) Compared() int64 { return c.Matched + c.Mismatched + c.Transient }

// Add adds o to c.
func (c *Counts) Add(o Counts) {
	c.Matched += o.Matched
	c.Mismatched += o.Mismatched
	c.Transient += o.Transient
	c.Dropped += o.Dropped
	c.Skipped += o.Skipped
	c.ServedSeconds += o.ServedSeconds
	c.ShadowSeconds += o.ShadowSeconds
}

// FlushStats adds counts (per fingerprint) to replica's row of the minute
// that holds at.
func FlushStats(ctx context.Context, q Querier, replica string, at time.Time, counts map[string]Counts) error {
	if len(counts) == 0 {
		return nil
	}
	bucket := at.UTC().Truncate(time.Minute)
	b := &pgx.Batch{}
	for fp, c := range counts {
		b.Queue(`INSERT INTO tandem.shadow_stats AS s (bucket, replica, fingerprint, matched, mismatched, transient, dropped, skipped, served_seconds, shadow_seconds)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
			ON CONFLICT (bucket, replica, fingerprint) DO UPDATE SET
				matched = s.matched + EXCLUDED.matched, mismatched = s.mismatched + EXCLUDED.mismatched,
				transient = s.transient + EXCLUDED.transient, dropped = s.dropped + EXCLUDED.dropped,
				skipped = s.skipped + EXCLUDED.skipped, served_seconds = s.served_seconds + EXCLUDED.served_seconds,
				shadow_seconds = s.shadow_seconds + EXCLUDED.shadow_seconds`,
			bucket, replica, fp, c.Matched, c.Mismatched, c.Transient, c.Dropped, c.Skipped, c.ServedSeconds, c.ShadowSeconds)
	}
	type batcher interface {
		SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
	}
	bq, ok := q.(batcher)
	if !ok {
		return errors.New("flushing shadow stats: the connection cannot send a batch")
	}
	if err := bq.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("flushing shadow stats: %w", err)
	}
	return nil
}

// FingerprintRate is one statement fingerprint's outcomes over a window.
type FingerprintRate struct {
	Fingerprint string `json:"fingerprint"`
	Statement   string `json:"statement,omitempty"` // the latest mismatching statement, if any
	Counts
}

// Rate is the shadow-read outcome over a window, in total and per
// fingerprint (those with mismatches first, then by compared reads).
type Rate struct {
	Window       jsonout.Duration  `json:"window"` // as text ("15m0s")
	Total        Counts            `json:"total"`
	Fingerprints []FingerprintRate `json:"fingerprints"`
}

// MismatchRate is confirmed mismatches over compared reads (0 when none
// were compared).
func (c Counts) MismatchRate() float64 {
	if c.Compared() == 0 {
		return 0
	}
	return float64(c.Mismatched) / float64(c.Compared())
}

// WindowRate sums every replica's counters over the last window. Missing
// tables (no proxy has shadowed yet) read as no data.
func WindowRate(ctx context.Context, q Querier, window time.Duration) (Rate, error) {
	r := Rate{Window: jsonout.Duration(window)}
	var exists bool
	if err := q.QueryRow(ctx, "SELECT to_regclass('tandem.shadow_stats') IS NOT NULL AND to_regclass('tandem.mismatches') IS NOT NULL").Scan(&exists); err != nil {
		return r, fmt.Errorf("reading shadow stats: %w", err)
	}
	if !exists {
		return r, nil
	}
	// The window starts at a minute boundary at or before now - window, so
	// the bucket in progress at the window's start counts whole.
	rows, err := q.Query(ctx, `SELECT s.fingerprint, sum(matched), sum(mismatched), sum(transient), sum(dropped), sum(skipped),
			sum(served_seconds), sum(shadow_seconds),
			(SELECT m.statement FROM tandem.mismatches m WHERE m.fingerprint = s.fingerprint ORDER BY m.id DESC LIMIT 1)
		FROM tandem.shadow_stats s
		WHERE s.bucket >= date_trunc('minute', now() - $1::interval)
		GROUP BY s.fingerprint`, window)
	if err != nil {
		return r, fmt.Errorf("reading shadow stats: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var f FingerprintRate
		var stmt *string
		if err := rows.Scan(&f.Fingerprint, &f.Matched, &f.Mismatched, &f.Transient, &f.Dropped, &f.Skipped,
			&f.ServedSeconds, &f.ShadowSeconds, &stmt); err != nil {
			return r, fmt.Errorf("reading shadow stats: %w", err)
		}
		if stmt != nil {
			f.Statement = *stmt
		}
		r.Total.Add(f.Counts)
		r.Fingerprints = append(r.Fingerprints, f)
	}
	if err := rows.Err(); err != nil {
		return r, fmt.Errorf("reading shadow stats: %w", err)
	}
	slices.SortFunc(r.Fingerprints, func(a, b FingerprintRate) int {
		if a.Mismatched != b.Mismatched {
			return cmp.Compare(b.Mismatched, a.Mismatched)
		}
		if a.Compared() != b.Compared() {
			return cmp.Compare(b.Compared(), a.Compared())
		}
		return cmp.Compare(a.Fingerprint, b.Fingerprint)
	})
	return r, nil
}

// Group is the mismatches of one statement fingerprint.
type Group struct {
	Fingerprint string    `json:"fingerprint"`
	Statement   string    `json:"statement"` // the latest one's text
	Count       int64     `json:"count"`
	First       time.Time `json:"first_at"`
	Last        time.Time `json:"last_at"`
	Samples     []Record  `json:"samples"` // the latest ones, newest first
}

// ListOptions filter List.
type ListOptions struct {
	Since       time.Time // only mismatches at or after this (zero: all)
	Fingerprint string    // only this fingerprint (empty: all)
	Samples     int       // records per group (default 3)
}

// List returns the stored mismatches grouped by fingerprint, the group
// with the latest mismatch first. Missing tables read as none.
func List(ctx context.Context, q Querier, o ListOptions) ([]Group, error) {
	if o.Samples < 1 {
		o.Samples = 3
	}
	var exists bool
	if err := q.QueryRow(ctx, "SELECT to_regclass('tandem.mismatches') IS NOT NULL").Scan(&exists); err != nil {
		return nil, fmt.Errorf("listing mismatches: %w", err)
	}
	if !exists {
		return []Group{}, nil
	}
	rows, err := q.Query(ctx, `WITH m AS (
			SELECT *, row_number() OVER (PARTITION BY fingerprint ORDER BY id DESC) AS n,
				count(*) OVER (PARTITION BY fingerprint) AS total,
				min(at) OVER (PARTITION BY fingerprint) AS first_at,
				max(at) OVER (PARTITION BY fingerprint) AS last_at
			FROM tandem.mismatches
			WHERE at >= $1 AND ($2 = '' OR fingerprint = $2))
		SELECT id, at, replica, fingerprint, statement, params, served_by, shadow_on, aa, kind, summary, diff, total, first_at, last_at
		FROM m WHERE n <= $3 ORDER BY last_at DESC, fingerprint, id DESC`, o.Since, o.Fingerprint, o.Samples)
	if err != nil {
		return nil, fmt.Errorf("listing mismatches: %w", err)
	}
	defer rows.Close()
	groups := []Group{}
	for rows.Next() {
		var r Record
		var params, diff []byte
		var total int64
		var first, last time.Time
		if err := rows.Scan(&r.ID, &r.At, &r.Replica, &r.Fingerprint, &r.Statement, &params, &r.ServedBy, &r.ShadowOn,
			&r.AA, &r.Kind, &r.Summary, &diff, &total, &first, &last); err != nil {
			return nil, fmt.Errorf("listing mismatches: %w", err)
		}
		if params != nil {
			if err := json.Unmarshal(params, &r.Params); err != nil {
				return nil, fmt.Errorf("listing mismatches: params of %d: %w", r.ID, err)
			}
		}
		r.Diff = json.RawMessage(diff)
		if n := len(groups); n == 0 || groups[n-1].Fingerprint != r.Fingerprint {
			groups = append(groups, Group{Fingerprint: r.Fingerprint, Statement: r.Statement, Count: total, First: first, Last: last})
		}
		g := &groups[len(groups)-1]
		g.Samples = append(g.Samples, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing mismatches: %w", err)
	}
	return groups, nil
}
