package proxy

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/table"
)

// Drift recording: keys the secondary may have missed go to the drift
// ledger before the client hears of the commit; the server keeps a
// per-table summary that read shifting consults (driftBlocks, dispatch.go).

// recordDrift writes entries to the drift ledger.
func (rs *routedSession) recordDrift(entries []table.DriftEntry) error {
	if len(entries) == 0 {
		return nil
	}
	for i := range entries {
		if entries[i].Stale == "" {
			entries[i].Stale = string(rs.state.Secondary()) // the store that missed the write
		}
	}
	defer rs.traceStep(spanLedger, "")(nil)
	rec := rs.srv.recordDrift
	if rec == nil {
		return errors.New("no drift ledger is configured")
	}
	ctx, cancel := context.WithTimeout(rs.ss.ctx, 10*time.Second)
	defer cancel()
	if err := rec(ctx, entries); err != nil {
		return err
	}
	rs.srv.metrics.R().Drift(ctx, len(entries))
	// Reads of these tables stop going to the new store at once, not only
	// after the next refresh from the ledger.
	rs.srv.addDrift(entries)
	return nil
}

// recordAcked records drift of a write the primary has already committed,
// before the client's acknowledgement. When the ledger cannot be written
// the outcome is ambiguous to the client's eyes: the primary has the
// write, the secondary may not, and nothing says so. Tandem then does what
// PostgreSQL does when it cannot tell whether a commit happened: the
// session ends without a ReadyForQuery (SQLSTATE 08006), and the entries
// are kept in memory and recorded as soon as the ledger is writable again.
func (rs *routedSession) recordAcked(entries []table.DriftEntry, what string) {
	if len(entries) == 0 {
		return
	}
	err := rs.recordDrift(entries)
	if err == nil {
		return
	}
	if rs.srv.recordDrift == nil {
		rs.ss.log.Error("drift not recorded: no drift ledger is configured", "what", what, "entries", len(entries))
		return
	}
	rs.ss.log.Error("could not record drift after the primary committed; ending the session without an acknowledgement and keeping the drift in memory until the ledger is writable",
		"what", what, "entries", len(entries), "error", err)
	rs.srv.holdDrift(entries)
	if rs.doomed == nil {
		rs.doomed = pgwire.Fatal(pgwire.CodeConnectionFailure, "the outcome of the transaction is unknown: the %s store committed it, but Tandem could not record that the %s store may have missed it", rs.state.Primary, rs.state.Secondary()).
			WithHint("Check whether the transaction's changes are present before retrying it; Tandem records the drift once its control database is reachable.").WithCause(err)
	}
}

func (s *Server) addDrift(entries []table.DriftEntry) {
	for {
		old := s.drift.Load()
		m := map[string]bool{}
		if old != nil {
			for k := range *old {
				m[k] = true
			}
		}
		for _, e := range entries {
			m[strings.ToLower(e.Table.String())] = true
		}
		if s.drift.CompareAndSwap(old, &m) {
			return
		}
	}
}
