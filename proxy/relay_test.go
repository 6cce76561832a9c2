package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"golang.org/x/sync/errgroup"
)

// TestQueryModes runs the same statements through the proxy in every pgx
// query mode: simple protocol, extended with and without a statement cache,
// and explicitly prepared statements.
func TestQueryModes(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db)
	ctx := context.Background()
	setup, err := pgx.Connect(ctx, p.dsn(db))
	if err != nil {
		t.Fatal(err)
	}
	defer setup.Close(ctx)
	if _, err := setup.Exec(ctx, `CREATE TABLE items (id int PRIMARY KEY, name text, price numeric, tags text[], meta jsonb)`); err != nil {
		t.Fatal(err)
	}
	modes := map[string]pgx.QueryExecMode{
		"simple":          pgx.QueryExecModeSimpleProtocol,
		"exec":            pgx.QueryExecModeExec,
		"cache_statement": pgx.QueryExecModeCacheStatement,
		"cache_describe":  pgx.QueryExecModeCacheDescribe,
		"describe_exec":   pgx.QueryExecModeDescribeExec,
	}
	base := 0
	for name, mode := range modes {
		t.Run(name, func(t *testing.T) {
			cfg, err := pgx.ParseConfig(p.dsn(db))
			if err != nil {
				t.Fatal(err)
			}
			cfg.DefaultQueryExecMode = mode
			conn, err := pgx.ConnectConfig(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			base += 100
			for i := range 20 {
				id := base + i
				if _, err := conn.Exec(ctx, `INSERT INTO items VALUES ($1, $2, $3, $4, $5)`,
					id, fmt.Sprintf("item %d 'q' \"dq\"", id), "12.50", []string{"a", "b,c"}, fmt.Sprintf(`{"k": %d}`, i)); err != nil {
					t.Fatal(err)
				}
			}
			var n int
			var sum string
			if err := conn.QueryRow(ctx, `SELECT count(*), sum(price)::text FROM items WHERE id >= $1 AND id < $2`, base, base+100).Scan(&n, &sum); err != nil {
				t.Fatal(err)
			}
			if n != 20 || sum != "250.00" {
				t.Fatalf("got %d rows, sum %s; want 20, 250.00", n, sum)
			}
			var tags []string
			var name string
			if err := conn.QueryRow(ctx, `SELECT name, tags FROM items WHERE id = $1`, base+3).Scan(&name, &tags); err != nil {
				t.Fatal(err)
			}
			if name != fmt.Sprintf("item %d 'q' \"dq\"", base+3) || len(tags) != 2 || tags[1] != "b,c" {
				t.Fatalf("round trip changed values: %q %q", name, tags)
			}
			// Explicit prepared statement, used several times, then deallocated.
			if _, err := conn.Prepare(ctx, "byid", `SELECT name FROM items WHERE id = $1`); err != nil {
				t.Fatal(err)
			}
			for i := range 5 {
				if err := conn.QueryRow(ctx, "byid", base+i).Scan(&name); err != nil {
					t.Fatal(err)
				}
			}
			if err := conn.Deallocate(ctx, "byid"); err != nil {
				t.Fatal(err)
			}
			// A batch is pipelined: many Parse/Bind/Execute with one Sync.
			batch := &pgx.Batch{}
			for i := range 10 {
				batch.Queue(`UPDATE items SET price = price + 1 WHERE id = $1`, base+i)
			}
			batch.Queue(`SELECT sum(price)::text FROM items WHERE id >= $1 AND id < $2`, base, base+100)
			br := conn.SendBatch(ctx, batch)
			for range 10 {
				if _, err := br.Exec(); err != nil {
					t.Fatal(err)
				}
			}
			if err := br.QueryRow().Scan(&sum); err != nil {
				t.Fatal(err)
			}
			if err := br.Close(); err != nil {
				t.Fatal(err)
			}
			if sum != "260.00" {
				t.Fatalf("after batch sum = %s, want 260.00", sum)
			}
		})
	}
	// Every write landed on the store itself.
	direct, err := pgx.Connect(ctx, shared.DSN(db))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(ctx)
	var n int
	if err := direct.QueryRow(ctx, `SELECT count(*) FROM items`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 20*len(modes) {
		t.Fatalf("store has %d rows, want %d", n, 20*len(modes))
	}
}

// TestLargeRow moves a 50 MB value in both directions: a Bind message and a
// DataRow far larger than the relay buffer are streamed through.
func TestLargeRow(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, p.dsn(db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `CREATE TABLE blobs (id int PRIMARY KEY, v text)`); err != nil {
		t.Fatal(err)
	}
	big := strings.Repeat("0123456789abcdefghijklmnopqrstuvwxyz-", 50<<20/37+1)[:50<<20]
	want := sha256.Sum256([]byte(big))
	if _, err := conn.Exec(ctx, `INSERT INTO blobs VALUES (1, $1)`, big); err != nil {
		t.Fatal(err)
	}
	var serverHash string
	var n int
	if err := conn.QueryRow(ctx, `SELECT encode(sha256(convert_to(v, 'UTF8')), 'hex'), length(v) FROM blobs WHERE id = 1`).Scan(&serverHash, &n); err != nil {
		t.Fatal(err)
	}
	if n != len(big) || serverHash != hex.EncodeToString(want[:]) {
		t.Fatalf("store holds %d bytes with hash %s; sent %d bytes", n, serverHash, len(big))
	}
	var back string
	if err := conn.QueryRow(ctx, `SELECT v FROM blobs WHERE id = 1`).Scan(&back); err != nil {
		t.Fatal(err)
	}
	if got := sha256.Sum256([]byte(back)); got != want {
		t.Fatalf("value read back through the proxy differs (%d bytes)", len(back))
	}
}

// TestManySessions holds 500 client sessions open at once, each paired with
// its own upstream backend.
func TestManySessions(t *testing.T) {
	const sessions = 500
	db := newDB(t)
	p := startProxy(t, shared, db)
	ctx := context.Background()
	conns := make([]*pgconn.PgConn, sessions)
	pids := make([]string, sessions)
	var g errgroup.Group
	g.SetLimit(64)
	for i := range sessions {
		g.Go(func() error {
			c, err := pgconn.Connect(ctx, p.dsn(db))
			if err != nil {
				return err
			}
			conns[i] = c
			res, err := c.Exec(ctx, "SELECT pg_backend_pid()").ReadAll()
			if err != nil {
				return err
			}
			pids[i] = string(res[0].Rows[0][0])
			return nil
		})
	}
	err := g.Wait()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close(ctx)
			}
		}
	}()
	if err != nil {
		t.Fatal(err)
	}
	if got := p.srv.Sessions(); got != sessions {
		t.Fatalf("proxy reports %d sessions, want %d", got, sessions)
	}
	distinct := map[string]bool{}
	for _, pid := range pids {
		distinct[pid] = true
	}
	if len(distinct) != sessions {
		t.Fatalf("%d distinct backends for %d sessions", len(distinct), sessions)
	}
	// All of them still work while all are open.
	for i := 0; i < sessions; i += 25 {
		if got := queryOne(t, conns[i], "SELECT pg_backend_pid()"); got != pids[i] {
			t.Fatalf("session %d moved from backend %s to %s", i, pids[i], got)
		}
	}
}

// TestCancel cancels a running pg_sleep(10) through the proxy, the way pgx
// and psql do: a CancelRequest with the key the proxy handed out.
func TestCancel(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db)
	conn, err := pgx.Connect(context.Background(), p.dsn(db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = conn.Exec(ctx, "SELECT pg_sleep(10)")
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("cancel took %s", took)
	}
	if err == nil {
		t.Fatal("pg_sleep(10) was not cancelled")
	}
	// The server's own answer to a cancel is 57014.
	raw := p.connect(t, db)
	rr := raw.Exec(context.Background(), "SELECT pg_sleep(10)")
	time.AfterFunc(200*time.Millisecond, func() { _ = raw.CancelRequest(context.Background()) })
	_, err = rr.ReadAll()
	if got := sqlState(err); got != "57014" {
		t.Fatalf("cancelled query: got %v (SQLSTATE %q), want 57014", err, got)
	}
	if got := queryOne(t, raw, "SELECT 'alive'"); got != "alive" {
		t.Fatalf("session unusable after cancel: %q", got)
	}
	// A cancel with a wrong key is ignored and harms nothing.
	bogus := p.connect(t, db)
	res := bogus.Exec(context.Background(), "SELECT pg_sleep(0.3), 'finished'")
	sendCancel(t, p.addr, 12345, []byte{1, 2, 3, 4})
	rows, err := res.ReadAll()
	if err != nil || string(rows[0].Rows[0][1]) != "finished" {
		t.Fatalf("unrelated session disturbed: %v", err)
	}
}

// TestNotifications delivers LISTEN/NOTIFY and notices through the proxy.
func TestNotifications(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var notices []string
	cfg, err := pgconn.ParseConfig(p.dsn(db))
	if err != nil {
		t.Fatal(err)
	}
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, n.Message) }
	listener, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close(ctx)
	if _, err := listener.Exec(ctx, `LISTEN "Orders Channel"`).ReadAll(); err != nil {
		t.Fatal(err)
	}
	other := p.connect(t, db)
	if _, err := other.Exec(ctx, `NOTIFY "Orders Channel", 'order 42'`).ReadAll(); err != nil {
		t.Fatal(err)
	}
	if err := listener.WaitForNotification(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := listener.Exec(ctx, `DO $$BEGIN RAISE NOTICE 'hello from %', 'plpgsql'; END$$`).ReadAll(); err != nil {
		t.Fatal(err)
	}
	if len(notices) != 1 || notices[0] != "hello from plpgsql" {
		t.Fatalf("notices = %q", notices)
	}
	// ParameterStatus follows SET of a reported parameter.
	if _, err := listener.Exec(ctx, `SET application_name = 'renamed'`).ReadAll(); err != nil {
		t.Fatal(err)
	}
	if got := listener.ParameterStatus("application_name"); got != "renamed" {
		t.Fatalf("application_name ParameterStatus = %q", got)
	}
}

// TestPsqlScript runs one psql script directly and through the proxy and
// requires identical output, errors and notices included.
func TestPsqlScript(t *testing.T) {
	bin, err := pgtest.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	psql := filepath.Join(bin, "psql")
	script := `\set ON_ERROR_STOP 0
CREATE TABLE people (id serial PRIMARY KEY, name text NOT NULL, born date);
INSERT INTO people (name, born) VALUES ('Ada', '1815-12-10'), ('Grace', '1906-12-09');
COPY people (name, born) FROM STDIN;
Edsger	1930-05-11
Barbara	1939-11-07
\.
SELECT id, name, born FROM people ORDER BY id;
SELECT 1/0;
BEGIN;
UPDATE people SET name = upper(name) WHERE id = 1;
SELECT * FROM missing_table;
SELECT 1;
ROLLBACK;
DO $$BEGIN RAISE NOTICE 'people: %', (SELECT count(*) FROM people); END$$;
COPY (SELECT name FROM people ORDER BY id) TO STDOUT;
\copy people (name) FROM STDIN
Tony
\.
SELECT count(*) FROM people;
\gset
PREPARE q(int) AS SELECT name FROM people WHERE id = $1;
EXECUTE q(2);
`
	dir, err := os.MkdirTemp("", "tandem-psql-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "script.sql")
	if err := os.WriteFile(file, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(dsn string) string {
		cmd := exec.Command(psql, "-X", "-q", "-f", file, dsn)
		cmd.Env = append(os.Environ(), "PGTZ=UTC", "PGOPTIONS=", "LC_ALL=C")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("psql: %v\n%s", err, out)
		}
		return string(out)
	}
	dbDirect, dbProxy := newDB(t), newDB(t)
	p := startProxy(t, shared, dbProxy)
	direct := run(shared.DSN(dbDirect))
	proxied := run(p.dsn(dbProxy))
	if direct != proxied {
		t.Fatalf("psql output differs\n--- direct\n%s\n--- through tandem\n%s", direct, proxied)
	}
	for _, want := range []string{"division by zero", "current transaction is aborted", "people: 4", "Edsger"} {
		if !strings.Contains(proxied, want) {
			t.Errorf("psql output lacks %q:\n%s", want, proxied)
		}
	}
}

// TestPgbench initialises pgbench through the proxy and runs it in each
// protocol mode; no transaction may fail.
func TestPgbench(t *testing.T) {
	if testing.Short() {
		t.Skip("pgbench run skipped in -short mode")
	}
	bin, err := pgtest.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	pgbench := filepath.Join(bin, "pgbench")
	db := newDB(t)
	p := startProxy(t, shared, db)
	host, port := strings.Split(p.addr, ":")[0], strings.Split(p.addr, ":")[1]
	pg := func(args ...string) string {
		cmd := exec.Command(pgbench, append([]string{"-h", host, "-p", port, "-U", "postgres"}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("pgbench %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	pg("-i", "-q", "-s", "1", db)
	processed := regexp.MustCompile(`number of transactions actually processed: (\d+)`)
	failed := regexp.MustCompile(`number of failed transactions: (\d+)`)
	for _, mode := range []string{"simple", "extended", "prepared"} {
		for _, script := range [][]string{{"-S"}, {}} {
			args := append([]string{"-n", "-M", mode, "-c", "4", "-j", "2", "-t", "200"}, script...)
			out := pg(append(args, db)...)
			m := processed.FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("pgbench %v: no result line\n%s", args, out)
			}
			if n, _ := strconv.Atoi(m[1]); n != 800 {
				t.Fatalf("pgbench %v processed %d transactions, want 800\n%s", args, n, out)
			}
			if f := failed.FindStringSubmatch(out); f != nil && f[1] != "0" {
				t.Fatalf("pgbench %v: %s failed transactions\n%s", args, f[1], out)
			}
		}
	}
	// The tpcb-like runs changed the balances on the store itself.
	conn, err := pgconn.Connect(context.Background(), shared.DSN(db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if got := queryOne(t, conn, "SELECT count(*) FROM pgbench_history"); got != "2400" {
		t.Fatalf("pgbench_history has %s rows, want 2400", got)
	}
}

// TestSessionLimit refuses the session over the cap with 53300 and admits a
// new one once a slot frees.
func TestSessionLimit(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db, func(c *config.Config) { c.Limits.MaxClientSessions = 2 })
	a := p.connect(t, db)
	b := p.connect(t, db)
	_, err := pgconn.Connect(context.Background(), p.dsn(db))
	if got := sqlState(err); got != "53300" {
		t.Fatalf("third session: %v (SQLSTATE %q), want 53300", err, got)
	}
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	succeedsSoon(t, func() error {
		c, err := pgconn.Connect(context.Background(), p.dsn(db))
		if err != nil {
			return err
		}
		return c.Close(context.Background())
	})
	if got := queryOne(t, b, "SELECT 'still here'"); got != "still here" {
		t.Fatal(got)
	}
}

// TestShutdownDrain: on Shutdown an idle session is closed at once with
// 57P01, a session inside a transaction may finish and commit, and is
// closed right after; new connections are refused.
func TestShutdownDrain(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db, func(c *config.Config) { c.Limits.DrainTimeout = config.Duration(30 * time.Second) })
	ctx := context.Background()
	idle := p.connect(t, db)
	busy := p.connect(t, db)
	if _, err := busy.Exec(ctx, "CREATE TABLE drained (id int)").ReadAll(); err != nil {
		t.Fatal(err)
	}
	if _, err := busy.Exec(ctx, "BEGIN; INSERT INTO drained VALUES (1)").ReadAll(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.srv.Shutdown(ctx) }()
	// The idle session ends with 57P01.
	succeedsSoon(t, func() error {
		if p.srv.Sessions() != 1 {
			return fmt.Errorf("%d sessions open", p.srv.Sessions())
		}
		return nil
	})
	_, err := idle.Exec(ctx, "SELECT 1").ReadAll()
	if got := sqlState(err); got != "57P01" {
		t.Fatalf("idle session: %v (SQLSTATE %q), want 57P01", err, got)
	}
	// New sessions are refused.
	if c, err := pgconn.Connect(ctx, p.dsn(db)); err == nil {
		c.Close(ctx)
		t.Fatal("a new session was accepted while draining")
	}
	// The transaction goes on and commits.
	if _, err := busy.Exec(ctx, "INSERT INTO drained VALUES (2)").ReadAll(); err != nil {
		t.Fatal(err)
	}
	if _, err := busy.Exec(ctx, "COMMIT").ReadAll(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	_, err = busy.Exec(ctx, "SELECT 1").ReadAll()
	if got := sqlState(err); got != "57P01" {
		t.Fatalf("after commit: %v (SQLSTATE %q), want 57P01", err, got)
	}
	direct, err := shared.Connect(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(ctx)
	if got := queryOne(t, direct, "SELECT count(*) FROM drained"); got != "2" {
		t.Fatalf("committed rows = %s, want 2", got)
	}
}

// TestShutdownDrainTimeout closes a transaction that outlives the drain
// timeout; the store rolls it back.
func TestShutdownDrainTimeout(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db, func(c *config.Config) { c.Limits.DrainTimeout = config.Duration(300 * time.Millisecond) })
	ctx := context.Background()
	busy := p.connect(t, db)
	if _, err := busy.Exec(ctx, "CREATE TABLE abandoned (id int)").ReadAll(); err != nil {
		t.Fatal(err)
	}
	if _, err := busy.Exec(ctx, "BEGIN; INSERT INTO abandoned VALUES (1)").ReadAll(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := p.srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < 300*time.Millisecond || took > 5*time.Second {
		t.Fatalf("Shutdown took %s with a 300ms drain timeout", took)
	}
	_, err := busy.Exec(ctx, "COMMIT").ReadAll()
	if got := sqlState(err); got != "57P01" {
		t.Fatalf("COMMIT after drain timeout: %v (SQLSTATE %q), want 57P01", err, got)
	}
	direct, err := shared.Connect(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(ctx)
	succeedsSoon(t, func() error {
		if n := queryOne(t, direct, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"); n != "0" {
			return fmt.Errorf("%s upstream backends left", n)
		}
		return nil
	})
	if got := queryOne(t, direct, "SELECT count(*) FROM abandoned"); got != "0" {
		t.Fatalf("uncommitted row survived: %s rows", got)
	}
}

// TestIdleSessionTimeout closes idle sessions with 57P05 but not sessions
// running a long statement or sitting in a transaction.
func TestIdleSessionTimeout(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db, func(c *config.Config) { c.Limits.IdleSessionTimeout = config.Duration(300 * time.Millisecond) })
	ctx := context.Background()
	idle := p.connect(t, db)
	busy := p.connect(t, db)
	intx := p.connect(t, db)
	if _, err := intx.Exec(ctx, "BEGIN").ReadAll(); err != nil {
		t.Fatal(err)
	}
	if got := queryOne(t, busy, "SELECT pg_sleep(0.8)::text || 'done'"); got != "done" {
		t.Fatalf("long statement: %q", got)
	}
	_, err := idle.Exec(ctx, "SELECT 1").ReadAll()
	if got := sqlState(err); got != "57P05" {
		t.Fatalf("idle session: %v (SQLSTATE %q), want 57P05", err, got)
	}
	if got := queryOne(t, intx, "SELECT 'in tx'"); got != "in tx" {
		t.Fatalf("session in a transaction was closed: %q", got)
	}
}

// TestUpstreamErrors relays the store's own startup errors (unknown
// database) and reports an unreachable store with 08006.
func TestUpstreamErrors(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db)
	_, err := pgconn.Connect(context.Background(), p.dsn("no_such_db"))
	if got := sqlState(err); got != "3D000" {
		t.Fatalf("unknown database: %v (SQLSTATE %q), want 3D000", err, got)
	}
	dead := startProxy(t, shared, db, func(c *config.Config) {
		c.Old.DSN = "postgres://postgres@127.0.0.1:1/x?sslmode=disable"
		c.Limits.ConnectTimeout = config.Duration(2 * time.Second)
	})
	_, err = pgconn.Connect(context.Background(), dead.dsn("x"))
	if got := sqlState(err); got != "08006" {
		t.Fatalf("unreachable store: %v (SQLSTATE %q), want 08006", err, got)
	}
}

// TestStoreRestart: when the store goes away under a session, the client
// gets an error, not a hang, and new sessions work once it is back.
func TestStoreRestart(t *testing.T) {
	c := pgtest.New(t)
	p := startProxy(t, c, "postgres")
	ctx := context.Background()
	s := p.connect(t, "postgres")
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	_, err := s.Exec(ctx, "SELECT 1").ReadAll()
	if err == nil {
		t.Fatal("query succeeded on a killed store")
	}
	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	s2 := p.connect(t, "postgres")
	if got := queryOne(t, s2, "SELECT 'back'"); got != "back" {
		t.Fatal(got)
	}
}

// sendCancel sends a raw CancelRequest to the proxy.
func sendCancel(t testing.TB, addr string, pid uint32, secret []byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := binary.BigEndian.AppendUint32(nil, uint32(12+len(secret)))
	msg = binary.BigEndian.AppendUint32(msg, 80877102)
	msg = binary.BigEndian.AppendUint32(msg, pid)
	msg = append(msg, secret...)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("cancel connection: read %d bytes, %v; want EOF", n, err)
	}
}

// TestBackendPID: the PID a client is told in BackendKeyData is its
// backend's, so self-notifications can be recognised as PostgreSQL clients do.
func TestBackendPID(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db)
	ctx := context.Background()
	c := p.connect(t, db)
	if got := queryOne(t, c, "SELECT pg_backend_pid()"); got != strconv.FormatUint(uint64(c.PID()), 10) {
		t.Fatalf("pg_backend_pid() = %s, BackendKeyData says %d", got, c.PID())
	}
	var from uint32
	c2, err := pgconn.ConnectConfig(ctx, func() *pgconn.Config {
		pc, _ := pgconn.ParseConfig(p.dsn(db))
		pc.OnNotification = func(_ *pgconn.PgConn, n *pgconn.Notification) { from = n.PID }
		return pc
	}())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close(ctx)
	if _, err := c2.Exec(ctx, "LISTEN self2; NOTIFY self2, 'me'").ReadAll(); err != nil {
		t.Fatal(err)
	}
	if from != c2.PID() {
		t.Fatalf("self-notification from PID %d, session was told %d", from, c2.PID())
	}
}
