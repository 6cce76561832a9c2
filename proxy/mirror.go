package proxy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/sony/gobreaker/v2"
	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// mirrorTx is the secondary's side of the client's current transaction.
type mirrorTx struct {
	open   bool               // the secondary is inside its transaction
	broken error              // the secondary missed something: every key goes to the drift ledger
	drift  []table.DriftEntry // what this transaction wrote, as drift entries, should it break
	// must is drift the transaction causes whatever the mirror does (a key
	// changed, an ON UPDATE action): recorded before its commit is
	// acknowledged.
	must       []table.DriftEntry
	savepoints []string // the client's savepoints, in order
}

var (
	errOutOfScope  = errors.New("the table is outside the migration's scope")
	errBreakerOpen = errors.New("the circuit breaker on the secondary store is open")
	errUnordered   = errors.New("the primary committed before the secondary could follow in lockstep")
)

// newBreaker builds the secondary store's circuit breaker.
func newBreaker(s *Server) *gobreaker.CircuitBreaker[struct{}] {
	failures := uint32(max(s.config().Routing.BreakerFailures, 1))
	return gobreaker.NewCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        "secondary",
		MaxRequests: 1,
		Timeout:     s.config().Routing.BreakerOpen.Duration(),
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= failures },
		OnStateChange: func(_ string, from, to gobreaker.State) {
			// Never call State() here: gobreaker holds its lock.
			s.breakerState.Store(to.String())
			s.metrics.R().Breaker(to.String())
			s.log.Warn("circuit breaker on the secondary store changed state", "from", from.String(), "to", to.String())
		},
	})
}

// BreakerState reports the secondary store's circuit breaker: "closed",
// "half-open" or "open".
func (s *Server) BreakerState() string {
	if v, ok := s.breakerState.Load().(string); ok {
		return v
	}
	return "closed"
}

// serve runs one request under the session's routing state.
func (rs *routedSession) serve(un *unit) error {
	kinds, pureRead, tables := rs.analyze(un)
	if rs.controlWrite != "" {
		return rs.refuseControlWrite(un, rs.controlWrite)
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
	if pureRead && rs.txState == 'I' && un.end != 'H' && !rs.extOpen && rs.mayLeavePrimary(st) {
		catalog := rs.catalogRead(un, tables)
		temp := rs.usesTemp(tables)
		if !catalog && !temp {
			if j := rs.shadowSample(un, tables); j != nil {
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
	wrap := mirror && writes && rs.txState == 'I' && wrappable(kinds) && un.end != 'H' && !rs.extOpen
	startTx := rs.txState
	// A batch ended by Flush instead of Sync leaves the primary's implicit
	// transaction open until a later Sync: until then the secondary follows
	// inside a transaction of its own, committed when the primary's is.
	implicit := startTx == 'I' && (rs.extOpen || un.end == 'H' && !lone)

	if mirror && rs.tx.pending() && hasCommit(rs, un) {
		// The secondary missed part of this transaction: record it before the
		// primary commits, so an acknowledged commit always has its drift.
		if err := rs.recordPending(); err != nil {
			return rs.refuseCommit(prim, err)
		}
	}
	if mirror && rs.extOpen && un.end != 'H' && rs.tx.pending() {
		// The Sync of this unit commits the primary's implicit transaction,
		// opened by a batch ended by Flush whose part on the secondary
		// failed: record the drift before the primary commits. When it
		// cannot be, the session ends without the Sync: the primary rolls
		// the implicit transaction back.
		if err := rs.recordPending(); err != nil {
			rs.ss.log.Error("could not record drift before a Sync commits a pipelined batch; ending the session so that the primary rolls it back", "error", err)
			return pgwire.Fatal(pgwire.CodeTransactionRollback, "transaction rolled back: Tandem could not record that the secondary store missed its writes").
				WithHint("The control database is unreachable; retry once it is back.")
		}
	}
	res, err := rs.runUnit(prim, un, wrap, mirror)
	if err != nil {
		if mirror && !wrap && (hasCommit(rs, un) || rs.extOpen && un.end != 'H') {
			rs.commitUnknown(err)
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
		if res.failed {
			rs.extFailed = true
		}
		if un.end == 'H' {
			rs.extOpen = true // already while the secondary follows (see syncSettings)
		}
		rs.follow(res, true, mirror)
		if un.end == 'H' {
			return rs.endWith(res)
		}
		// The Sync that ends the implicit transaction has been answered.
		failed := rs.extFailed || res.status != 'I'
		rs.extOpen, rs.extFailed = false, false
		if mirror {
			rs.secFinish(!failed)
		}
		return rs.endWith(res)
	}
	if startTx == 'I' && res.failed && res.status == 'I' && !hasTxEvent(res.events) {
		// An implicit transaction failed: the primary kept none of it.
		res.events = nil
	}
	rs.follow(res, startTx != 'I', mirror)
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
		rs.toClient('Z', []byte{res.status})
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

// hasCommit reports whether un ends the client's transaction with COMMIT.
func hasCommit(rs *routedSession, un *unit) bool {
	for _, m := range un.msgs {
		var plans []*classify.TextPlan
		switch m.typ {
		case 'Q':
			plans = append(plans, rs.srv.classifier.Plan(strings.TrimSuffix(string(m.body), "\x00")))
		case 'P':
			if p, err := decodeParse(m.body); err == nil {
				plans = append(plans, rs.srv.classifier.Plan(p.sql))
			}
		case 'B':
			if b, err := decodeBind(m.body); err == nil {
				if si := rs.stmts[b.stmt]; si != nil && si.plan != nil {
					plans = append(plans, si.plan)
				}
			}
		}
		for _, p := range plans {
			for _, s := range p.Stmts {
				if s.Kind == classify.Transaction && (s.Tx == classify.TxCommit || s.Tx == classify.TxPrepare) {
					return true
				}
			}
		}
	}
	return false
}

// refuseCommit rolls the client's transaction back when its drift cannot
// be recorded: acknowledging it would lose the secondary's copy silently.
func (rs *routedSession) refuseCommit(prim *rstore, cause error) error {
	rs.ss.log.Error("could not record drift; rolling the transaction back", "error", cause)
	if _, err := rs.internalQuery(prim, "ROLLBACK", time.Time{}); err != nil {
		return rs.storeLost(prim, err)
	}
	rs.secFinish(false)
	e := pgwire.Fatal(pgwire.CodeTransactionRollback, "transaction rolled back: Tandem could not record that the secondary store missed its writes").
		WithHint("The control database is unreachable; retry once it is back.")
	e.Severity = "ERROR"
	rs.toClientRaw(mustAppend(e.Response()))
	rs.toClient('Z', []byte{'I'})
	rs.endUnit('I')
	return nil
}

// finishWrapped ends an autocommit write the proxy wrapped in its own
// transaction: mirror, then commit the primary, then the secondary.
func (rs *routedSession) finishWrapped(prim *rstore, res *unitResult) error {
	if res.status != 'T' {
		if _, err := rs.internalQuery(prim, "ROLLBACK", time.Time{}); err != nil {
			return rs.storeLost(prim, err)
		}
		rs.secFinish(false)
		rs.toClient('Z', []byte{'I'})
		rs.endUnit('I')
		return nil
	}
	rs.follow(res, true, true)
	if rs.tx.pending() {
		if err := rs.recordPending(); err != nil {
			return rs.refuseCommit(prim, err)
		}
	}
	if k := rs.srv.knobs.BeforePrimaryCommit; k != nil {
		k()
	}
	_, err := rs.internalQuery(prim, "COMMIT", time.Time{})
	if err == nil && prim.lastTag != "COMMIT" {
		// The primary's transaction had failed (an internal statement of
		// the proxy's was cancelled or timed out): COMMIT rolled it back.
		// The secondary must not keep what the primary did not.
		err = &storeError{store: prim.name, code: "40000", message: "the transaction was rolled back on the " + prim.name + " store: a statement Tandem ran in it failed"}
	}
	if err != nil {
		var se *storeError
		if !errors.As(err, &se) {
			rs.commitUnknown(err)
			return rs.storeLost(prim, err)
		}
		// A deferred constraint failed at commit: the client sees the error,
		// as it would from PostgreSQL's own implicit commit.
		rs.secFinish(false)
		e := &pgwire.Error{Severity: "ERROR", Code: se.code, Message: se.message}
		rs.toClientRaw(mustAppend(e.Response()))
		rs.toClient('Z', []byte{'I'})
		rs.endUnit('I')
		return nil
	}
	rs.secFinish(true)
	if rs.doomed != nil {
		return rs.doomed
	}
	rs.toClient('Z', []byte{'I'})
	rs.endUnit('I')
	return nil
}

// commitUnknown records every key of the client's transaction as drift
// when the primary's session was lost while it committed: the primary may
// have committed (its reply was lost), and the secondary, whose
// transaction ends with the session, has not. If the primary did not
// commit, the repairer finds the keys equal and closes the entries.
func (rs *routedSession) commitUnknown(cause error) {
	entries := append(slices.Clone(rs.tx.drift), rs.tx.must...)
	if len(entries) == 0 {
		return
	}
	for i := range entries {
		entries[i].Reason = "the primary's commit outcome is unknown"
	}
	rs.ss.log.Warn("lost the primary while it committed; recording the transaction's keys as drift", "entries", len(entries), "error", cause)
	rs.recordAcked(entries, "a commit whose outcome is unknown")
	rs.tx.drift, rs.tx.must = nil, nil
}

// pending reports whether the transaction has drift to record before its
// commit is acknowledged: the secondary missed part of it, or it did what
// lockstep cannot follow.
func (tx *mirrorTx) pending() bool {
	return tx.broken != nil && len(tx.drift) > 0 || len(tx.must) > 0
}

// recordPending records the transaction's pending drift (see pending).
func (rs *routedSession) recordPending() error {
	var entries []table.DriftEntry
	if rs.tx.broken != nil {
		entries = append(entries, rs.tx.drift...)
	}
	entries = append(entries, rs.tx.must...)
	if err := rs.recordDrift(entries); err != nil {
		return err
	}
	if rs.tx.broken != nil {
		rs.tx.drift = nil
	}
	rs.tx.must = nil
	return nil
}

func mustAppend(m interface{ Encode([]byte) ([]byte, error) }) []byte {
	b, _ := m.Encode(nil)
	return b
}

// follow applies what the primary did to the secondary, in order.
func (rs *routedSession) follow(res *unitResult, inTx, mirror bool) {
	for i := range res.events {
		ev := &res.events[i]
		st := ev.stmt
		if st != nil && st.Kind == classify.Transaction {
			if mirror {
				rs.followTx(ev)
			}
			switch st.Tx {
			case classify.TxBegin:
				inTx = true
			case classify.TxCommit, classify.TxRollback, classify.TxPrepare:
				inTx = st.Chain
			}
			continue
		}
		if st != nil && st.Kind == classify.Session {
			if st.Replay {
				rs.replay(ev.sql)
			}
			continue
		}
		if st != nil && st.Kind == classify.Read {
			continue
		}
		if st != nil && st.Kind == classify.Write && st.Image == nil && strings.HasPrefix(st.NoImage, "locking") {
			continue // a locking SELECT changes nothing
		}
		if st != nil && rs.sessionPrivate(st) {
			continue // temporary objects are never mirrored (docs/dual-write.md)
		}
		if !mirror {
			continue
		}
		if st != nil && st.Kind == classify.DDL {
			rs.srv.invalidateCatalogs()
		}
		ordered := true
		for _, later := range res.events[i+1:] {
			if later.stmt != nil && later.stmt.Kind == classify.Transaction &&
				(later.stmt.Tx == classify.TxCommit || later.stmt.Tx == classify.TxPrepare) {
				ordered = false
			}
		}
		rs.mirrorWrite(ev, inTx, ordered)
	}
}

// sessionPrivate reports whether st creates a temporary relation or only
// touches the session's temporary relations, and keeps the list of them.
func (rs *routedSession) sessionPrivate(st *classify.StmtPlan) bool {
	if st.Creates != "" {
		name := strings.ToLower(strings.ReplaceAll(st.Creates, `"`, ""))
		if st.Temp {
			if rs.temps == nil {
				rs.temps = map[string]bool{}
			}
			rs.temps[strings.TrimPrefix(name, "pg_temp.")] = true
			return true
		}
		delete(rs.temps, name)
		return false
	}
	return len(st.Tables) > 0 && !slices.ContainsFunc(st.Tables, func(t string) bool { return !rs.isTemp(t) })
}

// isTemp reports whether the table, as written, is one of the session's
// temporary relations.
func (rs *routedSession) isTemp(t string) bool {
	if len(rs.temps) == 0 && !containsFold(t, "pg_temp") {
		return false // the common case, without allocating
	}
	t = strings.ToLower(strings.ReplaceAll(t, `"`, ""))
	if strings.HasPrefix(t, "pg_temp.") || strings.HasPrefix(t, "pg_temp_") {
		return true
	}
	return !strings.Contains(t, ".") && rs.temps[t]
}

// usesTemp reports whether any of tables is a temporary relation of the
// session: such reads stay on the store that holds them.
func (rs *routedSession) usesTemp(tables []string) bool {
	return slices.ContainsFunc(tables, rs.isTemp)
}

// followTx makes the secondary's transaction follow the client's.
func (rs *routedSession) followTx(ev *event) {
	st := ev.stmt
	switch st.Tx {
	case classify.TxBegin:
		rs.tx = mirrorTx{}
	case classify.TxCommit:
		rs.secFinish(ev.tag == "COMMIT")
		if st.Chain {
			rs.tx = mirrorTx{}
		}
	case classify.TxRollback:
		rs.secFinish(false)
		if st.Chain {
			rs.tx = mirrorTx{}
		}
	case classify.TxPrepare:
		// Two-phase commit is not mirrored in lockstep: hand its rows to
		// the repairer.
		if entries := append(slices.Clone(rs.tx.drift), rs.tx.must...); len(entries) > 0 {
			rs.recordAcked(entries, "a prepared transaction")
		}
		rs.secFinish(false)
	case classify.TxSavepoint:
		rs.tx.savepoints = append(rs.tx.savepoints, st.Savepoint)
		rs.secExec("SAVEPOINT " + quoteIdent(st.Savepoint))
	case classify.TxRelease, classify.TxRollbackTo:
		if i := slices.Index(rs.tx.savepoints, st.Savepoint); i >= 0 {
			if st.Tx == classify.TxRelease {
				rs.tx.savepoints = rs.tx.savepoints[:i]
			} else {
				rs.tx.savepoints = rs.tx.savepoints[:i+1]
			}
		}
		verb := "RELEASE SAVEPOINT "
		if st.Tx == classify.TxRollbackTo {
			verb = "ROLLBACK TO SAVEPOINT "
		}
		rs.secExec(verb + quoteIdent(st.Savepoint))
	}
}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// secExec runs a transaction-control statement on the secondary when its
// transaction is open and healthy.
func (rs *routedSession) secExec(sql string) {
	if !rs.tx.open || rs.tx.broken != nil {
		return
	}
	sec := rs.stores[storeIndexOf(string(rs.state.Secondary()))]
	if sec == nil || sec.up == nil {
		rs.tx.broken = errUpstreamLost
		return
	}
	if _, err := rs.internalQuery(sec, sql, rs.budget()); err != nil {
		rs.secFailed(sec, err)
	}
}

func (rs *routedSession) budget() time.Time {
	return time.Now().Add(rs.srv.config().Routing.MirrorBudget.Duration())
}

// secFailed marks the secondary's side of the transaction as broken and
// closes a session that timed out or died.
func (rs *routedSession) secFailed(sec *rstore, err error) {
	if rs.tx.broken == nil {
		rs.tx.broken = err
	}
	var se *storeError
	if !errors.As(err, &se) && sec.up != nil {
		if errors.Is(err, errBudget) {
			up := sec.up
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				_ = up.cancel(ctx)
			}()
		}
		sec.stop(false)
		rs.tx.open = false
	}
	rs.ss.log.Debug("secondary store missed a write", "store", sec.name, "error", err)
}

// secFinish commits (or rolls back) the secondary's transaction after the
// primary's commit; a failed commit sends the transaction's keys to the
// drift ledger.
func (rs *routedSession) secFinish(commit bool) {
	tx := rs.tx
	rs.tx = mirrorTx{}
	if commit && tx.pending() {
		// The primary has committed (a Sync or COMMIT answered before the
		// proxy saw the secondary fail): record before the acknowledgement.
		var entries []table.DriftEntry
		if tx.broken != nil {
			entries = append(entries, tx.drift...)
		}
		rs.recordAcked(append(entries, tx.must...), "a committed transaction")
		if tx.broken != nil {
			tx.drift = nil
		}
	}
	sec := rs.stores[storeIndexOf(string(rs.state.Secondary()))]
	if !tx.open || sec == nil || sec.up == nil {
		if commit && tx.broken == nil && len(tx.drift) > 0 && tx.open {
			_ = rs.recordDrift(tx.drift)
		}
		return
	}
	sql := "ROLLBACK"
	if commit && tx.broken == nil {
		sql = "COMMIT"
		if k := rs.srv.knobs.BeforeSecondaryCommit; k != nil {
			k()
		}
	}
	_, err := rs.brk(func() error {
		_, err := rs.internalQuery(sec, sql, rs.budget())
		return err
	})
	if err != nil {
		rs.tx.broken = err
		rs.secFailed(sec, err)
		rs.tx = mirrorTx{}
		if sql == "COMMIT" && len(tx.drift) > 0 {
			rs.recordAcked(tx.drift, "a transaction the secondary failed to commit")
		}
	}
}

// brk runs op through the circuit breaker.
func (rs *routedSession) brk(op func() error) (struct{}, error) {
	return rs.srv.breaker.Execute(func() (struct{}, error) { return struct{}{}, op() })
}

// secBegin opens the secondary's transaction for the client's, in replica
// mode, with the client's savepoints.
func (rs *routedSession) secBegin(sec *rstore) error {
	if rs.tx.open {
		return nil
	}
	sql := "BEGIN"
	if !sec.noRepl {
		sql = "BEGIN; SET LOCAL session_replication_role = replica"
	}
	if sec.replOK || sec.noRepl {
		// Known to work here: send it ahead with what follows, saving a
		// round trip; its reply is read before the next one.
		sec.queueQuery(sql)
		sec.queued++
		for _, sp := range rs.tx.savepoints {
			sec.queueQuery("SAVEPOINT " + quoteIdent(sp))
			sec.queued++
		}
		rs.tx.open = true
		return nil
	}
	if _, err := rs.internalQuery(sec, sql, rs.budget()); err != nil {
		var se *storeError
		if !errors.As(err, &se) || sec.noRepl {
			return err
		}
		rs.ss.log.Warn("cannot apply row images in replica mode on the secondary (triggers on it will fire); grant the privilege to set session_replication_role", "store", sec.name, "error", err)
		sec.noRepl = true
		if _, err := rs.internalQuery(sec, "ROLLBACK; BEGIN", rs.budget()); err != nil {
			return err
		}
	} else {
		sec.replOK = true
	}
	rs.tx.open = true
	for _, sp := range rs.tx.savepoints {
		if _, err := rs.internalQuery(sec, "SAVEPOINT "+quoteIdent(sp), rs.budget()); err != nil {
			return err
		}
	}
	return nil
}

// mirrorWrite applies one write to the secondary, or records it as drift.
func (rs *routedSession) mirrorWrite(ev *event, inTx, ordered bool) {
	ctx := rs.ss.ctx
	mode := metrics.ModeStatement
	if ev.image != nil {
		mode = metrics.ModeRowImage
	}
	rs.must = nil
	entries, plan, perr := rs.planWrite(ev)
	if errors.Is(perr, errOutOfScope) {
		return // tables outside tables.include/exclude are passed through untouched
	}
	// Drift the write causes whatever the mirror does (planWrite and the
	// applier add to it): with the transaction's, or at once when the
	// primary has committed already.
	defer func() {
		if len(rs.must) == 0 {
			return
		}
		must := rs.must
		rs.must = nil
		if inTx && ordered && !ev.copyIn && !overflowOf(ev) {
			rs.tx.must = append(rs.tx.must, must...)
			return
		}
		rs.recordAcked(must, "a committed write")
	}()
	if perr != nil {
		rs.ss.log.Warn("cannot mirror a write by row image; recording drift", "error", perr)
	}
	overflow := ev.image != nil && ev.image.overflow
	if !ordered || ev.copyIn || overflow {
		// Not applied in lockstep: the repairer copies these rows under lock.
		reason := "committed before lockstep"
		switch {
		case ev.copyIn:
			reason = "COPY FROM STDIN"
		case overflow:
			reason = "row images over the memory bound"
		}
		for i := range entries {
			entries[i].Reason = reason
		}
		rs.recordAcked(entries, "a write committed before lockstep")
		rs.srv.metrics.R().Mirrored(ctx, mode, metrics.MirrorSkipped, 0)
		return
	}
	if inTx {
		rs.tx.drift = append(rs.tx.drift, entries...)
		if rs.tx.broken != nil {
			rs.srv.metrics.R().Mirrored(ctx, mode, metrics.MirrorSkipped, 0)
			return
		}
	}
	start := time.Now()
	_, err := rs.brk(func() error {
		sec, err := rs.store(rs.state.Secondary())
		if err != nil {
			return err
		}
		if inTx {
			if err := rs.secBegin(sec); err != nil {
				rs.secFailed(sec, err)
				return err
			}
		}
		if perr != nil {
			return perr
		}
		if err := plan(sec); err != nil {
			rs.secFailed(sec, err)
			return err
		}
		return nil
	})
	if err == nil {
		rs.srv.metrics.R().Mirrored(ctx, mode, metrics.MirrorApplied, time.Since(start))
		return
	}
	result := metrics.MirrorFailed
	if errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
		result = metrics.MirrorSkipped
		err = errBreakerOpen
	}
	rs.srv.metrics.R().Mirrored(ctx, mode, result, 0)
	if inTx {
		if rs.tx.broken == nil {
			rs.tx.broken = err
		}
		return
	}
	ddl := ev.stmt != nil && ev.stmt.Kind == classify.DDL
	for i := range entries {
		if ddl {
			entries[i].Reason += ": " + err.Error()
		} else {
			entries[i].Reason = err.Error()
		}
	}
	if ddl {
		rs.ss.log.Error("DDL failed on the secondary store; its tables are recorded as whole-table drift: apply it there by hand",
			"tag", ev.tag, "tables", ev.stmt.Tables, "store", rs.state.Secondary(), "error", err)
	}
	rs.recordAcked(entries, "a write the secondary missed")
}

func overflowOf(ev *event) bool { return ev.image != nil && ev.image.overflow }

// planWrite returns the drift entries a write stands for and the function
// that applies it to the secondary.
func (rs *routedSession) planWrite(ev *event) ([]table.DriftEntry, func(*rstore) error, error) {
	ctx := rs.ss.ctx
	if ev.image != nil && len(ev.image.fields) > 0 && ev.image.fields[0].tableOID != 0 {
		pstore, sstore := rs.srv.old, rs.srv.new
		if rs.state.Primary == route.New {
			pstore, sstore = rs.srv.new, rs.srv.old
		}
		pc, err := rs.srv.catalogFor(ctx, pstore, rs.ss.database)
		if err != nil {
			return nil, nil, err
		}
		pm, err := pc.cache.ByOID(ctx, pc.pool, ev.image.fields[0].tableOID)
		if err != nil {
			return nil, nil, err
		}
		if privateSchema(pm.Name.Schema) {
			return nil, nil, errOutOfScope // a temporary table: the session's own
		}
		g, err := rs.srv.fkGraphOf(ctx, pc)
		if err != nil {
			return []table.DriftEntry{{Table: pm.Name, Reason: "mirror failed"}}, nil, err
		}
		if ms := rs.srv.mappings.Load(); ms != nil {
			var m *table.Mapping
			if rs.state.Primary == route.Old {
				if !ms.InScope(pm.Name) {
					return nil, nil, errOutOfScope
				}
				m = ms.ForOld(pm.Name)
			} else if m = ms.ForNew(pm.Name); m == nil {
				return nil, nil, errOutOfScope
			}
			if m == nil {
				entries := []table.DriftEntry{{Table: pm.Name, Reason: "the table's mapping has problems"}}
				return entries, nil, fmt.Errorf("table %s is in scope but its mapping has problems (see the proxy's log or tandem plan)", pm.Name)
			}
			if !m.Identity() && pm.HasKey() {
				return rs.planMapped(ev, pm, m, g)
			}
		}
		if pm.HasKey() {
			return rs.planImage(ev, pm, sstore, g)
		}
		rs.srv.metrics.R().Fallback(ctx, "no_key")
		entries := []table.DriftEntry{{Table: pm.Name, Reason: "no primary key"}}
		return entries, rs.statementApplier(ev), nil
	}
	reason := "not_rewritable"
	if ev.stmt != nil && ev.stmt.Kind == classify.DDL {
		reason = "ddl"
	} else if ev.stmt == nil || ev.stmt.Kind == classify.Unknown {
		reason = "unknown"
	}
	rs.srv.metrics.R().Fallback(ctx, reason)
	// With the change feed, a write whose effects the proxy cannot know
	// (DO, CALL, a function that writes, what does not parse) is not run
	// again on the secondary: run there, its defaults and sequences would
	// make rows of their own, which the feed never sees (they are not in
	// the primary's WAL). The feed checks what it did on the primary,
	// key by key, and the repairer copies it (design section 10).
	replay := reason == "ddl" || !rs.srv.config().Feed.Enabled
	if reason != "ddl" {
		fp := ""
		if ev.stmt != nil {
			fp = ev.stmt.Fingerprint
		}
		if replay {
			rs.ss.log.Info("write mirrored as statement text", "reason", reason, "fingerprint", fp)
		} else {
			rs.ss.log.Debug("write left to the change feed", "reason", reason, "fingerprint", fp)
		}
	}
	var entries []table.DriftEntry
	if ev.stmt != nil {
		why := "statement mirrored"
		if reason == "ddl" {
			// Should the DDL fail on the secondary (a TRUNCATE, an ALTER
			// TABLE behind a lock held there), the tables it names are
			// drift, named by its tag.
			tag := ev.tag
			if tag == "" {
				tag = "DDL"
			}
			why = tag + " failed on the secondary"
		}
		for _, t := range ev.stmt.Tables {
			if rs.isTemp(t) {
				continue
			}
			entries = append(entries, table.DriftEntry{Table: writtenName(t), Reason: why})
		}
	}
	if !replay {
		return entries, func(*rstore) error { return nil }, nil
	}
	return entries, rs.statementApplier(ev), nil
}

// privateSchema reports whether schema holds session-private or internal
// relations, which are never part of a migration.
func privateSchema(schema string) bool {
	return strings.HasPrefix(schema, "pg_temp") || strings.HasPrefix(schema, "pg_toast") || schema == "pg_catalog" || schema == "information_schema"
}

// writtenName turns a table name as written into a ledger name (public
// when unqualified).
func writtenName(t string) table.Name {
	t = strings.ReplaceAll(t, `"`, "")
	if i := strings.LastIndexByte(t, '.'); i >= 0 {
		return table.Name{Schema: t[:i], Table: t[i+1:]}
	}
	return table.Name{Schema: "public", Table: t}
}

// statementApplier mirrors a write by running its text (with its
// parameters) on the secondary.
func (rs *routedSession) statementApplier(ev *event) func(*rstore) error {
	return func(sec *rstore) error {
		if ev.sql == "" {
			return errors.New("the statement's text is unknown to the proxy")
		}
		deadline := rs.budget()
		if ev.bind == nil {
			_, err := rs.internalQuery(sec, ev.sql, deadline)
			return err
		}
		b := *ev.bind
		b.portal, b.stmt, b.resultFormats = "", "", nil
		sec.out = encodeParse(sec.out, "", ev.sql, rs.storeOIDs(sec, rs.stmtOIDs(ev)))
		sec.out = encodeBind(sec.out, b)
		sec.out = encodeExecute(sec.out, "", 0)
		sec.out = append(sec.out, syncMsg...)
		if err := rs.send(sec, deadline); err != nil {
			return err
		}
		_, err := rs.drainInternal(sec, deadline)
		return err
	}
}

func (rs *routedSession) stmtOIDs(ev *event) []uint32 {
	if ev.bind != nil {
		if si := rs.stmts[ev.bind.stmt]; si != nil {
			return si.oids
		}
	}
	return nil
}

// imageKeys returns the image's column names, where pm's key columns sit
// among them, and one drift entry per row (by key), should the mirror fail.
func imageKeys(pm *table.Meta, img *imageSet) (names []string, keyPos []int, entries []table.DriftEntry, err error) {
	names = make([]string, len(img.fields))
	for i, f := range img.fields {
		names[i] = f.name
	}
	keyPos = make([]int, len(pm.Key))
	for i, k := range pm.KeyNames() {
		if keyPos[i] = slices.Index(names, k); keyPos[i] < 0 {
			return nil, nil, nil, fmt.Errorf("row image of %s lacks key column %q", pm.Name, k)
		}
	}
	entries = make([]table.DriftEntry, 0, len(img.rows))
	for _, row := range img.rows {
		key := make([]string, len(keyPos))
		for i, p := range keyPos {
			key[i] = string(row[p])
		}
		entries = append(entries, table.DriftEntry{Table: pm.Name, Key: key, Reason: "mirror failed"})
	}
	return names, keyPos, entries, nil
}

// overflowed is the plan of a statement whose images were not held: the
// table is drift, and nothing is applied.
func overflowed(pm *table.Meta, g *fkGraph) ([]table.DriftEntry, func(*rstore) error, error) {
	entries := []table.DriftEntry{{Table: pm.Name, Reason: "row images over the memory bound"}}
	all := make([]string, len(pm.Columns))
	for i, c := range pm.Columns {
		all[i] = c.Name
	}
	for _, e := range append(g.deleteDrift(pm.Name), g.updateDrift(pm.Name, all)...) {
		e.Reason = "row images over the memory bound"
		entries = append(entries, e)
	}
	return entries, func(*rstore) error { return nil }, nil
}

// batches calls fn with the rows of img in batches of at most 1000 rows
// and 60000 parameters of width columns each.
func batches(rows [][][]byte, width int, fn func(rows [][][]byte) error) error {
	per := max(1, min(1000, 60000/max(width, 1)))
	for start := 0; start < len(rows); start += per {
		if err := fn(rows[start:min(start+per, len(rows))]); err != nil {
			return err
		}
	}
	return nil
}

// rowParams flattens the columns at pos of rows, row-major (pos nil: all).
func rowParams(rows [][][]byte, pos []int) [][]byte {
	var out [][]byte
	for _, r := range rows {
		if pos == nil {
			out = append(out, r...)
			continue
		}
		for _, p := range pos {
			out = append(out, r[p])
		}
	}
	return out
}

// planImage builds the upserts (or deletes) that apply row images to a
// table that maps to itself.
func (rs *routedSession) planImage(ev *event, pm *table.Meta, sstore *store, g *fkGraph) ([]table.DriftEntry, func(*rstore) error, error) {
	img := ev.image
	if img.overflow {
		return overflowed(pm, g)
	}
	names, keyPos, entries, err := imageKeys(pm, img)
	if err != nil {
		return nil, nil, err
	}
	updActs := rs.mustForUpdate(ev, pm, g, true)
	if len(updActs) > 0 {
		// Should the mirror fail, so did the actions.
		entries = append(entries, g.updateDrift(pm.Name, ev.stmt.Image.SetColumns)...)
	}
	del := isDelete(ev)
	actions := del && len(img.rows) > 0 && len(g.deleteActions(pm.Name)) > 0
	if actions {
		// Should the mirror fail, the children the actions reach are drift
		// too.
		entries = append(entries, g.deleteDrift(pm.Name)...)
	}
	apply := func(sec *rstore) (err error) {
		if len(img.rows) == 0 {
			return nil
		}
		ctx := rs.ss.ctx
		sc, err := rs.srv.catalogFor(ctx, sstore, rs.ss.database)
		if err != nil {
			return err
		}
		sm, err := sc.cache.ByName(ctx, sc.pool, pm.Name)
		if err != nil {
			return err
		}
		var cols []string
		var pos []int
		for i, n := range names {
			if j, ok := sm.Column(n); ok && !sm.Columns[j].Generated {
				cols = append(cols, n)
				pos = append(pos, i)
			} else if !ok {
				return fmt.Errorf("column %q of %s is missing on the %s store", n, pm.Name, sec.name)
			}
		}
		// Every image is upserted, a deleted row's too: INSERT ... ON
		// CONFLICT waits for a transaction that is inserting the same key
		// on the secondary, where a DELETE would not see the uncommitted
		// row and so would miss it when that insert commits after.
		if actions {
			defer func() {
				if err != nil {
					return
				}
				// PostgreSQL's own actions do not fire in replica mode:
				// apply them here, after the parent's rows are gone.
				var drift []table.DriftEntry
				drift, err = rs.applyDeleteActions(sec, g, fkDeleted{table: pm.Name, cols: names, rows: img.rows})
				rs.must = append(rs.must, drift...)
				if err != nil {
					rs.ss.log.Warn("could not apply ON DELETE actions on the secondary", "table", pm.Name, "error", err)
				}
			}()
		}
		if len(updActs) > 0 {
			// Before the row images, while the secondary's rows still hold
			// the old referenced values the children match.
			if !rs.tx.open || sec.noRepl {
				// Outside replica mode PostgreSQL's own actions fire.
				updActs = nil
			} else if err := rs.queueUpdateActions(sec, pm, updActs, names, img.rows); err != nil {
				return err
			}
		}
		err = batches(img.rows, len(cols), func(rows [][][]byte) error {
			sql, err := table.UpsertSQL(sm, cols, len(rows))
			if err != nil {
				return err
			}
			rs.queueExec(sec, sql, rowParams(rows, pos))
			if !del {
				return nil
			}
			if sql, err = table.DeleteSQL(sm, len(rows)); err != nil {
				return err
			}
			rs.queueExec(sec, sql, rowParams(rows, keyPos))
			return nil
		})
		if err != nil {
			return err
		}
		err = rs.execQueued(sec)
		return err
	}
	return entries, apply, nil
}

// mustForUpdate adds to rs.must what an update or upsert of pm causes that
// lockstep cannot follow: a changed key (the old keys are not in the row
// image, so the secondary would keep them: the repairer removes them), and
// changed referenced columns with ON UPDATE actions.
//
// With lockstep set, ON UPDATE actions of a write that keeps its keys are
// not recorded but returned, for the applier to run on the secondary
// before the row images (see queueUpdateActions).
func (rs *routedSession) mustForUpdate(ev *event, pm *table.Meta, g *fkGraph, lockstep bool) []fkAction {
	st := ev.stmt
	if st == nil || st.Image == nil || st.Image.Op == "delete" || len(st.Image.SetColumns) == 0 || ev.image == nil || len(ev.image.rows) == 0 {
		return nil
	}
	keyChange := false
	for _, c := range st.Image.SetColumns {
		if j, ok := pm.Column(c); ok && slices.Contains(pm.Key, j) {
			rs.must = append(rs.must, table.DriftEntry{Table: pm.Name, Reason: "key columns updated"})
			keyChange = true
			break
		}
	}
	if !lockstep || keyChange {
		rs.must = append(rs.must, g.updateDrift(pm.Name, st.Image.SetColumns)...)
		return nil
	}
	acts := g.updateActions(pm.Name, st.Image.SetColumns)
	for _, f := range acts {
		// The children's columns the action changes may be referenced
		// with ON UPDATE actions in turn (rare): the ledger.
		rs.must = append(rs.must, g.updateDrift(f.child, f.childCols)...)
	}
	return acts
}

func isDelete(ev *event) bool {
	return ev.stmt != nil && ev.stmt.Image != nil && ev.stmt.Image.Op == "delete"
}

// planMapped applies row images through a declared table mapping: forward
// (old -> new) while old is primary, reverse after the write flip. The
// server evaluates the mapping's expressions; a deleted row's image is
// upserted first, as in planImage.
func (rs *routedSession) planMapped(ev *event, pm *table.Meta, m *table.Mapping, g *fkGraph) ([]table.DriftEntry, func(*rstore) error, error) {
	img := ev.image
	if img.overflow {
		return overflowed(pm, g)
	}
	names, _, entries, err := imageKeys(pm, img)
	if err != nil {
		return nil, nil, err
	}
	rs.mustForUpdate(ev, pm, g, false)
	if isDelete(ev) && len(img.rows) > 0 {
		// The children of a mapped table live under their mapped names
		// on the secondary: their ON DELETE actions go to the ledger.
		for _, e := range g.deleteDrift(pm.Name) {
			e.Reason = "ON DELETE action through a table mapping"
			rs.must = append(rs.must, e)
		}
	}
	upsert, remove := m.ForwardUpsertSQL, m.ForwardDeleteSQL
	if rs.state.Primary != route.Old {
		upsert, remove = m.ReverseUpsertSQL, m.ReverseDeleteSQL
	}
	del := isDelete(ev)
	apply := func(sec *rstore) error {
		if len(img.rows) == 0 {
			return nil
		}
		err := batches(img.rows, len(names), func(rows [][][]byte) error {
			params := rowParams(rows, nil)
			sql, err := upsert(names, len(rows))
			if err != nil {
				return err
			}
			rs.queueExec(sec, sql, params)
			if !del {
				return nil
			}
			if sql, err = remove(names, len(rows)); err != nil {
				return err
			}
			rs.queueExec(sec, sql, params)
			return nil
		})
		if err != nil {
			return err
		}
		return rs.execQueued(sec)
	}
	return entries, apply, nil
}

// execQueued sends what queueExec queued, with a Sync, and reads the
// replies within the mirror budget.
func (rs *routedSession) execQueued(sec *rstore) error {
	deadline := rs.budget()
	sec.out = append(sec.out, syncMsg...)
	if err := rs.send(sec, deadline); err != nil {
		return err
	}
	_, err := rs.drainInternal(sec, deadline)
	if err != nil && sec.preparing {
		// A Parse of this batch may have failed: forget what was
		// prepared here; new names are used from now on.
		clear(sec.prepared)
	}
	sec.preparing = false
	return err
}

// queueExec queues a Bind/Execute of sql with text params (nil = NULL).
// The statements the mirror runs are few and repeat (one upsert or delete
// per table, column set and batch size), so each is prepared once per
// secondary session: the secondary then parses and plans it once.
func (rs *routedSession) queueExec(sec *rstore, sql string, params [][]byte) {
	name, ok := sec.prepared[sql]
	if !ok && len(sec.prepared) < maxMirrorStatements {
		if sec.prepared == nil {
			sec.prepared = map[string]string{}
		}
		sec.nextStmt++
		name = fmt.Sprintf("tandem_m%d", sec.nextStmt)
		sec.prepared[sql] = name
		sec.preparing = true
	}
	if !ok {
		sec.out = encodeParse(sec.out, name, sql, nil)
	}
	sec.out = encodeBind(sec.out, bindMsg{stmt: name, params: params})
	sec.out = encodeExecute(sec.out, "", 0)
}

// maxMirrorStatements bounds the statements prepared per secondary session.
const maxMirrorStatements = 256

// recordDrift writes entries to the drift ledger.
func (rs *routedSession) recordDrift(entries []table.DriftEntry) error {
	if len(entries) == 0 {
		return nil
	}
	for i := range entries {
		if entries[i].Stale == "" {
			entries[i].Stale = string(rs.state.Secondary()) // the store that missed the write
		}
	}
	rec := rs.srv.recordDrift
	if rec == nil {
		return errors.New("no drift ledger is configured")
	}
	ctx, cancel := context.WithTimeout(rs.ss.ctx, 10*time.Second)
	defer cancel()
	if err := rec(ctx, entries); err != nil {
		return err
	}
	rs.srv.metrics.R().Drift(ctx, len(entries))
	// Reads of these tables stop going to the new store at once, not only
	// after the next refresh from the ledger.
	rs.srv.addDrift(entries)
	return nil
}

// recordAcked records drift of a write the primary has already committed,
// before the client's acknowledgement. When the ledger cannot be written
// the outcome is ambiguous to the client's eyes: the primary has the
// write, the secondary may not, and nothing says so. Tandem then does what
// PostgreSQL does when it cannot tell whether a commit happened: the
// session ends without a ReadyForQuery (SQLSTATE 08006), and the entries
// are kept in memory and recorded as soon as the ledger is writable again.
func (rs *routedSession) recordAcked(entries []table.DriftEntry, what string) {
	if len(entries) == 0 {
		return
	}
	err := rs.recordDrift(entries)
	if err == nil {
		return
	}
	if rs.srv.recordDrift == nil {
		rs.ss.log.Error("drift not recorded: no drift ledger is configured", "what", what, "entries", len(entries))
		return
	}
	rs.ss.log.Error("could not record drift after the primary committed; ending the session without an acknowledgement and keeping the drift in memory until the ledger is writable",
		"what", what, "entries", len(entries), "error", err)
	rs.srv.holdDrift(entries)
	if rs.doomed == nil {
		rs.doomed = pgwire.Fatal(pgwire.CodeConnectionFailure, "the outcome of the transaction is unknown: the %s store committed it, but Tandem could not record that the %s store may have missed it", rs.state.Primary, rs.state.Secondary()).
			WithHint("Check whether the transaction's changes are present before retrying it; Tandem records the drift once its control database is reachable.").WithCause(err)
	}
}

func (s *Server) addDrift(entries []table.DriftEntry) {
	for {
		old := s.drift.Load()
		m := map[string]bool{}
		if old != nil {
			for k := range *old {
				m[k] = true
			}
		}
		for _, e := range entries {
			m[strings.ToLower(e.Table.String())] = true
		}
		if s.drift.CompareAndSwap(old, &m) {
			return
		}
	}
}

// replay runs a session statement on the session's other open stores.
func (rs *routedSession) replay(sql string) {
	if up := strings.ToUpper(strings.TrimSpace(sql)); strings.HasPrefix(up, "DISCARD") || strings.HasPrefix(up, "DEALLOCATE") {
		for _, u := range rs.stores {
			if u != nil {
				clear(u.parsed)
				clear(u.prepared) // the mirror's own statements go too; new names from here on
			}
		}
	}
	prim := rs.stores[storeIndexOf(string(rs.state.Primary))]
	for _, u := range rs.stores {
		if u == nil || u == prim || u.up == nil || u.dead != nil {
			continue
		}
		if rs.txState != 'I' && !rs.tx.open {
			continue // it gets the setting when its transaction opens... or at the next sync
		}
		if _, err := rs.internalQuery(u, sql, rs.budget()); err != nil {
			rs.ss.log.Info("could not replay a session statement on the second store", "store", u.name, "error", err)
			if rs.tx.open {
				rs.secFailed(u, err)
			}
		}
	}
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
	rs.holding, rs.hold, rs.spilled = true, rs.hold[:0], false
	// A retry on the primary runs the whole unit again: it must start from
	// the statements and portals the client had before this attempt.
	stmts, portals := maps.Clone(rs.stmts), maps.Clone(rs.portals)
	res, err := rs.runUnit(u, un, false, false)
	rs.holding = false
	if rs.spilled && err == nil {
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
