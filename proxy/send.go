package proxy

import (
	"strings"
	"time"

	"github.com/tandemdb/tandem/internal/pgwire"
)

// Sending a unit: runUnit queues each client message of the unit for a
// store, rewritten where the mirror needs a row image, with the reply it
// expects (an expectation), then lets the pump (pump.go) answer the client
// from the store's replies.

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
		u.out = encodeClose(u.out, pgwire.TargetStatement, name)
		p.q = append(p.q, &expectation{kind: expIntClose, undo: undo})
	}
	u.out = encodeParse(u.out, name, want, p.rs.storeOIDs(u, si.oids))
	p.q = append(p.q, &expectation{kind: expIntParse, undo: undo})
	u.parsed[name] = want
	if rewr {
		si.descOK, si.descPending, si.descFrom = false, true, p.u.name
		p.u.out = encodeDescribe(p.u.out, pgwire.TargetStatement, si.name)
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
	u.out = encodeClose(u.out, pgwire.TargetStatement, name)
	p.q = append(p.q, &expectation{kind: expIntClose, undo: func(bool) { restore(u.parsed, name, prev, had) }})
	delete(u.parsed, name)
}

// runUnit sends unit un to store u and processes the replies. wrap puts
// the unit inside the proxy's own BEGIN; collect rewrites writes to return
// row images and collects them.
func (rs *routedSession) runUnit(u *rstore, un *unit, wrap, collect bool) (*unitResult, error) {
	p := &pump{rs: rs, u: u, res: &unitResult{}, wrapQ: wrap}
	rs.from = u
	if wrap {
		u.queueQuery("BEGIN")
		p.q = append(p.q, &expectation{kind: expIntQuery})
	}
	for i, m := range un.msgs {
		d := &un.dec[i]
		if u.skipping && m.typ != pgwire.ClientSync {
			// An earlier message of the batch failed: the store discards
			// everything up to the Sync, and nothing of it takes effect.
			u.out = appendMsg(u.out, m.typ, m.body)
			continue
		}
		var err error
		switch m.typ {
		case pgwire.ClientQuery:
			sql, plan := d.sql, d.plan
			send := sql
			rewr := collect && plan.Err == nil && plan.SQL != sql
			if rewr {
				send = plan.SQL
			}
			u.queueQuery(send)
			delete(rs.stmts, "") // a simple Query destroys the unnamed statement
			p.q = append(p.q, &expectation{kind: expQuery, plan: plan, rewr: rewr, marker: -1})
		case pgwire.ClientFunctionCall:
			u.out = appendMsg(u.out, pgwire.ClientFunctionCall, m.body)
			p.q = append(p.q, &expectation{kind: expFunc})
		case pgwire.ClientParse:
			err = p.sendParse(d)
		case pgwire.ClientBind:
			err = p.sendBind(m, d)
		case pgwire.ClientDescribe:
			err = p.sendDescribe(m)
		case pgwire.ClientExecute:
			u.out = appendMsg(u.out, pgwire.ClientExecute, m.body)
			p.q = append(p.q, &expectation{kind: expExecute, portal: rs.portals[d.portal]})
		case pgwire.ClientClose:
			err = p.sendClose(m)
		case pgwire.ClientSync:
			u.out = appendMsg(u.out, pgwire.ClientSync, nil)
			p.q = append(p.q, &expectation{kind: expSync})
		case pgwire.ClientFlush:
			u.out = appendMsg(u.out, pgwire.ClientFlush, nil)
		default:
			u.out = appendMsg(u.out, m.typ, m.body)
		}
		if err != nil {
			return nil, err
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

// sendParse queues a Parse: the statement under the client's name, with
// the text it must have on this store (and, rewritten, an internal
// Describe of it).
func (p *pump) sendParse(d *decoded) error {
	rs, u := p.rs, p.u
	if d.err != nil {
		return errMalformedClient
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
		u.out = encodeDescribe(u.out, pgwire.TargetStatement, pm.name)
		p.q = append(p.q, &expectation{kind: expIntDesc, si: si})
	}
	return nil
}

// sendBind queues a Bind; for a rewritten statement, with result formats
// that also cover the row image's columns.
func (p *pump) sendBind(m clientMsg, d *decoded) error {
	rs, u := p.rs, p.u
	if d.err != nil {
		return errMalformedClient
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
				return err
			}
			if err := p.until(func() bool { return si.descOK || !p.has(expIntDesc, si) }); err != nil {
				return err
			}
			if u.skipping {
				// An earlier message failed meanwhile: the store
				// discards this Bind too.
				u.out = appendMsg(u.out, pgwire.ClientBind, m.body)
				return nil
			}
		}
		if si.descOK && si.marker >= 0 && needsColumnCount(b.resultFormats) {
			b2 := b
			b2.resultFormats = imageFormats(b.resultFormats, si.marker, len(si.fields))
			u.out = encodeBind(u.out, b2)
		} else {
			u.out = appendMsg(u.out, pgwire.ClientBind, m.body)
		}
	} else {
		u.out = appendMsg(u.out, pgwire.ClientBind, m.body)
	}
	prevPortal, hadPortal := rs.portals[b.portal]
	rs.portals[b.portal] = &portalInfo{stmt: si, bind: b}
	portal := b.portal
	p.q = append(p.q, &expectation{kind: expBind, undo: func(bool) { restore(rs.portals, portal, prevPortal, hadPortal) }})
	return nil
}

// sendDescribe queues a Describe of a statement (made to exist on this
// store first) or of a portal.
func (p *pump) sendDescribe(m clientMsg) error {
	rs, u := p.rs, p.u
	if len(m.body) < 2 {
		return errMalformedClient
	}
	name := strings.TrimSuffix(string(m.body[1:]), "\x00")
	if m.body[0] == pgwire.TargetStatement {
		si := rs.stmts[name]
		p.forget(name)
		p.ensureParsed(si)
		u.out = appendMsg(u.out, pgwire.ClientDescribe, m.body)
		p.q = append(p.q, &expectation{kind: expDescStmt, si: si})
	} else {
		u.out = appendMsg(u.out, pgwire.ClientDescribe, m.body)
		p.q = append(p.q, &expectation{kind: expDescPortal, portal: rs.portals[name]})
	}
	return nil
}

// sendClose queues a Close of a statement or a portal; the session forgets
// it at once, and takes it back should the Close fail.
func (p *pump) sendClose(m clientMsg) error {
	rs, u := p.rs, p.u
	if len(m.body) < 2 {
		return errMalformedClient
	}
	name := strings.TrimSuffix(string(m.body[1:]), "\x00")
	var undo func(bool)
	if m.body[0] == pgwire.TargetStatement {
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
	u.out = appendMsg(u.out, pgwire.ClientClose, m.body)
	p.q = append(p.q, &expectation{kind: expClose, undo: undo})
	return nil
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
