package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/admin"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/tracing"
	"github.com/tandemdb/tandem/internal/version"
	"github.com/tandemdb/tandem/proxy"
	"golang.org/x/sync/errgroup"
)

func newProxyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Run the proxy: clients connect here instead of to the old store",
		Long: `Run the Tandem proxy.

Each client session is paired with a session on the primary store (the old
store, until a write flip) and relayed byte for byte: simple and extended
query protocol, pipelining, COPY, notices, LISTEN/NOTIFY and errors with their
SQLSTATE. Clients authenticate at the proxy (trust, or SCRAM-SHA-256 against a
pgbouncer-style userlist); the proxy logs in to the store as the same user,
with the password from the store's DSN or password file.

The admin address serves /healthz, /readyz (both stores reachable),
/metrics (Prometheus) and, with a new store, the routing API: GET
/api/v1/state, POST /api/v1/route and POST /api/v1/rollback (see
'tandem route --help'), and the backfill's status and live throttle: GET
and POST /api/v1/backfill ({"rate": rows/s}, {"paused": true|false}).
All but /healthz, /readyz and /metrics need the bearer token of
--admin-token-file when one is set, and a non-loopback --admin needs one; a
POST must be application/json and name this server in its Host header.
--admin-tls-cert/--admin-tls-key serve it over HTTPS; --admin-pprof adds
/debug/pprof/. 'tandem health' asks it from the same configuration.

Clients authenticate with --auth-method; trust on a non-loopback --listen
is refused unless --auth-allow-remote-trust. Upstream, a store that asks
for an MD5 or cleartext password on a connection without TLS is refused
(28000) unless --old-require-auth/--new-require-auth allow it.

With a new store configured, the proxy keeps its routing state in the
control schema "tandem" (control.dsn, else the old store): it creates the
schema if needed, follows every change by LISTEN/NOTIFY (polling every
routing.poll), drains its writes for a write flip's fence, records skipped
or failed mirror writes in the drift ledger and repairs them every
routing.repair_interval (an entry that fails backs off, up to
routing.repair_backoff_max, and is stuck after routing.drift_stuck_attempts
failures). It refuses to start when the control database is unreachable.

On SIGHUP the proxy re-reads its configuration (file, environment, flags)
and puts in force, without dropping a session, the userlist and auth
method, the TLS certificate, the limits, routing.mirror_budget, the shadow
settings other than workers and queue, and log.level; the log line names
any changed setting that needs a restart. A file that does not load or
validate leaves the running configuration in force.

On SIGTERM or SIGINT the proxy stops accepting, lets open transactions finish
within --drain-timeout, then closes the remaining sessions with SQLSTATE 57P01.`,
		Example: `  tandem proxy --listen 127.0.0.1:6432 --admin 127.0.0.1:9187 \
    --old 'postgres://app@old-db:5432/shop' --new 'postgres://app@new-db:5432/shop'
  tandem proxy -c /etc/tandem/tandem.yaml`,
		Args: cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := flags.Load(os.LookupEnv)
		if err != nil {
			return err
		}
		log, level := newLevelLogger(cfg.Log, os.Stderr)
		rp, err := startProxy(cfg, log)
		if err != nil {
			return err
		}
		rp.level = level
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		ctx := cmd.Context()
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-hup:
				}
				next, err := flags.Load(os.LookupEnv)
				if err == nil {
					err = rp.reload(next)
				}
				if err != nil {
					log.Error("configuration not reloaded: the running configuration stays", "error", err)
				}
			}
		}()
		return rp.wait(ctx)
	}
	return cmd
}

// runningProxy is a proxy and its admin server, started together.
type runningProxy struct {
	cfg      *config.Config                // as started
	live     atomic.Pointer[config.Config] // in force: cfg, or what the last reload put in force
	level    *slog.LevelVar                // nil: the log level does not reload
	log      *slog.Logger
	srv      *proxy.Server
	admin    *admin.Server
	prom     *metrics.Prometheus
	tracing  *tracing.Provider // nil: tracing is off
	listener net.Listener
	g        *errgroup.Group
	control  *control.Plane // nil without a new store
	// adminToken is the admin API's token ("" = none), for in-process
	// callers such as the demo.
	adminToken string
	// history samples /metrics for the status page's charts until
	// stopHistory; historyDone is closed when it has.
	stopHistory context.CancelFunc
	historyDone chan struct{}
}

// startProxy binds both addresses and starts serving. Addresses with port 0
// get a free port; Addr and AdminAddr report the bound ones.
func startProxy(cfg *config.Config, log *slog.Logger) (*runningProxy, error) {
	bi := version.Get(release)
	in, err := newInstruments(cfg, bi)
	if err != nil {
		return nil, err
	}
	tp, err := tracing.New(tracing.Options{Endpoint: cfg.Tracing.Endpoint, SampleRatio: cfg.Tracing.SampleRatio, Insecure: cfg.Tracing.Insecure,
		Headers: tracing.ParseHeaders(cfg.Tracing.Headers), Version: bi.Version, Replica: control.ReplicaID(cfg)})
	if err != nil {
		return nil, err
	}
	started := false
	defer func() {
		if !started {
			_ = tp.Shutdown(context.Background()) // a start that failed leaves no exporter running
		}
	}()
	opts := proxy.Options{Logger: log, Metrics: in.proxy, Tracer: tp.Tracer()}
	cw, err := openControl(cfg, log, in.proxy, &opts)
	if err != nil {
		return nil, err
	}
	cp := cw.plane
	srv, err := proxy.New(cfg, opts)
	if err != nil {
		if cp != nil {
			cp.Stop()
		}
		return nil, err
	}
	if cp != nil {
		cp.RefreshMappings(context.Background(), srv)
		st, readAt := cp.Initial()
		srv.ApplyState(st) // before the first client: never serve on a routing state older than the stored one
		srv.HeardState(readAt)
	}
	adm, hist, token, err := listenAdmin(cfg, log, in.prom, srv, cw)
	if err != nil {
		if cp != nil {
			cp.Stop()
		}
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		_ = adm.Shutdown(context.Background())
		if cp != nil {
			cp.Stop()
		}
		return nil, fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	rp := &runningProxy{cfg: cfg, log: log, srv: srv, admin: adm, prom: in.prom, listener: ln, g: &errgroup.Group{}, control: cp, adminToken: token, tracing: tp}
	rp.live.Store(cfg)
	hctx, stopHistory := context.WithCancel(context.Background())
	rp.stopHistory, rp.historyDone = stopHistory, make(chan struct{})
	go func() {
		defer close(rp.historyDone)
		hist.Run(hctx)
	}()
	if cp != nil {
		cp.Start(srv, in.proxy, in.backfill, in.feed)
	}
	rp.g.Go(adm.Serve)
	rp.g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, proxy.ErrServerClosed) {
			return err
		}
		return nil
	})
	log.Info("tandem proxy started", "listen", ln.Addr().String(), "admin", adm.Addr(),
		"old", config.RedactDSN(cfg.Old.DSN), "auth", cfg.Auth.Method, "tls", cfg.TLS.Cert != "",
		"admin_token", cfg.AdminAPI.TokenFile != "", "admin_tls", cfg.AdminAPI.TLSCert != "", "tracing", cfg.Tracing.Endpoint != "")
	started = true
	return rp, nil
}

// instruments are the proxy process's metrics: the Prometheus exporter and
// the instruments of the proxy, the backfill and the change feed.
type instruments struct {
	prom     *metrics.Prometheus
	proxy    *metrics.Proxy
	backfill *metrics.Backfill
	feed     *metrics.Feed
}

func newInstruments(cfg *config.Config, bi version.Info) (*instruments, error) {
	prom, err := metrics.NewPrometheus(
		metrics.WithService(bi.Version, control.ReplicaID(cfg)),
		metrics.WithBuildInfo(metrics.BuildInfo{Version: bi.Version, Commit: bi.Commit, GoVersion: bi.GoVersion}))
	if err != nil {
		return nil, err
	}
	pm, err := metrics.NewProxy(prom.Provider.Meter("github.com/tandemdb/tandem/proxy"))
	if err != nil {
		return nil, err
	}
	bm, err := metrics.NewBackfill(prom.Provider.Meter("github.com/tandemdb/tandem/backfill"))
	if err != nil {
		return nil, err
	}
	fm, err := metrics.NewFeed(prom.Provider.Meter("github.com/tandemdb/tandem/feed"))
	if err != nil {
		return nil, err
	}
	return &instruments{prom: prom, proxy: pm, backfill: bm, feed: fm}, nil
}

// controlWiring is the control plane of a proxy with a new store, and what
// the admin API serves over it; all nil without a new store.
type controlWiring struct {
	plane      *control.Plane
	routing    *control.Routing
	backfill   *control.Backfill
	mismatches *admin.Mismatches
}

// openControl opens the control plane and the routing facade, and points
// opts' drift and mismatch recording at the plane.
func openControl(cfg *config.Config, log *slog.Logger, pm *metrics.Proxy, opts *proxy.Options) (controlWiring, error) {
	// With a new store, the proxy follows the routing state in the control
	// schema; without one it stays in passthrough and needs no control database.
	var cp *control.Plane
	var rt *control.Routing
	var bf *control.Backfill
	var mm *admin.Mismatches
	var err error
	if cfg.New.DSN != "" {
		if cp, err = control.Open(cfg, log); err != nil {
			return controlWiring{}, err
		}
		opts.RecordDrift = cp.RecordDrift
		opts.RecordMismatch = cp.RecordMismatch
		rt, err = control.NewRouting(cfg, log, func(ctx context.Context, rep route.Report) {
			if rep.Flip && rep.Fence > 0 {
				pm.R().Fence(ctx, rep.Fence)
			}
		})
		if err != nil {
			cp.Stop()
			return controlWiring{}, err
		}
		bf = &control.Backfill{Connect: rt.Connect}
		mm = &admin.Mismatches{Connect: rt.Connect, Window: cfg.Gates.ShadowWindow.Duration()}
	}
	return controlWiring{plane: cp, routing: rt, backfill: bf, mismatches: mm}, nil
}

// listenAdmin binds the admin server (not serving yet) with its health
// checks, security, status and the status page's history; token is the
// admin API's token.
func listenAdmin(cfg *config.Config, log *slog.Logger, prom *metrics.Prometheus, srv *proxy.Server, cw controlWiring) (adm *admin.Server, hist *admin.History, token string, err error) {
	rt := cw.routing
	ping := func(name string) admin.Check {
		return admin.Check{Name: name, Run: func(ctx context.Context) error { return srv.Ping(ctx, name) }}
	}
	checks := []admin.Check{ping("old")}
	if cfg.New.DSN != "" {
		checks = append(checks, ping("new"))
	}
	sec, sopts, err := adminSecurity(cfg)
	if err != nil {
		return nil, nil, "", err
	}
	var status func(ctx context.Context) (any, error)
	if rt != nil {
		status = func(ctx context.Context) (any, error) { return collectStatus(ctx, cfg, rt) }
	}
	hist = &admin.History{Read: prom.Sums}
	adm, err = admin.Listen(cfg.Admin, admin.NewHandler(admin.Options{Metrics: prom.Handler, Checks: checks, Logger: log, Routing: rt, Backfill: cw.backfill, Mismatches: cw.mismatches,
		Writers: srv.WriterSessions, Security: sec, Pprof: cfg.AdminAPI.Pprof, Status: status, History: hist}), log, sopts)
	if err != nil {
		return nil, nil, "", err
	}
	return adm, hist, sec.Token, nil
}

// reload puts next's reloadable settings in force (config.Reloadable: the
// userlist and auth method, TLS, limits, the mirror budget, most shadow
// settings, the log level) without dropping a session, and names in the log
// the changed settings that need a restart, which keep their running
// values. On error nothing changes.
func (rp *runningProxy) reload(next *config.Config) error {
	cur := rp.live.Load()
	eff := config.TakeReloadable(cur, next)
	if err := rp.srv.Reload(eff); err != nil {
		return err
	}
	if rp.level != nil {
		rp.level.Set(logLevel(eff.Log.Level))
	}
	rp.live.Store(eff)
	args := []any{"changed", config.Changed(cur, eff)}
	if restart := config.RestartOnly(cur, next); len(restart) > 0 {
		args = append(args, "need_restart", restart)
	}
	rp.log.Info("configuration reloaded", args...)
	return nil
}

// adminSecurity builds the admin server's checks and limits from the
// config: the token (read once, at start), the Host names a state-changing
// request may carry, TLS, and timeouts long enough for a write flip.
func adminSecurity(cfg *config.Config) (admin.Security, admin.ServerOptions, error) {
	var sec admin.Security
	a := cfg.AdminAPI
	if a.TokenFile != "" {
		tok, err := config.ReadToken(a.TokenFile)
		if err != nil {
			return sec, admin.ServerOptions{}, fmt.Errorf("admin_api.token_file: %w", err)
		}
		sec.Token = tok
	}
	if host, _, err := net.SplitHostPort(cfg.Admin); err == nil && host != "" {
		sec.Hosts = append(sec.Hosts, host)
	}
	for h := range strings.SplitSeq(a.AllowedHosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			sec.Hosts = append(sec.Hosts, h)
		}
	}
	r := cfg.Routing
	so := admin.ServerOptions{MaxConnections: a.MaxConnections,
		// A flip's handler waits for the fence, the acks and the lease (see admin.changeContext).
		WriteTimeout: 3*r.FenceTimeout.Duration() + 2*r.Poll.Duration() + 2*time.Minute}
	if a.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(a.TLSCert, a.TLSKey)
		if err != nil {
			return sec, so, fmt.Errorf("admin_api.tls_cert: %w", err)
		}
		so.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	return sec, so, nil
}

func (rp *runningProxy) Addr() string      { return rp.listener.Addr().String() }
func (rp *runningProxy) AdminAddr() string { return rp.admin.Addr() }

// wait serves until ctx is done, then drains and stops everything.
func (rp *runningProxy) wait(ctx context.Context) error {
	done := make(chan error, 1)
	go func() { done <- rp.g.Wait() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	rp.log.Info("shutting down")
	return rp.stop()
}

// stop drains sessions (bounded by the drain timeout) and stops the admin
// server and the meter provider.
func (rp *runningProxy) stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), rp.live.Load().Limits.DrainTimeout.Duration()+5*time.Second)
	defer cancel()
	err := rp.srv.Shutdown(ctx)
	err = errors.Join(err, rp.admin.Shutdown(ctx), rp.g.Wait())
	if rp.control != nil {
		rp.control.Stop() // after the sessions: they record drift through its pool
	}
	rp.stopHistory()
	<-rp.historyDone
	err = errors.Join(err, rp.prom.Shutdown(ctx), rp.tracing.Shutdown(ctx))
	rp.log.Info("tandem proxy stopped")
	return err
}
