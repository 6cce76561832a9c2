//go:build !linux

package proxy

// The epoll relay engine is Linux-only. Elsewhere no loops start, and every
// session is relayed by goroutines whatever relay.engine says.
type evloop struct{}

func (s *Server) startLoops() error { return nil }

func (s *Server) stopLoops() {}

func (ss *session) relayWithEngine() {
	if !ss.srv.wantRouted(ss) {
		h := ss.relay()
		ss.endRelayWriter()
		if h == nil {
			return
		}
		ss.serveRouted(h)
		return
	}
	ss.serveRouted(&handoff{})
}
