package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/route"
)

// The routed session's connection to one store: starting and stopping its
// reader, sending the queued messages, receiving replies under a deadline,
// the proxy's own internal queries, and keeping the session settings of a
// second store in step with the first.

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
		pgwire.ReadBatches(r, maxBody, func() (byte, []byte, error) { return pgwire.ReadMessage(r, maxBody) },
			func(typ byte, body []byte, err error) backendMsg { return backendMsg{typ: typ, body: body, err: err} },
			u.in, u.quit)
	}()
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
		_, _ = u.up.conn.Write([]byte{pgwire.ClientTerminate, 0, 0, 0, 4})
	}
	u.up.conn.Close()
	close(u.quit)
	<-u.done
	u.up, u.queue = nil, nil
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
	if src == u || src.up == nil || src.dead != nil || rs.txState == pgwire.TxFailed {
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
	guarded := src.txStatus == pgwire.TxInBlock
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
		u.queueQuery(fmt.Sprintf("SELECT pg_catalog.set_config(%s, %s, false)", pgwire.QuoteLiteral(kv[0]), pgwire.QuoteLiteral(kv[1])))
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
	if m.typ == pgwire.ServerReadyForQuery && len(m.body) == 1 {
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
// returning its rows (text) and its first error. Replies to requests sent
// ahead without waiting (a pipelined BEGIN, mirrored writes sent ahead)
// come first: an error there is this request's error too.
func (rs *routedSession) drainInternal(u *rstore, deadline time.Time) ([][]*string, error) {
	err := rs.drainAhead(u, deadline)
	if err != nil && u.dead != nil {
		return nil, err
	}
	rows, cerr := rs.drainOne(u, deadline)
	if err != nil {
		rows = nil
	} else {
		err = cerr
	}
	u.prepareDone(err)
	return rows, err
}

// drainAhead reads the replies of every request sent ahead on u (u.queued),
// returning the first error among them; it stops early, with the
// connection's error, only when the connection is lost.
func (rs *routedSession) drainAhead(u *rstore, deadline time.Time) error {
	var first error
	for ; u.queued > 0; u.queued-- {
		if _, err := rs.drainOne(u, deadline); err != nil {
			if u.dead != nil {
				u.queued = 0
				return err // the connection's error: the session is gone
			}
			if first == nil {
				first = err
			}
		}
	}
	return first
}

// prepareDone ends a drain that may have covered the mirror's Parses
// (queueExec): after an error one of them may have failed, so what was
// prepared here is forgotten and new names are used from now on.
func (u *rstore) prepareDone(err error) {
	if err != nil && u.preparing {
		clear(u.prepared)
	}
	u.preparing = false
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
		case pgwire.ServerDataRow:
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
		case pgwire.ServerErrorResponse:
			if firstErr == nil {
				code, msg := pgwire.ErrorFields(m.body)
				firstErr = &storeError{store: u.name, code: code, message: msg}
			}
		case pgwire.ServerNotification, pgwire.ServerParameterStatus:
			// A notification or parameter change caused by the proxy's own
			// COMMIT or SET on the store serving the client is the client's.
			if u.name == string(rs.state.Primary) {
				rs.toClient(m.typ, m.body)
			}
		case pgwire.ServerCommandComplete:
			u.lastTag = tagString(m.body)
		case pgwire.ServerReadyForQuery:
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
		if rs.txState != pgwire.TxIdle && !rs.tx.open {
			continue // it gets the setting when its transaction opens... or at the next sync
		}
		rs.secSettle() // after the writes sent ahead, as the client ran them
		if _, err := rs.internalQuery(u, sql, rs.budget()); err != nil {
			rs.ss.log.Info("could not replay a session statement on the second store", "store", u.name, "error", err)
			if rs.tx.open {
				rs.secFailed(u, err)
			}
		}
	}
}
