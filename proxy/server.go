// Package proxy is Tandem's client-facing PostgreSQL server. It accepts client
// sessions (TLS, SCRAM or trust authentication, cancel requests), pairs each
// with an upstream session on the primary store, and relays the protocol
// byte for byte.
package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/sony/gobreaker/v2"
	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/shadowpool"
	"github.com/tandemdb/tandem/internal/table"
	"go.opentelemetry.io/otel/trace"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("proxy: server closed")

// Options are the parts of a Server that do not come from the config file.
type Options struct {
	Logger  *slog.Logger   // nil = discard
	Metrics *metrics.Proxy // nil = record nothing
	Knobs   TestingKnobs
	// RecordDrift writes entries to the drift ledger in the control schema.
	// The proxy calls it, before acknowledging the client, for every write
	// the secondary store skipped or failed. Nil means no ledger: mirroring
	// failures are then logged as errors.
	RecordDrift func(ctx context.Context, entries []table.DriftEntry) error
	// Classifier classifies statements (nil = a new one with a default cache).
	Classifier *classify.Classifier
	// RecordMismatch stores a confirmed shadow-read mismatch in the control
	// schema. Nil: mismatches are only logged and counted.
	RecordMismatch func(ctx context.Context, r mismatch.Record) error
	// Tracer records a span per client unit of a routed session (trace.go);
	// nil records none, at the cost of a nil check per step.
	Tracer trace.Tracer
}

// TestingKnobs are injection points for tests; the zero value is production
// behaviour.
type TestingKnobs struct {
	// AfterSessionEnd is called when a session's goroutines have all exited.
	AfterSessionEnd func()
	// BeforeSecondaryCommit is called by a mirroring session after the
	// primary committed a transaction and before the secondary does.
	BeforeSecondaryCommit func()
	// BeforePrimaryCommit is called by a mirroring session before it sends
	// the COMMIT of an autocommit write it wrapped in a transaction.
	BeforePrimaryCommit func()
	// BeforeShadow is called by a shadow worker before it runs a sample.
	BeforeShadow func()
}

// Server accepts client sessions and relays them to the primary store. It is
// safe for concurrent use.
type Server struct {
	conf    atomic.Pointer[config.Config] // replaced whole by Reload
	log     *slog.Logger
	metrics *metrics.Proxy
	knobs   TestingKnobs
	tls     atomic.Pointer[tls.Config] // nil without a certificate
	users   atomic.Pointer[Userlist]   // nil for trust
	old     *store
	new     *store // nil when no new store is configured

	open     atomic.Int64 // client sessions counted against the limit
	buffered atomic.Int64 // bytes of requests the routed engine holds for all sessions (limits.max_buffered_bytes)
	stopping atomic.Bool  // set (under mu) once Shutdown or Close has begun
	baseCtx  context.Context
	stopCtx  context.CancelFunc

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	sessions  map[*session]struct{}
	cancels   map[cancelKey]*session
	wg        sync.WaitGroup // every connection-handling goroutine

	loops     []*evloop // the epoll relay engine's loops; nil with the goroutine engine
	loopsOnce sync.Once
	nextLoop  atomic.Uint32
	looped    atomic.Int64 // sessions relayed by a loop, for tests and metrics

	routing     routing
	drift       atomic.Pointer[map[string]bool] // tables with open drift ("schema.table")
	breaker     *gobreaker.CircuitBreaker[struct{}]
	cats        catalogs
	oids        oidCache // user-defined OIDs translated between the stores
	recordDrift func(ctx context.Context, entries []table.DriftEntry) error
	held        heldDrift // drift not yet recorded though its write committed (held.go)
	classifier  *classify.Classifier
	mappings    atomic.Pointer[table.Mappings]
	shadow      *shadowpool.Pool // nil without a new store
	// recordMismatch stores a confirmed shadow mismatch (Options.RecordMismatch).
	recordMismatch func(ctx context.Context, r mismatch.Record) error
	tracer         trace.Tracer // nil: no spans (trace.go)
}

type cancelKey struct {
	pid    uint32
	secret string
}

// New validates what it needs from cfg (TLS files, userlist, store DSNs) and
// returns a Server that has not started listening.
func New(cfg *config.Config, opts Options) (*Server, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		log:       log,
		metrics:   opts.Metrics,
		knobs:     opts.Knobs,
		listeners: map[net.Listener]struct{}{},
		sessions:  map[*session]struct{}{},
		cancels:   map[cancelKey]*session{},
	}
	var err error
	if s.old, err = newStore("old", cfg.Old, cfg.Limits.ConnectTimeout.Duration()); err != nil {
		return nil, err
	}
	if cfg.New.DSN != "" {
		if s.new, err = newStore("new", cfg.New, cfg.Limits.ConnectTimeout.Duration()); err != nil {
			return nil, err
		}
	}
	pairStores(s.old, s.new)
	s.conf.Store(cfg)
	if err := s.loadSecrets(cfg); err != nil {
		return nil, err
	}
	if cfg.Relay.Engine == config.RelayEpoll {
		if err := s.startLoops(); err != nil {
			return nil, fmt.Errorf("relay.engine epoll: %w", err)
		}
	}
	s.routing.init()
	s.breaker = newBreaker(s)
	s.recordDrift = opts.RecordDrift
	s.tracer = opts.Tracer
	s.classifier = opts.Classifier
	if s.classifier == nil {
		s.classifier = classify.New(10000)
	}
	s.baseCtx, s.stopCtx = context.WithCancel(context.Background())
	if s.new != nil {
		s.recordMismatch = opts.RecordMismatch
		s.shadow = s.newShadowPool()
	}
	return s, nil
}

// config returns the configuration in force: the one New was given, or the
// last one Reload applied. Callers read it once per decision and never
// modify it.
func (s *Server) config() *config.Config { return s.conf.Load() }

// loadSecrets reads cfg's TLS certificate and userlist and installs them;
// on error it installs nothing.
func (s *Server) loadSecrets(cfg *config.Config) error {
	var tc *tls.Config
	if cfg.TLS.Cert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLS.Cert, cfg.TLS.Key)
		if err != nil {
			return fmt.Errorf("tls: %w", err)
		}
		tc = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	var users *Userlist
	if cfg.Auth.Method == "scram-sha-256" {
		var err error
		if users, err = LoadUserlist(cfg.Auth.Userlist); err != nil {
			return fmt.Errorf("auth.userlist: %w", err)
		}
	}
	s.tls.Store(tc)
	s.users.Store(users)
	return nil
}

// Reload puts next in force for what can change while sessions are open:
// the auth method and userlist, the TLS certificate and tls.require, the
// limits, the mirror budget and fence timeout, and the shadow settings
// other than workers and queue. Sessions that start afterwards get all of
// them; open sessions keep their TLS and login, and see the rest at their
// next use. next must be validated, and its settings that need a restart
// (config.RestartOnly) must equal the running ones. On error (an unreadable
// certificate or userlist) nothing changes.
func (s *Server) Reload(next *config.Config) error {
	if diff := config.RestartOnly(s.config(), next); len(diff) > 0 {
		return fmt.Errorf("reload: %v can only change with a restart", diff)
	}
	if err := s.loadSecrets(next); err != nil {
		return err
	}
	s.conf.Store(next)
	if s.shadow != nil {
		s.shadow.SetSettings(shadowSettingsOf(next))
	}
	return nil
}

// ListenAndServe listens on the configured address and serves until Shutdown
// or Close.
func (s *Server) ListenAndServe() error {
	ln, err := net.Listen("tcp", s.config().Listen)
	if err != nil {
		return err
	}
	return s.Serve(ln)
}

// Serve accepts connections on ln until Shutdown or Close, handling each in
// its own goroutine. It closes ln before returning, and returns
// ErrServerClosed after Shutdown or Close. Client connections are closed by
// the session that owns them.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.stopping.Load() {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()

	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if s.stopping.Load() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "error", err, "backoff", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		s.mu.Lock()
		if s.stopping.Load() {
			s.mu.Unlock()
			s.refuse(conn, pgwire.Fatal(pgwire.CodeCannotConnectNow, "the proxy is shutting down"))
			continue
		}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.handle(conn)
		}()
	}
}

// refuse answers a connection that will not be served and closes it, on the
// accept goroutine, with a short write deadline so a stuck client cannot
// block accepting.
func (s *Server) refuse(conn net.Conn, e *pgwire.Error) {
	_ = conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	if b, err := e.Response().Encode(nil); err == nil {
		_, _ = conn.Write(b)
	}
	conn.Close()
}

// Shutdown stops accepting, lets open transactions finish until the drain
// timeout (or ctx) expires, and closes every session with SQLSTATE 57P01 at
// its next safe point: at once when it is idle, otherwise when its transaction
// ends. Sessions still busy when the timeout expires are closed mid-flight.
// Shutdown returns when every session has ended.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.stopping.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	sessions := make([]*session, 0, len(s.sessions))
	for ss := range s.sessions {
		sessions = append(sessions, ss)
	}
	s.mu.Unlock()
	s.log.Info("draining client sessions", "sessions", len(sessions), "drain_timeout", s.config().Limits.DrainTimeout.String())
	for _, ss := range sessions {
		ss.drainIfIdle()
	}

	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	timer := time.NewTimer(s.config().Limits.DrainTimeout.Duration())
	defer timer.Stop()
	select {
	case <-done:
		s.stopLoops()
		s.release()
		s.stopCtx()
		return nil
	case <-timer.C:
	case <-ctx.Done():
	}
	s.mu.Lock()
	left := make([]*session, 0, len(s.sessions))
	for ss := range s.sessions {
		left = append(left, ss)
	}
	s.mu.Unlock()
	s.log.Warn("drain timeout: closing sessions with open transactions", "sessions", len(left))
	for _, ss := range left {
		ss.kill(errShutdown)
	}
	<-done
	s.stopLoops()
	s.release()
	s.stopCtx()
	return nil
}

// release closes what sessions shared once they have all ended: the
// catalog pools and the shadow workers with their connections.
func (s *Server) release() {
	s.stopHeld()
	s.closeCatalogs()
	if s.shadow != nil {
		s.shadow.Stop()
	}
}

// Close closes the listeners and every session at once, with 57P01.
func (s *Server) Close() error {
	s.mu.Lock()
	s.stopping.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	for ss := range s.sessions {
		go ss.kill(errShutdown)
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.stopLoops()
	s.release()
	s.stopCtx()
	return nil
}

// Sessions reports the number of client sessions currently open.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// register makes a session visible to Shutdown and to cancel requests, and
// assigns its client-facing cancel key: the upstream backend's real process
// ID (so pg_backend_pid() and NotificationResponse PIDs agree with what the
// client was told) and a secret of the proxy's own, so a client's key is
// never the store's.
func (s *Server) register(ss *session) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping.Load() {
		return false
	}
	for {
		var secret [4]byte
		_, _ = rand.Read(secret[:])
		k := cancelKey{pid: ss.upstream.pid, secret: string(secret[:])}
		if _, dup := s.cancels[k]; dup {
			continue
		}
		ss.key = k
		s.cancels[k] = ss
		s.sessions[ss] = struct{}{}
		return true
	}
}

func (s *Server) unregister(ss *session) {
	s.mu.Lock()
	delete(s.sessions, ss)
	delete(s.cancels, ss.key)
	s.mu.Unlock()
}

// cancel forwards a client's CancelRequest to the store running that
// session's query. Unknown keys are ignored, as PostgreSQL does.
func (s *Server) cancel(ctx context.Context, req *pgproto3.CancelRequest) {
	s.mu.Lock()
	ss := s.cancels[cancelKey{pid: req.ProcessID, secret: string(req.SecretKey)}]
	s.mu.Unlock()
	if ss == nil {
		s.metrics.Connection(ctx, "cancel_unknown")
		return
	}
	s.metrics.Connection(ctx, "cancel")
	up := ss.upstream
	if sv := ss.serving.Load(); sv != nil {
		up = sv
	}
	if err := up.cancel(ctx); err != nil {
		s.log.Warn("forwarding cancel request failed", "session", ss.key.pid, "store", ss.upstream.store.name, "error", err)
	}
}

// Ping opens a session on the named store ("old" or "new") the way client
// sessions do (same DSN, TLS and credentials), and ends it. It is the
// readiness probe: its error names the store and never holds a password.
func (s *Server) Ping(ctx context.Context, name string) error {
	st := s.old
	if name == "new" {
		st = s.new
	}
	if st == nil {
		return fmt.Errorf("no %s store is configured", name)
	}
	up, err := st.connect(ctx, "", "", nil)
	if err != nil {
		return fmt.Errorf("%s store: %w", name, err)
	}
	_, _ = up.conn.Write([]byte{pgwire.ClientTerminate, 0, 0, 0, 4})
	return up.conn.Close()
}
