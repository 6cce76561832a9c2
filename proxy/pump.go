package proxy

import (
	"strings"
	"time"

	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/metrics"
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

// desiredSQL is the text statement si must have on store u: the row-image
// rewrite on the primary while mirroring, the client's text elsewhere.
func (rs *routedSession) desiredSQL(si *stmtInfo, u *rstore) (string, bool) {
	if si == nil {
		return "", false
	}
	if img := si.image(); img != nil && rs.state.Mirror && u.name == string(rs.state.Primary) {
		return img.SQL, true
	}
	return si.sql, false
}

// ensureParsed queues what makes statement si exist on u with the text it
// must have there.
func (p *pump) ensureParsed(si *stmtInfo) {
	if si == nil {
		return
	}
	want, rewr := p.rs.desiredSQL(si, p.u)
	if have, ok := p.u.parsed[si.name]; ok && have == want && (!rewr || (si.descOK || si.descPending) && si.descFrom == p.u.name) {
		return
	}
	u, name := p.u, si.name
	prev, had := u.parsed[name]
	undo := func(failed bool) {
		if failed {
			delete(u.parsed, name)
		} else {
			restore(u.parsed, name, prev, had)
		}
	}
	if had || name != "" {
		u.out = encodeClose(u.out, 'S', name)
		p.q = append(p.q, &expectation{kind: expIntClose, undo: undo})
	}
	u.out = encodeParse(u.out, name, want, p.rs.storeOIDs(u, si.oids))
	p.q = append(p.q, &expectation{kind: expIntParse, undo: undo})
	u.parsed[name] = want
	if rewr {
		si.descOK, si.descPending, si.descFrom = false, true, p.u.name
		p.u.out = encodeDescribe(p.u.out, 'S', si.name)
		p.q = append(p.q, &expectation{kind: expIntDesc, si: si})
	}
}

// forget closes a statement the store still holds under a name the
// client no longer has (it closed it, or a simple Query on another store
// destroyed the unnamed statement), so that the store answers a use of
// the name as PostgreSQL would: it does not exist, or it can be parsed.
func (p *pump) forget(name string) {
	if p.rs.stmts[name] != nil {
		return
	}
	prev, had := p.u.parsed[name]
	if !had {
		return
	}
	u := p.u
	u.out = encodeClose(u.out, 'S', name)
	p.q = append(p.q, &expectation{kind: expIntClose, undo: func(bool) { restore(u.parsed, name, prev, had) }})
	delete(u.parsed, name)
}

// run sends unit m to store u and processes the replies. wrap puts the
// unit inside the proxy's own BEGIN; collect rewrites writes to return row
// images and collects them.
func (rs *routedSession) runUnit(u *rstore, un *unit, wrap, collect bool) (*unitResult, error) {
	p := &pump{rs: rs, u: u, res: &unitResult{}, wrapQ: wrap}
	rs.from = u
	if wrap {
		u.queueQuery("BEGIN")
		p.q = append(p.q, &expectation{kind: expIntQuery})
	}
	for i, m := range un.msgs {
		d := &un.dec[i]
		if u.skipping && m.typ != 'S' {
			// An earlier message of the batch failed: the store discards
			// everything up to the Sync, and nothing of it takes effect.
			u.out = appendMsg(u.out, m.typ, m.body)
			continue
		}
		switch m.typ {
		case 'Q':
			sql, plan := d.sql, d.plan
			send := sql
			rewr := collect && plan.Err == nil && plan.SQL != sql
			if rewr {
				send = plan.SQL
			}
			u.queueQuery(send)
			delete(rs.stmts, "") // a simple Query destroys the unnamed statement
			p.q = append(p.q, &expectation{kind: expQuery, plan: plan, rewr: rewr, marker: -1})
		case 'F':
			u.out = appendMsg(u.out, 'F', m.body)
			p.q = append(p.q, &expectation{kind: expFunc})
		case 'P':
			if d.err != nil {
				return nil, errMalformedClient
			}
			pm := d.parse
			prevSI, hadSI := rs.stmts[pm.name]
			if hadSI && pm.name != "" {
				// The name is taken: make sure the store knows it, so that
				// it refuses the Parse (42P05) as PostgreSQL would.
				p.ensureParsed(prevSI)
			} else if pm.name != "" {
				p.forget(pm.name)
			}
			prevParsed, hadParsed := u.parsed[pm.name]
			si := &stmtInfo{name: pm.name, sql: pm.sql, oids: pm.oids, plan: d.plan, marker: -1}
			rs.stmts[pm.name] = si
			want, rewr := rs.desiredSQL(si, u)
			u.out = encodeParse(u.out, pm.name, want, rs.storeOIDs(u, pm.oids))
			name := pm.name
			p.q = append(p.q, &expectation{kind: expParse, undo: func(failed bool) {
				if failed && name == "" {
					// A failed Parse leaves no unnamed statement behind.
					delete(rs.stmts, name)
					delete(u.parsed, name)
					return
				}
				restore(rs.stmts, name, prevSI, hadSI)
				restore(u.parsed, name, prevParsed, hadParsed)
			}})
			u.parsed[pm.name] = want
			for _, o := range rs.stores {
				if o != nil && o != u {
					delete(o.parsed, pm.name)
				}
			}
			if rewr {
				si.descPending, si.descFrom = true, u.name
				u.out = encodeDescribe(u.out, 'S', pm.name)
				p.q = append(p.q, &expectation{kind: expIntDesc, si: si})
			}
		case 'B':
			if d.err != nil {
				return nil, errMalformedClient
			}
			b := d.bind
			si := rs.stmts[b.stmt]
			p.forget(b.stmt)
			p.ensureParsed(si)
			_, rewr := rs.desiredSQL(si, u)
			if si != nil && rewr {
				if !si.descOK && needsColumnCount(b.resultFormats) {
					// The result formats need the rewritten statement's
					// column count: get the Describe's answer first.
					u.out = append(u.out, flushMsg...)
					if err := rs.send(u, time.Time{}); err != nil {
						return nil, err
					}
					if err := p.until(func() bool { return si.descOK || !p.has(expIntDesc, si) }); err != nil {
						return nil, err
					}
					if u.skipping {
						// An earlier message failed meanwhile: the store
						// discards this Bind too.
						u.out = appendMsg(u.out, 'B', m.body)
						continue
					}
				}
				if si.descOK && si.marker >= 0 && needsColumnCount(b.resultFormats) {
					b2 := b
					b2.resultFormats = imageFormats(b.resultFormats, si.marker, len(si.fields))
					u.out = encodeBind(u.out, b2)
				} else {
					u.out = appendMsg(u.out, 'B', m.body)
				}
			} else {
				u.out = appendMsg(u.out, 'B', m.body)
			}
			prevPortal, hadPortal := rs.portals[b.portal]
			rs.portals[b.portal] = &portalInfo{stmt: si, bind: b}
			portal := b.portal
			p.q = append(p.q, &expectation{kind: expBind, undo: func(bool) { restore(rs.portals, portal, prevPortal, hadPortal) }})
		case 'D':
			if len(m.body) < 2 {
				return nil, errMalformedClient
			}
			name := strings.TrimSuffix(string(m.body[1:]), "\x00")
			if m.body[0] == 'S' {
				si := rs.stmts[name]
				p.forget(name)
				p.ensureParsed(si)
				u.out = appendMsg(u.out, 'D', m.body)
				p.q = append(p.q, &expectation{kind: expDescStmt, si: si})
			} else {
				u.out = appendMsg(u.out, 'D', m.body)
				p.q = append(p.q, &expectation{kind: expDescPortal, portal: rs.portals[name]})
			}
		case 'E':
			u.out = appendMsg(u.out, 'E', m.body)
			p.q = append(p.q, &expectation{kind: expExecute, portal: rs.portals[d.portal]})
		case 'C':
			if len(m.body) < 2 {
				return nil, errMalformedClient
			}
			name := strings.TrimSuffix(string(m.body[1:]), "\x00")
			var undo func(bool)
			if m.body[0] == 'S' {
				prevSI, hadSI := rs.stmts[name]
				prevParsed, hadParsed := u.parsed[name]
				undo = func(bool) {
					restore(rs.stmts, name, prevSI, hadSI)
					restore(u.parsed, name, prevParsed, hadParsed)
				}
				delete(rs.stmts, name)
				delete(u.parsed, name)
			} else {
				prevPortal, hadPortal := rs.portals[name]
				undo = func(bool) { restore(rs.portals, name, prevPortal, hadPortal) }
				delete(rs.portals, name)
			}
			u.out = appendMsg(u.out, 'C', m.body)
			p.q = append(p.q, &expectation{kind: expClose, undo: undo})
		case 'S':
			u.out = appendMsg(u.out, 'S', nil)
			p.q = append(p.q, &expectation{kind: expSync})
		case 'H':
			u.out = appendMsg(u.out, 'H', nil)
		default:
			u.out = appendMsg(u.out, m.typ, m.body)
		}
	}
	if err := rs.send(u, time.Time{}); err != nil {
		return nil, err
	}
	if err := p.until(func() bool { return len(p.q) == 0 }); err != nil {
		return nil, err
	}
	return p.res, nil
}

var errMalformedClient = &clientProtoError{}

type clientProtoError struct{}

func (*clientProtoError) Error() string { return "malformed message from the client" }

// needsColumnCount reports whether a Bind's result formats must be
// rewritten for the image columns: only when they name formats per column
// or ask for binary, since none or one text code already cover any count.
func needsColumnCount(formats []int) bool {
	return len(formats) > 1 || len(formats) == 1 && formats[0] != 0
}

// imageFormats extends a Bind's result formats to the rewritten statement's
// columns: the client's own as it asked, text for the marker and the image.
func imageFormats(client []int, marker, total int) []int {
	switch {
	case len(client) == 0:
		return nil
	case len(client) == 1 && client[0] == 0:
		return client
	}
	out := make([]int, total)
	for i := 0; i < marker && i < total; i++ {
		if len(client) == 1 {
			out[i] = client[0]
		} else if i < len(client) {
			out[i] = client[i]
		}
	}
	return out
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
	case 'N', 'A':
		if len(p.q) > 0 && p.q[0].kind >= expIntParse {
			return nil
		}
		rs.toClient(m.typ, m.body)
		return nil
	case 'S':
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
	case 'C':
		if len(p.q) == 0 || p.q[0].kind < expIntParse { // the client's statements, not the proxy's own
			rs.srv.metrics.Statement(p.u.name, metrics.CommandVerb(m.body), 1)
		}
	case 'E':
		rs.srv.metrics.Error(rs.ss.ctx, p.u.name, errorCode(m.body), metrics.OriginStore)
	}
	switch m.typ {
	case 'E':
		if e.kind == expIntQuery {
			code, msg := errorFields(m.body)
			p.intErr = &storeError{store: p.u.name, code: code, message: msg}
			if p.wrapQ {
				p.res.unwrapped = true
			}
			return nil
		}
		p.res.failed = true
		p.res.sentAny = true
		rs.toClient('E', m.body)
		if e.kind == expQuery || e.kind == expFunc {
			e.idx = 1 << 30 // the rest of the query does not run
			return nil
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
		return nil
	case 'Z':
		status := byte('I')
		if len(m.body) == 1 {
			status = m.body[0]
		}
		// A ReadyForQuery answers the first Sync or simple query queued:
		// anything before it was skipped by a store still discarding
		// messages after an error (a batch ended by Flush failed).
		p.skipToReady()
		if len(p.q) == 0 {
			rs.toClient(m.typ, m.body)
			return nil
		}
		e = p.q[0]
		p.q = p.q[1:]
		if e.kind == expIntQuery {
			return nil
		}
		p.res.status = status // the caller tells the client, once the secondary has followed
		return nil
	}
	switch e.kind {
	case expIntQuery:
		return nil
	case expIntParse, expIntClose:
		if m.typ == '1' || m.typ == '3' {
			p.q = p.q[1:]
		}
		return nil
	case expIntDesc:
		switch m.typ {
		case 't':
		case 'T':
			fs, err := decodeRowDescription(m.body)
			if err != nil {
				return err
			}
			e.si.fields, e.si.marker = fs, markerIndex(fs)
			e.si.descOK, e.si.descPending = true, false
			p.q = p.q[1:]
		case 'n':
			e.si.fields, e.si.marker, e.si.descOK, e.si.descPending = nil, -1, true, false
			p.q = p.q[1:]
		}
		return nil
	case expParse, expBind, expClose:
		p.res.sentAny = true
		rs.toClient(m.typ, m.body)
		p.q = p.q[1:]
		return nil
	case expDescStmt, expDescPortal:
		var si *stmtInfo
		if e.kind == expDescStmt {
			si = e.si
		} else if e.portal != nil {
			si = e.portal.stmt
		}
		p.res.sentAny = true
		switch m.typ {
		case 't':
			if si != nil && e.kind == expDescStmt && rs.state.Shadow > 0 { // kept for shadow reads only while they run
				si.paramDesc = decodeParameterDescription(m.body)
			}
			rs.toClient(m.typ, m.body)
			return nil
		case 'T':
			if _, rewr := rs.desiredSQL(si, p.u); rewr {
				fs, err := decodeRowDescription(m.body)
				if err != nil {
					return err
				}
				if mk := markerIndex(fs); mk >= 0 {
					if mk == 0 {
						rs.toClient('n', nil)
					} else {
						rs.toClient('T', rowDescriptionBody(fs[:mk]))
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
	case 'D':
		if si != nil && si.descOK && si.marker >= 0 {
			if _, rewr := rs.desiredSQL(si, p.u); rewr {
				return p.stripRow(e, m.body, si.fields, si.marker)
			}
		}
		rs.toClient('D', m.body)
	case 'C':
		rs.toClient('C', m.body)
		p.finishStmt(e, si, m.body)
		p.q = p.q[1:]
	case 'I', 's':
		rs.toClient(m.typ, m.body)
		p.q = p.q[1:]
	case 'G':
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
	case 'T':
		e.fields, e.marker = nil, -1
		if e.rewr && st != nil && st.Image != nil {
			fs, err := decodeRowDescription(m.body)
			if err != nil {
				return err
			}
			if mk := markerIndex(fs); mk >= 0 {
				e.fields, e.marker = fs, mk
				if mk > 0 {
					rs.toClient('T', rowDescriptionBody(fs[:mk]))
				}
				return nil
			}
		}
		rs.toClient('T', m.body)
	case 'D':
		if e.marker >= 0 {
			return p.stripRow(e, m.body, e.fields, e.marker)
		}
		rs.toClient('D', m.body)
	case 'C':
		rs.toClient('C', m.body)
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
	case 'I':
		rs.toClient('I', m.body)
		e.idx++
	case 'G':
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
			case 'E':
				failed, p.u.out = true, p.u.out[:0]
			case 'Z':
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
		if failed && c.typ == 'd' {
			continue // the store drops it anyway
		}
		p.u.out = appendMsg(p.u.out, c.typ, c.body)
		if len(p.u.out) > 64<<10 || c.typ == 'c' || c.typ == 'f' {
			if err := rs.send(p.u, time.Time{}); err != nil {
				return err
			}
		}
		if c.typ == 'c' || c.typ == 'f' {
			return nil
		}
	}
}
