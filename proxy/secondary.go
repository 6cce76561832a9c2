package proxy

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/sony/gobreaker/v2"
	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/table"
)

// The secondary transaction: how the secondary follows the client's
// transaction in lockstep (follow, followTx, mirrorWrite), the commit order
// (the secondary commits first, then the primary: finishWrapped), and the
// circuit breaker that stops trying a failing secondary.

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
	// ahead are the mirrored writes queued on the secondary whose replies
	// are still to be read (design section 3: collected by secSettle
	// before the primary's COMMIT is sent).
	ahead []aheadWrite
}

// aheadWrite is one mirrored write sent ahead, by its metrics mode.
type aheadWrite struct {
	mode string
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
			s.metrics.R().Breaker(to.String())
			s.log.Warn("circuit breaker on the secondary store changed state", "from", from.String(), "to", to.String())
		},
	})
}

// BreakerState reports the secondary store's circuit breaker: "closed",
// "half-open" or "open". It asks the breaker, which is what moves an open
// breaker to half-open once its timeout has passed: gobreaker makes that
// move only when asked. A state remembered from OnStateChange stayed
// "open" for good once the writes that would have asked had stopped, and
// the drift repairer, which waits while the breaker is open, never ran
// again (TestBreakerHalfOpensWithoutTraffic).
func (s *Server) BreakerState() string {
	return s.breaker.State().String()
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
	rs.toClient(pgwire.ServerReadyForQuery, []byte{pgwire.TxIdle})
	rs.endUnit(pgwire.TxIdle)
	return nil
}

// finishWrapped ends an autocommit write the proxy wrapped in its own
// transaction: mirror, then commit the primary, then the secondary.
func (rs *routedSession) finishWrapped(prim *rstore, res *unitResult) error {
	if res.status != pgwire.TxInBlock {
		if _, err := rs.internalQuery(prim, "ROLLBACK", time.Time{}); err != nil {
			return rs.storeLost(prim, err)
		}
		rs.secFinish(false)
		rs.toClient(pgwire.ServerReadyForQuery, []byte{pgwire.TxIdle})
		rs.endUnit(pgwire.TxIdle)
		return nil
	}
	rs.follow(res, true, true)
	rs.secSettle()
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
		rs.toClient(pgwire.ServerReadyForQuery, []byte{pgwire.TxIdle})
		rs.endUnit(pgwire.TxIdle)
		return nil
	}
	rs.secFinish(true)
	if rs.doomed != nil {
		return rs.doomed
	}
	rs.toClient(pgwire.ServerReadyForQuery, []byte{pgwire.TxIdle})
	rs.endUnit(pgwire.TxIdle)
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

// autocommitUnknown records as whole-table drift the tables of a unit that
// ran outside a transaction block (each statement commits on its own, a
// DDL among them, so the proxy did not wrap it) when the primary's session
// was lost before it answered: any of its statements may have committed
// there, and the secondary, which follows only once the primary has
// answered, ran none. Tables the unit only reads are recorded too (the
// repairer finds them equal); a statement naming no table (CREATE
// FUNCTION, DO) can only be logged.
func (rs *routedSession) autocommitUnknown(un *unit, cause error) {
	var entries []table.DriftEntry
	seen := map[table.Name]bool{}
	for _, t := range un.tables {
		n := writtenName(t)
		if seen[n] || rs.isTemp(t) {
			continue
		}
		seen[n] = true
		entries = append(entries, table.DriftEntry{Table: n, Reason: "the primary's outcome of an autocommit statement is unknown"})
	}
	if len(entries) == 0 {
		rs.ss.log.Error("lost the primary while it ran a write outside a transaction that names no table; it may have committed there and not on the secondary: compare the stores (tandem plan, tandem compare)",
			"error", cause)
		return
	}
	rs.ss.log.Warn("lost the primary while it ran a write outside a transaction; recording its tables as drift", "tables", len(entries), "error", cause)
	rs.recordAcked(entries, "an autocommit statement whose outcome is unknown")
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
	rs.secSettle() // the writes sent ahead before the transaction statement
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
	rs.secSettle() // the writes sent ahead come first, and their outcome with them
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
	rs.secSettle() // normally done before the primary's commit; here when it committed first
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
	endCommit := rs.traceStep(spanSecondaryCommit, rs.state.Secondary())
	_, err := rs.brk(func() error {
		_, err := rs.internalQuery(sec, sql, rs.budget())
		return err
	})
	endCommit(err)
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

// brkAhead runs op, which queues a write to send ahead, under the circuit
// breaker: refused while it is open; op's failure (the secondary cannot be
// reached, its BEGIN failed) counts against the secondary at once, its
// success does not: secSettle, which sends the write and reads its reply,
// counts the outcome.
func (rs *routedSession) brkAhead(op func() error) (struct{}, error) {
	if rs.srv.breaker.State() == gobreaker.StateOpen {
		return struct{}{}, gobreaker.ErrOpenState
	}
	if err := op(); err != nil {
		_, _ = rs.brk(func() error { return err })
		return struct{}{}, err
	}
	return struct{}{}, nil
}

// aheadLeft handles writes sent ahead that are still queued when the
// client's transaction has ended without the secondary following its end,
// which no path should do: they must never go out with a later
// transaction, so the secondary's transaction is rolled back and the
// transaction's keys go to the ledger.
func (rs *routedSession) aheadLeft() {
	rs.ss.log.Error("mirrored writes sent ahead were left when the transaction ended; recording its keys as drift", "writes", len(rs.tx.ahead))
	drift := append(slices.Clone(rs.tx.drift), rs.tx.must...)
	rs.tx.broken = errUnordered
	rs.secFinish(false)
	if len(drift) > 0 {
		rs.recordAcked(drift, "writes sent ahead that the secondary did not follow")
	}
}

// secSettle sends the writes queued ahead on the secondary (mirrorWrite)
// and reads their replies, within the mirror budget and through the
// breaker. It runs before anything else the secondary does and, at the
// latest, before the unit that commits the client's transaction reaches
// the primary (beforeCommit): the secondary then holds every row lock the
// transaction took on the primary before the primary releases them, so
// writers of one row still reach the secondary in the primary's order. A
// failure breaks the secondary's side of the transaction: its keys go to
// the drift ledger before the commit is acknowledged, as for a write that
// failed when it ran.
func (rs *routedSession) secSettle() {
	ahead := rs.tx.ahead
	if len(ahead) == 0 {
		return
	}
	rs.tx.ahead = nil
	ctx, start := rs.ss.ctx, time.Now()
	sec := rs.stores[storeIndexOf(string(rs.state.Secondary()))]
	end := rs.traceStep(spanSecondary, rs.state.Secondary())
	var err error
	if sec == nil || sec.up == nil || !rs.tx.open {
		err = errUpstreamLost
	} else {
		_, err = rs.brk(func() error {
			deadline := rs.budget()
			if err := rs.send(sec, deadline); err != nil {
				return err
			}
			err := rs.drainAhead(sec, deadline)
			sec.prepareDone(err)
			return err
		})
	}
	end(err)
	if err == nil {
		// The latency is the secondary's: the batch's round trip, not the
		// time the write waited for the client's next statements.
		d := time.Since(start)
		for _, w := range ahead {
			rs.srv.metrics.R().Mirrored(ctx, w.mode, metrics.MirrorApplied, d)
		}
		return
	}
	result := metrics.MirrorFailed
	if errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
		// Not sent: the replies are read (or the session closed) when the
		// secondary's transaction ends.
		result, err = metrics.MirrorSkipped, errBreakerOpen
	} else if sec != nil && sec.up != nil {
		rs.secFailed(sec, err)
	}
	if rs.tx.broken == nil {
		rs.tx.broken = err
	}
	for _, w := range ahead {
		rs.srv.metrics.R().Mirrored(ctx, w.mode, result, 0)
	}
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
	defer rs.traceStep(spanSecondary, rs.state.Secondary())(nil)
	ctx := rs.ss.ctx
	mode := metrics.ModeStatement
	if ev.image != nil {
		mode = metrics.ModeRowImage
	}
	rs.must, rs.plainApply = nil, false
	entries, apply, perr := rs.writeApplier(ev)
	if errors.Is(perr, errOutOfScope) {
		return // tables outside tables.include/exclude are passed through untouched
	}
	// Drift the write causes whatever the mirror does (writeApplier and the
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
	// Inside the client's own transaction a plain row-image write is sent
	// ahead: queued on the secondary, its reply read by secSettle before
	// the primary's COMMIT (design section 3). Anything else runs now,
	// after the writes sent ahead.
	ahead := inTx && ordered && rs.txState == pgwire.TxInBlock && perr == nil && rs.plainApply
	if !ahead {
		rs.secSettle()
	}
	if inTx {
		rs.tx.drift = append(rs.tx.drift, entries...)
		if rs.tx.broken != nil {
			rs.srv.metrics.R().Mirrored(ctx, mode, metrics.MirrorSkipped, 0)
			return
		}
	}
	start := time.Now()
	run := rs.brk
	if ahead {
		run = rs.brkAhead
	}
	rs.sendAhead, rs.wentAhead = ahead, false
	_, err := run(func() error {
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
		if err := apply(sec); err != nil {
			rs.secFailed(sec, err)
			return err
		}
		return nil
	})
	wentAhead := rs.wentAhead
	rs.sendAhead, rs.wentAhead = false, false
	if err == nil && wentAhead {
		rs.tx.ahead = append(rs.tx.ahead, aheadWrite{mode: mode})
		return
	}
	if err == nil {
		rs.srv.metrics.R().Mirrored(ctx, mode, metrics.MirrorApplied, time.Since(start))
		return
	}
	rs.mirrorFailed(ev, entries, err, mode, inTx)
}

// mirrorFailed handles a write the secondary did not apply: in a
// transaction, the transaction is broken (its drift is recorded before the
// commit); otherwise the write's keys are recorded as drift now.
func (rs *routedSession) mirrorFailed(ev *event, entries []table.DriftEntry, err error, mode string, inTx bool) {
	result := metrics.MirrorFailed
	if errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
		result = metrics.MirrorSkipped
		err = errBreakerOpen
	}
	rs.srv.metrics.R().Mirrored(rs.ss.ctx, mode, result, 0)
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

// execQueued sends what queueExec queued, with a Sync, and reads the
// replies within the mirror budget.
//
// With rs.sendAhead (mirrorWrite: a plain row-image write inside the
// client's transaction), nothing is sent or read yet: the batch stays queued
// on sec and secSettle sends it and reads its replies, with the other writes
// sent ahead, before the primary's COMMIT.
func (rs *routedSession) execQueued(sec *rstore) error {
	deadline := rs.budget()
	sec.out = append(sec.out, syncMsg...)
	if rs.sendAhead && rs.tx.open {
		sec.queued++
		rs.wentAhead = true
		return nil
	}
	if err := rs.send(sec, deadline); err != nil {
		return err
	}
	_, err := rs.drainInternal(sec, deadline)
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
