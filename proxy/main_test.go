package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

// shared is one throwaway cluster for the whole package; tests that need
// isolation create their own database on it.
var shared *pgtest.Cluster

func TestMain(m *testing.M) {
	os.Exit(harness.Run(m, harness.Clusters(&shared), destroySharedNew))
}

// newDB creates a fresh database on the shared cluster.
func newDB(t testing.TB) string {
	t.Helper()
	name := harness.DBName(t)
	if err := shared.CreateDatabase(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	return name
}

type testProxy struct {
	srv  *Server
	addr string
	cfg  *config.Config
}

// startProxy runs a proxy in front of cluster c (database db is the DSN's
// default) and stops it when the test ends.
func startProxy(t testing.TB, c *pgtest.Cluster, db string, mutate ...func(*config.Config)) *testProxy {
	t.Helper()
	return startProxyWith(t, c, db, Options{}, mutate...)
}

// startProxyWith is startProxy with options.
func startProxyWith(t testing.TB, c *pgtest.Cluster, db string, opts Options, mutate ...func(*config.Config)) *testProxy {
	t.Helper()
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.Admin = "127.0.0.1:0"
	cfg.Old.DSN = c.DSN(db)
	if engine := os.Getenv("TANDEM_TEST_RELAY"); engine != "" {
		cfg.Relay.Engine = engine // run the whole suite on another relay engine
	}
	for _, m := range mutate {
		m(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	opts.Logger = testLogger(t)
	srv, err := New(&cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return &testProxy{srv: srv, addr: ln.Addr().String(), cfg: &cfg}
}

func (p *testProxy) dsn(db string, params ...string) string {
	host, port, _ := net.SplitHostPort(p.addr)
	s := fmt.Sprintf("postgres://postgres@%s:%s/%s?sslmode=disable", host, port, db)
	for _, kv := range params {
		s += "&" + kv
	}
	return s
}

func (p *testProxy) connect(t testing.TB, db string, params ...string) *pgconn.PgConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgconn.Connect(ctx, p.dsn(db, params...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// testLogger sends the proxy's log to the test log while the test runs.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	w := &testWriter{t: t}
	t.Cleanup(w.stop)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

var _ io.Writer = (*testWriter)(nil)

// succeedsSoon retries fn until it returns nil or 10 s pass.
func succeedsSoon(t testing.TB, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	wait := time.Millisecond
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after 10s: %v", err)
		}
		time.Sleep(wait)
		wait = min(2*wait, 100*time.Millisecond)
	}
}

func sqlState(err error) string {
	var pe *pgconn.PgError
	if err != nil && errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// queryOne runs sql with the simple protocol and returns the first column
// of the first row.
func queryOne(t testing.TB, c *pgconn.PgConn, sql string) string {
	t.Helper()
	res, err := c.Exec(context.Background(), sql).ReadAll()
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	last := res[len(res)-1]
	if len(last.Rows) == 0 {
		t.Fatalf("%s: no rows", sql)
	}
	return string(last.Rows[0][0])
}
