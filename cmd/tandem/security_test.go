package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tandemdb/tandem/internal/pgtest"
)

// TestSecurityChild runs the tandem command line given in
// TANDEM_SECURITY_CHILD (arguments separated by \x1f) as the real binary
// would: signals stop it, errors go to stderr, the exit status is set.
func TestSecurityChild(t *testing.T) {
	args := os.Getenv("TANDEM_SECURITY_CHILD")
	if args == "" {
		t.Skip("helper process for the security tests")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	root := newRoot()
	root.SetArgs(strings.Split(args, "\x1f"))
	if err := root.ExecuteContext(ctx); err != nil {
		var ec exitCode
		if errors.As(err, &ec) {
			os.Exit(int(ec))
		}
		fmt.Fprintln(os.Stderr, "tandem:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// child is a tandem process started by startChild.
type child struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	stderr strings.Builder
	lines  chan string
	done   chan error
}

func startChild(t *testing.T, args ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestSecurityChild$")
	cmd.Env = append(os.Environ(), "TANDEM_SECURITY_CHILD="+strings.Join(args, "\x1f"))
	pr, pw := io.Pipe()
	cmd.Stderr, cmd.Stdout = pw, pw
	c := &child{cmd: cmd, lines: make(chan string, 1000), done: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			c.mu.Lock()
			c.stderr.WriteString(sc.Text() + "\n")
			c.mu.Unlock()
			select {
			case c.lines <- sc.Text():
			default:
			}
		}
		close(c.lines)
	}()
	go func() {
		err := cmd.Wait()
		pw.Close()
		c.done <- err
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
	})
	return c
}

func (c *child) output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stderr.String()
}

// adminAddr waits for the "tandem proxy started" log line and returns the
// admin address it names.
func (c *child) adminAddr(t *testing.T) string {
	t.Helper()
	timeout := time.After(time.Minute)
	for {
		select {
		case line, ok := <-c.lines:
			if !ok {
				t.Fatalf("the proxy exited before it started:\n%s", c.output())
			}
			var rec struct {
				Msg   string `json:"msg"`
				Admin string `json:"admin"`
			}
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "tandem proxy started" {
				return rec.Admin
			}
		case <-timeout:
			t.Fatalf("the proxy did not start within a minute:\n%s", c.output())
		}
	}
}

// wait waits for the process to exit and returns its exit status.
func (c *child) wait(t *testing.T) int {
	t.Helper()
	select {
	case err := <-c.done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(2 * time.Minute):
		t.Fatalf("the process did not exit:\n%s", c.output())
		return -1
	}
}

// TestAdminTokenProcess runs the proxy as a process with an admin token,
// on real stores, and checks the admin API as an attacker and an operator
// would meet it: 401 without or with a wrong token, 200 with it; a
// text/plain or foreign-Host POST refused; pprof off; `tandem health`
// works; and the token in no log line (debug level) and no metric.
func TestAdminTokenProcess(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	file, _ := pairConfig(t, oldC, newC, "token-proxy")
	const token = "tok-3b1f0c9e2d7a4e6b8c5d1a0f9e8d7c6b"
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startChild(t, "proxy", "-c", file, "--admin-token-file", tokenFile, "--log-level", "debug", "--log-format", "json")
	addr := p.adminAddr(t)
	base := "http://" + addr
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	call := func(method, path, body string, hdr map[string]string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, base+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range hdr {
			if k == "Host" {
				req.Host = v
			} else {
				req.Header.Set(k, v)
			}
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	bearer := "Bearer " + token
	for _, tc := range []struct {
		name, method, path, body string
		hdr                      map[string]string
		want                     int
	}{
		{"state without a token", "GET", "/api/v1/state", "", nil, 401},
		{"state with a wrong token", "GET", "/api/v1/state", "", map[string]string{"Authorization": "Bearer nope-" + token}, 401},
		{"state with the token", "GET", "/api/v1/state", "", map[string]string{"Authorization": bearer}, 200},
		{"mismatches without a token", "GET", "/api/v1/mismatches", "", nil, 401},
		{"route without a token", "POST", "/api/v1/route", `{"mirror": true}`, map[string]string{"Content-Type": "application/json"}, 401},
		{"route as text/plain (CSRF)", "POST", "/api/v1/route", `{"mirror": true}`, map[string]string{"Authorization": bearer, "Content-Type": "text/plain"}, 415},
		{"route with a foreign Host (DNS rebinding)", "POST", "/api/v1/route", `{"mirror": true}`,
			map[string]string{"Authorization": bearer, "Content-Type": "application/json", "Host": "attacker.example:80"}, 403},
		{"pprof is off by default", "GET", "/debug/pprof/", "", map[string]string{"Authorization": bearer}, 404},
		{"cmdline is never served", "GET", "/debug/pprof/cmdline", "", map[string]string{"Authorization": bearer}, 404},
		{"healthz needs no token", "GET", "/healthz", "", nil, 200},
		{"readyz needs no token", "GET", "/readyz", "", nil, 200},
	} {
		if code, body := call(tc.method, tc.path, tc.body, tc.hdr); code != tc.want {
			t.Errorf("%s: %s %s = %d %s, want %d", tc.name, tc.method, tc.path, code, body, tc.want)
		}
	}
	// Nothing above changed the routing state; the operator's request does.
	var st struct {
		State struct{ Mirror bool } `json:"state"`
	}
	if code, body := call("GET", "/api/v1/state", "", map[string]string{"Authorization": bearer}); code != 200 || json.Unmarshal([]byte(body), &st) != nil || st.State.Mirror {
		t.Fatalf("state after the refused requests: %d %s", code, body)
	}
	if code, body := call("POST", "/api/v1/route", `{"mirror": true}`, map[string]string{"Authorization": bearer, "Content-Type": "application/json"}); code != 200 {
		t.Fatalf("route with the token: %d %s", code, body)
	}
	_, metrics := call("GET", "/metrics", "", nil)

	// tandem health, in-process, with the same config and token.
	out, errOut, err := cli("health", "-c", file, "--admin", addr, "--admin-token-file", tokenFile, "--ready")
	if err != nil || !strings.Contains(out, "/readyz: ok") {
		t.Fatalf("tandem health --ready: %v\n%s%s", err, out, errOut)
	}

	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t); code != 0 {
		t.Fatalf("proxy exit status %d:\n%s", code, p.output())
	}
	logs := p.output()
	if !strings.Contains(logs, `"admin_token":true`) {
		t.Errorf("the start line does not say the admin API has a token:\n%s", logs)
	}
	for where, text := range map[string]string{"log": logs, "metrics": metrics} {
		if strings.Contains(text, token) {
			t.Errorf("the token is in the %s:\n%s", where, text)
		}
	}
}

// The proxy refuses to start where it would be open to the network:
// trust on a non-loopback listen address, an admin API without a token on
// a non-loopback address. Each message says why and how to fix it.
func TestRefusedOffLoopback(t *testing.T) {
	c := pgtest.New(t)
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"trust on all interfaces", []string{"--listen", "0.0.0.0:0"}, []string{"auth.method: is trust while listen", "auth.allow_remote_trust: true"}},
		{"admin API without a token", []string{"--admin", "0.0.0.0:0"}, []string{"is not a loopback address and the admin API has no token", "--admin-token-file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"proxy", "--old", c.DSN("postgres"), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"}, tc.args...)
			p := startChild(t, args...)
			if code := p.wait(t); code != 1 {
				t.Fatalf("exit status %d, want 1:\n%s", code, p.output())
			}
			for _, w := range tc.want {
				if !strings.Contains(p.output(), w) {
					t.Errorf("output does not say %q:\n%s", w, p.output())
				}
			}
		})
	}
	// The explicit opt-in starts.
	p := startChild(t, "proxy", "--old", c.DSN("postgres"), "--listen", "0.0.0.0:0", "--admin", "127.0.0.1:0",
		"--auth-allow-remote-trust", "--log-format", "json")
	p.adminAddr(t)
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t); code != 0 {
		t.Fatalf("exit status %d with --auth-allow-remote-trust:\n%s", code, p.output())
	}
}
