package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
)

// TestProxyChild is not a test: TestReloadOnSIGHUP runs the test binary as
// a separate `tandem proxy` process through it, to send it signals.
func TestProxyChild(t *testing.T) {
	args := os.Getenv("TANDEM_PROXY_CHILD")
	if args == "" {
		t.Skip("helper process for TestReloadOnSIGHUP")
	}
	ctx, stop := context.WithCancel(context.Background())
	go func() { // SIGTERM ends it as it ends the real binary's
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		<-ch
		stop()
	}()
	root := newRoot()
	root.SetArgs(strings.Split(args, "\x1f"))
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// childLog collects a child process's log lines and lets a test wait for one.
type childLog struct {
	mu    sync.Mutex
	lines []string
	more  chan struct{}
}

func (l *childLog) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l.mu.Lock()
		l.lines = append(l.lines, sc.Text())
		close(l.more)
		l.more = make(chan struct{})
		l.mu.Unlock()
	}
}

// loggedProc is a process a test started (startLogged), its stderr read into log.
type loggedProc struct {
	cmd    *exec.Cmd
	log    *childLog
	exited chan error // receives cmd.Wait's result once the process ended and its stderr is read
}

// startLogged starts cmd with its stderr read into a childLog; the test
// defers stop.
func startLogged(t *testing.T, cmd *exec.Cmd) *loggedProc {
	t.Helper()
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &loggedProc{cmd: cmd, log: &childLog{more: make(chan struct{})}, exited: make(chan error, 1)}
	readDone := make(chan struct{})
	go func() { c.log.read(stderr); close(readDone) }()
	go func() { <-readDone; c.exited <- cmd.Wait() }()
	return c
}

// stop ends the child with SIGTERM, killing it if it has not ended within
// 30s.
func (c *loggedProc) stop() {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(30 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
}

// wait returns the first line from index from on that matches re.
func (l *childLog) wait(t *testing.T, from int, re *regexp.Regexp) (string, int) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for i := from; ; {
		l.mu.Lock()
		for ; i < len(l.lines); i++ {
			if re.MatchString(l.lines[i]) {
				line := l.lines[i]
				l.mu.Unlock()
				return line, i + 1
			}
		}
		more := l.more
		l.mu.Unlock()
		select {
		case <-more:
		case <-deadline:
			l.mu.Lock()
			defer l.mu.Unlock()
			t.Fatalf("no log line matching %s within 30s; the log:\n%s", re, strings.Join(l.lines, "\n"))
		}
	}
}

// TestReloadOnSIGHUP: SIGHUP reloads a changed userlist while a session
// stays open; a broken config file is rejected without a restart; a
// changed setting that needs a restart is named and left alone.
func TestReloadOnSIGHUP(t *testing.T) {
	c := pgtest.New(t)
	dir := t.TempDir()
	users := filepath.Join(dir, "userlist.txt")
	file := filepath.Join(dir, "tandem.yaml")
	writeFile := func(path, text string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	config := func(listen string, extra string) string {
		return fmt.Sprintf("listen: %s\nadmin: 127.0.0.1:0\nold:\n  dsn: %q\nauth:\n  method: scram-sha-256\n  userlist: %s\nlimits:\n  drain_timeout: 2s\nlog:\n  level: info\n%s",
			listen, c.DSN("postgres"), users, extra)
	}
	writeFile(users, `"postgres" "first-secret"`+"\n")
	writeFile(file, config("127.0.0.1:0", ""))

	cmd := exec.Command(os.Args[0], "-test.run=^TestProxyChild$")
	cmd.Env = append(os.Environ(), "TANDEM_PROXY_CHILD="+strings.Join([]string{"proxy", "-c", file}, "\x1f"))
	proc := startLogged(t, cmd)
	defer proc.stop()
	log := proc.log
	started, next := log.wait(t, 0, regexp.MustCompile(`tandem proxy started`))
	addr := regexp.MustCompile(`listen=(\S+)`).FindStringSubmatch(started)[1]

	ctx := context.Background()
	connect := func(password string) (*pgx.Conn, error) {
		return pgx.Connect(ctx, fmt.Sprintf("postgres://postgres:%s@%s/postgres?sslmode=disable", password, addr))
	}
	open, err := connect("first-secret")
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close(ctx)

	// A new password in the userlist, and a listen address that only a
	// restart can change.
	writeFile(users, `"postgres" "second-secret"`+"\n")
	writeFile(file, config("127.0.0.1:1", ""))
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	line, next := log.wait(t, next, regexp.MustCompile(`configuration (not )?reloaded`))
	if !strings.Contains(line, "configuration reloaded") || !strings.Contains(line, "need_restart=[listen]") {
		t.Fatalf("reload: %s", line)
	}
	if c2, err := connect("second-secret"); err != nil {
		t.Errorf("the new password after the reload: %v", err)
	} else {
		c2.Close(ctx)
	}
	if c3, err := connect("first-secret"); err == nil || sqlstate(err) != "28P01" {
		t.Errorf("the old password after the reload: %v", err)
		if c3 != nil {
			c3.Close(ctx)
		}
	}
	var one int
	if err := open.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Errorf("the session opened before the reload: %v", err)
	}

	// A broken file: rejected, the running configuration stays.
	writeFile(file, config("127.0.0.1:0", "no_such_key: 1\n"))
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	line, _ = log.wait(t, next, regexp.MustCompile(`configuration (not )?reloaded`))
	if !strings.Contains(line, "configuration not reloaded") || !strings.Contains(line, "no_such_key") {
		t.Fatalf("broken file: %s", line)
	}
	if c4, err := connect("second-secret"); err != nil {
		t.Errorf("after a rejected reload: %v", err)
	} else {
		c4.Close(ctx)
	}
	if err := open.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		t.Errorf("the open session after a rejected reload: %v", err)
	}
	select {
	case err := <-proc.exited:
		t.Fatalf("the proxy exited: %v", err)
	default:
	}
}
