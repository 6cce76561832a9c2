package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// routing is the server's view of the routing state, as the follower
// delivers it, plus the write fence of the flip protocol.
type routing struct {
	state atomic.Pointer[route.State]

	mu      sync.Mutex
	changed chan struct{} // closed and replaced whenever the state changes

	// writers counts sessions that are inside a transaction or running a
	// unit that is not a plain read: what a write fence waits for.
	writers atomic.Int64
	drained chan struct{} // signalled (non-blocking) when writers drops to 0

	heard atomic.Int64 // Unix ns when the last acknowledged read of the state started; 0 = never (HeardState)
}

func (r *routing) init() {
	st := route.State{Version: 0, Settings: route.Passthrough()}
	r.state.Store(&st)
	r.changed = make(chan struct{})
	r.drained = make(chan struct{}, 1)
}

// ApplyState makes st the routing state for every unit that starts at a
// safe point from now on. It is called by the state follower with each new
// version, in order.
func (s *Server) ApplyState(st route.State) {
	cp := st
	s.routing.state.Store(&cp)
	s.routing.mu.Lock()
	close(s.routing.changed)
	s.routing.changed = make(chan struct{})
	s.routing.mu.Unlock()
	s.metrics.R().StateVersion(st.Version)
	s.log.Info("routing state applied", "version", st.Version, "state", st.Settings.String(), "fence", st.Fence)
}

// HeardState records that the routing state was read (and acknowledged)
// with a read that started at readAt. Until it is first called the replica
// does not fence itself: a proxy without a control plane has no state to
// hear.
func (s *Server) HeardState(readAt time.Time) {
	s.routing.heard.Store(readAt.UnixNano())
}

// selfFenced reports, and says why, whether this replica has not read the
// routing state for longer than routing.self_fence: it then refuses
// writes, since a write flip elsewhere stops waiting for it once it has
// been silent 3 × routing.poll (issue 12).
func (s *Server) selfFenced() (time.Duration, bool) {
	h := s.routing.heard.Load()
	if h == 0 {
		return 0, false
	}
	since := time.Since(time.Unix(0, h))
	return since, since > s.config().Routing.SelfFenceBound().Duration()
}

// State returns the routing state the server applies.
func (s *Server) State() route.State { return *s.routing.state.Load() }

// stateChanged returns a channel closed at the next state change.
func (s *Server) stateChanged() <-chan struct{} {
	s.routing.mu.Lock()
	defer s.routing.mu.Unlock()
	return s.routing.changed
}

// DrainWrites blocks until no session is inside a transaction or running a
// write, or ctx ends. With a fence raised no new ones start, so this is how
// a replica knows it may acknowledge the fence.
func (s *Server) DrainWrites(ctx context.Context) error {
	for s.routing.writers.Load() > 0 {
		select {
		case <-s.routing.drained:
		case <-ctx.Done():
			if n := s.routing.writers.Load(); n > 0 {
				s.log.Warn("write fence not drained: sessions still writing", "writers", n, "sessions", s.WriterSessions())
			}
			return ctx.Err()
		}
	}
	return nil
}

// Writers reports how many sessions are in a transaction or a write.
func (s *Server) Writers() int64 { return s.routing.writers.Load() }

func (s *Server) writerDone() {
	if s.routing.writers.Add(-1) == 0 {
		select {
		case s.routing.drained <- struct{}{}:
		default:
		}
	}
}

// SetMappings replaces the table mappings the mirror applies (nil: every
// table maps to itself and every table is in scope).
func (s *Server) SetMappings(ms *table.Mappings) { s.mappings.Store(ms) }

// SetDriftTables replaces the set of tables with open drift, named
// "schema.table" (unquoted): reads of them are not served by the new store
// until the repairer has closed the drift.
func (s *Server) SetDriftTables(tables []string) {
	m := make(map[string]bool, len(tables))
	for _, n := range tables {
		m[n] = true
	}
	s.drift.Store(&m)
}
