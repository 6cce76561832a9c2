package feed

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// errNoSlot is returned by guard when the slot does not exist.
var errNoSlot = errors.New("the replication slot is gone")

// guard measures the WAL the slot retains on the primary: past WALWarn
// it warns, past WALMax it drops the slot rather than fill the primary's
// disk, creates it again, and records whole-table drift for every table
// in scope, so nothing the dropped slot held is trusted unchecked. The
// drift is recorded after the new slot exists, so the repair that copies
// the tables runs after every change the new slot misses.
func (s *session) guard(ctx context.Context) error {
	var retained *int64
	err := s.prim.QueryRow(ctx, "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()", s.slot).Scan(&retained)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%w: %s on the %s store", errNoSlot, s.slot, s.store)
	}
	if err != nil {
		return fmt.Errorf("reading the WAL the slot %s retains: %w", s.slot, err)
	}
	if retained == nil {
		return nil
	}
	s.r.opts.Metrics.Retained(*retained)
	o := s.r.opts
	switch {
	case o.WALMax > 0 && *retained > o.WALMax:
		s.r.log.Error("the change feed's slot retains more WAL than feed.wal_max: dropping it and recording every table in scope as drift",
			"slot", s.slot, "store", s.store, "retained_bytes", *retained, "wal_max", o.WALMax)
		if s.repl != nil {
			_ = s.repl.Close(ctx)
			s.repl = nil
		}
		if err := DropSlot(ctx, s.prim, s.slot); err != nil {
			return err
		}
		if _, err := EnsureSlot(ctx, s.prim, s.slot); err != nil {
			return err
		}
		scope, err := publishedTables(ctx, s.prim, o.Names.Publication())
		if err != nil {
			return err
		}
		var entries []table.DriftEntry
		for _, n := range scope {
			entries = append(entries, table.DriftEntry{Table: n, Reason: Reason, Stale: string(s.secondary)})
			o.Metrics.Differences(n.String(), "slot dropped", 1)
		}
		if err := table.RecordDrift(ctx, s.control, entries); err != nil {
			return err
		}
		if err := heartbeat(ctx, s.control, s.store, s.slot, o.Replica, 0); err != nil {
			return err
		}
		_, _ = s.control.Exec(ctx, "UPDATE tandem.feed SET last_error = $2 WHERE store = $1", string(s.store),
			fmt.Sprintf("slot dropped at %s: it retained %d bytes of WAL, more than feed.wal_max; every table in scope recorded as drift", time.Now().UTC().Format(time.RFC3339), *retained))
		return errFollow // a running session restarts on the new slot
	case o.WALWarn > 0 && *retained > o.WALWarn:
		if !s.warned {
			s.r.log.Warn("the change feed's slot retains more WAL than feed.wal_warn; the feed is behind or stopped",
				"slot", s.slot, "store", s.store, "retained_bytes", *retained, "wal_warn", o.WALWarn, "wal_max", o.WALMax)
		}
		s.warned = true
	default:
		s.warned = false
	}
	return nil
}

// publishedTables are the tables of the feed's publication on the store
// conn reaches: the tables in scope, by the primary's names, known without
// the secondary or the mappings.
func publishedTables(ctx context.Context, conn *pgx.Conn, pub string) ([]table.Name, error) {
	rows, err := conn.Query(ctx, "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2", pub)
	if err != nil {
		return nil, fmt.Errorf("reading the publication %s: %w", pub, err)
	}
	defer rows.Close()
	var out []table.Name
	for rows.Next() {
		var n table.Name
		if err := rows.Scan(&n.Schema, &n.Table); err != nil {
			return nil, fmt.Errorf("reading the publication %s: %w", pub, err)
		}
		out = append(out, n)
	}
	return out, rows.Err()
}
