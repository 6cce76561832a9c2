package proxy

import (
	"context"
	"sync"
	"time"

	"github.com/tandemdb/tandem/internal/table"
)

// heldDrift is drift that could not be recorded when the primary had
// already committed (recordAcked): kept in memory and retried until the
// ledger takes it.
type heldDrift struct {
	mu      sync.Mutex
	entries []table.DriftEntry
	running bool
	stop    chan struct{}
	done    chan struct{}
}

// heldRetry is how often held drift is offered to the ledger again.
var heldRetry = 250 * time.Millisecond

// holdDrift keeps entries and retries recording them in the background.
func (s *Server) holdDrift(entries []table.DriftEntry) {
	h := &s.held
	h.mu.Lock()
	defer h.mu.Unlock()
	h.entries = append(h.entries, entries...)
	if h.running || s.stopping.Load() {
		return
	}
	h.running = true
	h.stop, h.done = make(chan struct{}), make(chan struct{})
	go s.retryHeld(h.stop, h.done)
}

// HeldDrift reports the drift entries waiting in memory for the ledger.
func (s *Server) HeldDrift() int {
	s.held.mu.Lock()
	defer s.held.mu.Unlock()
	return len(s.held.entries)
}

func (s *Server) retryHeld(stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(heldRetry)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		h := &s.held
		h.mu.Lock()
		entries := h.entries
		h.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := s.recordDrift(ctx, entries)
		cancel()
		if err != nil {
			s.log.Debug("held drift still cannot be recorded", "entries", len(entries), "error", err)
			continue
		}
		s.addDrift(entries)
		s.log.Warn("recorded drift held in memory since the ledger failed", "entries", len(entries))
		h.mu.Lock()
		h.entries = h.entries[len(entries):]
		if len(h.entries) == 0 {
			h.running = false
			h.mu.Unlock()
			return
		}
		h.mu.Unlock()
	}
}

// stopHeld ends the retries; drift still held is logged, entry by entry,
// for an operator to record.
func (s *Server) stopHeld() {
	h := &s.held
	h.mu.Lock()
	stop, done, running := h.stop, h.done, h.running
	h.running = false
	h.mu.Unlock()
	if running {
		close(stop)
		<-done
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, e := range h.entries {
		s.log.Error("drift lost at shutdown: it was never recorded in the ledger; run tandem compare on this table", "table", e.Table.String(), "key", e.Key, "reason", e.Reason)
	}
	h.entries = nil
}
