// Package admin is Tandem's operator HTTP API: liveness, readiness,
// metrics, and the routing state and its changes (job control as it is
// built). The server binds only the configured admin address, which is
// loopback by default: the API has no authentication of its own.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"
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
	Routing *Routing
	// Backfill serves /api/v1/backfill; nil answers it with 404.
	Backfill *Backfill
	// Mismatches serves /api/v1/mismatches; nil answers it with 404.
	Mismatches *Mismatches
	// Writers serves /api/v1/writers: this proxy's sessions a write fence
	// waits for, one line each (why, for how long); nil answers 404.
	Writers func() []string
	// Status serves /api/v1/status: the whole migration, as `tandem
	// status --json`; nil answers 404. The status page at / reads it.
	Status func(ctx context.Context) (any, error)
}

// NewHandler returns the admin API's handler:
//
//	GET /         the migration status page (HTML; reads /api/v1/status and /metrics)
//	GET /healthz  200 "ok" while the process serves HTTP
//	GET /readyz   200 when every check passes, else 503; JSON body per check
//	GET /metrics  Prometheus text format
//	/debug/pprof/ Go profiles (the admin address is loopback by default)
//	GET  /api/v1/status    the whole migration: routing, backfill, verify, shadow, gates (tandem status --json)
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
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		type result struct {
			Name  string `json:"name"`
			OK    bool   `json:"ok"`
			Error string `json:"error,omitempty"`
		}
		results := make([]result, len(opts.Checks))
		var wg sync.WaitGroup
		for i, c := range opts.Checks {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(r.Context(), opts.CheckTimeout)
				defer cancel()
				results[i] = result{Name: c.Name, OK: true}
				if err := c.Run(ctx); err != nil {
					results[i] = result{Name: c.Name, Error: err.Error()}
				}
			})
		}
		wg.Wait()
		status := http.StatusOK
		for _, res := range results {
			if !res.OK {
				status = http.StatusServiceUnavailable
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]any{"ready": status == http.StatusOK, "checks": results})
	})
	if opts.Metrics != nil {
		mux.Handle("GET /metrics", opts.Metrics)
	}
	uiHandlers(mux, opts.Status)
	routingHandlers(mux, opts.Routing)
	backfillHandlers(mux, opts.Backfill)
	mismatchHandlers(mux, opts.Mismatches)
	if opts.Writers != nil {
		mux.HandleFunc("GET /api/v1/writers", func(w http.ResponseWriter, r *http.Request) {
			sessions := opts.Writers()
			if sessions == nil {
				sessions = []string{}
			}
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(map[string]any{"writers": len(sessions), "sessions": sessions})
		})
	}
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// Server is the admin HTTP server.
type Server struct {
	srv *http.Server
	ln  net.Listener
}

// Listen binds addr; Serve then serves until Shutdown.
func Listen(addr string, h http.Handler, log *slog.Logger) (*Server, error) {
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
	return &Server{ln: ln, srv: &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          slog.NewLogLogger(el.Handler(), slog.LevelWarn),
	}}, nil
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
