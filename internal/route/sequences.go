package route

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// SequenceSync says what SyncSequences did.
type SequenceSync struct {
	Synced  int      `json:"synced"`            // sequences present on both stores, now at least from's value plus the margin
	Missing []string `json:"missing,omitempty"` // "schema.sequence" used on from but absent on to
}

// SyncSequences moves every sequence that has been used on from (outside
// the control schema tandem) forward on to: to's value becomes from's last
// value plus margin (minus, for a descending sequence), unless to is
// already past it, and never beyond to's own bounds. Sequences are matched
// by schema and name; those missing on to are returned in Missing and do
// not fail the sync. Run it while writes are fenced, so from hands out no
// new values meanwhile.
func SyncSequences(ctx context.Context, from, to *pgx.Conn, margin int64) (SequenceSync, error) {
	var out SequenceSync
	rows, err := from.Query(ctx, `SELECT schemaname, sequencename, last_value FROM pg_sequences
		WHERE schemaname <> 'tandem' AND schemaname NOT LIKE 'pg\_temp\_%' AND last_value IS NOT NULL
		ORDER BY 1, 2`)
	if err != nil {
		return out, fmt.Errorf("reading sequences: %w", err)
	}
	var schemas, names []string
	var values []int64
	var sch, name string
	var v int64
	if _, err := pgx.ForEachRow(rows, []any{&sch, &name, &v}, func() error {
		schemas, names, values = append(schemas, sch), append(names, name), append(values, v)
		return nil
	}); err != nil {
		return out, fmt.Errorf("reading sequences: %w", err)
	}
	if len(names) == 0 {
		return out, nil
	}
	// One round trip: setval only where to is behind the target.
	rows, err = to.Query(ctx, `
		WITH f(sch, name, v) AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])),
		t AS (
			SELECT f.sch, f.name, s.sequencename IS NOT NULL AS present, s.last_value,
				CASE WHEN s.increment_by > 0
					THEN LEAST(s.max_value::numeric, f.v::numeric + $4)::bigint
					ELSE GREATEST(s.min_value::numeric, f.v::numeric - $4)::bigint END AS target,
				s.increment_by > 0 AS ascending
			FROM f LEFT JOIN pg_sequences s ON s.schemaname = f.sch AND s.sequencename = f.name)
		SELECT sch, name, present,
			CASE WHEN present AND (last_value IS NULL OR (ascending AND target > last_value) OR (NOT ascending AND target < last_value))
				THEN setval(format('%I.%I', sch, name)::regclass, target) END IS NOT NULL
		FROM t ORDER BY sch, name`, schemas, names, values, margin)
	if err != nil {
		return out, fmt.Errorf("setting sequences: %w", err)
	}
	var present, moved bool
	if _, err := pgx.ForEachRow(rows, []any{&sch, &name, &present, &moved}, func() error {
		if present {
			out.Synced++
		} else {
			out.Missing = append(out.Missing, sch+"."+name)
		}
		return nil
	}); err != nil {
		return out, fmt.Errorf("setting sequences: %w", err)
	}
	return out, nil
}
