package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// updateGolden rewrites proxy/testdata/golden/*.txt from the proxied runs:
//
//	go test -run TestGoldenTranscripts ./proxy/ -update
var updateGolden = flag.Bool("update", false, "rewrite the golden wire transcripts in testdata/golden from the proxied runs")

// goldenStep is one round trip of an exchange: the frontend messages sent in
// one flush, and the number of ReadyForQuery messages that end it.
type goldenStep struct {
	send []pgproto3.FrontendMessage
	// copyIn holds what to send after each CopyInResponse of the step, in
	// order (CopyData..., then CopyDone or CopyFail).
	copyIn [][]pgproto3.FrontendMessage
	// ready is the number of ReadyForQuery messages that end the step; 0 means 1.
	ready int
	// flushed, for a step ended by Flush instead of Sync, is the number of
	// backend messages it gets (no ReadyForQuery comes).
	flushed int
	// pause is how long to wait after sending, before reading the replies.
	pause time.Duration
}

type goldenExchange struct {
	name  string
	steps []goldenStep
}

// Helpers to keep the exchange table readable.

func gQuery(sql string) goldenStep {
	return goldenStep{send: []pgproto3.FrontendMessage{&pgproto3.Query{String: sql}}}
}

func gMsgs(ready int, msgs ...pgproto3.FrontendMessage) goldenStep {
	return goldenStep{send: msgs, ready: ready}
}

// gFlushed is a step ended by Flush that gets n backend messages.
func gFlushed(n int, msgs ...pgproto3.FrontendMessage) goldenStep {
	return goldenStep{send: append(msgs, &pgproto3.Flush{}), flushed: n}
}

// gPBES is an unnamed Parse/Bind/Execute/Sync group with text parameters.
func gPBES(sql string, params ...string) []pgproto3.FrontendMessage {
	var args [][]byte
	for _, p := range params {
		args = append(args, []byte(p))
	}
	return []pgproto3.FrontendMessage{
		&pgproto3.Parse{Query: sql},
		&pgproto3.Bind{Parameters: args},
		&pgproto3.Execute{},
		&pgproto3.Sync{},
	}
}

func gConcat(groups ...[]pgproto3.FrontendMessage) []pgproto3.FrontendMessage {
	var out []pgproto3.FrontendMessage
	for _, g := range groups {
		out = append(out, g...)
	}
	return out
}

func gCopyData(s string) *pgproto3.CopyData { return &pgproto3.CopyData{Data: []byte(s)} }

// Built-in function OIDs are fixed by pg_proc.dat and stable across releases;
// the function_call exchange prints their regprocedure names to show it.
const (
	oidLength = 1257 // length(text)
	oidInt4pl = 177  // int4pl(integer, integer)
)

var goldenExchanges = []goldenExchange{
	{name: "simple_multi_statement", steps: []goldenStep{
		gQuery(`SELECT 1 AS one, 'two'::text AS two; SELECT generate_series(1,3) AS g`),
	}},
	{name: "empty_query", steps: []goldenStep{
		gQuery(``),
		gQuery(`-- only a comment`),
		gQuery(`/* block comment */ ;  ; `),
		// The extended protocol's empty query.
		gMsgs(1, &pgproto3.Parse{Query: ""}, &pgproto3.Bind{}, &pgproto3.Describe{ObjectType: 'P'}, &pgproto3.Execute{}, &pgproto3.Sync{}),
	}},
	{name: "extended_protocol", steps: []goldenStep{
		gMsgs(1,
			&pgproto3.Parse{Name: "s1", Query: `SELECT $1::int + 1 AS n, $2::text AS t, $1 AS raw`, ParameterOIDs: []uint32{23, 25}},
			&pgproto3.Describe{ObjectType: 'S', Name: "s1"},
			&pgproto3.Bind{PreparedStatement: "s1", Parameters: [][]byte{[]byte("41"), []byte("x")}, ResultFormatCodes: []int16{1, 0, 0}},
			&pgproto3.Describe{ObjectType: 'P'},
			&pgproto3.Execute{},
			&pgproto3.Sync{},
		),
		// A statement that returns no rows describes as NoData.
		gMsgs(1,
			&pgproto3.Parse{Name: "s2", Query: `SET search_path = public`},
			&pgproto3.Describe{ObjectType: 'S', Name: "s2"},
			&pgproto3.Bind{PreparedStatement: "s2"},
			&pgproto3.Execute{},
			&pgproto3.Sync{},
		),
		gMsgs(1, &pgproto3.Close{ObjectType: 'S', Name: "s1"}, &pgproto3.Close{ObjectType: 'S', Name: "s2"}, &pgproto3.Sync{}),
		// The closed statement is gone.
		gMsgs(1, &pgproto3.Bind{PreparedStatement: "s1", Parameters: [][]byte{[]byte("1"), []byte("y")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
	}},
	{name: "pipeline_error_recovery", steps: []goldenStep{
		// Two Sync groups in one flush, the second failing.
		gMsgs(2, gConcat(
			gPBES(`SELECT $1::int AS a`, "1"),
			gPBES(`SELECT 1/$1::int AS b`, "0"),
		)...),
		// The session recovers after the failed group.
		gMsgs(1, gPBES(`SELECT $1::text AS c`, "recovered")...),
		// Three groups in one flush, the middle one failing.
		gMsgs(3, gConcat(
			gPBES(`SELECT 'first' AS x`),
			gPBES(`SELECT * FROM no_such_table`),
			gPBES(`SELECT 'third' AS x`),
		)...),
	}},
	{name: "pipeline_error_one_sync", steps: []goldenStep{
		// An error skips the rest of the batch up to Sync.
		gMsgs(1,
			&pgproto3.Parse{Query: `SELECT 1 AS a`}, &pgproto3.Bind{}, &pgproto3.Execute{},
			&pgproto3.Parse{Query: `SELECT 1/0 AS b`}, &pgproto3.Bind{}, &pgproto3.Execute{},
			&pgproto3.Parse{Query: `SELECT 3 AS c`}, &pgproto3.Bind{}, &pgproto3.Execute{},
			&pgproto3.Sync{},
		),
		gMsgs(1, gPBES(`SELECT 4 AS d`)...),
	}},
	{name: "portal_suspended", steps: []goldenStep{
		gQuery(`BEGIN`),
		gMsgs(1,
			&pgproto3.Parse{Name: "five", Query: `SELECT g FROM generate_series(1,5) g`},
			&pgproto3.Bind{DestinationPortal: "p", PreparedStatement: "five"},
			&pgproto3.Describe{ObjectType: 'P', Name: "p"},
			&pgproto3.Execute{Portal: "p", MaxRows: 2},
			&pgproto3.Sync{},
		),
		// The portal survives Sync inside the transaction.
		gMsgs(1,
			&pgproto3.Execute{Portal: "p", MaxRows: 2},
			&pgproto3.Execute{Portal: "p", MaxRows: 2},
			&pgproto3.Execute{Portal: "p", MaxRows: 2},
			&pgproto3.Sync{},
		),
		gQuery(`COMMIT`),
		// After COMMIT the portal is gone.
		gMsgs(1, &pgproto3.Execute{Portal: "p"}, &pgproto3.Sync{}),
	}},
	{name: "errors_outside_transaction", steps: []goldenStep{
		gQuery(`SELECT 1/0`),
		gQuery(`SELECT * FROM no_such_table`),
		gQuery(`SELECT 1 FROM WHERE x`),
		gQuery(`SELECT 'ok' AS a; SELECT 1/0; SELECT 'never' AS c`),
		gQuery(`SELECT 'after' AS a`),
	}},
	{name: "errors_inside_transaction", steps: []goldenStep{
		gQuery(`BEGIN`),
		gQuery(`SELECT 'in tx' AS a`),
		gQuery(`SELECT * FROM no_such_table`),
		gQuery(`SELECT 1`),
		gMsgs(1, gPBES(`SELECT 2`)...),
		gQuery(`ROLLBACK`),
		gQuery(`SELECT 'after rollback' AS a`),
	}},
	{name: "notices", steps: []goldenStep{
		gQuery(`DO $$BEGIN RAISE NOTICE 'n1'; RAISE WARNING 'w1'; END$$`),
		gQuery(`DO $$BEGIN RAISE NOTICE 'with detail' USING DETAIL = 'd', HINT = 'h'; END$$`),
		gQuery(`DROP TABLE IF EXISTS no_such_table`),
	}},
	{name: "copy_out", steps: []goldenStep{
		gQuery(`COPY (SELECT g, g*2 FROM generate_series(1,5) g) TO STDOUT`),
		gQuery(`COPY (SELECT 'a,b' AS x, NULL AS y) TO STDOUT WITH (FORMAT csv, HEADER)`),
	}},
	{name: "copy_in", steps: []goldenStep{
		{
			send: []pgproto3.FrontendMessage{&pgproto3.Query{String: `CREATE TABLE golden_copy (a int, b text); COPY golden_copy FROM STDIN`}},
			copyIn: [][]pgproto3.FrontendMessage{{
				gCopyData("1\tone\n"), gCopyData("2\ttwo\n"), gCopyData("3\t\\N\n"), &pgproto3.CopyDone{},
			}},
		},
		{
			send:   []pgproto3.FrontendMessage{&pgproto3.Query{String: `COPY golden_copy FROM STDIN`}},
			copyIn: [][]pgproto3.FrontendMessage{{gCopyData("4\tfour\n"), &pgproto3.CopyFail{Message: "golden client gave up"}}},
		},
		{
			send:   []pgproto3.FrontendMessage{&pgproto3.Query{String: `COPY golden_copy FROM STDIN`}},
			copyIn: [][]pgproto3.FrontendMessage{{gCopyData("x\tbad\n"), &pgproto3.CopyDone{}}},
		},
		gQuery(`SELECT * FROM golden_copy ORDER BY a`),
	}},
	{name: "listen_notify", steps: []goldenStep{
		gQuery(`LISTEN ch; NOTIFY ch, 'payload'`),
		gQuery(`SELECT pg_notify('ch', 'via function')`),
		gQuery(`UNLISTEN *`),
	}},
	{name: "parameter_status", steps: []goldenStep{
		gQuery(`SET application_name = 'changed'`),
		gQuery(`SET TimeZone = 'Europe/Paris'`),
		gQuery(`SELECT '2024-01-01 12:00:00+00'::timestamptz::text AS ts`),
		gQuery(`BEGIN; SET LOCAL application_name = 'in tx'`),
		gQuery(`ROLLBACK`),
		gQuery(`RESET ALL`),
	}},
	{name: "nulls_and_unicode", steps: []goldenStep{
		gQuery(`SELECT NULL::int, 'héllo ☃'::text, '{1,2}'::int[]`),
		gQuery(`SELECT ''::text AS empty, NULL::text AS null, E'tab\there' AS ctl`),
	}},
	{name: "function_call", steps: []goldenStep{
		gQuery(fmt.Sprintf(`SELECT %d::regprocedure AS length, %d::regprocedure AS int4pl`, oidLength, oidInt4pl)),
		gMsgs(1, &pgproto3.FunctionCall{Function: oidLength, Arguments: [][]byte{[]byte("héllo ☃")}}),
		gMsgs(1, &pgproto3.FunctionCall{Function: oidInt4pl, ArgFormatCodes: []uint16{1}, Arguments: [][]byte{{0, 0, 0, 40}, {0, 0, 0, 2}}, ResultFormatCode: 1}),
		gMsgs(1, &pgproto3.FunctionCall{Function: oidLength, Arguments: [][]byte{nil}}),
		gMsgs(1, &pgproto3.FunctionCall{Function: 1}),
	}},
	{name: "large_row", steps: []goldenStep{
		// Larger than the proxy's relay buffer.
		gQuery(`SELECT repeat('0123456789', 4000) AS big, 1 AS small`),
	}},
	{name: "unnamed_across_syncs", steps: []goldenStep{
		// pgx's describe-exec mode and many drivers: Parse + Describe + Sync,
		// then Bind + Execute + Sync of the unnamed statement.
		gQuery(`CREATE TABLE u (id int PRIMARY KEY, v text);
			CREATE FUNCTION f_out(a int, OUT b int, OUT c text) LANGUAGE sql AS $$ SELECT a * 2, 'x' || a $$;
			CREATE PROCEDURE p_out(INOUT x int) LANGUAGE plpgsql AS $$ BEGIN INSERT INTO u VALUES (x + 1000, 'proc'); x := x + 1; END $$`),
		gMsgs(1, &pgproto3.Parse{Query: `INSERT INTO u VALUES ($1, $2)`}, &pgproto3.Describe{ObjectType: 'S'}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("1"), []byte("one")}}, &pgproto3.Describe{ObjectType: 'P'}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("2"), []byte("two")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Parse{Query: `INSERT INTO u VALUES ($1, $2) RETURNING id, v`}, &pgproto3.Describe{ObjectType: 'S'}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("3"), []byte("three")}, ResultFormatCodes: []int16{1, 0}}, &pgproto3.Describe{ObjectType: 'P'}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Parse{Query: `SELECT * FROM f_out($1)`}, &pgproto3.Describe{ObjectType: 'S'}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("21")}}, &pgproto3.Describe{ObjectType: 'P'}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Parse{Query: `CALL p_out($1)`}, &pgproto3.Describe{ObjectType: 'S'}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("5")}}, &pgproto3.Describe{ObjectType: 'P'}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("6")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		// Inside a transaction, and a named statement next to the unnamed one.
		gQuery(`BEGIN`),
		gMsgs(1, &pgproto3.Parse{Query: `UPDATE u SET v = $2 WHERE id = $1`}, &pgproto3.Describe{ObjectType: 'S'},
			&pgproto3.Parse{Name: "del", Query: `DELETE FROM u WHERE id = $1`}, &pgproto3.Describe{ObjectType: 'S', Name: "del"}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("1"), []byte("uno")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{PreparedStatement: "del", Parameters: [][]byte{[]byte("2")}}, &pgproto3.Execute{},
			&pgproto3.Bind{Parameters: [][]byte{[]byte("3"), []byte("tres")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gQuery(`COMMIT`),
		gMsgs(1, &pgproto3.Bind{PreparedStatement: "del", Parameters: [][]byte{[]byte("1005")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gQuery(`SELECT * FROM u ORDER BY id`),
	}},
	{name: "flush_pipeline_error", steps: []goldenStep{
		gQuery(`CREATE TABLE fp (id int PRIMARY KEY)`),
		gQuery(`INSERT INTO fp VALUES (1)`),
		// A Flush-ended pipeline: each reply arrives without a Sync.
		gFlushed(3, &pgproto3.Parse{Query: `INSERT INTO fp VALUES ($1)`}, &pgproto3.Bind{Parameters: [][]byte{[]byte("2")}}, &pgproto3.Execute{}),
		// A statement fails in the middle: the error arrives at once.
		gFlushed(2, &pgproto3.Bind{Parameters: [][]byte{[]byte("1")}}, &pgproto3.Execute{}),
		// Skipped up to the Sync, which ends the failed implicit transaction.
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("4")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{Parameters: [][]byte{[]byte("5")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		// The same inside an explicit transaction.
		gQuery(`BEGIN`),
		gFlushed(3, &pgproto3.Parse{Name: "ins", Query: `INSERT INTO fp VALUES ($1)`}, &pgproto3.Bind{PreparedStatement: "ins", Parameters: [][]byte{[]byte("6")}}, &pgproto3.Execute{}),
		gFlushed(2, &pgproto3.Bind{PreparedStatement: "ins", Parameters: [][]byte{[]byte("6")}}, &pgproto3.Execute{}),
		gMsgs(1, &pgproto3.Sync{}),
		gQuery(`ROLLBACK`),
		// An error in Parse and in Describe, Flush-ended.
		gFlushed(1, &pgproto3.Parse{Query: `SELEC 1`}, &pgproto3.Bind{}, &pgproto3.Execute{}),
		gMsgs(1, &pgproto3.Sync{}),
		gFlushed(1, &pgproto3.Describe{ObjectType: 'S', Name: "no_such_statement"}),
		gMsgs(1, &pgproto3.Sync{}),
		gQuery(`SELECT * FROM fp ORDER BY id`),
	}},
	{name: "statement_timeout_between_messages", steps: []goldenStep{
		gQuery(`CREATE TABLE st (id int PRIMARY KEY)`),
		gQuery(`SET statement_timeout = '200ms'`),
		// The timeout runs from the first message to the Sync: it fires
		// while the server waits for the Describe.
		{send: []pgproto3.FrontendMessage{&pgproto3.Parse{Name: "slow", Query: `INSERT INTO st VALUES ($1)`}, &pgproto3.Flush{}}, flushed: 1, pause: 600 * time.Millisecond},
		gMsgs(1, &pgproto3.Describe{ObjectType: 'S', Name: "slow"}, &pgproto3.Sync{}),
		{send: []pgproto3.FrontendMessage{&pgproto3.Parse{Query: `INSERT INTO st VALUES ($1)`}, &pgproto3.Flush{}}, flushed: 1, pause: 600 * time.Millisecond},
		gMsgs(1, &pgproto3.Describe{ObjectType: 'S'}, &pgproto3.Bind{Parameters: [][]byte{[]byte("1")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		// The timeout fires in a batch, before a write's Describe.
		gMsgs(1, &pgproto3.Parse{Query: `SELECT pg_sleep(0.6)`}, &pgproto3.Bind{}, &pgproto3.Execute{},
			&pgproto3.Parse{Name: "w", Query: `INSERT INTO st VALUES ($1)`}, &pgproto3.Describe{ObjectType: 'S', Name: "w"}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Parse{Name: "w", Query: `INSERT INTO st VALUES ($1)`}, &pgproto3.Describe{ObjectType: 'S', Name: "w"},
			&pgproto3.Parse{Query: `SELECT pg_sleep(0.6)`}, &pgproto3.Bind{}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gMsgs(1, &pgproto3.Bind{PreparedStatement: "w", Parameters: [][]byte{[]byte("2")}}, &pgproto3.Execute{}, &pgproto3.Sync{}),
		gQuery(`RESET statement_timeout`),
		gQuery(`SELECT count(*) FROM st`),
	}},
	{name: "many_parameters", steps: []goldenStep{
		gQuery(`CREATE TABLE mp (a int PRIMARY KEY, b int)`),
		// 65,535 parameters, the protocol's maximum.
		gMsgs(1, gPBES(manyParamsSelect(65535), numbers(0, 65535)...)...),
		// A mirrored write with many rows (each parameter becomes part of a row image).
		gMsgs(1, gPBES(manyParamsInsert(2000), numbers(0, 4000)...)...),
		gQuery(`SELECT count(*), sum(a), sum(b) FROM mp`),
	}},
}

// manyParamsSelect is a query with n parameters.
func manyParamsSelect(n int) string {
	var sb strings.Builder
	sb.WriteString("SELECT cardinality(ARRAY[")
	for i := 1; i <= n; i++ {
		if i > 1 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, "$%d", i)
	}
	sb.WriteString("]::int[]) AS n")
	return sb.String()
}

// manyParamsInsert inserts rows rows of two parameters each into mp.
func manyParamsInsert(rows int) string {
	var sb strings.Builder
	sb.WriteString("INSERT INTO mp VALUES ")
	for i := 0; i < rows; i++ {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, "($%d::int,$%d::int)", 2*i+1, 2*i+2)
	}
	return sb.String()
}

func numbers(from, to int) []string {
	out := make([]string, 0, to-from)
	for i := from; i < to; i++ {
		out = append(out, strconv.Itoa(i))
	}
	return out
}

// TestGoldenTranscripts checks that the proxy is invisible on the wire: each
// exchange is run directly against PostgreSQL and through the proxy, each in
// a fresh database, and the two transcripts of backend messages must be
// identical message for message, apart from what must differ (the cancel key,
// backend PIDs, OIDs of created objects). The proxied transcript is also
// compared with testdata/golden/<name>.txt, after normalising what varies
// between server versions and runs.
func TestGoldenTranscripts(t *testing.T) {
	p := startProxy(t, shared, "postgres")
	direct := net.JoinHostPort("127.0.0.1", strconv.Itoa(shared.Port()))
	for _, ex := range goldenExchanges {
		t.Run(ex.name, func(t *testing.T) {
			dbDirect, dbProxied := newDB(t), newDB(t)
			want := runGolden(t, direct, dbDirect, ex)
			got := runGolden(t, p.addr, dbProxied, ex)
			same := slicesEqual(want.exact, got.exact)
			if !same {
				t.Errorf("proxied transcript differs from direct PostgreSQL\n%s\n--- direct\n%s\n--- proxied\n%s",
					lineDiff(want.exact, got.exact, "direct", "proxied"), numbered(want.exact), numbered(got.exact))
			}
			// A golden file records what the proxy must send: the proxied
			// transcript, or the direct one while the proxy gets it wrong.
			record := got.golden
			if !same {
				record = want.golden
			}
			checkGoldenFile(t, ex.name, got.golden, record)
		})
	}
}

// transcript is one run of an exchange, one message per line: "> " for what
// the test sent, "< " for what it received.
type transcript struct {
	// exact is normalised only for what must differ between a direct and a
	// proxied session: the cancel key, backend PIDs (but not whether a
	// notification came from the session itself) and the OIDs of objects
	// the exchange creates (each run has its own database).
	exact []string
	// golden is further normalised for what varies between server versions
	// and runs: server_version and error source locations.
	golden []string
}

func (tr *transcript) add(exact, golden string) {
	tr.exact = append(tr.exact, exact)
	tr.golden = append(tr.golden, golden)
}

func (tr *transcript) note(s string) { tr.add(s, s) }

func runGolden(t *testing.T, addr, db string, ex goldenExchange) *transcript {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fe := pgproto3.NewFrontend(conn, conn)
	tr := &transcript{}
	norm := &normaliser{}

	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("%s via %s: %s\ntranscript so far:\n%s", ex.name, addr, fmt.Sprintf(format, args...), numbered(tr.exact))
	}
	send := func(msgs []pgproto3.FrontendMessage) {
		t.Helper()
		for _, m := range msgs {
			line := "> " + frontendJSON(m)
			tr.add(line, line)
			fe.Send(m)
		}
		if err := fe.Flush(); err != nil {
			fail("send: %v", err)
		}
	}
	// receive records backend messages until the ready-th ReadyForQuery,
	// answering CopyInResponse messages from copyIn.
	receive := func(ready, flushed int, copyIn [][]pgproto3.FrontendMessage) {
		t.Helper()
		_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
		for ready > 0 || flushed > 0 {
			flushed--
			msg, err := fe.Receive()
			if err != nil {
				fail("receive: %v", err)
			}
			exact, golden := norm.lines(msg)
			tr.add("< "+exact, "< "+golden)
			switch m := msg.(type) {
			case *pgproto3.BackendKeyData:
				norm.self = m.ProcessID
			case *pgproto3.ReadyForQuery:
				ready--
			case *pgproto3.CopyInResponse:
				if len(copyIn) == 0 {
					fail("unexpected CopyInResponse")
				}
				send(copyIn[0])
				copyIn = copyIn[1:]
			case *pgproto3.ErrorResponse:
				if m.Severity == "FATAL" || m.Severity == "PANIC" {
					fail("session ended: %s", exact)
				}
			}
		}
		if len(copyIn) > 0 {
			fail("%d CopyInResponse messages never came", len(copyIn))
		}
	}

	// The StartupMessage names a database that differs between the runs, so
	// the transcript shows a fixed line in its place.
	tr.note("> StartupMessage (protocol 3.0, user postgres, application_name=golden, client_encoding=UTF8, DateStyle=ISO, TimeZone=UTC)")
	fe.Send(&pgproto3.StartupMessage{
		ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{
			"user":             "postgres",
			"database":         db,
			"application_name": "golden",
			"client_encoding":  "UTF8",
			"DateStyle":        "ISO",
			"TimeZone":         "UTC",
		},
	})
	if err := fe.Flush(); err != nil {
		fail("send startup: %v", err)
	}
	// PostgreSQL reports its parameters in the order of its sorted GUC table
	// (case-insensitive by name), and the proxy replays them in that same
	// order, so they are compared in order, like every other message.
	receive(1, 0, nil)

	for i, st := range ex.steps {
		tr.note(fmt.Sprintf("-- step %d", i+1))
		send(st.send)
		time.Sleep(st.pause)
		if st.flushed > 0 {
			receive(0, st.flushed, st.copyIn)
		} else {
			receive(max(st.ready, 1), 0, st.copyIn)
		}
	}

	// PostgreSQL closes the connection after Terminate without a word;
	// anything received before the end of the stream is part of the
	// transcript.
	tr.note("-- terminate")
	send([]pgproto3.FrontendMessage{&pgproto3.Terminate{}})
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		msg, err := fe.Receive()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			fail("connection still open 5s after Terminate")
		}
		if err != nil {
			break
		}
		exact, golden := norm.lines(msg)
		tr.add("< "+exact, "< "+golden)
	}
	return tr
}

// frontendJSON renders a message the test sends.
func frontendJSON(m pgproto3.FrontendMessage) string {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Sprintf("%T !marshal: %v", m, err)
	}
	if !bytes.HasPrefix(b, []byte(`{"Type":`)) { // FunctionCall has no MarshalJSON
		return reflect.TypeOf(m).Elem().Name() + " " + string(b)
	}
	return shorten(string(b))
}

// shorten keeps transcripts of huge messages readable: past 64 KiB a line
// shows its start, its length and a hash of the whole.
func shorten(line string) string {
	const limit = 64 << 10
	if len(line) <= limit {
		return line
	}
	sum := sha256.Sum256([]byte(line))
	return fmt.Sprintf("%s... (%d bytes, sha256 %x)", line[:200], len(line), sum[:8])
}

// firstUserOID is PostgreSQL's FirstNormalObjectId: objects created after
// initdb get OIDs from here on.
const firstUserOID = 16384

// normaliser renders the backend messages of one session.
type normaliser struct {
	self uint32            // the PID the session's BackendKeyData gave
	oids map[uint32]string // user object OID -> "$oidN", in order of appearance
}

// oid shows a built-in OID as itself and a user object's OID (which differs
// between the direct and proxied databases, since the OID counter is
// cluster-wide) by order of appearance, so that identity is still checked.
func (n *normaliser) oid(o uint32) any {
	if o < firstUserOID {
		return o
	}
	if n.oids == nil {
		n.oids = map[uint32]string{}
	}
	s, ok := n.oids[o]
	if !ok {
		s = fmt.Sprintf("$oid%d", len(n.oids)+1)
		n.oids[o] = s
	}
	return s
}

// lines renders a received message twice: exact (for comparing direct and
// proxied runs) and golden (also normalised for the golden files). msg is
// borrowed from the Frontend, so it is rendered at once and never kept.
func (n *normaliser) lines(msg pgproto3.BackendMessage) (exact, golden string) {
	mustJSON := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Sprintf("%T !marshal: %v", v, err)
		}
		return string(b)
	}
	errorJSON := func(typ string, e pgproto3.ErrorResponse) string {
		s := mustJSON(e)
		return strings.Replace(s, `{"Type":"ErrorResponse"`, `{"Type":"`+typ+`"`, 1)
	}
	withoutLocation := func(e pgproto3.ErrorResponse) pgproto3.ErrorResponse {
		e.File, e.Line, e.Routine = "", 0, ""
		return e
	}

	switch m := msg.(type) {
	case *pgproto3.BackendKeyData:
		// The proxy hands out its own cancel key. Only its shape must match.
		s := mustJSON(struct{ Type, ProcessID, SecretKey string }{
			"BackendKeyData", "$pid", fmt.Sprintf("$%d_bytes", len(m.SecretKey)),
		})
		return s, s
	case *pgproto3.NotificationResponse:
		// The PID differs between any two sessions. What a client can rely
		// on is whether it is its own (the PID its BackendKeyData gave):
		// that is how a listener recognises its own notifications, as the
		// NOTIFY documentation recommends.
		pid := "$other_session"
		if m.PID == n.self {
			pid = "$own_session"
		}
		s := mustJSON(struct{ Type, PID, Channel, Payload string }{"NotificationResponse", pid, m.Channel, m.Payload})
		return s, s
	case *pgproto3.RowDescription:
		type field struct {
			Name                 string
			TableOID             any
			TableAttributeNumber uint16
			DataTypeOID          any
			DataTypeSize         int16
			TypeModifier         int32
			Format               int16
		}
		fields := make([]field, len(m.Fields))
		for i, f := range m.Fields {
			fields[i] = field{string(f.Name), n.oid(f.TableOID), f.TableAttributeNumber, n.oid(f.DataTypeOID), f.DataTypeSize, f.TypeModifier, f.Format}
		}
		s := mustJSON(struct {
			Type   string
			Fields []field
		}{"RowDescription", fields})
		return s, s
	case *pgproto3.ParameterDescription:
		oids := make([]any, len(m.ParameterOIDs))
		for i, o := range m.ParameterOIDs {
			oids[i] = n.oid(o)
		}
		s := mustJSON(struct {
			Type          string
			ParameterOIDs []any
		}{"ParameterDescription", oids})
		return s, s
	case *pgproto3.FunctionCallResponse:
		if m.Result == nil { // pgproto3 shows NULL as {"text":""}
			s := `{"Type":"FunctionCallResponse","Result":null}`
			return s, s
		}
	case *pgproto3.ErrorResponse:
		return errorJSON("ErrorResponse", *m), errorJSON("ErrorResponse", withoutLocation(*m))
	case *pgproto3.NoticeResponse:
		e := pgproto3.ErrorResponse(*m)
		return errorJSON("NoticeResponse", e), errorJSON("NoticeResponse", withoutLocation(e))
	case *pgproto3.ParameterStatus:
		exact = mustJSON(m)
		if m.Name == "server_version" {
			return exact, mustJSON(&pgproto3.ParameterStatus{Name: m.Name, Value: "$server_version"})
		}
		return exact, exact
	}
	exact = mustJSON(msg)
	if !strings.HasPrefix(exact, `{"Type":`) {
		exact = reflect.TypeOf(msg).Elem().Name() + " " + exact
	}
	exact = shorten(exact)
	return exact, exact
}

// checkGoldenFile compares the proxied transcript with its golden file, or
// with -update rewrites the file with record.
func checkGoldenFile(t *testing.T, name string, lines, record []string) {
	t.Helper()
	path := filepath.Join("testdata", "golden", name+".txt")
	const header = "# Golden wire transcript: what a client sees through the proxy (go test ./proxy -run TestGoldenTranscripts -update).\n" +
		"# Normalised: BackendKeyData, notification PIDs, user object OIDs, server_version, error/notice File/Line/Routine.\n"
	content := header + strings.Join(lines, "\n") + "\n"
	if *updateGolden {
		if !slicesEqual(lines, record) {
			t.Logf("%s gets the direct transcript: the proxied one differs", path)
			content = header + strings.Join(record, "\n") + "\n"
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		t.Logf("no golden file %s (run with -update to create it)", path)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if string(b) == content {
		return
	}
	want := strings.Split(strings.TrimSuffix(strings.TrimPrefix(string(b), header), "\n"), "\n")
	t.Errorf("proxied transcript differs from %s (run with -update if the change is intended)\n%s",
		path, lineDiff(want, lines, path, "proxied"))
}

func slicesEqual(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func numbered(lines []string) string {
	var sb strings.Builder
	for i, l := range lines {
		fmt.Fprintf(&sb, "%4d %s\n", i+1, l)
	}
	return sb.String()
}

// lineDiff is a unified-style line diff of a and b (longest common
// subsequence; transcripts are short).
func lineDiff(a, b []string, aName, bName string) string {
	n, m := len(a), len(b)
	lcs := make([][]int, n+1)
	for i := range lcs {
		lcs[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if a[i] == b[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "--- %s\n+++ %s\n", aName, bName)
	i, j := 0, 0
	for i < n || j < m {
		switch {
		case i < n && j < m && a[i] == b[j]:
			fmt.Fprintf(&sb, "  %s\n", a[i])
			i++
			j++
		case j < m && (i == n || lcs[i][j+1] >= lcs[i+1][j]):
			fmt.Fprintf(&sb, "+ %s\n", b[j])
			j++
		default:
			fmt.Fprintf(&sb, "- %s\n", a[i])
			i++
		}
	}
	return sb.String()
}

// routedPhases are the routing states a session can be served in by the
// routed engine, for the differential tests.
var routedPhases = []struct {
	name string
	set  route.Settings
}{
	{"mirror", route.Settings{Primary: route.Old, Mirror: true}},
	{"reads_shifted", route.Settings{Primary: route.Old, Mirror: true, Reads: 100}},
	{"shadow", route.Settings{Primary: route.Old, Mirror: true, Reads: 100, Shadow: 100}},
	{"flipped", route.Settings{Primary: route.New, Mirror: true, Reads: 100}},
}

// TestGoldenTranscriptsDualWrite runs the same exchanges through a proxy
// in each routed phase (mirroring every write to a second store, reads
// shifted, shadow reads, writes flipped to new): a client must not be able
// to tell that its writes were rewritten to return row images, or that a
// second store follows in lockstep. After each exchange the two stores
// hold the same rows.
func TestGoldenTranscriptsDualWrite(t *testing.T) {
	for _, ph := range routedPhases {
		t.Run(ph.name, func(t *testing.T) {
			d := newDifferential(t, ph.set)
			for _, ex := range goldenExchanges {
				t.Run(ex.name, func(t *testing.T) {
					if ex.name == "many_parameters" && raceEnabled {
						// Classifying a 65,535-parameter statement takes
						// tens of seconds under the race detector; make
						// test runs this exchange without it (make fuzz).
						t.Skip("run without -race by make fuzz")
					}
					d.run(t, ex)
				})
			}
		})
	}
}

// differential runs exchanges directly against the old cluster and
// through a proxy in one routing state, each in fresh databases, and
// checks that the replies match and that both stores then hold the same
// rows. Writes that cannot be mirrored in lockstep (COPY FROM STDIN, a
// secondary past its budget) go to the drift ledger, for the repairer:
// their tables are not compared.
type differential struct {
	nc      *pgtest.Cluster
	direct  string
	p       *testProxy
	phase   string
	mu      sync.Mutex
	drifted map[string]bool
}

func newDifferential(t *testing.T, set route.Settings) *differential {
	t.Helper()
	d := &differential{nc: sharedNew(t), direct: net.JoinHostPort("127.0.0.1", strconv.Itoa(shared.Port())), phase: set.String(), drifted: map[string]bool{}}
	record := func(_ context.Context, entries []table.DriftEntry) error {
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, e := range entries {
			d.drifted[e.Table.Table] = true
		}
		return nil
	}
	d.p = startProxyWith(t, shared, "postgres", Options{RecordDrift: record}, func(c *config.Config) { c.New.DSN = d.nc.DSN("postgres") })
	d.p.srv.ApplyState(route.State{Version: 2, Settings: set})
	return d
}

// run runs ex both ways and compares; it reports whether they matched.
func (d *differential) run(t *testing.T, ex goldenExchange) bool {
	t.Helper()
	dbDirect, dbProxied := newDB(t), newDB(t)
	if err := d.nc.CreateDatabase(context.Background(), dbProxied); err != nil {
		t.Fatal(err)
	}
	want := runGolden(t, d.direct, dbDirect, ex)
	got := runGolden(t, d.p.addr, dbProxied, ex)
	if !slicesEqual(want.exact, got.exact) {
		t.Errorf("%s (%s): transcript differs from direct PostgreSQL\n%s\n--- direct\n%s\n--- proxied\n%s", ex.name, d.phase,
			lineDiff(want.exact, got.exact, "direct", "proxied"), numbered(want.exact), numbered(got.exact))
		return false
	}
	d.mu.Lock()
	skip := maps.Clone(d.drifted)
	clear(d.drifted)
	d.mu.Unlock()
	return assertStoresEqual(t, shared, d.nc, dbProxied, skip)
}

// assertStoresEqual checks that every table of db's public schema holds
// the same rows on both clusters.
func assertStoresEqual(t *testing.T, a, b *pgtest.Cluster, db string, skip map[string]bool) bool {
	t.Helper()
	ctx := context.Background()
	dump := func(c *pgtest.Cluster) map[string]string {
		conn, err := pgx.Connect(ctx, c.DSN(db))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		rows, err := conn.Query(ctx, `SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace ORDER BY 1`)
		if err != nil {
			t.Fatal(err)
		}
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, n := range names {
			if skip[n] {
				continue
			}
			var h string
			q := fmt.Sprintf(`SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM %s t`, pgx.Identifier{n}.Sanitize())
			if err := conn.QueryRow(ctx, q).Scan(&h); err != nil {
				t.Fatal(err)
			}
			out[n] = h
		}
		return out
	}
	da, db2 := dump(a), dump(b)
	if !reflect.DeepEqual(da, db2) {
		t.Errorf("the stores differ after the exchange:\n old %v\n new %v", da, db2)
		return false
	}
	return true
}
