package proxy

import (
	"fmt"
	"slices"
	"time"
)

// writerMark is why a session counts as a writer for the write fence, and
// since when: what an operator needs when a fence does not drain.
type writerMark struct {
	why   string
	since time.Time
}

// WriterSessions describes the sessions the write fence waits for: one
// line per session counted in Writers, with why and for how long.
func (s *Server) WriterSessions() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	now := time.Now()
	for ss := range s.sessions {
		if m := ss.writer.Load(); m != nil {
			out = append(out, fmt.Sprintf("session %d (%s@%s): %s for %s", ss.key.pid, ss.user, ss.database, m.why, now.Sub(m.since).Round(time.Millisecond)))
		}
	}
	slices.Sort(out)
	return out
}

// markWriter keeps the session's writerMark in step with setWriter(on):
// why it counts, from the session's state, and since when it has.
func (rs *routedSession) markWriter(on bool) {
	cur := rs.ss.writer.Load()
	if !on {
		if cur != nil {
			rs.ss.writer.Store(nil)
		}
		return
	}
	why := "running a write"
	switch {
	case rs.extOpen:
		why = "an implicit transaction is open (a Flush-ended batch) until the client's Sync"
	case rs.txState == 'T':
		why = "in a transaction"
	case rs.txState == 'E':
		why = "in a failed transaction, until the client's ROLLBACK"
	}
	if cur != nil && cur.why == why {
		return
	}
	since := time.Now()
	if cur != nil {
		since = cur.since
	}
	rs.ss.writer.Store(&writerMark{why: why, since: since})
}
