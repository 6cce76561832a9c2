package proxy

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/pgwire"
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
			line := fmt.Sprintf("session %d (%s@%s): %s", ss.key.pid, ss.user, ss.database, m.why)
			if !m.since.IsZero() {
				line += " for " + now.Sub(m.since).Round(time.Millisecond).String()
			}
			out = append(out, line)
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
	case rs.txState == pgwire.TxInBlock:
		why = "in a transaction"
	case rs.txState == pgwire.TxFailed:
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

// waitFence sets rs.state to the routing state a unit starting now runs
// under. While a write fence is up, a unit that may write waits for the
// state to change: it never runs on the state the fence is moving away
// from, since the flip may by then have drained, synced sequences and
// applied the next state on other replicas. It gives up, with an error the
// client can retry, when the fence is held 2 × routing.fence_timeout
// (plus routing.feed_wait with feed.enabled) without the state moving on (a
// flip takes at most fence_timeout to drain and as long to repair, and
// with the change feed waits up to feed_wait for it; a dead flip's fence
// expires with its lease), and ends at once when the session is killed or
// the client goes away.
func (rs *routedSession) waitFence(pureRead bool) error {
	var timer *time.Timer
	version := int64(-1)
	for {
		// Count first, then look at the fence (the drain raises the fence
		// first, then looks at the count): with both atomic, either this
		// unit sees the fence or the drain sees this unit. Looking first
		// left a window in which a fence could be raised and drained
		// between the look and the count, and the write then ran on the
		// state being left.
		if !pureRead {
			rs.setWriter(true)
		}
		rs.state = rs.srv.State()
		if rs.state.Fence == 0 || pureRead {
			return nil
		}
		rs.setWriter(false) // held: not a writer while waiting
		ch := rs.srv.stateChanged()
		if cur := rs.srv.State(); cur.Version != rs.state.Version || cur.Fence != rs.state.Fence {
			continue // changed before ch was taken
		}
		if rs.state.Version != version {
			// A write flip is draining writes (or applying its next state):
			// wait for the state after it.
			cfg := rs.srv.config()
			bound := 2 * cfg.Routing.FenceTimeout.Duration()
			if cfg.Feed.Enabled {
				bound += cfg.Routing.FeedWait.Duration()
			}
			if timer == nil {
				defer rs.traceStep(spanFenceWait, "")(nil)
				rs.srv.metrics.R().FenceWait(rs.ss.ctx)
				timer = time.NewTimer(bound)
				defer timer.Stop()
			} else {
				timer.Reset(bound)
			}
			version = rs.state.Version
		}
		select {
		case <-ch:
		case b := <-rs.clientIn:
			// Keep what the client sends meanwhile for after the unit; a
			// client gone while its write is held abandons the write.
			rs.pushback = append(rs.pushback, b...)
			if m := b[len(b)-1]; m.err != nil {
				return rs.clientErr(m.err)
			}
		case <-timer.C:
			rs.ss.log.Warn("write held at a write fence for twice routing.fence_timeout (plus routing.feed_wait with the change feed); refusing it", "fence", rs.state.Fence, "version", rs.state.Version)
			return errFenceHeld()
		case <-rs.ss.killCh:
			return rs.ss.killErr
		}
	}
}

// checkSelfFence refuses a unit that may write while this replica has not
// read the routing state for longer than routing.self_fence (issue 12): a
// write flip on another replica may have moved the primary, and stops
// waiting for this one once it has been silent 3 × routing.poll. Outside a
// transaction the unit gets 40001 and nothing runs; inside one the session
// ends (FATAL), so the store rolls the transaction back rather than let it
// commit on a primary that may no longer be the primary.
func (rs *routedSession) checkSelfFence(pureRead bool) error {
	if pureRead {
		return nil
	}
	since, fenced := rs.srv.selfFenced()
	if !fenced {
		return nil
	}
	e := pgwire.Fatal(pgwire.CodeSerializationFailure, "this Tandem replica has not been able to read the routing state for %s (routing.self_fence is %s): it refuses writes until it can",
		since.Round(time.Millisecond), rs.srv.config().Routing.SelfFenceBound()).
		WithHint("Nothing of this request ran. Retry, through another replica if you can; check this replica's connection to the control database.")
	if rs.txState == pgwire.TxIdle && !rs.extOpen {
		e.Severity = "ERROR"
	}
	rs.ss.log.Debug("refusing a write: the routing state has not been read within routing.self_fence", "since", since)
	return e
}

// errFenceHeld is the error of a unit refused at a write fence that did not
// end in time: a serialization failure, which clients and frameworks retry.
func errFenceHeld() *pgwire.Error {
	e := pgwire.Fatal(pgwire.CodeSerializationFailure, "could not start the write: a write flip is in progress and its fence was held longer than expected").
		WithHint("Nothing was run. Retry the transaction; the flip ends, or gives up, within seconds.")
	e.Severity = "ERROR"
	return e
}

// refuseUnit answers a unit that beginUnit refused. An ERROR is what
// PostgreSQL would send for a batch that failed before running anything:
// for a Query, FunctionCall or Sync-ended batch the error and
// ReadyForQuery; for a Flush-ended batch the error, then, as PostgreSQL
// does after an error in an extended-protocol batch, every message up to
// the next Sync is skipped and that Sync answered. Anything else (the
// session killed, a unit of another shape) ends the session.
func (rs *routedSession) refuseUnit(un *unit, err error) error {
	var pe *pgwire.Error
	if !errors.As(err, &pe) || pe.Severity != "ERROR" {
		return err
	}
	switch un.end {
	case pgwire.ClientQuery, pgwire.ClientFunctionCall, pgwire.ClientSync, pgwire.ClientFlush:
	default:
		f := *pe
		f.Severity = "FATAL"
		return &f
	}
	rs.srv.metrics.Error(rs.ss.ctx, string(rs.state.Primary), pe.Code, metrics.OriginProxy)
	rs.toClientRaw(mustAppend(pe.Response()))
	if un.end == pgwire.ClientFlush {
		if err := rs.cout.Flush(); err != nil {
			return errClientGone
		}
		for {
			m := rs.nextClient()
			if m.err != nil {
				return rs.clientErr(m.err)
			}
			if m.typ == pgwire.ClientTerminate {
				rs.pushback = append([]clientMsg{m}, rs.pushback...)
				rs.endUnit(rs.txState)
				return nil
			}
			if m.typ == pgwire.ClientSync {
				break
			}
		}
	}
	rs.toClient(pgwire.ServerReadyForQuery, []byte{rs.txState})
	rs.endUnit(rs.txState)
	return nil
}

// relayMark is the writer mark of a relayed session: the byte relay does
// not classify statements, so it counts from the start of each request
// until a ReadyForQuery leaves the session idle outside a transaction.
var relayMark = &writerMark{why: "relayed: a request or a transaction in flight"}

// noteRelayLocked keeps a relayed session's count in Server.Writers in step
// with its state, so that a write fence also waits for a session still
// relayed (one in a transaction since before mirroring was turned on).
// ss.mu is held.
func (ss *session) noteRelayLocked() {
	busy := !ss.idleLocked()
	if busy == ss.relayWriter {
		return
	}
	ss.relayWriter = busy
	if busy {
		ss.srv.routing.writers.Add(1)
		ss.writer.Store(relayMark)
	} else {
		ss.writer.Store(nil)
		ss.srv.writerDone()
	}
}

// endRelayWriter releases a relayed session's count when the relay ends
// (the session is over, or handed to the routed engine, which keeps its
// own).
func (ss *session) endRelayWriter() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.relayWriter {
		ss.relayWriter = false
		ss.writer.Store(nil)
		ss.srv.writerDone()
	}
}

// lone reports whether un is a Flush or a Sync alone at a safe point: it
// opens no implicit transaction on the store and writes nothing, so it
// neither waits at a fence nor counts as a writer (a Flush, until some
// later Sync).
func (rs *routedSession) lone(un *unit) bool {
	return len(un.msgs) == 1 && (un.end == pgwire.ClientFlush || un.end == pgwire.ClientSync) && un.msgs[0].typ == un.end && rs.txState == pgwire.TxIdle && !rs.extOpen
}

// inert reports whether un runs nothing: Parse, Bind, Describe and Close
// ended by a Sync at a safe point (how drivers prepare a statement). It
// changes no data and leaves no transaction open, so it does not wait at
// a write fence.
func (rs *routedSession) inert(un *unit) bool {
	if un.end != pgwire.ClientSync || rs.txState != pgwire.TxIdle || rs.extOpen {
		return false
	}
	for _, m := range un.msgs {
		switch m.typ {
		case pgwire.ClientParse, pgwire.ClientBind, pgwire.ClientDescribe, pgwire.ClientClose, pgwire.ClientSync:
		default:
			return false
		}
	}
	return true
}
