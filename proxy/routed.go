package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"strings"
	"time"

	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
	"github.com/tandemdb/tandem/internal/table"
)

// The routed engine serves a session message by message whenever the
// routing state is more than a passthrough to one store: it classifies each
// request, sends it to the store that must serve it, rewrites writes so that
// the primary returns their row images, strips those before the client sees
// them, and applies them on the secondary in lockstep (design sections 2, 3).

var errHandoff = errors.New("handing the session to the routed engine")

// handoff carries a relayed session's in-flight bytes to the routed engine.
type handoff struct {
	clientIn  []byte // client bytes read but not relayed, from a message boundary
	upIn      []byte // primary-store bytes read but not relayed, from a message boundary
	clientOut []byte // store bytes not yet written to the client
}

// preparedStmt is a named statement the client parsed while relayed.
type preparedStmt struct {
	sql  string
	oids []uint32
}

// notePrepared records Parse and Close messages seen by the relay, so that
// the routed engine can re-parse (and rewrite) statements it did not see.
func (ss *session) notePrepared(typ byte, body []byte, whole bool) {
	if !whole || len(body) < 2 {
		return
	}
	if typ == pgwire.ClientParse && body[0] == 0 {
		// The unnamed statement lives until the next Parse: keep its last
		// body in a reused buffer (no allocation per statement), decoded
		// only if the session is handed over.
		ss.unnamedParse = append(ss.unnamedParse[:0], body...)
		return
	}
	switch typ {
	case pgwire.ClientParse:
		p, err := decodeParse(body)
		if err != nil || p.name == "" {
			return
		}
		ss.prepMu.Lock()
		if ss.prepared == nil {
			ss.prepared = map[string]preparedStmt{}
		}
		ss.prepared[p.name] = preparedStmt{sql: p.sql, oids: p.oids}
		ss.prepMu.Unlock()
	case pgwire.ClientClose:
		if len(body) > 1 && body[0] == pgwire.TargetStatement {
			name := strings.TrimSuffix(string(body[1:]), "\x00")
			ss.prepMu.Lock()
			delete(ss.prepared, name)
			ss.prepMu.Unlock()
		}
	}
}

// passthrough reports whether st lets a session on store be relayed byte
// for byte: nothing mirrored, shadowed or fenced, and every statement served
// by that store.
func passthrough(st *route.State, store string) bool {
	if st.Mirror || st.Shadow > 0 || st.Fence != 0 {
		return false
	}
	return (st.Primary == route.Old && st.Reads == 0 && store == "old") ||
		(st.Primary == route.New && st.Reads == 100 && store == "new")
}

// wantRouted reports whether ss must leave (or not enter) the byte relay.
func (s *Server) wantRouted(ss *session) bool {
	return !passthrough(s.routing.state.Load(), ss.upstream.store.name)
}

// atSafePoint reports whether the session has no request in flight and no
// open transaction.
func (ss *session) atSafePoint() bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.idleLocked()
}

// clientMsg is one message from the client, or the error that ended reading.
type clientMsg struct {
	typ  byte
	body []byte
	err  error
}

// stmtInfo is what the routed engine knows of one client statement.
type stmtInfo struct {
	name string
	sql  string // the client's text
	oids []uint32
	plan *classify.TextPlan
	// For a rewritten statement: the primary's RowDescription fields and the
	// marker's index (the client's columns come before it).
	fields      []field
	marker      int
	descOK      bool
	descPending bool   // an internal Describe of it is on its way
	descFrom    string // the store that described it: fields hold that store's table OIDs
	// desc is the statement's result columns as the client's Describe
	// was answered, for shadow reads (nil: not seen, or no shadowing).
	desc      []shadow.Field
	paramDesc []uint32 // the parameter types the store inferred
}

// image reports the row-image rewrite of a one-statement text, or nil.
func (si *stmtInfo) image() *classify.Rewrite {
	if si == nil || si.plan == nil || len(si.plan.Stmts) != 1 {
		return nil
	}
	return si.plan.Stmts[0].Image
}

// kind returns the statement's kind (Unknown when it has several or none).
func (si *stmtInfo) kind() classify.Kind {
	if si == nil || si.plan == nil || si.plan.Err != nil {
		return classify.Unknown
	}
	if len(si.plan.Stmts) == 0 {
		return classify.Session
	}
	k := si.plan.Stmts[0].Kind
	for _, s := range si.plan.Stmts[1:] {
		if s.Kind != k {
			return classify.Unknown
		}
	}
	return k
}

type portalInfo struct {
	stmt *stmtInfo
	bind bindMsg
}

// routedSession is one session served by the routed engine. It is owned by
// the session's goroutine.
type routedSession struct {
	ss      *session
	srv     *Server
	maxBody int
	cout    *bufio.Writer
	hold    []byte     // client output held back while a shifted read may still be retried
	reply   replyState // whether output goes to the client or to hold

	clientIn   chan []clientMsg
	clientQuit chan struct{}
	clientDone chan struct{}
	pushback   []clientMsg

	stores  [2]*rstore // old, new
	home    *rstore    // the store the session started on
	state   route.State
	bucket  int // 0..99: reads go to new when bucket < reads
	writer  bool
	txState byte
	// extOpen: a batch ended by Flush left the primary's implicit
	// transaction open until the next Sync; extFailed: it had an error.
	extOpen, extFailed bool

	stmts   map[string]*stmtInfo
	portals map[string]*portalInfo
	spare   *unit // a released unit, reused by the next (newUnit)

	tx mirrorTx // the secondary's side of the current transaction
	// must collects the drift the write being mirrored causes whatever the
	// mirror does (see mirrorTx.must).
	must []table.DriftEntry
	// plainApply: the applier writeApplier just built only queues upserts
	// and deletes (no foreign-key actions, whose replies it reads), so the
	// write may be sent ahead; sendAhead asks execQueued to keep the batch
	// queued for secSettle, and wentAhead says it did (secondary.go).
	plainApply, sendAhead, wentAhead bool
	// doomed, once set, ends the session instead of the next ReadyForQuery:
	// the primary committed, and drift that may be real could not be
	// recorded (see recordAcked).
	doomed error

	// Shadow reads: the reply being copied for a sampled read, the store
	// that served the current unit, and the session's SET values.
	capture  *capture
	servedBy route.Store
	// temps are the temporary relations the session created while routed
	// (lower case, as written): session-private, never migration data.
	temps map[string]bool
	// from is the store whose replies are being passed to the client: its
	// descriptions are translated into the home store's OIDs.
	from     *rstore
	gucDirty bool
	gucs     [][2]string

	trace unitTrace // the current unit's span, when tracing (trace.go)
}

// replyState says where the client's output goes while a unit runs.
type replyState uint8

const (
	// replyDirect: straight to the client (buffered in cout).
	replyDirect replyState = iota
	// replyHeld: into hold, so that a shifted read that fails can be run
	// again on the primary before the client has seen anything.
	replyHeld
	// replySpilled: the held reply grew past maxHold and went to the
	// client; the rest streams, and the read can no longer be retried.
	replySpilled
)

func storeIndexOf(name string) int {
	if name == "new" {
		return 1
	}
	return 0
}

// serveRouted serves the session with the routed engine until it ends.
func (ss *session) serveRouted(h *handoff) {
	s := ss.srv
	rs := &routedSession{ss: ss, srv: s, maxBody: int(s.config().Limits.MaxMessageBytes),
		cout: bufio.NewWriterSize(ss.client, 32<<10), stmts: map[string]*stmtInfo{}, portals: map[string]*portalInfo{},
		txState:  ss.upstream.txStatus,
		gucDirty: true} // SETs made while relayed are unknown: read them at the first shadow sample
	ss.mu.Lock()
	rs.txState = ss.txStatus
	ss.mu.Unlock()
	f := fnv.New32a()
	fmt.Fprint(f, ss.key.pid, ss.key.secret)
	rs.bucket = int(f.Sum32() % 100)
	home := &rstore{name: ss.upstream.store.name, st: ss.upstream.store, up: ss.upstream, txStatus: rs.txState}
	home.start(rs.maxBody, io.MultiReader(bytes.NewReader(h.upIn), ss.upstream.reader))
	rs.home = home
	rs.stores[storeIndexOf(home.name)] = home
	if p, err := decodeParse(ss.unnamedParse); err == nil && len(ss.unnamedParse) > 0 {
		rs.stmts[""] = &stmtInfo{sql: p.sql, oids: p.oids, plan: s.classifier.Plan(p.sql)}
		home.parsed[""] = p.sql
	}
	ss.prepMu.Lock()
	for name, p := range ss.prepared {
		rs.stmts[name] = &stmtInfo{name: name, sql: p.sql, oids: p.oids, plan: s.classifier.Plan(p.sql)}
		home.parsed[name] = p.sql
	}
	ss.prepMu.Unlock()
	// The relay noted the Parse messages it read, but those it hands over
	// unsent never reached the store: the routed engine runs them itself.
	forEachMsg(h.clientIn, func(typ byte, body []byte) {
		if typ == pgwire.ClientParse {
			if p, err := decodeParse(body); err == nil {
				delete(rs.stmts, p.name)
				delete(home.parsed, p.name)
			}
		}
	})
	rs.startClientReader(io.MultiReader(bytes.NewReader(h.clientIn), idleReader{ss}))
	s.metrics.Relayed(ss.ctx, "routed")
	if len(h.clientOut) > 0 {
		_, _ = rs.cout.Write(h.clientOut)
	}
	reason := rs.run()
	rs.finish(reason)
}

// forEachMsg calls fn with each whole message in b (from a message
// boundary).
func forEachMsg(b []byte, fn func(typ byte, body []byte)) {
	for len(b) >= 5 {
		n := int(binary.BigEndian.Uint32(b[1:5]))
		if n < 4 || len(b) < 1+n {
			return
		}
		fn(b[0], b[5:1+n])
		b = b[1+n:]
	}
}

func (rs *routedSession) startClientReader(r io.Reader) {
	rs.clientIn = make(chan []clientMsg, 16)
	rs.clientQuit = make(chan struct{})
	rs.clientDone = make(chan struct{})
	br := bufio.NewReaderSize(r, 32<<10)
	first := func() (byte, []byte, error) {
		for {
			typ, body, err := rs.readClientMsg(br)
			if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && !rs.ss.atSafePoint() {
				continue // the idle timeout does not apply inside a request or transaction
			}
			return typ, body, err
		}
	}
	go func() {
		defer close(rs.clientDone)
		pgwire.ReadBatches(br, rs.maxBody, first,
			func(typ byte, body []byte, err error) clientMsg { return clientMsg{typ: typ, body: body, err: err} },
			rs.clientIn, rs.clientQuit)
	}()
}

// nextClient returns the next client message.
func (rs *routedSession) nextClient() clientMsg {
	if len(rs.pushback) == 0 {
		select {
		case b := <-rs.clientIn:
			rs.pushback = b
		case <-rs.ss.killCh:
			return clientMsg{err: rs.ss.killErr}
		}
	}
	m := rs.pushback[0]
	rs.pushback = rs.pushback[1:]
	return m
}

// run serves requests until the session ends, returning why.
func (rs *routedSession) run() error {
	ss := rs.ss
	for {
		if err := rs.cout.Flush(); err != nil {
			return errClientGone
		}
		if rs.txState == pgwire.TxIdle && rs.srv.stopping.Load() {
			return errShutdown
		}
		for len(rs.home.queue) > 0 && rs.home.up != nil {
			// Messages the home store sent after its last reply.
			bm := rs.home.queue[0]
			rs.home.queue = rs.home.queue[1:]
			if err := rs.forwardAsync(rs.home, bm); err != nil {
				return err
			}
		}
		var m clientMsg
		if len(rs.pushback) > 0 {
			m = rs.nextClient()
		} else {
			var async <-chan []backendMsg
			if rs.home.up != nil {
				async = rs.home.in
			}
			select {
			case b := <-rs.clientIn:
				rs.pushback = b
				m = rs.nextClient()
			case b := <-async:
				rs.home.queue = b
				continue
			case <-ss.killCh:
				return ss.killErr
			}
		}
		if m.err != nil {
			return rs.clientErr(m.err)
		}
		if m.typ == pgwire.ClientTerminate {
			ss.terminated.Store(true)
			return nil
		}
		u, err := rs.collect(m)
		if err != nil {
			return err
		}
		endTrace := rs.traceUnit(u)
		err = rs.serve(u)
		endTrace(err)
		rs.release(u)
		if err != nil {
			return err
		}
	}
}

func (rs *routedSession) clientErr(err error) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return errIdleTimeout
	case errors.Is(err, pgwire.ErrProtocol):
		return pgwire.Fatal(pgwire.CodeProtocolViolation, "%s", strings.TrimPrefix(err.Error(), "protocol violation: ")).WithCause(err)
	case err == errShutdown || err == errIdleTimeout:
		return err
	}
	var pe *pgwire.Error
	if errors.As(err, &pe) {
		return err
	}
	return errClientGone
}

// forwardAsync passes a message the store sent outside any request
// (notifications, notices, parameter changes) to the client.
func (rs *routedSession) forwardAsync(u *rstore, bm backendMsg) error {
	if bm.err != nil {
		u.dead = bm.err
		if u == rs.home {
			return errUpstreamLost
		}
		return nil
	}
	if bm.typ == pgwire.ServerErrorResponse {
		rs.toClient(pgwire.ServerErrorResponse, bm.body)
		_ = rs.cout.Flush()
		return errUpstreamLost
	}
	rs.toClient(bm.typ, bm.body)
	return rs.flushIfIdle()
}

func (rs *routedSession) flushIfIdle() error {
	if err := rs.cout.Flush(); err != nil {
		return errClientGone
	}
	return nil
}

// toClient queues one message for the client (or for the hold buffer while
// a shifted read may still be retried on the primary).
func (rs *routedSession) toClient(typ byte, body []byte) {
	if (typ == pgwire.ServerRowDescription || typ == pgwire.ServerParameterDescription) && rs.from != rs.home {
		body = rs.homeOIDs(rs.from, typ, body)
	}
	if rs.capture != nil {
		rs.capture.add(typ, body)
	}
	if rs.reply == replyHeld {
		rs.hold = appendMsg(rs.hold, typ, body)
		rs.spillHold()
		return
	}
	b := rs.cout.AvailableBuffer()
	b = appendMsg(b, typ, body)
	_, _ = rs.cout.Write(b)
}

func (rs *routedSession) toClientRaw(b []byte) {
	if rs.reply == replyHeld {
		rs.hold = append(rs.hold, b...)
		rs.spillHold()
		return
	}
	_, _ = rs.cout.Write(b)
}

// maxHold bounds the reply of a shifted read held back for a retry; a
// larger reply streams to the client and can no longer be retried.
const maxHold = 1 << 20

func (rs *routedSession) spillHold() {
	if len(rs.hold) > maxHold {
		_, _ = rs.cout.Write(rs.hold)
		rs.hold, rs.reply = rs.hold[:0], replySpilled
	}
}

// finish ends the session: stores closed, the client told why when it is
// the proxy's doing, and every goroutine gone.
func (rs *routedSession) finish(reason error) {
	ss := rs.ss
	_ = rs.cout.Flush()
	rs.setWriter(false)
	for _, u := range rs.stores {
		if u != nil && u.up != nil {
			clean := reason == nil || reason == errShutdown || reason == errIdleTimeout || reason == errClientGone
			u.stop(clean)
		}
	}
	ss.closing.Store(true)
	close(rs.clientQuit)
	if ss.sendFinal(reason) {
		ss.lingerClose(false)
	}
	ss.client.Close()
	<-rs.clientDone
}

// setWriter keeps the server's count of sessions in a transaction or a
// write, which a write fence waits for.
func (rs *routedSession) setWriter(on bool) {
	rs.markWriter(on)
	if on == rs.writer {
		return
	}
	rs.writer = on
	if on {
		rs.srv.routing.writers.Add(1)
	} else {
		rs.srv.writerDone()
	}
}

// beginUnit marks the session busy, picks up a new routing state at a safe
// point, and holds new writes while a write fence is up (waitFence). An
// error means the unit must not run: nothing was sent to a store.
func (rs *routedSession) beginUnit(pureRead bool) error {
	ss := rs.ss
	ss.mu.Lock()
	ss.inRequest = true
	ss.reqStart = time.Now()
	ss.outstanding = 1
	ss.mu.Unlock()
	if err := rs.checkSelfFence(pureRead); err != nil {
		return err
	}
	if rs.txState != pgwire.TxIdle || rs.extOpen {
		return nil
	}
	if err := rs.waitFence(pureRead); err != nil {
		return err
	}
	rs.setWriter(!pureRead)
	return nil
}

// endUnit records the transaction status the client was told.
func (rs *routedSession) endUnit(status byte) {
	rs.txState = status
	ss := rs.ss
	ss.mu.Lock()
	ss.outstanding = 0
	ss.inRequest = false
	ss.txStatus = status
	took := time.Since(ss.reqStart)
	ss.mu.Unlock()
	rs.srv.metrics.Latency(ss.ctx, string(rs.state.Primary), took)
	switch {
	case rs.extOpen:
		// An implicit transaction is open until the next Sync: not a safe point.
		ss.mu.Lock()
		ss.inRequest = true
		ss.mu.Unlock()
		rs.setWriter(true)
	case status == pgwire.TxIdle:
		rs.setWriter(false)
		if len(rs.tx.ahead) > 0 {
			rs.aheadLeft()
		}
		rs.tx = mirrorTx{}
	default:
		rs.setWriter(true)
	}
}
