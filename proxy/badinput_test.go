package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/config"
)

// rawSession opens a TCP connection to the proxy and, when startup is true,
// completes the startup handshake with the protocol reader.
func rawSession(t *testing.T, p *testProxy, db string, startup bool) (net.Conn, *pgproto3.Frontend) {
	t.Helper()
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fe := pgproto3.NewFrontend(c, c)
	if !startup {
		return c, fe
	}
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": "postgres", "database": db, "application_name": "badinput"}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	readUntilReady(t, fe, nil)
	return c, fe
}

// readUntilReady receives messages until ReadyForQuery, passing each to
// check when it is not nil.
func readUntilReady(t *testing.T, fe *pgproto3.Frontend, check func(pgproto3.BackendMessage)) {
	t.Helper()
	for {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := msg.(*pgproto3.ReadyForQuery); ok {
			return
		}
		if check != nil {
			check(msg)
		}
	}
}

// expectFatal reads the proxy's answer: one FATAL ErrorResponse with code,
// then end of stream.
func expectFatal(t *testing.T, fe *pgproto3.Frontend, code string) {
	t.Helper()
	msg, err := fe.Receive()
	if err != nil {
		t.Fatalf("want ErrorResponse %s, got %v", code, err)
	}
	er, ok := msg.(*pgproto3.ErrorResponse)
	if !ok {
		t.Fatalf("want ErrorResponse %s, got %T", code, msg)
	}
	if er.Code != code || er.Severity != "FATAL" {
		t.Fatalf("got %s %s %q, want FATAL %s", er.Severity, er.Code, er.Message, code)
	}
	if _, err := fe.Receive(); !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		t.Fatalf("after the FATAL error the proxy must close the connection; got %v", err)
	}
}

func header(typ byte, length int32) []byte {
	return binary.BigEndian.AppendUint32([]byte{typ}, uint32(length))
}

// TestBadInput sends hostile bytes in every phase; only the offending
// session ends (with 08P01 where a reply is possible), its upstream
// backend goes away, and a bystander session carries on.
func TestBadInput(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db, func(c *config.Config) { c.Limits.MaxMessageBytes = 64 << 10 })
	bystander := p.connect(t, db)
	if _, err := bystander.Exec(context.Background(), "BEGIN; CREATE TABLE survivor (id int); INSERT INTO survivor VALUES (1)").ReadAll(); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name    string
		startup bool   // complete startup first
		send    []byte // then send these bytes
		hangUp  bool   // then close the connection instead of reading the answer
	}{
		{name: "http request instead of startup", send: []byte("GET / HTTP/1.1\r\nHost: tandem\r\n\r\n")},
		{name: "negative startup length", send: []byte{0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0}},
		{name: "startup length below minimum", send: []byte{0, 0, 0, 4}},
		{name: "unknown protocol version", send: append(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 8+9), 0x00020000), []byte("user\x00pg\x00\x00")...)},
		{name: "negative message length", startup: true, send: header('Q', -5)},
		{name: "message length below 4", startup: true, send: header('Q', 2)},
		{name: "huge message length", startup: true, send: header('Q', 1<<30)},
		{name: "oversized query", startup: true, send: append(header('Q', 4+100<<10), []byte(strings.Repeat("x", 100<<10))...)},
		{name: "disconnect mid-message", startup: true, send: append(header('Q', 1000), []byte("SELECT 1 -- cut")...), hangUp: true},
		{name: "disconnect mid-startup", send: []byte{0, 0, 0, 40, 0, 3, 0, 0, 'u', 's'}, hangUp: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, fe := rawSession(t, p, db, tc.startup)
			if _, err := c.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			if tc.hangUp {
				c.Close()
			} else {
				expectFatal(t, fe, "08P01")
			}
			// The offending session's upstream backend is gone.
			succeedsSoon(t, func() error {
				n := queryOne(t, bystander, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'badinput'")
				if n != "0" {
					return errors.New(n + " backends of bad sessions still open")
				}
				return nil
			})
			// The bystander's open transaction is untouched.
			if got := queryOne(t, bystander, "SELECT count(*) FROM survivor"); got != "1" {
				t.Fatalf("bystander sees %s rows", got)
			}
		})
	}
	if _, err := bystander.Exec(context.Background(), "COMMIT").ReadAll(); err != nil {
		t.Fatal(err)
	}
	succeedsSoon(t, func() error {
		if n := p.srv.Sessions(); n != 1 {
			return errors.New("sessions still registered")
		}
		return nil
	})
}

// TestProtocolNegotiation: a client asking for protocol 3.2 with a _pq_
// option is told that the proxy speaks 3.0 and goes on normally.
func TestProtocolNegotiation(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db)
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fe := pgproto3.NewFrontend(c, c)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion32,
		Parameters: map[string]string{"user": "postgres", "database": db, "_pq_.future_option": "1"}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	msg, err := fe.Receive()
	if err != nil {
		t.Fatal(err)
	}
	npv, ok := msg.(*pgproto3.NegotiateProtocolVersion)
	if !ok || npv.NewestMinorProtocol != 0 || len(npv.UnrecognizedOptions) != 1 || npv.UnrecognizedOptions[0] != "_pq_.future_option" {
		t.Fatalf("first message %#v, want NegotiateProtocolVersion(3.0, [_pq_.future_option])", msg)
	}
	readUntilReady(t, fe, nil)
	fe.Send(&pgproto3.Query{String: "SELECT 'negotiated'"})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	got := ""
	readUntilReady(t, fe, func(msg pgproto3.BackendMessage) {
		if dr, ok := msg.(*pgproto3.DataRow); ok {
			got = string(dr.Values[0])
		}
	})
	if got != "negotiated" {
		t.Fatalf("got %q, want negotiated", got)
	}
	fe.Send(&pgproto3.Terminate{})
	_ = fe.Flush()
}

// TestReplicationRefused: replication connections get 0A000 with a hint.
func TestReplicationRefused(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db)
	_, err := pgconn.Connect(context.Background(), p.dsn(db, "replication=database"))
	if got := sqlState(err); got != "0A000" {
		t.Fatalf("replication connection: %v (SQLSTATE %q), want 0A000", err, got)
	}
}

// TestConnectTimeout: a client that connects and then stays silent, or
// stalls during authentication, is dropped after limits.connect_timeout.
func TestConnectTimeout(t *testing.T) {
	db := newDB(t)
	p := startProxy(t, shared, db, func(c *config.Config) { c.Limits.ConnectTimeout = config.Duration(300 * time.Millisecond) })
	for _, partial := range [][]byte{nil, {0, 0, 0, 40, 0, 3, 0}} {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(partial); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(make([]byte, 64))
		took := time.Since(start)
		c.Close()
		if n != 0 || err == nil {
			t.Fatalf("silent client got %d bytes, %v", n, err)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the proxy kept a silent client open for 5s (connect_timeout 300ms)")
		}
		if took < 250*time.Millisecond {
			t.Fatalf("dropped after %s, before connect_timeout", took)
		}
	}
}
