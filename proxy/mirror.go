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
	open       bool               // the secondary is inside its transaction
	broken     error              // the secondary missed something: every key goes to the drift ledger
	drift      []table.DriftEntry // what this transaction wrote, as drift entries, should it break
	savepoints []string           // the client's savepoints, in order
}

var (
	errOutOfScope  = errors.New("the table is outside the migration's scope")
	errBreakerOpen = errors.New("the circuit breaker on the secondary store is open")
	errUnordered   = errors.New("the primary committed before the secondary could follow in lockstep")
)

// newBreaker builds the secondary store's circuit breaker.
func newBreaker(s *Server) *gobreaker.CircuitBreaker[struct{}] {
	failures := uint32(max(s.cfg.Routing.BreakerFailures, 1))
	return gobreaker.NewCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        "secondary",
		MaxRequests: 1,
		Timeout:     s.cfg.Routing.BreakerOpen.Duration(),
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

	if mirror && rs.tx.broken != nil && len(rs.tx.drift) > 0 && hasCommit(rs, un) {
		// The secondary missed part of this transaction: record it before the
		// primary commits, so an acknowledged commit always has its drift.
		if err := rs.recordDrift(rs.tx.drift); err != nil {
			return rs.refuseCommit(prim, err)
		}
		rs.tx.drift = nil
	}
	res, err := rs.runUnit(prim, un, wrap, mirror)
	if err != nil {
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
	if rs.tx.broken != nil && len(rs.tx.drift) > 0 {
		if err := rs.recordDrift(rs.tx.drift); err != nil {
			return rs.refuseCommit(prim, err)
		}
		rs.tx.drift = nil
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
	rs.toClient('Z', []byte{'I'})
	rs.endUnit('I')
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
		if len(rs.tx.drift) > 0 {
			if err := rs.recordDrift(rs.tx.drift); err != nil {
				rs.ss.log.Error("could not record drift for a prepared transaction", "error", err)
			}
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
	return time.Now().Add(rs.srv.cfg.Routing.MirrorBudget.Duration())
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
			if derr := rs.recordDrift(tx.drift); derr != nil {
				rs.ss.log.Error("the secondary failed to commit and its drift could not be recorded", "error", derr, "commit_error", err)
			}
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
	entries, plan, perr := rs.planWrite(ev)
	if errors.Is(perr, errOutOfScope) {
		return // tables outside tables.include/exclude are passed through untouched
	}
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
		if err := rs.recordDrift(entries); err != nil {
			rs.ss.log.Error("could not record drift", "error", err)
		}
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
	for i := range entries {
		entries[i].Reason = err.Error()
	}
	if derr := rs.recordDrift(entries); derr != nil {
		rs.ss.log.Error("could not record drift", "error", derr, "mirror_error", err)
	}
}

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
				return rs.planMapped(ev, pm, m)
			}
		}
		if pm.HasKey() {
			return rs.planImage(ev, pm, sstore)
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
	if reason != "ddl" {
		fp := ""
		if ev.stmt != nil {
			fp = ev.stmt.Fingerprint
		}
		rs.ss.log.Info("write mirrored as statement text", "reason", reason, "fingerprint", fp)
	}
	var entries []table.DriftEntry
	if ev.stmt != nil && reason != "ddl" {
		for _, t := range ev.stmt.Tables {
			if rs.isTemp(t) {
				continue
			}
			entries = append(entries, table.DriftEntry{Table: writtenName(t), Reason: "statement mirrored"})
		}
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
func overflowed(pm *table.Meta) ([]table.DriftEntry, func(*rstore) error, error) {
	return []table.DriftEntry{{Table: pm.Name, Reason: "row images over the memory bound"}}, func(*rstore) error { return nil }, nil
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
func (rs *routedSession) planImage(ev *event, pm *table.Meta, sstore *store) ([]table.DriftEntry, func(*rstore) error, error) {
	img := ev.image
	if img.overflow {
		return overflowed(pm)
	}
	names, keyPos, entries, err := imageKeys(pm, img)
	if err != nil {
		return nil, nil, err
	}
	if st := ev.stmt; st != nil && st.Image != nil && st.Image.Op != "delete" {
		for _, c := range st.Image.SetColumns {
			if slices.Contains(pm.KeyNames(), c) {
				// A key change: the old keys are not in the image. The
				// repairer removes them from the secondary.
				entries = append(entries, table.DriftEntry{Table: pm.Name, Reason: "key columns updated"})
				break
			}
		}
	}
	del := isDelete(ev)
	apply := func(sec *rstore) error {
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
		return rs.execQueued(sec)
	}
	return entries, apply, nil
}

func isDelete(ev *event) bool {
	return ev.stmt != nil && ev.stmt.Image != nil && ev.stmt.Image.Op == "delete"
}

// planMapped applies row images through a declared table mapping: forward
// (old -> new) while old is primary, reverse after the write flip. The
// server evaluates the mapping's expressions; a deleted row's image is
// upserted first, as in planImage.
func (rs *routedSession) planMapped(ev *event, pm *table.Meta, m *table.Mapping) ([]table.DriftEntry, func(*rstore) error, error) {
	img := ev.image
	if img.overflow {
		return overflowed(pm)
	}
	names, _, entries, err := imageKeys(pm, img)
	if err != nil {
		return nil, nil, err
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
