package proxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
)

// liveHeap is the heap's live objects after a GC, from runtime/metrics.
func liveHeap() uint64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// hostile opens an authenticated session through the proxy and returns its
// raw connection.
func hostile(t *testing.T, ctx context.Context, dsn string) net.Conn {
	t.Helper()
	pc, err := pgconn.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	hj, err := pc.Hijack()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hj.Conn.Close() })
	return hj.Conn
}

// readErrorCode reads backend messages from c until an ErrorResponse and
// returns its SQLSTATE and message, or the read error.
func readErrorCode(c net.Conn) (string, string, error) {
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Minute))
	br := bufio.NewReader(c)
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return "", "", err
		}
		body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
		if _, err := io.ReadFull(br, body); err != nil {
			return "", "", err
		}
		if hdr[0] == 'E' {
			var er pgproto3.ErrorResponse
			if err := er.Decode(body); err != nil {
				return "", "", err
			}
			return er.Code, er.Message, nil
		}
	}
}

// TestHostileAnnouncedMessages: 200 sessions in routed mode each announce
// a 200 MB message and send nothing more (issue 12). The proxy's heap
// grows by less than 64 MB (it allocated 200 MiB before bodies were read
// as they arrive, 1 MiB each before this change), other sessions keep
// working, and each hostile session ends with 08P01 at
// limits.message_timeout.
func TestHostileAnnouncedMessages(t *testing.T) {
	const sessions, announced, timeout = 200, 200 << 20, 5 * time.Second
	e := newPairEnv(t, `CREATE TABLE t (id int PRIMARY KEY)`, func(c *config.Config) {
		c.Limits.MessageTimeout = config.Duration(timeout)
	})
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	good := e.client()
	if _, err := good.Exec(ctx, `INSERT INTO t VALUES (0)`); err != nil {
		t.Fatal(err)
	}
	base := liveHeap()
	conns := make([]net.Conn, sessions)
	for i := range conns {
		conns[i] = hostile(t, ctx, e.proxy.dsn(e.db))
	}
	hdr := []byte{'Q', 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], announced+4)
	sent := time.Now()
	for _, c := range conns {
		if _, err := c.Write(hdr); err != nil {
			t.Fatal(err)
		}
	}
	// While they hold their messages open: the heap, and another session.
	var peak uint64
	for i := 1; time.Since(sent) < timeout/2; i++ {
		peak = max(peak, liveHeap())
		if _, err := good.Exec(ctx, `INSERT INTO t VALUES ($1)`, i); err != nil {
			t.Fatalf("another session while %d hold announced messages: %v", sessions, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	growth := int64(peak) - int64(base)
	t.Logf("%d sessions announcing %d MB each: live heap %d MiB -> peak %d MiB (growth %.1f MiB)",
		sessions, announced>>20, base>>20, peak>>20, float64(growth)/(1<<20))
	if growth >= 64<<20 {
		t.Errorf("the heap grew by %d MiB, want < 64 MiB", growth>>20)
	}
	var wg sync.WaitGroup
	errs := make([]error, sessions)
	for i, c := range conns {
		wg.Go(func() {
			code, msg, err := readErrorCode(c)
			switch {
			case err != nil:
				errs[i] = err
			case code != "08P01" || !strings.Contains(msg, "limits.message_timeout"):
				errs[i] = fmt.Errorf("%s %s", code, msg)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("hostile sessions did not all end with 08P01 at the message timeout: %v", err)
	}
	if took := time.Since(sent); took < timeout {
		t.Fatalf("the hostile sessions ended after %s, before the message timeout", took)
	}
	var n int
	if err := good.QueryRow(ctx, `SELECT count(*) FROM t`, pgx.QueryExecModeSimpleProtocol).Scan(&n); err != nil || n < 2 {
		t.Fatalf("the other session after: %d %v", n, err)
	}
	e.assertEqual("t", "id")
}

// A batch is bounded before its Sync: by message count and bytes per
// session, and by the bytes held for all sessions; past a bound the
// session ends with 54000 naming the setting, and the others are served.
func TestBatchCaps(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE t (id int PRIMARY KEY, v text)`, func(c *config.Config) {
		c.Limits.MaxMessageBytes = 64 * config.KiB
		c.Limits.MaxBatchMessages = 50
		c.Limits.MaxBufferedBytes = 100 * config.KiB
	})
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	insert := func(id int, pad int) []byte {
		b, _ := (&pgproto3.Parse{Query: fmt.Sprintf("INSERT INTO t VALUES (%d, '%s')", id, strings.Repeat("x", pad))}).Encode(nil)
		b, _ = (&pgproto3.Bind{}).Encode(b)
		b, _ = (&pgproto3.Execute{}).Encode(b)
		return b
	}
	sync, _ := (&pgproto3.Sync{}).Encode(nil)

	// Too many messages before a Sync.
	c := hostile(t, ctx, e.proxy.dsn(e.db))
	var batch []byte
	for i := range 20 {
		batch = append(batch, insert(1000+i, 0)...)
	}
	if _, err := c.Write(batch); err != nil {
		t.Fatal(err)
	}
	if code, msg, err := readErrorCode(c); err != nil || code != "54000" || !strings.Contains(msg, "limits.max_batch_messages") {
		t.Fatalf("60 messages without a Sync: %s %s %v, want 54000", code, msg, err)
	}

	// Two sessions whose open batches together pass max_buffered_bytes.
	a := hostile(t, ctx, e.proxy.dsn(e.db))
	if _, err := a.Write(insert(1, 60<<10)); err != nil {
		t.Fatal(err)
	}
	// a's batch is held once the proxy has read it: the next one to arrive
	// passes the cap. Wait until it counts.
	waitUntil(t, func() bool { return e.proxy.srv.buffered.Load() >= 60<<10 })
	b := hostile(t, ctx, e.proxy.dsn(e.db))
	if _, err := b.Write(insert(2, 60<<10)); err != nil {
		t.Fatal(err)
	}
	if code, msg, err := readErrorCode(b); err != nil || code != "54000" || !strings.Contains(msg, "limits.max_buffered_bytes") {
		t.Fatalf("a batch past the proxy's cap: %s %s %v, want 54000", code, msg, err)
	}
	if _, err := a.Write(sync); err != nil {
		t.Fatal(err)
	}
	good := e.client()
	var n int
	waitUntil(t, func() bool {
		return good.QueryRow(ctx, `SELECT count(*) FROM t WHERE id = 1`).Scan(&n) == nil && n == 1
	})
	if err := good.QueryRow(ctx, `SELECT count(*) FROM t`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("t holds %d rows (%v), want only session a's", n, err)
	}
	waitUntil(t, func() bool { return e.proxy.srv.buffered.Load() == 0 })
	e.assertEqual("t", "id")
}

// waitUntil polls cond for up to a minute.
func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within a minute")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
