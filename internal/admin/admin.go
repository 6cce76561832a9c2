// Package admin is Tandem's operator HTTP API: liveness, readiness,
// metrics, and the routing state and its changes (job control as it is
// built). It is HTTP handlers only: what they serve is the control plane's
// (internal/control: the routing facade, the backfill's throttle), and it
// imports no top-level package. Everything but the probes and the metrics needs the bearer token
// when one is configured (Security); the server binds only the configured
// admin address, which is loopback by default.
package admin

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/jsonout"
)

// Check is one readiness probe.
type Check struct {
	Name string
	Run  func(ctx context.Context) error
}

// Options configure the admin handler.
type Options struct {
	Metrics http.Handler // served at /metrics
	Checks  []Check      // run by /readyz
	Logger  *slog.Logger
	// CheckTimeout bounds each readiness probe (default 2s).
	CheckTimeout time.Duration
	// Routing serves /api/v1/state, /api/v1/route and /api/v1/rollback;
	// nil answers them with 404 (no new store is configured).
	Routing *control.Routing
	// Backfill serves /api/v1/backfill; nil answers it with 404.
	Backfill *control.Backfill
	// Mismatches serves /api/v1/mismatches; nil answers it with 404.
	Mismatches *Mismatches
	// Writers serves /api/v1/writers: this proxy's sessions a write fence
	// waits for, one line each (why, for how long); nil answers 404.
	Writers func() []string
	// Status serves /api/v1/status: the whole migration, as `tandem
	// status --json`; nil answers 404. The status page at / reads it.
	Status func(ctx context.Context) (any, error)
	// History serves /api/v1/history: this process's recent samples of
	// drift, mirror latency, shadow outcomes and feed lag, which the
	// status page charts; nil answers 404.
	History *History
	// Security is the token and Host checks every request goes through.
	Security Security
	// Pprof serves /debug/pprof/ (behind the token); /debug/pprof/cmdline,
	// which would show the command line and so any DSN on it, never is.
	Pprof bool
}

// NewHandler returns the admin API's handler:
//
//	GET /         the migration status page (HTML; reads /api/v1/status and /metrics)
//	GET /healthz  200 "ok" while the process serves HTTP
//	GET /readyz   200 when every check passes, else 503; JSON body per check
//	GET /metrics  Prometheus text format
//	/debug/pprof/ Go profiles, only with Pprof (never /debug/pprof/cmdline)
//	GET  /api/v1/status    the whole migration: routing, backfill, verify, shadow, gates (tandem status --json)
//	GET  /api/v1/history   this process's samples for the page's charts over the last hour (HistoryDoc)
//	GET  /api/v1/state     routing state, replicas, history tail, open drift (Status)
//	POST /api/v1/route     a RouteRequest: 200 with a Result; 400 malformed; 409 refused
//	                       (illegal transition, cutover gate, concurrent change); 503 fence not drained
//	POST /api/v1/rollback  optional {"force": bool, "reason": text}: as /api/v1/route
//	GET  /api/v1/backfill  per table rows and chunks, finished, rate and paused (backfill.State)
//	POST /api/v1/backfill  {"rate": rows/s} and/or {"paused": bool}: 200 with the state after; 400 malformed
//	GET  /api/v1/writers   this proxy's sessions a write fence would wait for: {"writers": n, "sessions": [why...]}
//	GET  /api/v1/mismatches shadow-read outcomes over ?window= (default the gate's) per fingerprint, and the
//	                       stored mismatches grouped by fingerprint (?fingerprint=, ?since=RFC3339, ?samples=1..100)
func NewHandler(opts Options) http.Handler {
	if opts.CheckTimeout == 0 {
		opts.CheckTimeout = 2 * time.Second
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	// Probes at any rate open at most one connection per store a second.
	probe := &coalesced[readiness]{maxAge: time.Second, fn: func(ctx context.Context) readiness {
		return runChecks(ctx, opts.Checks, opts.CheckTimeout)
	}}
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		res := probe.get(r.Context())
		status := http.StatusOK
		if !res.ok {
			status = http.StatusServiceUnavailable
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = jsonout.Write(w, map[string]any{"ready": res.ok, "checks": res.results})
	})
	if opts.Metrics != nil {
		mux.Handle("GET /metrics", opts.Metrics)
	}
	uiPage(mux)
	// The API handlers each open a control-database connection: at most
	// apiConcurrency run at once, so hammering the admin API cannot use up
	// the control database's max_connections.
	api := http.NewServeMux()
	routingHandlers(api, opts.Routing)
	status := statusHandler(api, opts.Status)
	historyHandler(api, opts.History)
	backfillHandlers(api, opts.Backfill)
	mismatchHandlers(api, opts.Mismatches)
	sem := make(chan struct{}, apiConcurrency)
	mux.Handle("/api/v1/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case sem <- struct{}{}:
			defer func() { <-sem }()
		case <-r.Context().Done():
			return
		}
		api.ServeHTTP(w, r)
		if r.Method != http.MethodGet && status != nil {
			status.forget() // a routing change: the next status shows it
		}
	}))
	if opts.Writers != nil {
		api.HandleFunc("GET /api/v1/writers", func(w http.ResponseWriter, r *http.Request) {
			sessions := opts.Writers()
			if sessions == nil {
				sessions = []string{}
			}
			w.Header().Set("Content-Type", "application/json")
			_ = jsonout.Write(w, map[string]any{"writers": len(sessions), "sessions": sessions})
		})
	}
	if opts.Pprof {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", http.NotFound)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	return opts.Security.guard(mux)
}

// apiConcurrency is how many /api/v1 requests run at once; more wait.
const apiConcurrency = 4

// coalesced runs fn at most once at a time, shares its result with the
// requests that wait for it, and reuses it for maxAge: callers at any rate
// cost at most one run per maxAge. fn gets a context of its own (not the
// first caller's: the result serves the others too), bounded by timeout
// when set.
type coalesced[T any] struct {
	fn      func(ctx context.Context) T
	maxAge  time.Duration
	timeout time.Duration

	run sync.Mutex // held while fn runs
	mu  sync.Mutex
	at  time.Time
	v   T
	gen uint64 // forget's count: a run that began before a forget keeps no result
}

// forget drops the result kept, and the one of a run under way, so the
// next get runs fn again.
func (c *coalesced[T]) forget() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.at, c.gen = time.Time{}, c.gen+1
}

func (c *coalesced[T]) cached() (T, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.at.IsZero() && time.Since(c.at) < c.maxAge {
		return c.v, true
	}
	var zero T
	return zero, false
}

func (c *coalesced[T]) get(ctx context.Context) T {
	if v, hit := c.cached(); hit {
		return v
	}
	c.run.Lock()
	defer c.run.Unlock()
	if v, hit := c.cached(); hit {
		return v // another request ran it meanwhile
	}
	c.mu.Lock()
	gen := c.gen
	c.mu.Unlock()
	fctx := context.WithoutCancel(ctx)
	if c.timeout > 0 {
		var cancel context.CancelFunc
		fctx, cancel = context.WithTimeout(fctx, c.timeout)
		defer cancel()
	}
	v := c.fn(fctx)
	c.mu.Lock()
	if c.gen == gen {
		c.at, c.v = time.Now(), v
	}
	c.mu.Unlock()
	return v
}

// readiness is one run of the readiness checks for /readyz.
type readiness struct {
	results []checkResult
	ok      bool
}

type checkResult struct {
	Name  string `json:"name"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// runChecks runs every check at once, each bounded by timeout.
func runChecks(ctx context.Context, checks []Check, timeout time.Duration) readiness {
	results := make([]checkResult, len(checks))
	var wg sync.WaitGroup
	for i, c := range checks {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			results[i] = checkResult{Name: c.Name, OK: true}
			if err := c.Run(cctx); err != nil {
				results[i] = checkResult{Name: c.Name, Error: err.Error()}
			}
		})
	}
	wg.Wait()
	ok := true
	for _, r := range results {
		ok = ok && r.OK
	}
	return readiness{results: results, ok: ok}
}

// Server is the admin HTTP server.
type Server struct {
	srv *http.Server
	ln  net.Listener
}

// ServerOptions bound what one client can hold of the admin server. Zero
// fields take the defaults.
type ServerOptions struct {
	// TLS, when set, serves HTTPS.
	TLS *tls.Config
	// MaxConnections caps the connections held at once (default 64); more
	// wait in the listen backlog until one closes.
	MaxConnections int
	// ReadHeaderTimeout bounds reading a request's headers (default 5s),
	// ReadTimeout the whole request (default 30s), WriteTimeout writing the
	// response from the end of the headers (default 2m; a write flip's
	// handler waits up to its fence and ack timeouts, so cmd/tandem sets it
	// from them), and IdleTimeout a kept-alive connection (default 60s).
	ReadHeaderTimeout, ReadTimeout, WriteTimeout, IdleTimeout time.Duration
}

// Listen binds addr; Serve then serves until Shutdown.
func Listen(addr string, h http.Handler, log *slog.Logger, o ServerOptions) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin listen %s: %w", addr, err)
	}
	var el *slog.Logger
	if log != nil {
		el = log
	} else {
		el = slog.New(slog.DiscardHandler)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.ReadHeaderTimeout, 5*time.Second)
	def(&o.ReadTimeout, 30*time.Second)
	def(&o.WriteTimeout, 2*time.Minute)
	def(&o.IdleTimeout, time.Minute)
	if o.MaxConnections <= 0 {
		o.MaxConnections = 64
	}
	ln = &limitListener{Listener: ln, sem: make(chan struct{}, o.MaxConnections)}
	if o.TLS != nil {
		ln = tls.NewListener(ln, o.TLS)
	}
	return &Server{ln: ln, srv: &http.Server{
		Handler:           h,
		ReadHeaderTimeout: o.ReadHeaderTimeout,
		ReadTimeout:       o.ReadTimeout,
		WriteTimeout:      o.WriteTimeout,
		IdleTimeout:       o.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(el.Handler(), slog.LevelWarn),
	}}, nil
}

// limitListener accepts at most cap(sem) connections at once: Accept waits
// for one to close (as golang.org/x/net/netutil.LimitListener).
type limitListener struct {
	net.Listener
	sem chan struct{}
}

func (l *limitListener) Accept() (net.Conn, error) {
	l.sem <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	return &limitConn{Conn: c, release: func() { <-l.sem }}, nil
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// Addr is the bound address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Serve serves until Shutdown; it returns nil after a Shutdown.
func (s *Server) Serve() error {
	if err := s.srv.Serve(s.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops the server gracefully.
func (s *Server) Shutdown(ctx context.Context) error { return s.srv.Shutdown(ctx) }
