//go:build linux

package proxy

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
)

// TestEpollEngine checks that with relay.engine=epoll plaintext sessions
// really run on the loops, including a reply far larger than a socket
// buffer (partial writes and backpressure) while the client reads slowly
// in pipelined batches. The rest of the suite runs on this engine too with
// TANDEM_TEST_RELAY=epoll (make test does both).
func TestEpollEngine(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db, func(c *config.Config) { c.Relay.Engine = config.RelayEpoll })
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, p.dsn(db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var total int64
	var big string
	if err := conn.QueryRow(ctx, "SELECT sum(g), repeat('x', 20000000) FROM generate_series(1, 100000) g").Scan(&total, &big); err != nil {
		t.Fatal(err)
	}
	if total != 5000050000 || len(big) != 20000000 || strings.Trim(big, "x") != "" {
		t.Fatalf("got %d and %d bytes", total, len(big))
	}
	rows, err := conn.Query(ctx, "SELECT g, md5(g::text) FROM generate_series(1, 200000) g")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for rows.Next() {
		n++
	}
	if rows.Err() != nil || n != 200000 {
		t.Fatalf("%d rows, %v", n, rows.Err())
	}
	if got := p.srv.looped.Load(); got < 1 {
		t.Fatalf("%d sessions ran on the epoll loops", got)
	}
	if len(p.srv.loops) == 0 {
		t.Fatal("no loops started")
	}
}
