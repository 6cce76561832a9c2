// Package pgtest provides throwaway PostgreSQL servers for integration tests
// and for the `tandem demo` command. It works on Linux only.
//
// Each Cluster is a private postmaster listening only on 127.0.0.1 at a
// random free port, with a superuser "postgres", trust authentication and
// its Unix socket in its own directory. The data directory lives in a
// temporary directory owned by the Cluster and removed by Destroy. Clusters
// are tuned for speed, not durability (fsync=off and friends): committed data
// survives Stop and Restart, but not an operating-system crash, and Kill
// (kill -9) loses the last commits unless the cluster runs with
// synchronous_commit=on (Options.Settings), which a test that kills a store
// and counts its rows needs.
//
// Starting a cluster is fast because the result of initdb is kept in a
// per-version, per-user template directory that all processes on the machine
// share; each new cluster starts from a private copy of it. The template and
// the cluster directories live in $TMPDIR if that is set, otherwise in
// /dev/shm when it is a tmpfs with at least 2 GiB free (creating a data
// directory's thousand-odd files there is several times cheaper than on a
// disk), otherwise in /tmp.
//
// Servers never outlive the process that started them: if it dies without
// calling Destroy (a test timeout, Ctrl-C), the kernel kills its servers, and
// the next process to start a cluster removes the directories left behind.
// To be able to reap the server processes it kills, the first process to
// start a cluster becomes a child subreaper (PR_SET_CHILD_SUBREAPER), so
// orphaned descendants of any of its children are re-parented to it rather
// than to init.
//
// When the calling process runs as root, the servers run as the OS user
// "postgres", which must exist.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sync/errgroup"
)

// Options tune a cluster. The zero value is fine.
type Options struct {
	// Settings are extra postgresql.conf settings (name -> value), applied over the defaults.
	Settings map[string]string
	// Logf, if set, receives progress lines (e.g. t.Logf). nil = silent.
	Logf func(format string, args ...any)
}

// defaultSettings are the postgresql.conf settings every cluster starts
// with, before Options.Settings are applied.
var defaultSettings = map[string]string{
	"fsync":                     "off",
	"synchronous_commit":        "off",
	"full_page_writes":          "off",
	"wal_level":                 "logical",
	"max_prepared_transactions": "64",
	"max_connections":           "600",
	"shared_buffers":            "32MB",
	"max_wal_senders":           "10",
	"max_replication_slots":     "10",
	"log_min_messages":          "warning",
	"logging_collector":         "off",
	// Dynamic shared memory lives in files inside the data directory rather
	// than in /dev/shm, so that a killed server leaves nothing behind outside
	// Dir.
	"dynamic_shared_memory_type": "mmap",
}

// DefaultSettings returns (a copy of) the postgresql.conf settings every
// cluster starts with; Options.Settings are applied over them. The settings
// port, listen_addresses and unix_socket_directories are managed by the
// Cluster and cannot be overridden.
func DefaultSettings() map[string]string {
	return maps.Clone(defaultSettings)
}

// reservedSettings are owned by the Cluster itself and cannot be overridden.
var reservedSettings = []string{"port", "listen_addresses", "unix_socket_directories"}

// defaultTimeout bounds Start, Restart and Stop when the context has no deadline.
const defaultTimeout = 30 * time.Second

// host is the only address clusters listen on.
const host = "127.0.0.1"

// Cluster is one throwaway PostgreSQL server. Methods are safe for concurrent use.
//
// A Cluster is running when Start returns it. Stop and Kill end the server
// process (and all of its children) but keep the data directory, so Restart
// can bring the same cluster back on the same port. Destroy ends the server
// and removes everything; after Destroy only the accessors and Destroy itself
// remain meaningful.
type Cluster struct {
	env      *serverEnv
	dir      string // temp dir owned by the cluster
	dataDir  string // dir/data
	logPath  string // dir/postgres.log
	port     int    // fixed once Start returns
	settings map[string]string
	logf     func(format string, args ...any)

	opMu sync.Mutex // serializes lifecycle operations (start, stop, kill, destroy)

	mu        sync.Mutex // guards the fields below
	proc      *process
	destroyed bool
}

// BinDir returns the directory holding the PostgreSQL server binaries that
// clusters use: $PG_BINDIR if set, else `pg_config --bindir`, else the newest
// /usr/lib/postgresql/*/bin that contains initdb.
func BinDir() (string, error) {
	return resolveBinDir()
}

// Start creates and starts a new cluster. On success the server accepts
// connections; on failure nothing is left running or on disk. The context
// bounds the whole operation (30 s if it has no deadline); it does not bound
// the lifetime of the server, which runs until Stop, Kill or Destroy (or until
// the calling process exits).
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	began := time.Now()

	settings, err := mergeSettings(opts.Settings)
	if err != nil {
		return nil, err
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	env, err := environment()
	if err != nil {
		return nil, err
	}

	sweepOnce.Do(func() { sweepStale(env.base, logf) })
	dir, err := os.MkdirTemp(env.base, clusterDirPrefix)
	if err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	if err := writeOwner(dir); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	c := &Cluster{
		env:      env,
		dir:      dir,
		dataDir:  filepath.Join(dir, "data"),
		logPath:  filepath.Join(dir, "postgres.log"),
		settings: settings,
		logf:     logf,
	}
	ok := false
	defer func() {
		if !ok {
			_ = c.destroy()
		}
	}()
	if err := env.chown(dir); err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	if err := populateDataDir(ctx, env, c.dataDir, logf); err != nil {
		return nil, err
	}
	if err := c.writeConfig(); err != nil {
		return nil, err
	}

	const portAttempts = 5
	for attempt := 1; ; attempt++ {
		if c.port, err = reservePort(); err != nil {
			return nil, err
		}
		if err := c.writeSettings(); err != nil {
			return nil, err
		}
		err := c.launch(ctx)
		if err == nil {
			break
		}
		if errors.Is(err, errAddrInUse) && attempt < portAttempts && ctx.Err() == nil {
			logf("pgtest: port %d was taken, retrying with another", c.port)
			releasePort(c.port)
			c.port = 0
			continue
		}
		return nil, err
	}
	ok = true
	logf("pgtest: PostgreSQL %s ready at %s:%d in %v (dir %s)", env.version, host, c.port, time.Since(began).Round(time.Millisecond), dir)
	return c, nil
}

// StartPair starts two independent clusters concurrently with the same
// options, conventionally the "old" and "new" side of a migration. Either
// both are returned running or neither is left behind.
func StartPair(ctx context.Context, opts Options) (old, new *Cluster, err error) {
	var a, b *Cluster
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		var err error
		a, err = Start(gctx, opts)
		return err
	})
	g.Go(func() error {
		var err error
		b, err = Start(gctx, opts)
		return err
	})
	if err := g.Wait(); err != nil {
		for _, c := range []*Cluster{a, b} {
			if c != nil {
				_ = c.Destroy()
			}
		}
		return nil, nil, err
	}
	return a, b, nil
}

// New starts a cluster for the duration of a test: it is destroyed by
// t.Cleanup, and a start failure fails the test immediately. Progress is
// logged with t.Logf unless the options say otherwise. Several Options are
// merged, later ones winning.
func New(t testing.TB, opts ...Options) *Cluster {
	t.Helper()
	c, err := Start(t.Context(), testOptions(t, opts))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { destroyInCleanup(t, c) })
	return c
}

// NewPair is StartPair for the duration of a test, with the same cleanup and
// failure behaviour as New.
func NewPair(t testing.TB, opts ...Options) (old, new *Cluster) {
	t.Helper()
	a, b, err := StartPair(t.Context(), testOptions(t, opts))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		destroyInCleanup(t, a)
		destroyInCleanup(t, b)
	})
	return a, b
}

func testOptions(t testing.TB, opts []Options) Options {
	merged := Options{Logf: t.Logf}
	for _, o := range opts {
		if o.Logf != nil {
			merged.Logf = o.Logf
		}
		if len(o.Settings) > 0 {
			if merged.Settings == nil {
				merged.Settings = map[string]string{}
			}
			maps.Copy(merged.Settings, o.Settings)
		}
	}
	return merged
}

func destroyInCleanup(t testing.TB, c *Cluster) {
	t.Helper()
	if err := c.Destroy(); err != nil {
		t.Errorf("pgtest: %v", err)
	}
}

// Host returns the address the server listens on, always "127.0.0.1".
func (c *Cluster) Host() string { return host }

// Port returns the TCP port of the server. It never changes, including across Restart.
func (c *Cluster) Port() int { return c.port }

// Dir returns the cluster's private temporary directory. It holds the data
// directory, the server log and the Unix socket, and is removed by Destroy.
func (c *Cluster) Dir() string { return c.dir }

// DataDir returns the server's data directory (inside Dir).
func (c *Cluster) DataDir() string { return c.dataDir }

// LogPath returns the file the server writes its log to (inside Dir).
func (c *Cluster) LogPath() string { return c.logPath }

// Version returns the PostgreSQL server version, e.g. "15.19".
func (c *Cluster) Version() string { return c.env.version }

// DSN returns a libpq/pgx connection URL for database db as the superuser
// "postgres"; db "" means "postgres".
func (c *Cluster) DSN(db string) string {
	if db == "" {
		db = "postgres"
	}
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User("postgres"),
		Host:     fmt.Sprintf("%s:%d", host, c.port),
		Path:     "/" + db,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// PID returns the process id of the postmaster, or 0 when the server is not running.
func (c *Cluster) PID() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil || c.proc.done() {
		return 0
	}
	return c.proc.cmd.Process.Pid
}

// Running reports whether the postmaster is alive. It turns false after Stop,
// Kill or Destroy, and also if the server died on its own.
func (c *Cluster) Running() bool {
	return c.PID() != 0
}

// Stop shuts the server down cleanly ("fast" shutdown: open sessions are
// disconnected, a shutdown checkpoint is written) and waits until the server
// and all its children are gone. It is a no-op if the server is not running.
// If ctx ends first (30 s if it has no deadline), the server is killed as
// by Kill and the context's error is returned.
func (c *Cluster) Stop(ctx context.Context) error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	return c.stop(ctx)
}

func (c *Cluster) stop(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	p := c.takeProc()
	if p == nil {
		return nil
	}
	if err := p.stop(ctx); err != nil {
		c.logf("pgtest: %s:%d did not shut down in time; killed it", host, c.port)
		return fmt.Errorf("pgtest: stopping server on port %d: %w", c.port, err)
	}
	c.logf("pgtest: stopped %s:%d", host, c.port)
	return nil
}

// Kill simulates a crash: it SIGKILLs the postmaster and all of its
// children and waits until they are gone. The data directory is left as a
// crash leaves it, so Restart performs crash recovery. It is a no-op if the
// server is not running.
func (c *Cluster) Kill() error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	if p := c.takeProc(); p != nil {
		p.kill()
		c.logf("pgtest: killed %s:%d", host, c.port)
	}
	return nil
}

// Restart starts the server again on the same port and data directory,
// after Stop, Kill or a crash; a running server is stopped first as by Stop.
// On success the server accepts connections (after crash recovery, if
// needed). The context bounds the operation as for Start.
func (c *Cluster) Restart(ctx context.Context) error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	if c.isDestroyed() {
		return errors.New("pgtest: Restart on a destroyed cluster")
	}
	if err := c.stop(ctx); err != nil {
		return err
	}
	reapAdopted()
	began := time.Now()
	// The port can be briefly unavailable (a client socket may hold it), and
	// children of a postmaster that died on its own may still hold its shared
	// memory for a moment; both clear up by themselves, so keep trying until
	// the deadline.
	var transient error // the latest failure worth retrying
	for {
		err := c.launch(ctx)
		if err == nil {
			break
		}
		if errors.Is(err, errAddrInUse) || errors.Is(err, errShmemInUse) {
			transient = err
		} else if transient == nil || ctx.Err() == nil {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("pgtest: gave up restarting on port %d: %w; last failure: %w", c.port, ctx.Err(), transient)
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	c.logf("pgtest: restarted %s:%d in %v", host, c.port, time.Since(began).Round(time.Millisecond))
	return nil
}

// Destroy ends the server if it is running (without a clean shutdown) and
// removes the cluster's directory and any shared memory it left behind.
// It is idempotent: calls after a successful one return nil.
func (c *Cluster) Destroy() error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	if c.isDestroyed() {
		return nil
	}
	if err := c.destroy(); err != nil {
		return err
	}
	c.logf("pgtest: destroyed %s:%d", host, c.port)
	return nil
}

func (c *Cluster) destroy() error {
	if p := c.takeProc(); p != nil {
		p.kill()
	}
	reapAdopted()
	removeLeftoverShmem(c.dataDir)
	if err := os.RemoveAll(c.dir); err != nil {
		return fmt.Errorf("pgtest: removing %s: %w", c.dir, err)
	}
	c.mu.Lock()
	c.destroyed = true
	c.mu.Unlock()
	releasePort(c.port)
	return nil
}

func (c *Cluster) isDestroyed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.destroyed
}

// takeProc detaches the current server process from the cluster, returning
// nil if there is none.
func (c *Cluster) takeProc() *process {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.proc
	c.proc = nil
	return p
}

// CreateDatabase creates database name. The name is used verbatim (quoted),
// so capitals and other characters are kept.
func (c *Cluster) CreateDatabase(ctx context.Context, name string) error {
	return c.Exec(ctx, "postgres", "CREATE DATABASE "+QuoteIdent(name))
}

// Exec runs sql in database db on a fresh connection that is closed
// afterwards. sql may contain several statements; it is sent with the simple
// query protocol, so it runs as one implicit transaction unless it contains
// explicit transaction control. Server errors are returned as *pgconn.PgError
// (wrapped).
func (c *Cluster) Exec(ctx context.Context, db, sql string) error {
	conn, err := c.Connect(ctx, db)
	if err != nil {
		return err
	}
	_, execErr := conn.Exec(ctx, sql).ReadAll()
	closeErr := conn.Close(ctx)
	if execErr != nil {
		return fmt.Errorf("pgtest: exec in database %q on port %d: %w", dbName(db), c.port, execErr)
	}
	return closeErr
}

// Connect opens a new connection to database db ("" means "postgres") as the
// superuser. The caller owns the connection and must close it.
func (c *Cluster) Connect(ctx context.Context, db string) (*pgconn.PgConn, error) {
	conn, err := pgconn.Connect(ctx, c.DSN(db))
	if err != nil {
		return nil, fmt.Errorf("pgtest: connecting to database %q on port %d: %w", dbName(db), c.port, err)
	}
	return conn, nil
}

func dbName(db string) string {
	if db == "" {
		return "postgres"
	}
	return db
}

// QuoteIdent quotes s as an SQL identifier.
func QuoteIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

var settingName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

func mergeSettings(extra map[string]string) (map[string]string, error) {
	merged := maps.Clone(defaultSettings)
	for name, value := range extra {
		if !settingName.MatchString(name) {
			return nil, fmt.Errorf("pgtest: invalid setting name %q", name)
		}
		name = strings.ToLower(name)
		if slices.Contains(reservedSettings, name) {
			return nil, fmt.Errorf("pgtest: setting %q is managed by pgtest and cannot be overridden", name)
		}
		merged[name] = value
	}
	return merged, nil
}

// quoteConfValue quotes v as a postgresql.conf string value.
func quoteConfValue(v string) string {
	v = strings.ReplaceAll(v, `\`, `\\`)
	v = strings.ReplaceAll(v, `'`, `''`)
	v = strings.ReplaceAll(v, "\n", `\n`)
	v = strings.ReplaceAll(v, "\r", `\r`)
	return "'" + v + "'"
}

const settingsFile = "pgtest.conf"

const hbaConf = `# Written by pgtest: trust everything, loopback only.
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
`

// writeConfig installs pg_hba.conf and makes postgresql.conf include the
// settings file written by writeSettings.
func (c *Cluster) writeConfig() error {
	if err := c.env.writeFile(filepath.Join(c.dataDir, "pg_hba.conf"), []byte(hbaConf)); err != nil {
		return err
	}
	conf := filepath.Join(c.dataDir, "postgresql.conf")
	f, err := os.OpenFile(conf, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	_, err = fmt.Fprintf(f, "\n# Added by pgtest; settings there override the ones above.\ninclude '%s'\n", settingsFile)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	return nil
}

// writeSettings writes the settings file for the current port.
func (c *Cluster) writeSettings() error {
	var b strings.Builder
	b.WriteString("# Written by pgtest.\n")
	for _, name := range slices.Sorted(maps.Keys(c.settings)) {
		fmt.Fprintf(&b, "%s = %s\n", name, quoteConfValue(c.settings[name]))
	}
	fmt.Fprintf(&b, "listen_addresses = %s\n", quoteConfValue(host))
	fmt.Fprintf(&b, "port = %d\n", c.port)
	fmt.Fprintf(&b, "unix_socket_directories = %s\n", quoteConfValue(c.dir))
	return c.env.writeFile(filepath.Join(c.dataDir, settingsFile), []byte(b.String()))
}

func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, defaultTimeout)
}

// Ports handed to clusters of this process that are not yet destroyed, so
// that two clusters started at the same moment never pick the same one.
var (
	portsMu sync.Mutex
	ports   = map[int]bool{}
)

func reservePort() (int, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 100 {
		p, err := pickPort()
		if err != nil {
			return 0, err
		}
		if !ports[p] {
			ports[p] = true
			return p, nil
		}
	}
	return 0, errors.New("pgtest: no free port found")
}

// pickPort proposes a port; tests replace it to provoke port collisions.
var pickPort = freePort

func releasePort(p int) {
	if p == 0 {
		return
	}
	portsMu.Lock()
	defer portsMu.Unlock()
	delete(ports, p)
}
