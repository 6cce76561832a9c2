package proxy

import (
	"strings"
	"time"

	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/pgwire"
)

// expKind is what a message sent to a store is answered with.
type expKind uint8

const (
	expQuery      expKind = iota // a client Query: statements up to ReadyForQuery
	expFunc                      // a FunctionCall: up to ReadyForQuery
	expParse                     // ParseComplete
	expBind                      // BindComplete
	expDescStmt                  // ParameterDescription, then RowDescription or NoData
	expDescPortal                // RowDescription or NoData
	expExecute                   // rows, then CommandComplete, EmptyQuery or PortalSuspended
	expClose                     // CloseComplete
	expSync                      // ReadyForQuery
	expIntParse                  // the proxy's own: swallowed
	expIntClose                  // the proxy's own: swallowed
	expIntDesc                   // the proxy's own Describe of a rewritten statement: recorded, swallowed
	expIntQuery                  // the proxy's own simple query: swallowed up to ReadyForQuery
)

type expectation struct {
	kind   expKind
	si     *stmtInfo
	portal *portalInfo
	plan   *classify.TextPlan
	rewr   bool // Query: sent with the row-image rewrite
	idx    int  // Query: statement being answered
	gotT   bool // Describe statement: ParameterDescription seen
	fields []field
	marker int        // index of the image marker in fields, -1 = none
	rows   [][][]byte // row images collected for the statement being answered
	imgMem int        // their size
	over   bool       // they outgrew maxImageBytes: the table goes to the drift ledger instead
	copied bool       // the statement being answered read COPY data
	// undo takes back what queueing the message did to the proxy's model
	// of the store's statements and portals, when the store skipped the
	// message (failed false: an earlier error) or refused it (failed true).
	undo func(failed bool)
}

// drop takes back e's effects: the store never carried it out.
func (e *expectation) drop(failed bool) {
	if e.kind == expIntDesc && e.si != nil {
		e.si.descPending = false
	}
	if e.undo != nil {
		e.undo(failed)
	}
}

// restore sets m[k] back to v (present) or removes it.
func restore[V any](m map[string]V, k string, v V, present bool) {
	if present {
		m[k] = v
	} else {
		delete(m, k)
	}
}

// event is something the primary did that the secondary must follow, in
// the order it happened.
type event struct {
	stmt    *classify.StmtPlan
	sql     string   // the statement's text, for statement mirroring
	bind    *bindMsg // the parameters of an extended-protocol statement
	tag     string   // its CommandComplete tag
	image   *imageSet
	copyIn  bool // rows arrived by COPY FROM STDIN
	ordered bool // false when the primary committed before the secondary could follow
}

// imageSet is the row images one statement returned.
type imageSet struct {
	fields   []field // the image columns
	rows     [][][]byte
	overflow bool // more than maxImageBytes: rows dropped, the whole table is drift
}

// maxImageBytes bounds the row images held for one statement.
var maxImageBytes = 32 << 20 // a variable for tests

// unitResult is what running a unit on a store produced.
type unitResult struct {
	status  byte // the final ReadyForQuery status (0 for a Flush-ended unit)
	events  []event
	failed  bool // an ErrorResponse was sent to the client
	sentAny bool // some reply reached the client (or the hold buffer)
	// unwrapped: the proxy's own BEGIN around the unit failed, so the
	// primary ran (and committed) its statements one by one.
	unwrapped bool
}

// pump is the state of processing one store's replies to one unit.
type pump struct {
	rs     *routedSession
	u      *rstore
	q      []*expectation
	res    *unitResult
	cols   [][]byte
	wrapQ  bool // the unit is wrapped in the proxy's BEGIN: the final Z is not the client's
	intErr error
}

func (p *pump) has(k expKind, si *stmtInfo) bool {
	for _, e := range p.q {
		if e.kind == k && e.si == si {
			return true
		}
	}
	return false
}

// until processes replies until done reports true.
func (p *pump) until(done func() bool) error {
	for !done() {
		m, err := p.rs.recv(p.u, time.Time{})
		if err != nil {
			return err
		}
		if err := p.handle(m); err != nil {
			return err
		}
	}
	return nil
}

// handle processes one reply.
func (p *pump) handle(m backendMsg) error {
	rs := p.rs
	switch m.typ {
	case pgwire.ServerNoticeResponse, pgwire.ServerNotification:
		if len(p.q) > 0 && p.q[0].kind >= expIntParse {
			return nil
		}
		rs.toClient(m.typ, m.body)
		return nil
	case pgwire.ServerParameterStatus:
		rs.toClient(m.typ, m.body)
		return nil
	}
	if len(p.q) == 0 {
		// Nothing was expected (a Flush-ended unit after an error): pass it on.
		rs.toClient(m.typ, m.body)
		return nil
	}
	e := p.q[0]
	switch m.typ {
	case pgwire.ServerCommandComplete:
		if len(p.q) == 0 || p.q[0].kind < expIntParse { // the client's statements, not the proxy's own
			rs.srv.metrics.Statement(p.u.name, metrics.CommandVerb(m.body), 1)
		}
	case pgwire.ServerErrorResponse:
		rs.srv.metrics.Error(rs.ss.ctx, p.u.name, errorCode(m.body), metrics.OriginStore)
	}
	switch m.typ {
	case pgwire.ServerErrorResponse:
		p.storeError(e, m)
		return nil
	case pgwire.ServerReadyForQuery:
		p.ready(m)
		return nil
	}
	switch e.kind {
	case expIntQuery:
		return nil
	case expIntParse, expIntClose:
		if m.typ == pgwire.ServerParseComplete || m.typ == pgwire.ServerCloseComplete {
			p.q = p.q[1:]
		}
		return nil
	case expIntDesc:
		return p.internalDescribe(e, m)
	case expParse, expBind, expClose:
		p.res.sentAny = true
		rs.toClient(m.typ, m.body)
		p.q = p.q[1:]
		return nil
	case expDescStmt, expDescPortal:
		return p.describeReply(e, m)
	case expExecute:
		return p.execReply(e, m)
	case expQuery, expFunc:
		return p.queryReply(e, m)
	case expSync:
		rs.toClient(m.typ, m.body)
		return nil
	}
	return nil
}

// storeError handles an ErrorResponse answering e: the proxy's own query
// keeps it; the client's statement fails, and in the extended protocol
// everything up to the Sync is skipped and its effects taken back.
func (p *pump) storeError(e *expectation, m backendMsg) {
	if e.kind == expIntQuery {
		code, msg := pgwire.ErrorFields(m.body)
		p.intErr = &storeError{store: p.u.name, code: code, message: msg}
		if p.wrapQ {
			p.res.unwrapped = true
		}
		return
	}
	p.res.failed = true
	p.res.sentAny = true
	p.rs.toClient(pgwire.ServerErrorResponse, m.body)
	if e.kind == expQuery || e.kind == expFunc {
		e.idx = 1 << 30 // the rest of the query does not run
		return
	}
	// Extended protocol: the message failed, and the store skips
	// everything after it up to Sync.
	// Their effects are taken back last first.
	p.u.skipping = true
	n := 0
	for n < len(p.q) && p.q[n].kind != expSync {
		n++
	}
	for i := n - 1; i >= 0; i-- {
		p.q[i].drop(i == 0)
	}
	p.q = p.q[n:]
}

// ready handles a ReadyForQuery: the unit's (or the proxy's own query's)
// end. The client gets the unit's only once the secondary has followed.
func (p *pump) ready(m backendMsg) {
	status := byte(pgwire.TxIdle)
	if len(m.body) == 1 {
		status = m.body[0]
	}
	// A ReadyForQuery answers the first Sync or simple query queued:
	// anything before it was skipped by a store still discarding
	// messages after an error (a batch ended by Flush failed).
	p.skipToReady()
	if len(p.q) == 0 {
		p.rs.toClient(m.typ, m.body)
		return
	}
	e := p.q[0]
	p.q = p.q[1:]
	if e.kind == expIntQuery {
		return
	}
	p.res.status = status // the caller tells the client, once the secondary has followed
}

// internalDescribe reads the answer to the proxy's own Describe of a
// rewritten statement: where its row image starts.
func (p *pump) internalDescribe(e *expectation, m backendMsg) error {
	switch m.typ {
	case pgwire.ServerParameterDescription:
	case pgwire.ServerRowDescription:
		fs, err := decodeRowDescription(m.body)
		if err != nil {
			return err
		}
		e.si.fields, e.si.marker = fs, markerIndex(fs)
		e.si.descOK, e.si.descPending = true, false
		p.q = p.q[1:]
	case pgwire.ServerNoData:
		e.si.fields, e.si.marker, e.si.descOK, e.si.descPending = nil, -1, true, false
		p.q = p.q[1:]
	}
	return nil
}

// describeReply passes the answer to a client's Describe on, without the
// row image's columns of a rewritten statement.
func (p *pump) describeReply(e *expectation, m backendMsg) error {
	rs := p.rs
	var si *stmtInfo
	if e.kind == expDescStmt {
		si = e.si
	} else if e.portal != nil {
		si = e.portal.stmt
	}
	p.res.sentAny = true
	switch m.typ {
	case pgwire.ServerParameterDescription:
		if si != nil && e.kind == expDescStmt && rs.state.Shadow > 0 { // kept for shadow reads only while they run
			si.paramDesc = decodeParameterDescription(m.body)
		}
		rs.toClient(m.typ, m.body)
		return nil
	case pgwire.ServerRowDescription:
		if _, rewr := rs.desiredSQL(si, p.u); rewr {
			fs, err := decodeRowDescription(m.body)
			if err != nil {
				return err
			}
			if mk := markerIndex(fs); mk >= 0 {
				if mk == 0 {
					rs.toClient(pgwire.ServerNoData, nil)
				} else {
					rs.toClient(pgwire.ServerRowDescription, rowDescriptionBody(fs[:mk]))
				}
				p.q = p.q[1:]
				return nil
			}
		}
		if si != nil && e.kind == expDescStmt && rs.state.Shadow > 0 { // kept for shadow reads only while they run
			if fs, err := decodeRowDescription(m.body); err == nil {
				si.desc = shadowFields(fs)
			}
		}
		rs.toClient(m.typ, m.body)
	default:
		rs.toClient(m.typ, m.body)
	}
	p.q = p.q[1:]
	return nil
}

// skipToReady drops the expectations the store skipped before its next
// ReadyForQuery.
func (p *pump) skipToReady() {
	n := 0
	for n < len(p.q) {
		k := p.q[n].kind
		if k == expSync || k == expQuery || k == expFunc || k == expIntQuery {
			break
		}
		n++
	}
	for i := n - 1; i >= 0; i-- { // last first
		p.q[i].drop(false)
	}
	p.q = p.q[n:]
}

func markerIndex(fs []field) int {
	for i, f := range fs {
		if f.name == classify.ImageMarker {
			return i
		}
	}
	return -1
}

// execReply handles a reply to a client's Execute.
func (p *pump) execReply(e *expectation, m backendMsg) error {
	rs := p.rs
	p.res.sentAny = true
	var si *stmtInfo
	if e.portal != nil {
		si = e.portal.stmt
	}
	switch m.typ {
	case pgwire.ServerDataRow:
		if si != nil && si.descOK && si.marker >= 0 {
			if _, rewr := rs.desiredSQL(si, p.u); rewr {
				return p.stripRow(e, m.body, si.fields, si.marker)
			}
		}
		rs.toClient(pgwire.ServerDataRow, m.body)
	case pgwire.ServerCommandComplete:
		rs.toClient(pgwire.ServerCommandComplete, m.body)
		p.finishStmt(e, si, m.body)
		p.q = p.q[1:]
	case pgwire.ServerEmptyQueryResponse, pgwire.ServerPortalSuspended:
		rs.toClient(m.typ, m.body)
		p.q = p.q[1:]
	case pgwire.ServerCopyInResponse:
		e.copied = true
		return p.copyIn(m, siPlanStmt(si))
	default: // CopyOut and its data
		rs.toClient(m.typ, m.body)
	}
	return nil
}

func siPlanStmt(si *stmtInfo) *classify.StmtPlan {
	if si == nil || si.plan == nil || len(si.plan.Stmts) != 1 {
		return nil
	}
	return &si.plan.Stmts[0]
}

// stripRow passes the client's columns of a rewritten statement's row on
// and keeps the row image.
func (p *pump) stripRow(e *expectation, body []byte, fields []field, marker int) error {
	cols, err := splitDataRow(body, p.cols)
	if err != nil {
		return err
	}
	p.cols = cols
	if marker > 0 {
		p.rs.toClientRaw(encodeDataRow(nil, cols[:marker]))
	}
	if e.fields == nil {
		e.fields = fields
	}
	if e.over {
		return nil
	}
	img := make([][]byte, len(cols)-marker-1)
	for i, c := range cols[marker+1:] {
		if c != nil {
			img[i] = append([]byte{}, c...)
			e.imgMem += len(c)
		}
	}
	e.rows = append(e.rows, img)
	if e.imgMem > maxImageBytes {
		// Memory stays bounded: a statement this large is handed to the
		// repairer as a whole-table entry rather than held.
		e.over, e.rows = true, nil
	}
	return nil
}

// finishStmt records the event of a completed extended-protocol statement.
func (p *pump) finishStmt(e *expectation, si *stmtInfo, tag []byte) {
	st := siPlanStmt(si)
	if st == nil {
		if si == nil || si.kind() != classify.Read {
			ev := event{sql: sqlOf(si), tag: tagString(tag), ordered: true}
			if e.portal != nil {
				b := e.portal.bind
				ev.bind = &b
			}
			p.res.events = append(p.res.events, ev)
		}
		return
	}
	ev := event{stmt: st, sql: si.sql, tag: tagString(tag), ordered: true}
	if e.portal != nil {
		b := e.portal.bind
		ev.bind = &b
	}
	if si.descOK && si.marker >= 0 {
		if _, rewr := p.rs.desiredSQL(si, p.u); rewr {
			ev.image = &imageSet{fields: si.fields[si.marker+1:], rows: e.rows, overflow: e.over}
		}
	}
	ev.copyIn = e.copied
	e.rows, e.copied, e.over, e.imgMem = nil, false, false, 0
	p.res.events = append(p.res.events, ev)
}

func sqlOf(si *stmtInfo) string {
	if si == nil {
		return ""
	}
	return si.sql
}

func tagString(b []byte) string { return strings.TrimSuffix(string(b), "\x00") }

// queryReply handles a reply to a client's Query or FunctionCall.
func (p *pump) queryReply(e *expectation, m backendMsg) error {
	rs := p.rs
	p.res.sentAny = true
	var st *classify.StmtPlan
	if e.plan != nil && e.idx < len(e.plan.Stmts) {
		st = &e.plan.Stmts[e.idx]
	}
	switch m.typ {
	case pgwire.ServerRowDescription:
		e.fields, e.marker = nil, -1
		if e.rewr && st != nil && st.Image != nil {
			fs, err := decodeRowDescription(m.body)
			if err != nil {
				return err
			}
			if mk := markerIndex(fs); mk >= 0 {
				e.fields, e.marker = fs, mk
				if mk > 0 {
					rs.toClient(pgwire.ServerRowDescription, rowDescriptionBody(fs[:mk]))
				}
				return nil
			}
		}
		rs.toClient(pgwire.ServerRowDescription, m.body)
	case pgwire.ServerDataRow:
		if e.marker >= 0 {
			return p.stripRow(e, m.body, e.fields, e.marker)
		}
		rs.toClient(pgwire.ServerDataRow, m.body)
	case pgwire.ServerCommandComplete:
		rs.toClient(pgwire.ServerCommandComplete, m.body)
		if st != nil {
			ev := event{stmt: st, sql: st.SQL, tag: tagString(m.body), ordered: true}
			if e.marker >= 0 {
				ev.image = &imageSet{fields: e.fields[e.marker+1:], rows: e.rows, overflow: e.over}
			}
			if e.copied {
				ev.copyIn = true
			}
			p.res.events = append(p.res.events, ev)
		} else if e.kind == expFunc {
			p.res.events = append(p.res.events, event{tag: tagString(m.body), ordered: true})
		}
		e.idx++
		e.fields, e.marker, e.rows, e.copied, e.over, e.imgMem = nil, -1, nil, false, false, 0
	case pgwire.ServerEmptyQueryResponse:
		rs.toClient(pgwire.ServerEmptyQueryResponse, m.body)
		e.idx++
	case pgwire.ServerCopyInResponse:
		e.copied = true
		return p.copyIn(m, st)
	default: // RowDescription-less replies: CopyOut data, FunctionCallResponse...
		rs.toClient(m.typ, m.body)
	}
	return nil
}

// copyIn relays a COPY FROM STDIN: the client's data goes to the store
// until CopyDone or CopyFail.
func (p *pump) copyIn(m backendMsg, st *classify.StmtPlan) error {
	rs := p.rs
	rs.toClient(m.typ, m.body)
	if err := rs.cout.Flush(); err != nil {
		return errClientGone
	}
	failed := false
	for {
		// The store may reject the data midway: its error goes to the
		// client at once, as it would directly, so that the client stops
		// sending. After an error the store drops the rest of the copy.
		for len(p.u.queue) > 0 {
			bm := p.u.queue[0]
			p.u.queue = p.u.queue[1:]
			if bm.err != nil {
				p.u.dead = bm.err
				return bm.err
			}
			p.u.note(bm)
			if err := p.handle(bm); err != nil {
				return err
			}
			if err := rs.cout.Flush(); err != nil {
				return errClientGone
			}
			switch bm.typ {
			case pgwire.ServerErrorResponse:
				failed, p.u.out = true, p.u.out[:0]
			case pgwire.ServerReadyForQuery:
				// A simple-query COPY ended by an error: the store is ready
				// again; copy messages the client still sends are dropped
				// by the store, as PostgreSQL documents.
				return nil
			}
		}
		var c clientMsg
		if len(rs.pushback) > 0 {
			c = rs.nextClient()
		} else {
			select {
			case b := <-rs.clientIn:
				rs.pushback = b
				c = rs.nextClient()
			case b := <-p.u.in:
				p.u.queue = b
				continue
			case <-rs.ss.killCh:
				return rs.ss.killErr
			}
		}
		if c.err != nil {
			return rs.clientErr(c.err)
		}
		if failed && c.typ == pgwire.ClientCopyData {
			continue // the store drops it anyway
		}
		p.u.out = appendMsg(p.u.out, c.typ, c.body)
		if len(p.u.out) > 64<<10 || c.typ == pgwire.ClientCopyDone || c.typ == pgwire.ClientCopyFail {
			if err := rs.send(p.u, time.Time{}); err != nil {
				return err
			}
		}
		if c.typ == pgwire.ClientCopyDone || c.typ == pgwire.ClientCopyFail {
			return nil
		}
	}
}
