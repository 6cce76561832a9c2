package proxy

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/route"
)

// Dispatch: a request is collected into a unit, analyzed (kinds, tables,
// pure read), and served under the session's routing state: on the
// primary, with the secondary following, or as a read shifted to the
// other store.

// unit is one request: a Query, a FunctionCall, or extended-protocol
// messages up to a Sync or Flush.
//
// collect also analyzes it, once: every later stage (serve, the shadow
// sample, runUnit, the commit check) reads what analyze found instead of
// decoding and classifying the messages again.
type unit struct {
	msgs []clientMsg
	end  byte  // 'Q', 'F', 'S', 'H', or the type of a lone message
	held int64 // bytes counted in Server.buffered for msgs (limits.go)

	dec      []decoded       // one per message of msgs
	kinds    []classify.Kind // of each statement the unit runs, in order
	pureRead bool            // only reads (and at least one statement)
	tables   []string        // as written in the statements
	// commits: a statement of the unit ends the client's transaction with
	// COMMIT or PREPARE TRANSACTION. A Bind counts with the session's
	// statement of its name as it was before the unit.
	commits bool
	// controlWrite is a control-schema table the unit would change ("" =
	// none): refused, see refuseControlWrite.
	controlWrite string
}

// decoded is one client message of a unit, decoded once by analyze.
type decoded struct {
	err  error              // the message did not decode (Parse, Bind)
	sql  string             // Query: the client's text
	plan *classify.TextPlan // Query: the text's plan; Parse: the statement's
	// parse is a Parse's content.
	parse parseMsg
	// bind is a Bind's content, and stmt the statement it binds as analyze
	// resolved it: a Parse earlier in the unit, else the session's (nil:
	// unknown).
	bind bindMsg
	stmt *stmtInfo
	// portal and maxRows are an Execute's; execErr: the body was short.
	portal  string
	maxRows int32
	execErr bool
}

// collect reads the rest of the request that m starts and analyzes it.
func (rs *routedSession) collect(m clientMsg) (*unit, error) {
	u, err := rs.gather(m)
	if err != nil {
		return nil, err
	}
	rs.analyze(u)
	return u, nil
}

// spareUnitMsgs bounds the messages a unit kept for reuse may hold room
// for, so that one huge batch does not pin its arrays for the session.
const spareUnitMsgs = 64

// newUnit returns an empty unit that m starts: the session's spare one
// (what release gave back) when it has one, so that a unit's arrays are
// not allocated again for every request (issue 15).
func (rs *routedSession) newUnit(m clientMsg) *unit {
	u := rs.spare
	rs.spare = nil
	if u == nil {
		return &unit{msgs: []clientMsg{m}}
	}
	*u = unit{msgs: append(u.msgs[:0], m), dec: u.dec[:0], kinds: u.kinds[:0], tables: u.tables[:0]}
	return u
}

// gather reads the rest of the request that m starts.
func (rs *routedSession) gather(m clientMsg) (_ *unit, err error) {
	u := rs.newUnit(m)
	defer func() {
		if err != nil {
			rs.release(u)
		}
	}()
	if err := rs.holdMsg(u, m); err != nil {
		return nil, err
	}
	switch m.typ {
	case pgwire.ClientQuery, pgwire.ClientFunctionCall, pgwire.ClientSync, pgwire.ClientFlush:
		u.end = m.typ
		return u, nil
	case pgwire.ClientParse, pgwire.ClientBind, pgwire.ClientDescribe, pgwire.ClientExecute, pgwire.ClientClose:
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
		case pgwire.ClientSync, pgwire.ClientFlush:
			u.msgs = append(u.msgs, n)
			u.end = n.typ
			return u, nil
		case pgwire.ClientParse, pgwire.ClientBind, pgwire.ClientDescribe, pgwire.ClientExecute, pgwire.ClientClose:
			u.msgs = append(u.msgs, n)
			if err := rs.holdMsg(u, n); err != nil {
				return nil, err
			}
		default:
			// A message that does not belong in an extended-protocol batch
			// (Query, Terminate...): serve what came before it first.
			rs.pushback = append([]clientMsg{n}, rs.pushback...)
			u.end = pgwire.ClientFlush
			return u, nil
		}
	}
}

// analyze decodes and classifies the unit's messages once: the statement
// kinds, the tables, whether it is a pure read, whether it commits, and a
// write to the control schema.
func (rs *routedSession) analyze(u *unit) {
	u.dec = slices.Grow(u.dec[:0], len(u.msgs))[:len(u.msgs)]
	u.pureRead = true
	note := func(si *stmtInfo) {
		if si == nil || si.plan == nil || si.plan.Err != nil {
			u.kinds = append(u.kinds, classify.Unknown)
			u.pureRead = false
			return
		}
		for _, st := range si.plan.Stmts {
			u.kinds = append(u.kinds, st.Kind)
			if st.Kind != classify.Read {
				u.pureRead = false
				if t := controlTable(st.Tables); t != "" && u.controlWrite == "" {
					u.controlWrite = t
				}
			}
			u.tables = append(u.tables, st.Tables...)
		}
	}
	// commits reports whether p ends the transaction (see unit.commits).
	commits := func(p *classify.TextPlan) bool {
		for _, s := range p.Stmts {
			if s.Kind == classify.Transaction && (s.Tx == classify.TxCommit || s.Tx == classify.TxPrepare) {
				return true
			}
		}
		return false
	}
	local := map[string]*stmtInfo{}
	portals := map[string]*stmtInfo{}
	for i, m := range u.msgs {
		d := &u.dec[i]
		switch m.typ {
		case pgwire.ClientQuery:
			d.sql = strings.TrimSuffix(string(m.body), "\x00")
			d.plan = rs.srv.classifier.Plan(d.sql)
			note(&stmtInfo{sql: d.sql, plan: d.plan})
			u.commits = u.commits || commits(d.plan)
		case pgwire.ClientParse:
			if d.parse, d.err = decodeParse(m.body); d.err != nil {
				u.pureRead = false
				continue
			}
			d.plan = rs.srv.classifier.Plan(d.parse.sql)
			local[d.parse.name] = &stmtInfo{sql: d.parse.sql, oids: d.parse.oids, plan: d.plan}
			u.commits = u.commits || commits(d.plan)
		case pgwire.ClientBind:
			if d.bind, d.err = decodeBind(m.body); d.err != nil {
				u.pureRead = false
				continue
			}
			// The commit check asks the session's statement of the name as
			// it was before the unit (a Parse of the unit counts on its own).
			if si := rs.stmts[d.bind.stmt]; si != nil && si.plan != nil {
				u.commits = u.commits || commits(si.plan)
			}
			d.stmt = local[d.bind.stmt]
			if d.stmt == nil {
				d.stmt = rs.stmts[d.bind.stmt]
			}
			portals[d.bind.portal] = d.stmt
		case pgwire.ClientExecute:
			r := msgReader{b: m.body}
			d.portal = r.cstring()
			d.maxRows = r.int32()
			d.execErr = r.err
			si, ok := portals[d.portal]
			if !ok {
				if p := rs.portals[d.portal]; p != nil {
					si = p.stmt
				}
			}
			note(si)
		case pgwire.ClientFunctionCall:
			u.kinds = append(u.kinds, classify.Unknown)
			u.pureRead = false
		}
	}
	if len(u.kinds) == 0 {
		u.pureRead = false // a bare Sync or Flush belongs to the primary's session
	}
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

// serve runs one request under the session's routing state.
func (rs *routedSession) serve(un *unit) error {
	kinds, pureRead, tables := un.kinds, un.pureRead, un.tables
	if un.controlWrite != "" {
		return rs.refuseControlWrite(un, un.controlWrite)
	}
	lone := rs.lone(un) || rs.inert(un)
	if err := rs.beginUnit(pureRead || lone); err != nil {
		return rs.refuseUnit(un, err)
	}
	st := rs.state
	rs.servedBy = ""
	if slices.Contains(kinds, classify.Session) {
		rs.gucDirty = true // a SET: shadow runs copy the session's settings again
	}
	if pureRead && rs.txState == pgwire.TxIdle && un.end != pgwire.ClientFlush && !rs.extOpen && rs.mayLeavePrimary(st) {
		catalog := rs.catalogRead(un, tables)
		temp := rs.usesTemp(tables)
		if !catalog && !temp {
			if j := rs.shadowSample(un); j != nil {
				defer rs.shadowDone(j, time.Now())
			}
		}
		target := rs.readStore(tables)
		switch {
		case temp:
			target = st.Primary // where the session's temporary tables are
		case catalog:
			// Catalog lookups reveal OIDs: they stay on the home store.
			target = route.Store(rs.home.name)
		}
		if target != st.Primary {
			done, err := rs.shiftedRead(un, target)
			if err != nil || done {
				return err
			}
		}
	}
	prim, err := rs.store(st.Primary)
	if err != nil {
		rs.ss.log.Warn("cannot reach the primary store", "store", st.Primary, "error", err)
		return pgwire.Fatal(pgwire.CodeConnectionFailure, "could not connect to the %s store", st.Primary).
			WithHint("The store of record is unreachable; reconnect to retry.").WithCause(err)
	}
	rs.ss.serving.Store(prim.up)
	writes := hasWrite(kinds)
	mirror := st.Mirror && !pureRead
	wrap := mirror && writes && rs.txState == pgwire.TxIdle && wrappable(kinds) && un.end != pgwire.ClientFlush && !rs.extOpen
	startTx := rs.txState
	// A batch ended by Flush instead of Sync leaves the primary's implicit
	// transaction open until a later Sync: until then the secondary follows
	// inside a transaction of its own, committed when the primary's is.
	implicit := startTx == pgwire.TxIdle && (rs.extOpen || un.end == pgwire.ClientFlush && !lone)

	if mirror {
		if stop, err := rs.beforeCommit(prim, un); stop {
			return err
		}
	}
	endPrimary := rs.traceStep(spanPrimary, st.Primary)
	res, err := rs.runUnit(prim, un, wrap, mirror)
	endPrimary(err)
	if err != nil {
		switch {
		case mirror && !wrap && (un.commits || rs.extOpen && un.end != pgwire.ClientFlush):
			rs.commitUnknown(err)
		case mirror && !wrap && writes && startTx == pgwire.TxIdle && un.end != pgwire.ClientFlush:
			rs.autocommitUnknown(un, err)
		}
		return rs.storeLost(prim, err)
	}
	rs.servedBy = st.Primary
	if wrap && res.unwrapped {
		// The primary ran the statements without the proxy's transaction
		// (its BEGIN failed): each committed on its own, so each is
		// mirrored on its own, in order.
		rs.ss.log.Warn("the proxy's BEGIN around an autocommit write failed; mirroring its statements one by one")
		wrap = false
	}
	if wrap {
		return rs.finishWrapped(prim, res)
	}
	if implicit {
		return rs.endImplicit(un, res, mirror)
	}
	if startTx == pgwire.TxIdle && res.failed && res.status == pgwire.TxIdle && !hasTxEvent(res.events) {
		// An implicit transaction failed: the primary kept none of it.
		res.events = nil
	}
	rs.follow(res, startTx != pgwire.TxIdle, mirror)
	return rs.endWith(res)
}

// beforeCommit records the drift of a mirrored transaction the secondary
// missed part of, before the unit that commits it reaches the primary, so
// that an acknowledged commit always has its drift. stop: the unit is not
// to run (err says how the client is answered).
func (rs *routedSession) beforeCommit(prim *rstore, un *unit) (stop bool, _ error) {
	if len(rs.tx.ahead) > 0 && (un.commits || rs.extOpen && un.end != pgwire.ClientFlush || !wrappable(un.kinds)) {
		// The unit may end the transaction on the primary (or is one the
		// secondary follows at once): the writes sent ahead are applied
		// there first, while the primary still holds their row locks.
		rs.secSettle()
	}
	if rs.tx.pending() && un.commits {
		if err := rs.recordPending(); err != nil {
			return true, rs.refuseCommit(prim, err)
		}
	}
	if rs.extOpen && un.end != pgwire.ClientFlush && rs.tx.pending() {
		// The Sync of this unit commits the primary's implicit transaction,
		// opened by a batch ended by Flush whose part on the secondary
		// failed: record the drift before the primary commits. When it
		// cannot be, the session ends without the Sync: the primary rolls
		// the implicit transaction back.
		if err := rs.recordPending(); err != nil {
			rs.ss.log.Error("could not record drift before a Sync commits a pipelined batch; ending the session so that the primary rolls it back", "error", err)
			return true, pgwire.Fatal(pgwire.CodeTransactionRollback, "transaction rolled back: Tandem could not record that the secondary store missed its writes").
				WithHint("The control database is unreachable; retry once it is back.")
		}
	}
	return false, nil
}

// endImplicit ends a unit served inside the primary's implicit
// transaction of an extended-protocol batch: a Flush leaves it open, the
// Sync that ends it commits the secondary's too (or rolls it back).
func (rs *routedSession) endImplicit(un *unit, res *unitResult, mirror bool) error {
	if res.failed {
		rs.extFailed = true
	}
	if un.end == pgwire.ClientFlush {
		rs.extOpen = true // already while the secondary follows (see syncSettings)
	}
	rs.follow(res, true, mirror)
	if un.end == pgwire.ClientFlush {
		return rs.endWith(res)
	}
	// The Sync that ends the implicit transaction has been answered.
	failed := rs.extFailed || res.status != pgwire.TxIdle
	rs.extOpen, rs.extFailed = false, false
	if mirror {
		rs.secFinish(!failed)
	}
	return rs.endWith(res)
}

// mayLeavePrimary reports whether an eligible read could be served or
// shadowed anywhere but the primary under st: only then is it worth
// looking at its tables and text. In the common case (primary old, this
// session's reads on old, no shadowing, started on old) it is not.
func (rs *routedSession) mayLeavePrimary(st route.State) bool {
	natural := route.Old
	if rs.bucket < st.Reads {
		natural = route.New
	}
	return natural != st.Primary || st.Shadow > 0 || st.Primary != route.Old || rs.home.name != string(st.Primary)
}

// endWith tells the client the unit is done (ReadyForQuery with the
// primary's status) and records it.
func (rs *routedSession) endWith(res *unitResult) error {
	if rs.doomed != nil {
		// The primary committed and Tandem cannot tell whether the
		// secondary has it, nor record that it may not: no ReadyForQuery.
		return rs.doomed
	}
	if res.status != 0 {
		rs.toClient(pgwire.ServerReadyForQuery, []byte{res.status})
		rs.endUnit(res.status)
	} else {
		rs.endUnit(rs.txState)
	}
	return nil
}

func (rs *routedSession) storeLost(u *rstore, err error) error {
	var pe *pgwire.Error
	if errors.As(err, &pe) {
		return err
	}
	if _, ok := err.(*clientProtoError); ok {
		return pgwire.Fatal(pgwire.CodeProtocolViolation, "invalid message from the client")
	}
	if errors.Is(err, errClientGone) {
		return err
	}
	rs.ss.log.Info("lost the primary store's session", "store", u.name, "error", err)
	return pgwire.Fatal(pgwire.CodeConnectionFailure, "lost the connection to the %s store", u.name).
		WithHint("The store closed the session or went down; reconnect to retry.")
}

func hasTxEvent(evs []event) bool {
	for _, ev := range evs {
		if ev.stmt != nil && ev.stmt.Kind == classify.Transaction {
			return true
		}
	}
	return false
}

func hasWrite(kinds []classify.Kind) bool {
	for _, k := range kinds {
		if k == classify.Write || k == classify.DDL || k == classify.Unknown {
			return true
		}
	}
	return false
}

// wrappable: units of plain reads, writes and session statements can run
// inside the proxy's own transaction; DDL (some cannot run in one),
// transaction control and what cannot be parsed cannot.
func wrappable(kinds []classify.Kind) bool {
	for _, k := range kinds {
		if k != classify.Read && k != classify.Write && k != classify.Session {
			return false
		}
	}
	return true
}

// shiftedRead serves an eligible read from target, holding the reply until
// it is complete so that a failure can be retried on the primary. It
// reports whether the read was served.
func (rs *routedSession) shiftedRead(un *unit, target route.Store) (bool, error) {
	ctx := rs.ss.ctx
	u, err := rs.store(target)
	if err != nil {
		rs.srv.metrics.R().Read(ctx, string(target), "retried_on_primary")
		rs.ss.log.Debug("shifted read could not reach its store; retrying on the primary", "store", target, "error", err)
		return false, nil
	}
	rs.ss.serving.Store(u.up)
	rs.hold, rs.reply = rs.hold[:0], replyHeld
	// A retry on the primary runs the whole unit again: it must start from
	// the statements and portals the client had before this attempt.
	stmts, portals := maps.Clone(rs.stmts), maps.Clone(rs.portals)
	res, err := rs.runUnit(u, un, false, false)
	spilled := rs.reply == replySpilled
	rs.reply = replyDirect
	if spilled && err == nil {
		// Part of the reply is with the client: it cannot be retried.
		rs.servedBy = target
		rs.srv.metrics.R().Read(ctx, string(target), "served")
		return true, rs.endWith(res)
	}
	if err != nil || res.failed {
		if err != nil && u.up != nil {
			u.stop(false)
		}
		if errors.Is(err, errClientGone) {
			return true, err
		}
		rs.srv.metrics.R().Read(ctx, string(target), "retried_on_primary")
		rs.ss.log.Debug("shifted read failed; retrying on the primary", "store", target, "error", err)
		if rs.capture != nil {
			rs.capture.reset() // the primary's reply is the one the client gets
		}
		rs.stmts, rs.portals = stmts, portals
		return false, nil
	}
	rs.servedBy = target
	_, _ = rs.cout.Write(rs.hold)
	rs.srv.metrics.R().Read(ctx, string(target), "served")
	return true, rs.endWith(res)
}
