package proxy

import (
	"bufio"
	"context"
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
	if typ == 'P' && body[0] == 0 {
		// The unnamed statement lives until the next Parse: keep its last
		// body in a reused buffer (no allocation per statement), decoded
		// only if the session is handed over.
		ss.unnamedParse = append(ss.unnamedParse[:0], body...)
		return
	}
	switch typ {
	case 'P':
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
	case 'C':
		if len(body) > 1 && body[0] == 'S' {
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

// backendMsg is one message from a store, or the error that ended reading.
type backendMsg struct {
	typ  byte
	body []byte
	err  error
}

// rstore is a routed session's connection to one store.
type rstore struct {
	name   string
	st     *store
	up     *upstream
	out    []byte
	in     chan []backendMsg // batches: every message one read made whole
	queue  []backendMsg      // the rest of the batch being consumed
	quit   chan struct{}
	done   chan struct{}
	parsed map[string]string // statement name -> text parsed there
	noRepl bool              // session_replication_role cannot be set here
	replOK bool              // a replica-mode BEGIN has worked here: later ones are pipelined
	queued int               // internal requests sent whose replies are still to be read
	// prepared maps the mirror's statements to their names on this store.
	prepared  map[string]string
	nextStmt  int
	preparing bool
	dead      error // set once the connection failed
	// lastTag is the last CommandComplete tag an internal query got, and
	// txStatus the store's last ReadyForQuery status.
	lastTag  string
	txStatus byte
	// skipping: an extended-protocol message failed and the store discards
	// every message up to the next Sync.
	skipping bool
}

func (u *rstore) start(maxBody int, first io.Reader) {
	u.in = make(chan []backendMsg, 16)
	u.quit = make(chan struct{})
	u.done = make(chan struct{})
	u.parsed = map[string]string{}
	r := bufio.NewReaderSize(first, 32<<10)
	go func() {
		defer close(u.done)
		for {
			// Hand over every message that one read brought in, at once:
			// one wake-up of the session per read, not per message.
			typ, body, err := pgwire.ReadMessage(r, maxBody)
			batch := []backendMsg{{typ: typ, body: body, err: err}}
			for err == nil && wholeBuffered(r) {
				typ, body, err = pgwire.ReadMessage(r, maxBody)
				batch = append(batch, backendMsg{typ: typ, body: body, err: err})
			}
			select {
			case u.in <- batch:
			case <-u.quit:
				return
			}
			if err != nil {
				return
			}
		}
	}()
}

// wholeBuffered reports whether r holds a whole message already.
func wholeBuffered(r *bufio.Reader) bool {
	if r.Buffered() < 5 {
		return false
	}
	h, err := r.Peek(5)
	if err != nil {
		return false
	}
	n := int(int32(uint32(h[1])<<24 | uint32(h[2])<<16 | uint32(h[3])<<8 | uint32(h[4])))
	return n >= 4 && r.Buffered() >= 1+n
}

// queueQuery queues a simple Query. PostgreSQL destroys the unnamed
// statement when it runs one, so the next use of the client's unnamed
// statement parses it here again.
func (u *rstore) queueQuery(sql string) {
	u.out = encodeQuery(u.out, sql)
	delete(u.parsed, "")
}

// stop closes the connection, saying goodbye when it is still healthy, and
// waits for the reader.
func (u *rstore) stop(goodbye bool) {
	if u.up == nil {
		return
	}
	if goodbye && u.dead == nil {
		_ = u.up.conn.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = u.up.conn.Write([]byte{'X', 0, 0, 0, 4})
	}
	u.up.conn.Close()
	close(u.quit)
	<-u.done
	u.up, u.queue = nil, nil
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
	hold    []byte // client output held back while a shifted read may still be retried
	holding bool
	spilled bool // the held reply grew past maxHold and went to the client

	// controlWrite is the control-schema table the unit analyze last saw
	// would change ("" = none): refused, see refuseControlWrite.
	controlWrite string

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

	tx mirrorTx // the secondary's side of the current transaction
	// must collects the drift the write being mirrored causes whatever the
	// mirror does (see mirrorTx.must).
	must []table.DriftEntry
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
}

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
	home.start(rs.maxBody, io.MultiReader(bytesReader(h.upIn), ss.upstream.reader))
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
		if typ == 'P' {
			if p, err := decodeParse(body); err == nil {
				delete(rs.stmts, p.name)
				delete(home.parsed, p.name)
			}
		}
	})
	rs.startClientReader(io.MultiReader(bytesReader(h.clientIn), idleReader{ss}))
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

type byteSliceReader struct{ b []byte }

func (r *byteSliceReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.b)
	r.b = r.b[n:]
	return n, nil
}

func bytesReader(b []byte) io.Reader { return &byteSliceReader{b: b} }

func (rs *routedSession) startClientReader(r io.Reader) {
	rs.clientIn = make(chan []clientMsg, 16)
	rs.clientQuit = make(chan struct{})
	rs.clientDone = make(chan struct{})
	br := bufio.NewReaderSize(r, 32<<10)
	go func() {
		defer close(rs.clientDone)
		for {
			typ, body, err := rs.readClientMsg(br)
			if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && !rs.ss.atSafePoint() {
				continue // the idle timeout does not apply inside a request or transaction
			}
			batch := []clientMsg{{typ: typ, body: body, err: err}}
			for err == nil && wholeBuffered(br) {
				typ, body, err = pgwire.ReadMessage(br, rs.maxBody)
				batch = append(batch, clientMsg{typ: typ, body: body, err: err})
			}
			select {
			case rs.clientIn <- batch:
			case <-rs.clientQuit:
				return
			}
			if err != nil {
				return
			}
		}
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
		if rs.txState == 'I' && rs.srv.stopping.Load() {
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
		if m.typ == 'X' {
			ss.terminated.Store(true)
			return nil
		}
		u, err := rs.collect(m)
		if err != nil {
			return err
		}
		err = rs.serve(u)
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
	if bm.typ == 'E' {
		rs.toClient('E', bm.body)
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
	if (typ == 'T' || typ == 't') && rs.from != rs.home {
		body = rs.homeOIDs(rs.from, typ, body)
	}
	if rs.capture != nil {
		rs.capture.add(typ, body)
	}
	if rs.holding {
		rs.hold = appendMsg(rs.hold, typ, body)
		rs.spillHold()
		return
	}
	b := rs.cout.AvailableBuffer()
	b = appendMsg(b, typ, body)
	_, _ = rs.cout.Write(b)
}

func (rs *routedSession) toClientRaw(b []byte) {
	if rs.holding {
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
		rs.hold, rs.holding, rs.spilled = rs.hold[:0], false, true
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

// unit is one request: a Query, a FunctionCall, or extended-protocol
// messages up to a Sync or Flush.
type unit struct {
	msgs []clientMsg
	end  byte  // 'Q', 'F', 'S', 'H', or the type of a lone message
	held int64 // bytes counted in Server.buffered for msgs (limits.go)
}

// collect reads the rest of the request that m starts.
func (rs *routedSession) collect(m clientMsg) (_ *unit, err error) {
	u := &unit{msgs: []clientMsg{m}}
	defer func() {
		if err != nil {
			rs.release(u)
		}
	}()
	if err := rs.holdMsg(u, m); err != nil {
		return nil, err
	}
	switch m.typ {
	case 'Q', 'F', 'S', 'H':
		u.end = m.typ
		return u, nil
	case 'P', 'B', 'D', 'E', 'C':
	default:
		u.end = m.typ
		return u, nil
	}
	for {
		n := rs.nextClient()
		if n.err != nil {
			return nil, rs.clientErr(n.err)
		}
		switch n.typ {
		case 'S', 'H':
			u.msgs = append(u.msgs, n)
			u.end = n.typ
			return u, nil
		case 'P', 'B', 'D', 'E', 'C':
			u.msgs = append(u.msgs, n)
			if err := rs.holdMsg(u, n); err != nil {
				return nil, err
			}
		default:
			// A message that does not belong in an extended-protocol batch
			// (Query, Terminate...): serve what came before it first.
			rs.pushback = append([]clientMsg{n}, rs.pushback...)
			u.end = 'H'
			return u, nil
		}
	}
}

// store returns the session's connection to the named store, opening it
// (and bringing its session settings in step with the home store) when
// needed.
func (rs *routedSession) store(name route.Store) (*rstore, error) {
	i := storeIndexOf(string(name))
	if u := rs.stores[i]; u != nil && u.up != nil && u.dead == nil {
		return u, nil
	} else if u != nil && u.up != nil {
		u.stop(false)
	}
	st := rs.srv.old
	if name == route.New {
		st = rs.srv.new
	}
	if st == nil {
		return nil, fmt.Errorf("no %s store is configured", name)
	}
	timeout := rs.srv.config().Limits.ConnectTimeout.Duration()
	if name != rs.state.Primary {
		// A session on the secondary is opened inside a client's request:
		// it gets the mirror budget, like any other secondary work.
		timeout = min(timeout, rs.srv.config().Routing.MirrorBudget.Duration())
	}
	ctx, cancel := context.WithTimeout(rs.ss.ctx, timeout)
	up, err := st.connect(ctx, rs.ss.user, rs.ss.database, rs.ss.params)
	cancel()
	if err != nil {
		return nil, err
	}
	u := &rstore{name: string(name), st: st, up: up}
	u.start(rs.maxBody, up.reader)
	rs.stores[i] = u
	if err := rs.syncSettings(u); err != nil {
		rs.ss.log.Warn("could not copy session settings to the second store", "store", name, "error", err)
	}
	return u, nil
}

// syncSettings copies the home session's SET values to u.
func (rs *routedSession) syncSettings(u *rstore) error {
	src := rs.home
	if src == u || src.up == nil || src.dead != nil || rs.txState == 'E' {
		return nil
	}
	if rs.extOpen && src.name == string(rs.state.Primary) {
		// A simple Query would commit the primary's implicit transaction
		// (and be skipped after an error in it): leave the SETs.
		rs.ss.log.Debug("session settings not copied to the second store: the primary's implicit transaction is open", "store", u.name)
		return nil
	}
	// The home store may be inside the client's (or the proxy's own)
	// transaction: a failure of this read there (a cancel meant for the
	// client's statement, a statement_timeout) must not abort it.
	guarded := src.txStatus == 'T'
	if guarded {
		if _, err := rs.internalQuery(src, "SAVEPOINT tandem_settings", time.Time{}); err != nil {
			return err
		}
	}
	sets, err := rs.sessionSETs(src)
	if guarded {
		end := "RELEASE SAVEPOINT tandem_settings"
		if err != nil {
			end = "ROLLBACK TO SAVEPOINT tandem_settings; RELEASE SAVEPOINT tandem_settings"
		}
		if _, gerr := rs.internalQuery(src, end, time.Time{}); gerr != nil && err == nil {
			err = gerr
		}
	}
	if err != nil {
		return err
	}
	if len(sets) == 0 {
		return nil
	}
	for _, kv := range sets {
		u.queueQuery(fmt.Sprintf("SELECT pg_catalog.set_config(%s, %s, false)", quoteLiteral(kv[0]), quoteLiteral(kv[1])))
	}
	if err := rs.send(u, time.Time{}); err != nil {
		return err
	}
	var firstErr error
	for range sets {
		_, err := rs.drainInternal(u, time.Time{})
		if err != nil && firstErr == nil {
			firstErr = err
		}
		if u.dead != nil {
			return u.dead
		}
	}
	return firstErr
}

// sessionSETs returns the settings the session changed on src (name,
// value), except those a second session must not copy.
func (rs *routedSession) sessionSETs(src *rstore) ([][2]string, error) {
	rows, err := rs.internalQuery(src, "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' AND name NOT IN ('session_replication_role', 'transaction_isolation', 'transaction_read_only', 'transaction_deferrable')", time.Time{})
	if err != nil {
		return nil, err
	}
	var out [][2]string
	for _, r := range rows {
		if len(r) == 2 && r[0] != nil && r[1] != nil {
			out = append(out, [2]string{*r[0], *r[1]})
		}
	}
	return out, nil
}

// quoteLiteral quotes s as an SQL literal that means s whatever
// standard_conforming_strings is, as PostgreSQL's quote_literal does: a
// value with a backslash becomes an E'...' string with it doubled.
func quoteLiteral(s string) string {
	q := strings.ReplaceAll(s, "'", "''")
	if strings.Contains(s, `\`) {
		return "E'" + strings.ReplaceAll(q, `\`, `\\`) + "'"
	}
	return "'" + q + "'"
}

// send writes u's queued output.
func (rs *routedSession) send(u *rstore, deadline time.Time) error {
	if len(u.out) == 0 {
		return nil
	}
	_ = u.up.conn.SetWriteDeadline(deadline)
	_, err := u.up.conn.Write(u.out)
	u.out = u.out[:0]
	if err != nil {
		u.dead = err
		return err
	}
	return nil
}

var errSkipping = errors.New("the store is discarding messages up to the client's next Sync")

var errBudget = errors.New("the secondary store exceeded the mirror latency budget")

// recv returns u's next message; a zero deadline waits as long as it takes.
func (rs *routedSession) recv(u *rstore, deadline time.Time) (backendMsg, error) {
	if u.dead != nil {
		return backendMsg{}, u.dead
	}
	if len(u.queue) > 0 {
		m := u.queue[0]
		u.queue = u.queue[1:]
		if m.err != nil {
			u.dead = m.err
			return m, m.err
		}
		u.note(m)
		return m, nil
	}
	var timeout <-chan time.Time
	if !deadline.IsZero() {
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case b := <-u.in:
		m := b[0]
		u.queue = b[1:]
		if m.err != nil {
			u.dead = m.err
			return m, m.err
		}
		u.note(m)
		return m, nil
	case <-timeout:
		u.dead = errBudget
		return backendMsg{}, errBudget
	case <-rs.ss.killCh:
		return backendMsg{}, rs.ss.killErr
	}
}

// note keeps the store's transaction status from its ReadyForQuery.
func (u *rstore) note(m backendMsg) {
	if m.typ == 'Z' && len(m.body) == 1 {
		u.txStatus = m.body[0]
		u.skipping = false
	}
}

// storeError is an ErrorResponse from a store for an internal statement.
type storeError struct {
	store, code, message string
}

func (e *storeError) Error() string {
	return fmt.Sprintf("%s store: %s (SQLSTATE %s)", e.store, e.message, e.code)
}

// drainInternal reads one internal request's replies up to ReadyForQuery,
// returning its rows (text) and its first error.
func (rs *routedSession) drainInternal(u *rstore, deadline time.Time) ([][]*string, error) {
	for u.queued > 0 {
		// Replies to requests sent ahead without waiting (a pipelined
		// BEGIN): an error there is this request's error too.
		u.queued--
		if _, err := rs.drainOne(u, deadline); err != nil {
			for ; u.queued > 0; u.queued-- {
				if _, e := rs.drainOne(u, deadline); e != nil && u.dead != nil {
					return nil, e
				}
			}
			_, _ = rs.drainOne(u, deadline)
			return nil, err
		}
	}
	return rs.drainOne(u, deadline)
}

func (rs *routedSession) drainOne(u *rstore, deadline time.Time) ([][]*string, error) {
	var rows [][]*string
	var firstErr error
	var cols [][]byte
	for {
		m, err := rs.recv(u, deadline)
		if err != nil {
			return nil, err
		}
		switch m.typ {
		case 'D':
			cols, err = splitDataRow(m.body, cols)
			if err != nil {
				return nil, err
			}
			row := make([]*string, len(cols))
			for i, c := range cols {
				if c != nil {
					s := string(c)
					row[i] = &s
				}
			}
			rows = append(rows, row)
		case 'E':
			if firstErr == nil {
				code, msg := errorFields(m.body)
				firstErr = &storeError{store: u.name, code: code, message: msg}
			}
		case 'A', 'S':
			// A notification or parameter change caused by the proxy's own
			// COMMIT or SET on the store serving the client is the client's.
			if u.name == string(rs.state.Primary) {
				rs.toClient(m.typ, m.body)
			}
		case 'C':
			u.lastTag = tagString(m.body)
		case 'Z':
			return rows, firstErr
		}
	}
}

// internalQuery runs sql on u with the simple protocol and returns its rows.
func (rs *routedSession) internalQuery(u *rstore, sql string, deadline time.Time) ([][]*string, error) {
	if u.skipping {
		return nil, errSkipping
	}
	u.queueQuery(sql)
	if err := rs.send(u, deadline); err != nil {
		return nil, err
	}
	return rs.drainInternal(u, deadline)
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
	if rs.txState != 'I' || rs.extOpen {
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
	case status == 'I':
		rs.setWriter(false)
		rs.tx = mirrorTx{}
	default:
		rs.setWriter(true)
	}
}

// statementsOf returns the statements a unit runs, with the Bind of each
// Execute (nil for a Query).
func (rs *routedSession) analyze(u *unit) (kinds []classify.Kind, pureRead bool, tables []string) {
	pureRead = true
	rs.controlWrite = ""
	note := func(si *stmtInfo) {
		if si == nil || si.plan == nil || si.plan.Err != nil {
			kinds = append(kinds, classify.Unknown)
			pureRead = false
			return
		}
		for _, st := range si.plan.Stmts {
			kinds = append(kinds, st.Kind)
			if st.Kind != classify.Read {
				pureRead = false
				if t := controlTable(st.Tables); t != "" && rs.controlWrite == "" {
					rs.controlWrite = t
				}
			}
			tables = append(tables, st.Tables...)
		}
	}
	local := map[string]*stmtInfo{}
	portals := map[string]*stmtInfo{}
	for _, m := range u.msgs {
		switch m.typ {
		case 'Q':
			sql := strings.TrimSuffix(string(m.body), "\x00")
			note(&stmtInfo{sql: sql, plan: rs.srv.classifier.Plan(sql)})
		case 'P':
			p, err := decodeParse(m.body)
			if err != nil {
				pureRead = false
				continue
			}
			local[p.name] = &stmtInfo{sql: p.sql, plan: rs.srv.classifier.Plan(p.sql)}
		case 'B':
			b, err := decodeBind(m.body)
			if err != nil {
				pureRead = false
				continue
			}
			si := local[b.stmt]
			if si == nil {
				si = rs.stmts[b.stmt]
			}
			portals[b.portal] = si
		case 'E':
			r := msgReader{b: m.body}
			name := r.cstring()
			si, ok := portals[name]
			if !ok {
				if p := rs.portals[name]; p != nil {
					si = p.stmt
				}
			}
			note(si)
		case 'F':
			kinds = append(kinds, classify.Unknown)
			pureRead = false
		}
	}
	if len(kinds) == 0 {
		pureRead = false // a bare Sync or Flush belongs to the primary's session
	}
	return kinds, pureRead, tables
}

// readStore picks the store that serves an eligible read.
func (rs *routedSession) readStore(tables []string) route.Store {
	st := rs.state
	if rs.srv.reshaped(tables) {
		return route.Old // written for old's shape
	}
	if rs.srv.driftBlocks(tables) {
		return st.Primary // the secondary may be missing writes
	}
	if rs.bucket < st.Reads {
		return route.New
	}
	return route.Old
}

// reshaped reports whether any of tables (as written) maps to a new table
// of another name or shape: a read written for old cannot run on new.
func (s *Server) reshaped(tables []string) bool {
	ms := s.mappings.Load()
	if ms == nil {
		return false
	}
	for _, t := range tables {
		if m := ms.ForOld(writtenName(t)); m != nil && !m.Identity() {
			return true
		}
	}
	return false
}

// driftBlocks reports whether any of tables has open drift.
func (s *Server) driftBlocks(tables []string) bool {
	m := s.drift.Load()
	if m == nil || len(*m) == 0 {
		return false
	}
	for _, t := range tables {
		t = strings.ToLower(strings.ReplaceAll(t, `"`, ""))
		if (*m)[t] {
			return true
		}
		if !strings.Contains(t, ".") && (*m)["public."+t] {
			return true
		}
		for k := range *m {
			if i := strings.LastIndexByte(k, '.'); i >= 0 && k[i+1:] == t {
				return true
			}
		}
	}
	return false
}
