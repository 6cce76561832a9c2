package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	code := m.Run()
	// Every server this process started must be gone.
	for _, p := range descendants(os.Getpid()) {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.pid)); err == nil && strings.Contains(string(b), "postgres") {
			fmt.Fprintf(os.Stderr, "pgtest: leftover process %d: %q\n", p.pid, b)
			code = 1
		}
	}
	// Nor may any of their processes linger as zombies of this one.
	if zombies := zombieChildren(); len(zombies) > 0 {
		fmt.Fprintf(os.Stderr, "pgtest: unreaped child processes: %v\n", zombies)
		code = 1
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: leaked goroutines: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

func zombieChildren() []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		if state, ppid, _, ok := procStat(pid); ok && state == 'Z' && ppid == os.Getpid() {
			out = append(out, pid)
		}
	}
	return out
}

// query runs sql and returns the first column of the first row of its last result.
func query(t *testing.T, c *Cluster, db, sql string) string {
	t.Helper()
	ctx := t.Context()
	conn, err := c.Connect(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	results, err := conn.Exec(ctx, sql).ReadAll()
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	last := results[len(results)-1]
	if len(last.Rows) == 0 {
		t.Fatalf("%s: no rows", sql)
	}
	return string(last.Rows[0][0])
}

func mustExec(t *testing.T, c *Cluster, db, sql string) {
	t.Helper()
	if err := c.Exec(t.Context(), db, sql); err != nil {
		t.Fatal(err)
	}
}

func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

func TestPairIsolation(t *testing.T) {
	began := time.Now()
	old, new, err := StartPair(t.Context(), Options{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("StartPair took %v", time.Since(began))
	t.Cleanup(func() {
		if err := old.Destroy(); err != nil {
			t.Error(err)
		}
		if err := new.Destroy(); err != nil {
			t.Error(err)
		}
	})

	for _, c := range []*Cluster{old, new} {
		if !c.Running() || c.PID() == 0 {
			t.Fatalf("cluster on port %d not running", c.Port())
		}
		if c.Host() != "127.0.0.1" {
			t.Errorf("Host() = %q", c.Host())
		}
		want := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.Port())
		if got := c.DSN(""); got != want {
			t.Errorf("DSN(\"\") = %q, want %q", got, want)
		}
		if !regexp.MustCompile(`^\d+(\.\d+)?`).MatchString(c.Version()) {
			t.Errorf("Version() = %q", c.Version())
		}
		if v := query(t, c, "", "SHOW server_version"); !strings.HasPrefix(v, c.Version()) {
			t.Errorf("server_version %q, Version() %q", v, c.Version())
		}
	}
	if old.Port() == new.Port() || old.Dir() == new.Dir() {
		t.Fatalf("clusters share port or dir: %d %s / %d %s", old.Port(), old.Dir(), new.Port(), new.Dir())
	}

	mustExec(t, old, "postgres", `
		CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
		INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three');`)
	if n := query(t, old, "postgres", "SELECT count(*) FROM items"); n != "3" {
		t.Fatalf("old has %s rows, want 3", n)
	}
	err = new.Exec(t.Context(), "postgres", "SELECT count(*) FROM items")
	if sqlState(err) != "42P01" { // undefined_table
		t.Fatalf("items on new cluster: got %v, want undefined_table", err)
	}
}

func TestDefaultsAndSettings(t *testing.T) {
	c := New(t, Options{Settings: map[string]string{"work_mem": "7MB", "application_name": "it's"}})
	for name, want := range map[string]string{
		"work_mem":                  "7MB",
		"application_name":          "it's",
		"max_connections":           "600",
		"wal_level":                 "logical",
		"fsync":                     "off",
		"max_prepared_transactions": "64",
		"shared_buffers":            "32MB",
		"listen_addresses":          "127.0.0.1",
		"unix_socket_directories":   c.Dir(),
	} {
		if got := query(t, c, "", "SHOW "+name); got != want {
			t.Errorf("SHOW %s = %q, want %q", name, got, want)
		}
	}
	if got := query(t, c, "", "SELECT current_user"); got != "postgres" {
		t.Errorf("current_user = %q", got)
	}
	if got := query(t, c, "", "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"); got != "t" {
		t.Errorf("rolsuper = %q", got)
	}
}

func TestStartErrors(t *testing.T) {
	if _, err := Start(t.Context(), Options{Settings: map[string]string{"Port": "5432"}}); err == nil {
		t.Fatal("overriding port was accepted")
	}
	if _, err := Start(t.Context(), Options{Settings: map[string]string{"bad\nname": "x"}}); err == nil {
		t.Fatal("bad setting name was accepted")
	}

	// A setting the server rejects: the error carries the server log and
	// nothing is left behind.
	_, err := Start(t.Context(), Options{Settings: map[string]string{"shared_buffers": "banana"}})
	if err == nil {
		t.Fatal("invalid shared_buffers was accepted")
	}
	if !strings.Contains(err.Error(), "banana") {
		t.Errorf("error does not include the server log: %v", err)
	}
	t.Log(err)
	// The error names the cluster's directory; it must be gone. (Counting
	// the entries of the shared temp dir would race with other packages'
	// clusters starting at the same time.)
	m := regexp.MustCompile(`\(dir ([^)]+)\)`).FindStringSubmatch(err.Error())
	if m == nil {
		t.Fatalf("error does not name the cluster directory: %v", err)
	}
	if _, statErr := os.Stat(m[1]); !os.IsNotExist(statErr) {
		t.Errorf("cluster directory %s left behind after a failed start: %v", m[1], statErr)
	}
}

func TestCreateDatabase(t *testing.T) {
	c := New(t)
	for _, name := range []string{"MixedCase_DB", `odd "name" with spaces/and?marks`} {
		if err := c.CreateDatabase(t.Context(), name); err != nil {
			t.Fatal(err)
		}
		mustExec(t, c, name, "CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
		if got := query(t, c, name, "SELECT current_database() || ':' || (SELECT x FROM t)"); got != name+":42" {
			t.Errorf("got %q, want %q", got, name+":42")
		}
	}
	err := c.CreateDatabase(t.Context(), "MixedCase_DB")
	if sqlState(err) != "42P04" { // duplicate_database
		t.Errorf("second CreateDatabase: got %v, want duplicate_database", err)
	}
}

func TestKillRestart(t *testing.T) {
	c := New(t)
	port := c.Port()
	mustExec(t, c, "", "CREATE TABLE kept (id int); INSERT INTO kept SELECT generate_series(1, 1000)")
	// synchronous_commit=off may lose the latest commits in a crash.
	mustExec(t, c, "", "CHECKPOINT")

	// An open session gives the postmaster one more child to clean up.
	conn, err := c.Connect(t.Context(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())

	pid := c.PID()
	kids := descendants(pid)
	if len(kids) == 0 {
		t.Fatal("postmaster has no children")
	}
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	if c.Running() || c.PID() != 0 {
		t.Fatal("still running after Kill")
	}
	if state, _, _, ok := procStat(pid); ok && state != 'Z' {
		t.Errorf("postmaster %d still exists", pid)
	}
	for _, k := range kids {
		if k.alive() {
			t.Errorf("child %d of the postmaster survived Kill", k.pid)
		}
	}
	if err := c.Kill(); err != nil {
		t.Fatalf("second Kill: %v", err)
	}

	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	if c.Port() != port {
		t.Fatalf("port changed from %d to %d", port, c.Port())
	}
	if !c.Running() || c.PID() == pid {
		t.Fatalf("Running()=%v PID()=%d after Restart (old pid %d)", c.Running(), c.PID(), pid)
	}
	if n := query(t, c, "", "SELECT count(*) FROM kept"); n != "1000" {
		t.Fatalf("after crash recovery: %s rows, want 1000", n)
	}
	mustExec(t, c, "", "INSERT INTO kept VALUES (1001)")
}

func TestKillRestartSynchronousCommit(t *testing.T) {
	c := New(t, Options{Settings: map[string]string{"synchronous_commit": "on"}})
	mustExec(t, c, "", "CREATE TABLE kept (id int)")
	for i := range 20 {
		mustExec(t, c, "", fmt.Sprintf("INSERT INTO kept VALUES (%d)", i))
	}
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := query(t, c, "", "SELECT count(*) FROM kept"); n != "20" {
		t.Fatalf("after crash recovery: %s rows, want 20", n)
	}
}

func TestStopRestart(t *testing.T) {
	c := New(t)
	port := c.Port()
	mustExec(t, c, "", "CREATE TABLE kept AS SELECT 'hello'::text AS v")
	if err := c.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	if c.Running() {
		t.Fatal("running after Stop")
	}
	if err := c.Exec(t.Context(), "", "SELECT 1"); err == nil {
		t.Fatal("Exec succeeded on a stopped cluster")
	}
	if err := c.Stop(t.Context()); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	if c.Port() != port {
		t.Fatalf("port changed from %d to %d", port, c.Port())
	}
	if v := query(t, c, "", "SELECT v FROM kept"); v != "hello" {
		t.Fatalf("got %q", v)
	}
	// Restart of a running cluster stops it first.
	pid := c.PID()
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	if c.PID() == pid || !c.Running() {
		t.Fatalf("Restart of a running cluster: pid %d -> %d, running %v", pid, c.PID(), c.Running())
	}
	if v := query(t, c, "", "SELECT v FROM kept"); v != "hello" {
		t.Fatalf("got %q", v)
	}
}

func TestDestroy(t *testing.T) {
	c, err := Start(t.Context(), Options{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	dir, pid := c.Dir(), c.PID()
	if _, err := os.Stat(dir); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("dir %s still exists (%v)", dir, err)
	}
	if state, _, _, ok := procStat(pid); ok && state != 'Z' {
		t.Fatalf("postmaster %d still exists", pid)
	}
	if c.Running() {
		t.Fatal("Running after Destroy")
	}
	if err := c.Destroy(); err != nil {
		t.Fatalf("second Destroy: %v", err)
	}
	if err := c.Restart(t.Context()); err == nil {
		t.Fatal("Restart after Destroy succeeded")
	}

	// Destroy after Kill, and after Stop.
	for _, end := range []func(*Cluster) error{
		(*Cluster).Kill,
		func(c *Cluster) error { return c.Stop(t.Context()) },
	} {
		c, err := Start(t.Context(), Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := end(c); err != nil {
			t.Fatal(err)
		}
		if err := c.Destroy(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(c.Dir()); !os.IsNotExist(err) {
			t.Fatalf("dir %s still exists (%v)", c.Dir(), err)
		}
	}
}

func TestConcurrentUse(t *testing.T) {
	c := New(t)
	mustExec(t, c, "", "CREATE TABLE hits (n int)")
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 8 {
		wg.Go(func() {
			for j := range 5 {
				errs <- c.Exec(t.Context(), "", fmt.Sprintf("INSERT INTO hits VALUES (%d)", i*10+j))
				_ = c.Running()
				_ = c.PID()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := query(t, c, "", "SELECT count(*) FROM hits"); n != "40" {
		t.Fatalf("%s rows, want 40", n)
	}
}

func TestPortCollision(t *testing.T) {
	// Hand Start a port that is taken; it must move on to another one.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	taken := l.Addr().(*net.TCPAddr).Port
	calls := 0
	pickPort = func() (int, error) {
		calls++
		if calls == 1 {
			return taken, nil
		}
		return freePort()
	}
	defer func() { pickPort = freePort }()

	c := New(t)
	if c.Port() == taken || calls < 2 {
		t.Fatalf("got port %d after %d picks; %d was taken", c.Port(), calls, taken)
	}
	mustExec(t, c, "", "SELECT 1")

	// Restart insists on its own port: it fails while the port is taken and
	// succeeds once it is free again.
	if err := c.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", c.Port()))
	if err != nil {
		t.Fatal(err)
	}
	// Restart retries a taken port until its deadline, then names it. One
	// second was too short on a loaded machine: the first attempt had not
	// reached the bind, and the error was a bare deadline.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	err = c.Restart(ctx)
	if err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("Restart on a taken port: %v", err)
	}
	if c.Running() {
		t.Fatal("running after failed Restart")
	}
	l2.Close()
	if err := c.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	mustExec(t, c, "", "SELECT 1")
}

func TestSweepStale(t *testing.T) {
	env, err := environment()
	if err != nil {
		t.Fatal(err)
	}
	mk := func(owner string) string {
		dir, err := os.MkdirTemp(env.base, clusterDirPrefix)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		if err := os.MkdirAll(filepath.Join(dir, "data", "base"), 0o700); err != nil {
			t.Fatal(err)
		}
		if owner != "" {
			if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(owner), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	_, _, start, _ := procStat(os.Getpid())
	ns := pidNamespace()
	dead := mk("999999999 12345 " + ns + "\n")
	live := mk(fmt.Sprintf("%d %s %s\n", os.Getpid(), start, ns))
	foreign := mk("999999999 12345 pid:[1]\n")
	unknown := mk("")
	sweepStale(env.base, t.Logf)
	if _, err := os.Stat(dead); !os.IsNotExist(err) {
		t.Errorf("directory of a dead process was kept: %v", err)
	}
	for _, dir := range []string{live, foreign, unknown} {
		if _, err := os.Stat(dir); err != nil {
			t.Errorf("%s was removed: %v", dir, err)
		}
	}
}
