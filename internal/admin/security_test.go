package admin

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

const testToken = "t0ken-0123456789abcdef"

// serve runs the admin handler for opts on a real listener, as
// cmd/tandem does, and returns its base URL.
func serve(t *testing.T, opts Options, so ServerOptions) string {
	t.Helper()
	srv, err := Listen("127.0.0.1:0", NewHandler(opts), nil, so)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() {
		_ = srv.Shutdown(t.Context())
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return "http://" + srv.Addr()
}

// request sends one request with the given headers ("Host" sets the Host
// header) and returns the status and body.
func request(t *testing.T, method, url, body string, hdr map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// With a token, everything but the probes and the metrics needs it; a
// state-changing request must be JSON and name this server in Host (no
// CSRF by a text/plain form, no DNS rebinding); pprof is off unless asked
// for, behind the token when on, and never serves cmdline.
func TestAdminSecurity(t *testing.T) {
	metrics := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("m 1\n")) })
	writers := func() []string { return nil }
	// /api/v1/backfill has a POST; without a control plane it answers 404
	// once past the guard, which tells the guard's refusals apart.
	base := serve(t, Options{Metrics: metrics, Writers: writers, Security: Security{Token: testToken, Hosts: []string{"tandem.internal"}}}, ServerOptions{})
	auth := map[string]string{"Authorization": "Bearer " + testToken}
	json := map[string]string{"Authorization": "Bearer " + testToken, "Content-Type": "application/json"}
	for _, tc := range []struct {
		name, method, path, body string
		hdr                      map[string]string
		want                     int
	}{
		{"healthz is public", "GET", "/healthz", "", nil, 200},
		{"readyz is public", "GET", "/readyz", "", nil, 200},
		{"metrics are public", "GET", "/metrics", "", nil, 200},
		{"no token", "GET", "/api/v1/writers", "", nil, 401},
		{"wrong token", "GET", "/api/v1/writers", "", map[string]string{"Authorization": "Bearer " + testToken + "x"}, 401},
		{"token as basic", "GET", "/api/v1/writers", "", map[string]string{"Authorization": "Basic " + testToken}, 401},
		{"prefix of the token", "GET", "/api/v1/writers", "", map[string]string{"Authorization": "Bearer " + testToken[:8]}, 401},
		{"token", "GET", "/api/v1/writers", "", auth, 200},
		{"POST without the token", "POST", "/api/v1/backfill", `{"paused":true}`, map[string]string{"Content-Type": "application/json"}, 401},
		{"POST text/plain", "POST", "/api/v1/backfill", `{"paused":true}`, map[string]string{"Authorization": "Bearer " + testToken, "Content-Type": "text/plain"}, 415},
		{"POST form", "POST", "/api/v1/backfill", `paused=true`, map[string]string{"Authorization": "Bearer " + testToken, "Content-Type": "application/x-www-form-urlencoded"}, 415},
		{"POST without a type", "POST", "/api/v1/backfill", `{"paused":true}`, auth, 415},
		{"POST foreign Host", "POST", "/api/v1/backfill", `{"paused":true}`, merge(json, "Host", "evil.example:9187"), 403},
		{"POST JSON", "POST", "/api/v1/backfill", `{"paused":true}`, json, 404},
		{"POST JSON with charset", "POST", "/api/v1/backfill", `{"paused":true}`, merge(json, "Content-Type", "application/json; charset=utf-8"), 404},
		{"POST localhost", "POST", "/api/v1/backfill", `{"paused":true}`, merge(json, "Host", "localhost:9187"), 404},
		{"POST allowed host", "POST", "/api/v1/backfill", `{"paused":true}`, merge(json, "Host", "TANDEM.internal"), 404},
		{"pprof off", "GET", "/debug/pprof/", "", auth, 404},
		{"cmdline off", "GET", "/debug/pprof/cmdline", "", auth, 404},
	} {
		if code, body := request(t, tc.method, base+tc.path, tc.body, tc.hdr); code != tc.want {
			t.Errorf("%s: %s %s: %d %s, want %d", tc.name, tc.method, tc.path, code, body, tc.want)
		}
	}

	pp := serve(t, Options{Pprof: true, Security: Security{Token: testToken}}, ServerOptions{})
	if code, _ := request(t, "GET", pp+"/debug/pprof/", "", nil); code != 401 {
		t.Errorf("pprof without the token: %d, want 401", code)
	}
	if code, body := request(t, "GET", pp+"/debug/pprof/", "", auth); code != 200 || !strings.Contains(body, "goroutine") {
		t.Errorf("pprof with the token: %d", code)
	}
	if code, body := request(t, "GET", pp+"/debug/pprof/cmdline", "", auth); code != 404 || strings.Contains(body, "admin.test") {
		t.Errorf("pprof cmdline: %d %q, want 404", code, body)
	}
	if code, _ := request(t, "GET", pp+"/debug/pprof/goroutine?debug=1", "", auth); code != 200 {
		t.Errorf("pprof goroutine: %d", code)
	}

	// Without a token (loopback only: cmd/tandem refuses otherwise) reads
	// are open, but the JSON and Host checks still stop a browser.
	open := serve(t, Options{Writers: writers}, ServerOptions{})
	if code, _ := request(t, "GET", open+"/api/v1/writers", "", nil); code != 200 {
		t.Errorf("no token configured: %d", code)
	}
	if code, _ := request(t, "POST", open+"/api/v1/backfill", `{}`, map[string]string{"Content-Type": "text/plain"}); code != 415 {
		t.Errorf("no token, text/plain POST: %d, want 415", code)
	}
	if code, _ := request(t, "POST", open+"/api/v1/backfill", `{}`, map[string]string{"Content-Type": "application/json", "Host": "rebound.example"}); code != 403 {
		t.Errorf("no token, foreign Host: %d, want 403", code)
	}
}

func merge(m map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for mk, mv := range m {
		if mk != k {
			out[mk] = mv
		}
	}
	return out
}

// The token never reaches the server's log, even for failed requests or
// ones the server cannot parse.
func TestAdminTokenNotLogged(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := Listen("127.0.0.1:0", NewHandler(Options{Logger: log, Security: Security{Token: testToken}}), log, ServerOptions{ReadHeaderTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	request(t, "GET", "http://"+srv.Addr()+"/api/v1/state", "", map[string]string{"Authorization": "Bearer " + testToken})
	request(t, "GET", "http://"+srv.Addr()+"/api/v1/state", "", map[string]string{"Authorization": "Bearer wrong-" + testToken})
	// A malformed request line with the token in it: net/http answers 400.
	c, err := net.Dial("tcp", srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	_, _ = c.Write([]byte("GET /" + testToken + " HTTP/1.1\r\nAuthorization: Bearer " + testToken + "\r\nBad Header\r\n\r\n"))
	_, _ = io.ReadAll(c)
	c.Close()
	_ = srv.Shutdown(t.Context())
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), testToken) {
		t.Fatalf("the token is in the log:\n%s", logs.String())
	}
}
