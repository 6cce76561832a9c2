package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/xdg-go/scram"
)

// relayBufSize is each direction's relay buffer. A batch of small messages
// that fits is read with one read and written with one write.
const relayBufSize = 32 << 10

// maxAuthMessage caps messages during authentication, before the client is
// known (PostgreSQL uses the same order of magnitude).
const maxAuthMessage = 8 << 10

var (
	errShutdown = pgwire.Fatal(pgwire.CodeAdminShutdown, "terminating connection due to administrator command").
			WithHint("The Tandem proxy is shutting down; reconnect to be served by another replica.")
	errIdleTimeout = pgwire.Fatal(pgwire.CodeIdleSessionTimeout, "terminating connection due to idle-session timeout").
			WithHint("The proxy's limits.idle_session_timeout closed this session.")
	errClientGone   = errors.New("client went away")
	errClientDone   = errors.New("client terminated the session")
	errUpstreamLost = errors.New("upstream connection lost")
)

// serverWhole marks the store-to-client message types the relay decodes:
// CommandComplete (statement counts), ErrorResponse (SQLSTATE counts) and
// ReadyForQuery (transaction state, safe points and latency).
var serverWhole = func() *[256]bool {
	var w [256]bool
	w[pgwire.ServerCommandComplete], w[pgwire.ServerErrorResponse], w[pgwire.ServerReadyForQuery] = true, true, true
	return &w
}()

// clientWhole marks the client-to-store types the relay decodes: Parse and
// Close, so that a session handed to the routed engine knows its named
// prepared statements.
var clientWhole = func() *[256]bool {
	var w [256]bool
	w[pgwire.ClientParse], w[pgwire.ClientClose] = true, true
	return &w
}()

// session is one client connection and its upstream session. It is owned by
// the goroutine running Server.handle; kill and drainIfIdle may be called
// from any goroutine.
type session struct {
	srv      *Server
	ctx      context.Context
	client   net.Conn
	tlsOn    bool
	user     string
	database string
	upstream *upstream
	key      cancelKey
	log      *slog.Logger

	mu          sync.Mutex
	outstanding int  // Query, Sync and FunctionCall messages not yet answered by ReadyForQuery
	inRequest   bool // a request has started and not yet ended with ReadyForQuery
	reqStart    time.Time
	txStatus    byte

	closing    atomic.Bool // set once the session is ending: reads must not re-arm the idle timeout
	handingOff atomic.Bool // the relay is stopping to hand the session to the routed engine
	// msgDeadline (Unix nanoseconds; 0 = none) is when the rest of the
	// client message being read must have arrived (limits.message_timeout).
	msgDeadline atomic.Int64

	params  map[string]string        // the client's startup parameters, for more store sessions
	serving atomic.Pointer[upstream] // the store session serving the current request (routed engine), for cancels

	unnamedParse []byte // the body of the last unnamed Parse relayed (owned by the relay until a handoff)
	prepMu       sync.Mutex
	prepared     map[string]preparedStmt // named statements the client parsed while relayed
	terminated   atomic.Bool             // the client sent Terminate: the store closing after it is expected

	writer      atomic.Pointer[writerMark] // set while the session counts in Server.Writers (fence.go)
	relayWriter bool                       // under mu: counted while relayed (noteRelayLocked)

	killOnce sync.Once
	killCh   chan struct{}
	killErr  error
}

// handle serves one client connection from startup to close. It closes conn.
func (s *Server) handle(conn net.Conn) {
	ss := &session{srv: s, ctx: s.baseCtx, client: conn, killCh: make(chan struct{}), log: s.log, txStatus: pgwire.TxIdle}
	defer func() {
		conn.Close()
		if s.knobs.AfterSessionEnd != nil {
			s.knobs.AfterSessionEnd()
		}
	}()
	timeout := s.config().Limits.ConnectTimeout.Duration()
	_ = conn.SetDeadline(time.Now().Add(timeout))

	startup, err := ss.negotiate()
	if err != nil || startup == nil {
		ss.fail(err, "protocol_error")
		return
	}
	if e := ss.checkStartup(startup); e != nil {
		ss.fail(e, "rejected")
		return
	}
	if max := int64(s.config().Limits.MaxClientSessions); s.open.Add(1) > max {
		s.open.Add(-1)
		ss.fail(pgwire.Fatal(pgwire.CodeTooManyConnections, "sorry, too many clients already").
			WithHint("The proxy allows %d client sessions (limits.max_client_sessions).", max), "too_many")
		return
	}
	defer s.open.Add(-1)

	var saslFinal pgproto3.BackendMessage
	if users := s.users.Load(); users != nil { // one userlist for the whole login, even across a reload
		if saslFinal, err = ss.authenticateSCRAM(users); err != nil {
			ss.fail(err, "auth_failed")
			return
		}
	}

	params := map[string]string{}
	for k, v := range startup.Parameters {
		if k != "user" && k != "database" && !strings.HasPrefix(k, "_pq_.") {
			params[k] = v
		}
	}
	ss.params = params
	home := s.old
	if st := s.State(); st.Primary == "new" && s.new != nil {
		home = s.new
	}
	ctx, cancel := context.WithDeadline(ss.ctx, time.Now().Add(timeout))
	ss.upstream, err = home.connect(ctx, ss.user, ss.database, params)
	cancel()
	if err != nil {
		ss.log.Warn("upstream connect failed", "store", home.name, "user", ss.user, "database", ss.database, "error", err)
		resp := upstreamError(home.name, err)
		s.metrics.Error(ss.ctx, home.name, resp.Code, metrics.OriginStore)
		ss.writeClient(resp)
		s.metrics.Connection(ss.ctx, "upstream_failed")
		return
	}
	defer ss.upstream.conn.Close()
	if !s.register(ss) {
		ss.fail(pgwire.Fatal(pgwire.CodeCannotConnectNow, "the proxy is shutting down"), "rejected")
		return
	}
	defer s.unregister(ss)
	ss.txStatus = ss.upstream.txStatus
	ss.log = s.log.With("session", ss.key.pid, "user", ss.user, "database", ss.database)

	if err := ss.sendReady(saslFinal); err != nil {
		return
	}
	_ = conn.SetDeadline(time.Time{})
	s.metrics.Connection(ss.ctx, "accepted")
	s.metrics.SessionOpened(ss.ctx)
	defer s.metrics.SessionClosed(ss.ctx)
	ss.log.Debug("session started", "client", conn.RemoteAddr().String(), "tls", ss.tlsOn,
		"application_name", params["application_name"], "upstream_pid", ss.upstream.pid)
	ss.relayWithEngine()
	ss.log.Debug("session ended")
}

// negotiate answers SSLRequest and GSSEncRequest and returns the startup
// message, or nil after serving a CancelRequest.
func (ss *session) negotiate() (*pgproto3.StartupMessage, error) {
	for range 3 {
		msg, err := pgwire.ReadStartup(ss.client)
		if err != nil {
			if errors.Is(err, pgwire.ErrProtocol) {
				return nil, pgwire.Fatal(pgwire.CodeProtocolViolation, "%s", strings.TrimPrefix(err.Error(), "protocol violation: ")).WithCause(err)
			}
			return nil, err
		}
		switch m := msg.(type) {
		case *pgproto3.SSLRequest:
			if ss.tlsOn {
				return nil, pgwire.Fatal(pgwire.CodeProtocolViolation, "SSLRequest received on an encrypted connection")
			}
			tc := ss.srv.tls.Load()
			if tc == nil {
				if _, err := ss.client.Write([]byte{'N'}); err != nil {
					return nil, err
				}
				continue
			}
			if _, err := ss.client.Write([]byte{'S'}); err != nil {
				return nil, err
			}
			tconn := tls.Server(ss.client, tc)
			if err := tconn.HandshakeContext(ss.ctx); err != nil {
				return nil, err
			}
			ss.client, ss.tlsOn = tconn, true
		case *pgproto3.GSSEncRequest:
			if _, err := ss.client.Write([]byte{'N'}); err != nil {
				return nil, err
			}
		case *pgproto3.CancelRequest:
			ss.srv.cancel(ss.ctx, m)
			return nil, nil
		case *pgproto3.StartupMessage:
			return m, nil
		}
	}
	return nil, pgwire.Fatal(pgwire.CodeProtocolViolation, "too many negotiation requests before the startup packet")
}

// checkStartup applies the rules that do not need credentials.
func (ss *session) checkStartup(m *pgproto3.StartupMessage) *pgwire.Error {
	ss.user = m.Parameters["user"]
	ss.database = m.Parameters["database"]
	if ss.user == "" {
		return pgwire.Fatal(pgwire.CodeInvalidAuthSpec, "no PostgreSQL user name specified in startup packet")
	}
	if ss.database == "" {
		ss.database = ss.user
	}
	if r, ok := m.Parameters["replication"]; ok && !isFalse(r) {
		return pgwire.Fatal(pgwire.CodeFeatureNotSupported, "replication connections are not supported by the Tandem proxy").
			WithHint("Connect replication clients to the store directly.")
	}
	if ss.srv.config().TLS.Require && !ss.tlsOn {
		return pgwire.Fatal(pgwire.CodeInvalidAuthSpec, "the Tandem proxy requires an encrypted connection").
			WithHint("Connect with sslmode=require (or verify-ca/verify-full).")
	}
	if m.ProtocolVersion != pgproto3.ProtocolVersion30 || hasPQOptions(m.Parameters) {
		// Tandem speaks protocol 3.0 to its stores; say so, as PostgreSQL does.
		npv := &pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0}
		for k := range m.Parameters {
			if strings.HasPrefix(k, "_pq_.") {
				npv.UnrecognizedOptions = append(npv.UnrecognizedOptions, k)
			}
		}
		sort.Strings(npv.UnrecognizedOptions)
		if err := ss.writeClient(npv); err != nil {
			return pgwire.Fatal(pgwire.CodeConnectionFailure, "could not send to client").WithCause(err)
		}
	}
	return nil
}

func hasPQOptions(p map[string]string) bool {
	for k := range p {
		if strings.HasPrefix(k, "_pq_.") {
			return true
		}
	}
	return false
}

func isFalse(v string) bool {
	switch strings.ToLower(v) {
	case "false", "off", "no", "0", "":
		return true
	}
	return false
}

// authenticateSCRAM runs a SCRAM-SHA-256 exchange against the userlist. The
// client's SCRAM user name is ignored (libpq sends it empty): the startup
// packet's user is the one checked. Unknown users fail exactly like a wrong
// password.
func (ss *session) authenticateSCRAM(users *Userlist) (pgproto3.BackendMessage, error) {
	cred, known := users.lookup(ss.user)
	server, err := scram.SHA256.NewServer(func(string) (scram.StoredCredentials, error) { return cred, nil })
	if err != nil {
		return nil, err
	}
	conv := server.NewConversation()
	failed := pgwire.Fatal(pgwire.CodeInvalidPassword, "password authentication failed for user %q", ss.user)

	if err := ss.writeClient(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}}); err != nil {
		return nil, err
	}
	typ, body, err := pgwire.ReadMessage(ss.client, maxAuthMessage)
	if err != nil {
		return nil, authReadErr(err)
	}
	var first pgproto3.SASLInitialResponse
	if typ != pgwire.ClientPassword || first.Decode(body) != nil {
		return nil, pgwire.Fatal(pgwire.CodeProtocolViolation, "expected SASL response, got message type %q", typ)
	}
	if first.AuthMechanism != "SCRAM-SHA-256" {
		return nil, pgwire.Fatal(pgwire.CodeProtocolViolation, "client selected an invalid SASL authentication mechanism")
	}
	out, err := conv.Step(string(first.Data))
	if err != nil {
		return nil, failed.WithCause(err)
	}
	if err := ss.writeClient(&pgproto3.AuthenticationSASLContinue{Data: []byte(out)}); err != nil {
		return nil, err
	}
	typ, body, err = pgwire.ReadMessage(ss.client, maxAuthMessage)
	if err != nil {
		return nil, authReadErr(err)
	}
	var final pgproto3.SASLResponse
	if typ != pgwire.ClientPassword || final.Decode(body) != nil {
		return nil, pgwire.Fatal(pgwire.CodeProtocolViolation, "expected SASL response, got message type %q", typ)
	}
	out, err = conv.Step(string(final.Data))
	if err != nil || !conv.Valid() || !known {
		return nil, failed.WithCause(err)
	}
	return &pgproto3.AuthenticationSASLFinal{Data: []byte(out)}, nil
}

func authReadErr(err error) error {
	if errors.Is(err, pgwire.ErrProtocol) {
		return pgwire.Fatal(pgwire.CodeProtocolViolation, "invalid message during authentication").WithCause(err)
	}
	return err
}

// sendReady completes the client's startup: authentication ok, the store's
// parameters (in the order the store sent them), the proxy's
// cancel key and ReadyForQuery, in one write.
func (ss *session) sendReady(saslFinal pgproto3.BackendMessage) error {
	msgs := make([]pgproto3.BackendMessage, 0, len(ss.upstream.params)+4)
	if saslFinal != nil {
		msgs = append(msgs, saslFinal)
	}
	msgs = append(msgs, &pgproto3.AuthenticationOk{})
	for _, ps := range ss.upstream.params {
		msgs = append(msgs, &pgproto3.ParameterStatus{Name: ps.name, Value: ps.value})
	}
	msgs = append(msgs,
		&pgproto3.BackendKeyData{ProcessID: ss.key.pid, SecretKey: []byte(ss.key.secret)},
		&pgproto3.ReadyForQuery{TxStatus: ss.upstream.txStatus})
	return ss.writeClient(msgs...)
}

// writeClient encodes msgs and writes them in one write. It is used only
// while no relay goroutine writes to the client.
func (ss *session) writeClient(msgs ...pgproto3.BackendMessage) error {
	b, err := pgwire.AppendMessages(nil, msgs...)
	if err != nil {
		return err
	}
	_, err = ss.client.Write(b)
	return err
}

// fail ends a session that never reached the relay: a *pgwire.Error is sent
// to the client; transport errors only go to the log.
func (ss *session) fail(err error, outcome string) {
	if err == nil { // a served CancelRequest
		return
	}
	ss.srv.metrics.Connection(ss.ctx, outcome)
	var pe *pgwire.Error
	if errors.As(err, &pe) {
		ss.srv.metrics.Error(ss.ctx, ss.srv.old.name, pe.Code, metrics.OriginProxy)
		_ = ss.client.SetWriteDeadline(time.Now().Add(time.Second))
		if ss.writeClient(pe.Response()) == nil {
			ss.lingerClose(true)
		}
		ss.log.Info("client session refused", "client", ss.client.RemoteAddr().String(), "user", ss.user,
			"sqlstate", pe.Code, "reason", pe.Message)
		return
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		ss.log.Debug("client left during startup", "client", ss.client.RemoteAddr().String())
		return
	}
	ss.log.Info("client startup failed", "client", ss.client.RemoteAddr().String(), "error", err)
}

// kill ends the session with err (sent to the client when it is a
// *pgwire.Error). The first call wins; later calls do nothing.
func (ss *session) kill(err error) {
	ss.killOnce.Do(func() {
		ss.killErr = err
		close(ss.killCh)
	})
}

// idleLocked reports whether the session is at a safe point: no request in
// flight and no open transaction. ss.mu must be held.
func (ss *session) idleLocked() bool {
	return ss.outstanding == 0 && !ss.inRequest && ss.txStatus == pgwire.TxIdle
}

// drainIfIdle ends the session now if it is at a safe point; otherwise the
// relay ends it at the next ReadyForQuery that leaves it idle.
func (ss *session) drainIfIdle() {
	ss.mu.Lock()
	idle := ss.idleLocked()
	ss.mu.Unlock()
	if idle {
		ss.kill(errShutdown)
	}
}

// relay copies messages both ways until either side ends, the session is
// killed, or the routing state needs the session routed message by message.
// When the session ended, it returns nil, both relay goroutines have exited,
// the upstream is closed, and the client has received the final error, if
// any. When it returns a handoff, nothing is closed and no goroutine reads
// either connection.
func (ss *session) relay() *handoff {
	ss.srv.metrics.Relayed(ss.ctx, "goroutines")
	clientFr := pgwire.NewFramer(idleReader{ss}, relayBufSize, int(ss.srv.config().Limits.MaxMessageBytes), clientWhole)
	upFr := pgwire.NewFramer(ss.upstream.reader, relayBufSize, int(ss.srv.config().Limits.MaxMessageBytes), serverWhole)
	aDone := make(chan error, 1)
	bDone := make(chan error, 1)
	var held []byte // the client batch a handoff stopped
	go func() {
		err := ss.clientToUpstream(clientFr, &held)
		aDone <- err
	}()
	go func() { bDone <- ss.upstreamToClient(upFr) }()

	var reason error
	aOut, bOut := false, false
	select {
	case reason = <-aDone:
		aOut = true
	case reason = <-bDone:
		bOut = true
	case <-ss.killCh:
		reason = ss.killErr
	}
	if reason == errHandoff && aOut {
		// Stop the store reader at once; what it has read stays in its framer.
		ss.handingOff.Store(true)
		_ = ss.upstream.conn.SetReadDeadline(time.Now())
		reason = <-bDone
		bOut = true
		ss.handingOff.Store(false)
		_ = ss.upstream.conn.SetReadDeadline(time.Time{})
		_ = ss.client.SetReadDeadline(time.Time{})
		if reason == errHandoff && !upFr.InMessage() {
			return &handoff{clientIn: held, upIn: upFr.Rest(0)}
		}
		if reason == errHandoff {
			reason = pgwire.Fatal(pgwire.CodeConnectionFailure, "could not switch the session to routed mode in the middle of a store message").
				WithHint("Reconnect; the new session is routed from its start.")
		}
	}
	ss.sayGoodbye(reason, aOut && !clientFr.InMessage())
	ss.upstream.conn.Close()
	if !bOut {
		<-bDone
	}
	// From here on this goroutine is the only writer to the client.
	ss.closeClient(reason, upFr, aOut)
	if !aOut {
		<-aDone
	}
	return nil
}

// sayGoodbye ends the store's backend cleanly with a Terminate when the
// session stopped at a message boundary for a reason that allows it: the
// proxy closing an idle session, or the client leaving without Terminate.
// clientQuiet says no client bytes are in flight to the store.
func (ss *session) sayGoodbye(reason error, clientQuiet bool) {
	if reason == errShutdown || reason == errIdleTimeout || (reason == errClientGone && clientQuiet) {
		_, _ = ss.upstream.conn.Write([]byte{pgwire.ClientTerminate, 0, 0, 0, 4})
	}
}

// closeClient sends the client the final error, if the proxy has one to
// say and the store's bytes stopped at a message boundary, and closes the
// client connection. readerExited says no goroutine is reading the client.
func (ss *session) closeClient(reason error, upFr *pgwire.Framer, readerExited bool) {
	ss.closing.Store(true)
	if !upFr.InMessage() && ss.sendFinal(reason) {
		// Let the client read the error: half-close, and consume what it is
		// still sending for a moment, so the kernel does not answer it with a
		// reset that would discard the error unread.
		ss.lingerClose(readerExited)
	}
	ss.client.Close()
}

// lingerTime bounds how long a session that sent a FATAL error keeps
// reading its client before closing.
const lingerTime = 250 * time.Millisecond

// lingerClose half-closes the client connection and discards its input until
// it closes its side or lingerTime passes. When the client relay goroutine
// is still running (reading == false means it has exited) it does the
// reading; otherwise this does.
func (ss *session) lingerClose(readerExited bool) {
	if cw, ok := ss.client.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	_ = ss.client.SetReadDeadline(time.Now().Add(lingerTime))
	if readerExited {
		_, _ = io.Copy(io.Discard, io.LimitReader(ss.client, 1<<20))
	}
}

// sendFinal tells the client why the proxy ends its session, when it is the
// proxy's doing, and reports whether it sent anything.
func (ss *session) sendFinal(reason error) bool {
	var pe *pgwire.Error
	switch {
	case errors.As(reason, &pe):
	case errors.Is(reason, errUpstreamLost) && ss.terminated.Load():
		return false // the store closed because the client said goodbye
	case errors.Is(reason, errUpstreamLost):
		pe = pgwire.Fatal(pgwire.CodeConnectionFailure, "lost the connection to the %s store", ss.upstream.store.name).
			WithHint("The store closed the session or went down; reconnect to retry.")
	default:
		return false
	}
	ss.srv.metrics.Error(ss.ctx, ss.upstream.store.name, pe.Code, metrics.OriginProxy)
	if pe.Code != pgwire.CodeAdminShutdown && pe.Code != pgwire.CodeIdleSessionTimeout {
		ss.log.Info("closing client session", "sqlstate", pe.Code, "reason", pe.Message, "cause", pe.Err)
	}
	_ = ss.client.SetWriteDeadline(time.Now().Add(time.Second))
	return ss.writeClient(pe.Response()) == nil
}

// idleReader reads from the client, arming the idle-session timeout before
// each read when one is configured.
type idleReader struct{ ss *session }

func (r idleReader) Read(p []byte) (int, error) {
	if md := r.ss.msgDeadline.Load(); md != 0 && !r.ss.closing.Load() {
		_ = r.ss.client.SetReadDeadline(time.Unix(0, md)) // within a message: its deadline, not the idle one
	} else if d := r.ss.srv.config().Limits.IdleSessionTimeout.Duration(); d > 0 && !r.ss.closing.Load() {
		_ = r.ss.client.SetReadDeadline(time.Now().Add(d))
	} else if !r.ss.closing.Load() && r.ss.srv.config().Limits.MessageTimeout > 0 {
		_ = r.ss.client.SetReadDeadline(time.Time{}) // a past message's deadline no longer applies
	}
	return r.ss.client.Read(p)
}

// toStore is the client-to-store direction's bookkeeping, shared by the
// relay engines: which messages were seen, whether a batch may start, and
// what a read error means for the session.
type toStore struct {
	ss         *session
	syncs      int
	terminated bool
}

func (d *toStore) visit(typ byte, _ int, body []byte, whole bool) error {
	switch typ {
	case pgwire.ClientQuery, pgwire.ClientSync, pgwire.ClientFunctionCall: // each is answered by one ReadyForQuery
		d.syncs++
	case pgwire.ClientParse, pgwire.ClientClose:
		d.ss.notePrepared(typ, body, whole)
	case pgwire.ClientTerminate:
		d.terminated = true
		d.ss.terminated.Store(true)
		return errClientDone
	}
	return nil
}

// before is called with a batch about to go to the store; it refuses with
// errShutdown when the proxy is draining and the session is at a safe point.
func (d *toStore) before() error {
	if d.ss.srv.wantRouted(d.ss) && d.ss.atSafePoint() {
		return errHandoff
	}
	if !d.ss.beginRequest(d.syncs) {
		return errShutdown
	}
	d.syncs = 0
	return nil
}

// after accounts for n bytes relayed.
func (d *toStore) after(n int) {
	d.ss.srv.metrics.Bytes(d.ss.upstream.store.name, metrics.ClientToStore, int64(n))
}

// readErr maps an error from reading the client to the session's end
// reason; stop is false when reading should go on (an idle deadline that
// found the session busy).
func (d *toStore) readErr(fr *pgwire.Framer, err error) (reason error, stop bool) {
	switch {
	case d.terminated:
		return nil, true
	case errors.Is(err, os.ErrDeadlineExceeded):
		d.ss.mu.Lock()
		idle := d.ss.idleLocked()
		d.ss.mu.Unlock()
		if idle {
			return errIdleTimeout, true
		}
		fr.ClearErr()
		return nil, false
	case errors.Is(err, pgwire.ErrProtocol):
		return pgwire.Fatal(pgwire.CodeProtocolViolation, "%s", strings.TrimPrefix(err.Error(), "protocol violation: ")).WithCause(err), true
	}
	return errClientGone, true
}

// toClient is the store-to-client direction's bookkeeping.
type toClient struct {
	ss     *session
	zs     int
	status byte
	last   byte
}

func (d *toClient) visit(typ byte, _ int, body []byte, whole bool) error {
	d.last = typ
	if !whole {
		return nil
	}
	m, store := d.ss.srv.metrics, d.ss.upstream.store.name
	switch typ {
	case pgwire.ServerCommandComplete:
		m.Statement(store, metrics.CommandVerb(body), 1)
	case pgwire.ServerErrorResponse:
		m.Error(d.ss.ctx, store, errorCode(body), metrics.OriginStore)
	case pgwire.ServerReadyForQuery:
		if len(body) == 1 {
			d.zs++
			d.status = body[0]
		}
	}
	return nil
}

// after accounts for n bytes relayed and reports whether the session must
// end now because the proxy is draining and the session reached a safe
// point. It reads the clock only when a ReadyForQuery ended a request.
func (d *toClient) after(n int) bool {
	d.ss.srv.metrics.Bytes(d.ss.upstream.store.name, metrics.StoreToClient, int64(n))
	if d.zs == 0 {
		return false
	}
	drain := d.ss.endRequests(d.zs, d.status, time.Now())
	d.zs = 0
	return drain
}

// readErr maps an error from reading the store to the session's end reason.
func (d *toClient) readErr(err error) error {
	if d.ss.handingOff.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
		return errHandoff
	}
	if errors.Is(err, pgwire.ErrProtocol) {
		return pgwire.Fatal(pgwire.CodeProtocolViolation, "invalid message from the %s store", d.ss.upstream.store.name).WithCause(err)
	}
	if d.last == pgwire.ServerErrorResponse {
		return nil // the store said why it closed (e.g. FATAL 57P01); nothing to add
	}
	return errUpstreamLost
}

// clientToUpstream relays client messages to the store with blocking reads.
// It returns nil after the client's Terminate, errClientGone when the client
// disconnects, or a *pgwire.Error to send to the client.
func (ss *session) clientToUpstream(fr *pgwire.Framer, held *[]byte) error {
	d := &toStore{ss: ss}
	for {
		out, err := fr.Next(d.visit)
		if len(out) > 0 {
			if e := d.before(); e != nil {
				if e == errHandoff {
					*held = fr.Rest(len(out))
				}
				return e
			}
			if _, werr := ss.upstream.conn.Write(out); werr != nil {
				return errUpstreamLost
			}
			d.after(len(out))
		}
		if err != nil {
			if reason, stop := d.readErr(fr, err); stop {
				return reason
			}
		}
	}
}

// beginRequest notes that a batch is about to go upstream. It returns false
// when the proxy is draining and the session is at a safe point, so the
// batch must not start.
func (ss *session) beginRequest(syncs int) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.outstanding == 0 && !ss.inRequest {
		if ss.txStatus == pgwire.TxIdle && ss.srv.stopping.Load() {
			return false
		}
		ss.inRequest = true
		ss.reqStart = time.Now()
	}
	ss.outstanding += syncs
	ss.noteRelayLocked()
	return true
}

// endRequests accounts for n ReadyForQuery messages, the last with status,
// and reports whether the session should now close because the proxy is
// draining and the session is at a safe point.
func (ss *session) endRequests(n int, status byte, now time.Time) bool {
	ss.mu.Lock()
	ss.outstanding = max(ss.outstanding-n, 0)
	ss.txStatus = status
	var took time.Duration
	ended := ss.outstanding == 0 && ss.inRequest
	if ended {
		ss.inRequest = false
		took = now.Sub(ss.reqStart)
	}
	idle := ss.idleLocked()
	ss.noteRelayLocked()
	ss.mu.Unlock()
	if ended {
		ss.srv.metrics.Latency(ss.ctx, ss.upstream.store.name, took)
	}
	return idle && ss.srv.stopping.Load()
}

// upstreamToClient relays store messages to the client with blocking
// reads, watching CommandComplete, ErrorResponse and ReadyForQuery.
func (ss *session) upstreamToClient(fr *pgwire.Framer) error {
	d := &toClient{ss: ss}
	for {
		out, err := fr.Next(d.visit)
		if len(out) > 0 {
			// Account before writing, so a client that reads the reply sees
			// its request in the metrics; act on a drain after writing.
			drain := d.after(len(out))
			if _, werr := ss.client.Write(out); werr != nil {
				return errClientGone
			}
			if drain {
				return errShutdown
			}
		}
		if err != nil {
			return d.readErr(err)
		}
	}
}

// errorCode returns the SQLSTATE of an ErrorResponse body, XX000 when it
// has none.
func errorCode(body []byte) string {
	if code, _ := pgwire.ErrorFields(body); code != "" {
		return code
	}
	return "XX000"
}
