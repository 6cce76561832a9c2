package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
)

// TestSlowloris: many half-sent requests on both ports (a startup packet
// cut short on the client port, request headers never finished on the
// admin port, more of them than the admin server's connection cap) do not
// stop the proxy serving: a client still connects and queries, /readyz
// still answers (from one probe, not one store connection per request),
// and the half-sent connections are closed by the timeouts.
func TestSlowloris(t *testing.T) {
	c := pgtest.New(t)
	cfg := config.Default()
	cfg.Listen, cfg.Admin = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Old.DSN = c.DSN("postgres")
	cfg.Limits.ConnectTimeout = config.Duration(3 * time.Second)
	cfg.Limits.DrainTimeout = config.Duration(time.Second)
	cfg.AdminAPI.MaxConnections = 16
	rp := startQuietProxy(t, &cfg)
	defer stopProxy(t, rp)
	var closed atomic.Int64
	half := func(addr string, partial []byte, n int) {
		for range n {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { conn.Close() })
			if _, err := conn.Write(partial); err != nil {
				t.Fatal(err)
			}
			go func() {
				_ = conn.SetReadDeadline(time.Now().Add(2 * time.Minute))
				_, _ = io.Copy(io.Discard, conn) // returns when the server closes it
				closed.Add(1)
			}()
		}
	}
	const clientHalf, adminHalf = 300, 40
	half(rp.Addr(), []byte{0, 0, 0, 40, 0, 3}, clientHalf)                                         // 6 of a 40-byte startup packet
	half(rp.AdminAddr(), []byte("GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "), adminHalf) // headers never end

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	app, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", rp.Addr()))
	if err != nil {
		t.Fatalf("a client while %d half-sent startups are open: %v", clientHalf, err)
	}
	var one int
	if err := app.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("query: %v", err)
	}
	app.Close(ctx)
	client := &http.Client{Timeout: time.Minute}
	resp, err := client.Get("http://" + rp.AdminAddr() + "/readyz")
	if err != nil {
		t.Fatalf("/readyz while %d half-sent requests hold the admin port: %v", adminHalf, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/readyz: %d", resp.StatusCode)
	}
	t.Logf("served a client and /readyz %s after opening %d + %d half-sent connections", time.Since(start).Round(time.Millisecond), clientHalf, adminHalf)
	// The timeouts close every half-sent connection.
	deadline := time.Now().Add(time.Minute)
	for closed.Load() < clientHalf+adminHalf {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d half-sent connections closed by the proxy within a minute", closed.Load(), clientHalf+adminHalf)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// /readyz at any rate runs its probes at most once a second: count the
	// store's connections while it is hammered.
	ctl, err := pgx.Connect(ctx, c.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	sessions := func() int {
		var n int
		if err := ctl.QueryRow(ctx, "SELECT sessions FROM pg_stat_database WHERE datname = 'postgres'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := sessions()
	hammer := time.Now()
	for range 200 {
		resp, err := client.Get("http://" + rp.AdminAddr() + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	// pg_stat_database is updated when sessions end, at most every 500 ms.
	time.Sleep(time.Second)
	secs := time.Since(hammer).Seconds()
	if opened := sessions() - before; float64(opened) > secs+3 {
		t.Fatalf("200 /readyz requests in %.1fs opened %d store sessions, want about one a second", secs, opened)
	}
}
