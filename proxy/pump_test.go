package proxy

import (
	"bufio"
	"bytes"
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/route"
)

// The reply pump without PostgreSQL: a unit goes to a store whose replies
// are scripted, and the test reads what the store was sent and what the
// client got.

// sentConn is a store connection that records what the proxy writes.
type sentConn struct {
	net.Conn // nil: only Write, SetWriteDeadline and Close are used
	sent     bytes.Buffer
}

func (c *sentConn) Write(p []byte) (int, error)      { return c.sent.Write(p) }
func (c *sentConn) SetWriteDeadline(time.Time) error { return nil }
func (c *sentConn) Close() error                     { return nil }

// pumpSession is a routed session on one scripted store, with the client's
// output in client.
type pumpSession struct {
	rs     *routedSession
	u      *rstore
	conn   *sentConn
	client *bytes.Buffer
}

func newPumpSession(t *testing.T, st route.Settings, replies ...pgproto3.BackendMessage) *pumpSession {
	t.Helper()
	srv := &Server{log: slog.New(slog.DiscardHandler), classifier: classify.New(100)}
	srv.conf.Store(&config.Config{})
	ss := &session{srv: srv, ctx: context.Background(), killCh: make(chan struct{}), log: srv.log}
	client := &bytes.Buffer{}
	rs := &routedSession{ss: ss, srv: srv, maxBody: 1 << 20, cout: bufio.NewWriter(client),
		stmts: map[string]*stmtInfo{}, portals: map[string]*portalInfo{}, txState: pgwire.TxIdle,
		state: route.State{Settings: st}}
	var script []byte
	for _, m := range replies {
		b, err := m.Encode(script)
		if err != nil {
			t.Fatal(err)
		}
		script = b
	}
	conn := &sentConn{}
	u := &rstore{name: "old", up: &upstream{conn: conn}, txStatus: pgwire.TxIdle}
	u.start(rs.maxBody, bytes.NewReader(script))
	t.Cleanup(func() { u.stop(false) })
	rs.home, rs.from = u, u
	rs.stores[storeIndexOf(u.name)] = u
	return &pumpSession{rs: rs, u: u, conn: conn, client: client}
}

// run runs one unit made of msgs and returns its result.
func (ps *pumpSession) run(t *testing.T, msgs ...pgproto3.FrontendMessage) *unitResult {
	t.Helper()
	un := &unit{}
	for _, m := range msgs {
		b, err := m.Encode(nil)
		if err != nil {
			t.Fatal(err)
		}
		un.msgs = append(un.msgs, clientMsg{typ: b[0], body: b[5:]})
		un.end = b[0]
	}
	ps.rs.analyze(un)
	res, err := ps.rs.runUnit(ps.u, un, false, ps.rs.state.Mirror)
	if err != nil {
		t.Fatal(err)
	}
	if err := ps.rs.cout.Flush(); err != nil {
		t.Fatal(err)
	}
	return res
}

// types lists the message types in a stream of messages.
func types(t *testing.T, b []byte) string {
	t.Helper()
	var out []byte
	r := bytes.NewReader(b)
	for r.Len() > 0 {
		typ, _, err := pgwire.ReadMessage(r, 1<<20)
		if err != nil {
			t.Fatalf("after %q: %v", out, err)
		}
		out = append(out, typ)
	}
	return string(out)
}

// A simple query's replies reach the client as the store sent them, all
// but the ReadyForQuery, which the caller sends once the secondary has
// followed.
func TestPumpSimpleQuery(t *testing.T) {
	ps := newPumpSession(t, route.Settings{Primary: route.Old},
		&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("n"), DataTypeOID: 23, DataTypeSize: 4, TypeModifier: -1}}},
		&pgproto3.DataRow{Values: [][]byte{[]byte("1")}},
		&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	res := ps.run(t, &pgproto3.Query{String: "SELECT 1 AS n"})
	if got := types(t, ps.conn.sent.Bytes()); got != "Q" {
		t.Fatalf("store was sent %q, want Q", got)
	}
	if got := types(t, ps.client.Bytes()); got != "TDC" {
		t.Fatalf("client got %q, want TDC", got)
	}
	if res.status != pgwire.TxIdle || res.failed {
		t.Fatalf("result %+v", res)
	}
	want := encodeBackend(t, &pgproto3.DataRow{Values: [][]byte{[]byte("1")}})
	if !bytes.Contains(ps.client.Bytes(), want) {
		t.Fatal("the DataRow did not reach the client unchanged")
	}
}

// An extended-protocol batch whose Bind fails: the client gets the
// ParseComplete and the error, the store skips to the Sync, and the unit
// reports the failure; a failed unnamed Parse leaves no statement.
func TestPumpExtendedError(t *testing.T) {
	ps := newPumpSession(t, route.Settings{Primary: route.Old},
		&pgproto3.ParseComplete{},
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "22P02", Message: "invalid input syntax for type integer"},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	res := ps.run(t,
		&pgproto3.Parse{Name: "s1", Query: "SELECT $1::int"},
		&pgproto3.Bind{PreparedStatement: "s1", Parameters: [][]byte{[]byte("x")}},
		&pgproto3.Execute{},
		&pgproto3.Sync{})
	if got := types(t, ps.conn.sent.Bytes()); got != "PBES" {
		t.Fatalf("store was sent %q, want PBES", got)
	}
	if got := types(t, ps.client.Bytes()); got != "1E" {
		t.Fatalf("client got %q, want 1E", got)
	}
	if !res.failed || res.status != pgwire.TxIdle {
		t.Fatalf("result %+v", res)
	}
	if ps.rs.stmts["s1"] == nil {
		t.Fatal("the statement parsed before the failed Bind is gone")
	}
	if _, ok := ps.rs.portals[""]; ok {
		t.Fatal("the failed Bind left a portal")
	}
	if ps.u.skipping {
		t.Fatal("the store still skips after the ReadyForQuery")
	}
}

// A mirrored UPDATE ... RETURNING: the store is sent the text rewritten to
// return the row image after the marker column; the client gets only its
// own column, in the RowDescription and in each DataRow, and the image is
// kept as the unit's event for the secondary.
func TestPumpStripsRowImage(t *testing.T) {
	int4 := func(name string, table uint32, attr uint16) pgproto3.FieldDescription {
		return pgproto3.FieldDescription{Name: []byte(name), TableOID: table, TableAttributeNumber: attr, DataTypeOID: 23, DataTypeSize: 4, TypeModifier: -1}
	}
	marker := pgproto3.FieldDescription{Name: []byte(classify.ImageMarker), DataTypeOID: 25, DataTypeSize: -1, TypeModifier: -1}
	ps := newPumpSession(t, route.Settings{Primary: route.Old, Mirror: true},
		&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{int4("id", 16384, 1), marker, int4("id", 16384, 1), int4("a", 16384, 2)}},
		&pgproto3.DataRow{Values: [][]byte{[]byte("7"), nil, []byte("7"), []byte("1")}},
		&pgproto3.CommandComplete{CommandTag: []byte("UPDATE 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	const sql = "UPDATE t SET a = 1 WHERE id = 7 RETURNING id"
	res := ps.run(t, &pgproto3.Query{String: sql})

	_, body, err := pgwire.ReadMessage(bytes.NewReader(ps.conn.sent.Bytes()), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if sent := string(bytes.TrimSuffix(body, []byte{0})); sent == sql || !bytes.Contains(body, []byte(classify.ImageMarker)) {
		t.Fatalf("store was sent %q: not rewritten to return the row image", sent)
	}
	if got := types(t, ps.client.Bytes()); got != "TDC" {
		t.Fatalf("client got %q, want TDC", got)
	}
	wantT := encodeBackend(t, &pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{int4("id", 16384, 1)}})
	wantD := encodeBackend(t, &pgproto3.DataRow{Values: [][]byte{[]byte("7")}})
	if !bytes.Contains(ps.client.Bytes(), wantT) || !bytes.Contains(ps.client.Bytes(), wantD) {
		t.Fatalf("the client's RowDescription or DataRow still carries the image: % x", ps.client.Bytes())
	}
	if len(res.events) != 1 || res.events[0].image == nil || len(res.events[0].image.rows) != 1 {
		t.Fatalf("events %+v: want one with one row image", res.events)
	}
	if row := res.events[0].image.rows[0]; len(row) != 2 || string(row[0]) != "7" || string(row[1]) != "1" {
		t.Fatalf("row image %q, want [7 1]", row)
	}
}
