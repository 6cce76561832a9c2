package pgwire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"runtime"
	"sort"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/jackc/pgx/v5/pgproto3"
)

// ---------------------------------------------------------------------------
// Message builders

// typed returns a typed message with the given body.
func typed(typ byte, body []byte) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], uint32(4+len(body)))
	return append(b, body...)
}

// header returns a typed message header with a raw length field.
func header(typ byte, length uint32) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], length)
	return b
}

// cstr returns s followed by a NUL.
func cstr(s string) []byte { return append([]byte(s), 0) }

// startupPacket returns a startup-phase packet: length, code, then rest.
func startupPacket(code uint32, rest []byte) []byte {
	b := make([]byte, 8, 8+len(rest))
	binary.BigEndian.PutUint32(b, uint32(8+len(rest)))
	binary.BigEndian.PutUint32(b[4:], code)
	return append(b, rest...)
}

// startupMsg returns a StartupMessage with the given key/value pairs.
func startupMsg(version uint32, kv ...string) []byte {
	var rest []byte
	for _, s := range kv {
		rest = append(rest, cstr(s)...)
	}
	return startupPacket(version, append(rest, 0))
}

// rawPacket returns a packet whose length field is length, followed by rest.
func rawPacket(length uint32, rest []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, length)
	return append(b, rest...)
}

func cancelPacket(pid uint32, key []byte) []byte {
	return startupPacket(codeCancelRequest, append(binary.BigEndian.AppendUint32(nil, pid), key...))
}

func query(sql string) []byte { return typed('Q', cstr(sql)) }

func concat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// pipeline is an extended-protocol batch: Parse, Bind, Describe, Execute, Sync.
func pipeline() []byte {
	parse := concat(cstr("s1"), cstr("SELECT $1::int"), []byte{0, 1, 0, 0, 0, 23})
	bind := concat(cstr(""), cstr("s1"), []byte{0, 0, 0, 1, 0, 0, 0, 2, '4', '2', 0, 0})
	return concat(
		typed('P', parse),
		typed('B', bind),
		typed('D', concat([]byte{'P'}, cstr(""))),
		typed('E', concat(cstr(""), []byte{0, 0, 0, 0})),
		typed('S', nil),
	)
}

// copyStream is a COPY FROM STDIN: a query, CopyData rows, CopyDone.
func copyStream(rows int) []byte {
	b := query("COPY t FROM STDIN")
	for i := range rows {
		b = append(b, typed('d', fmt.Appendf(nil, "%d\trow %d with some text\n", i, i))...)
	}
	return append(b, typed('c', nil)...)
}

// serverReply is a typical backend response to a simple query.
func serverReply() []byte {
	return concat(
		typed('T', concat([]byte{0, 1}, cstr("n"), make([]byte, 18))),
		typed('D', concat([]byte{0, 1, 0, 0, 0, 1}, []byte("1"))),
		typed('C', cstr("SELECT 1")),
		typed('Z', []byte{'I'}),
	)
}

// ---------------------------------------------------------------------------
// Readers

// errTimeout is a transport error that a caller may decide to ignore.
var errTimeout = timeoutError{}

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

func isTimeout(err error) bool {
	return errors.Is(err, errTimeout) || errors.Is(err, iotest.ErrTimeout)
}

// step is one piece of a stepReader's output: n bytes (fewer if the data
// ends first), then err if set. A piece larger than the caller's buffer is
// continued on the next Read. A step with n == 0 and an error returns just
// the error.
type step struct {
	n   int
	err error
}

// stepReader serves data following steps; once they are used up it serves
// the rest as fast as the caller's buffer allows, then io.EOF. If eofWithData
// is set, the Read that returns the last bytes returns io.EOF as well.
type stepReader struct {
	data        []byte
	steps       []step
	eofWithData bool
	reads       int
}

func (r *stepReader) Read(p []byte) (int, error) {
	r.reads++
	want, err := len(r.data), error(nil)
	if len(r.steps) > 0 {
		want, err = r.steps[0].n, r.steps[0].err
	}
	if len(r.data) == 0 && err == nil {
		return 0, io.EOF
	}
	n := min(want, len(p), len(r.data))
	if len(r.steps) > 0 {
		if n < want && n == len(p) && n < len(r.data) {
			r.steps[0].n -= n // the rest of the piece comes next
			err = nil
		} else {
			r.steps = r.steps[1:]
		}
	}
	copy(p, r.data[:n])
	r.data = r.data[n:]
	if len(r.data) == 0 && r.eofWithData && err == nil {
		err = io.EOF
	}
	return n, err
}

// splitReader returns a stepReader that returns data split at the given
// offsets (ascending), one piece per Read.
func splitReader(data []byte, cuts ...int) *stepReader {
	r := &stepReader{data: data}
	prev := 0
	for _, c := range cuts {
		r.steps = append(r.steps, step{n: c - prev})
		prev = c
	}
	return r
}

// countingReader counts the bytes handed to the Framer.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// errReader fails every Read with err.
type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

// ---------------------------------------------------------------------------
// ReadStartup

// errKind classifies an error for table tests.
type errKind int

const (
	errNone errKind = iota
	errEOF
	errUnexpectedEOF
	errProto
	errTransport
)

func (k errKind) String() string {
	return [...]string{"nil", "io.EOF", "io.ErrUnexpectedEOF", "ErrProtocol", "transport"}[k]
}

// checkErr fails t unless err is of kind k. Transport errors must be
// exactly io.EOF / io.ErrUnexpectedEOF and never wrap ErrProtocol; protocol
// errors must wrap ErrProtocol.
func checkErr(t testing.TB, err error, k errKind) {
	t.Helper()
	switch k {
	case errNone:
		if err != nil {
			t.Fatalf("unexpected error: %v", err)
		}
	case errEOF:
		if err != io.EOF {
			t.Fatalf("err = %v, want io.EOF", err)
		}
	case errUnexpectedEOF:
		if err != io.ErrUnexpectedEOF {
			t.Fatalf("err = %v, want io.ErrUnexpectedEOF", err)
		}
	case errProto:
		if !errors.Is(err, ErrProtocol) {
			t.Fatalf("err = %v, want an ErrProtocol", err)
		}
	case errTransport:
		if err == nil || errors.Is(err, ErrProtocol) {
			t.Fatalf("err = %v, want a transport error not wrapping ErrProtocol", err)
		}
	}
	if k != errProto && errors.Is(err, ErrProtocol) {
		t.Fatalf("err = %v wraps ErrProtocol; want %v", err, k)
	}
}

func TestReadStartup(t *testing.T) {
	bigValue := strings.Repeat("x", MaxStartupPacket-8-len("application_name")-3)
	key32 := bytes.Repeat([]byte{0xAB}, 32)
	tests := []struct {
		name  string
		in    []byte
		kind  errKind
		check func(t *testing.T, m pgproto3.FrontendMessage)
	}{
		{
			name: "startup 3.0",
			in:   startupMsg(pgproto3.ProtocolVersion30, "user", "alice", "database", "app", "application_name", "psql"),
			check: func(t *testing.T, m pgproto3.FrontendMessage) {
				sm := m.(*pgproto3.StartupMessage)
				want := map[string]string{"user": "alice", "database": "app", "application_name": "psql"}
				if sm.ProtocolVersion != pgproto3.ProtocolVersion30 || !maps.Equal(sm.Parameters, want) {
					t.Fatalf("got %d %v, want 3.0 %v", sm.ProtocolVersion, sm.Parameters, want)
				}
			},
		},
		{
			name: "startup 3.2",
			in:   startupMsg(pgproto3.ProtocolVersion32, "user", "bob", "options", "-c search_path=x"),
			check: func(t *testing.T, m pgproto3.FrontendMessage) {
				sm := m.(*pgproto3.StartupMessage)
				want := map[string]string{"user": "bob", "options": "-c search_path=x"}
				if sm.ProtocolVersion != pgproto3.ProtocolVersion32 || !maps.Equal(sm.Parameters, want) {
					t.Fatalf("got %d %v, want 3.2 %v", sm.ProtocolVersion, sm.Parameters, want)
				}
			},
		},
		{
			name: "startup of exactly the maximum length",
			in:   startupMsg(pgproto3.ProtocolVersion30, "application_name", bigValue),
			check: func(t *testing.T, m pgproto3.FrontendMessage) {
				if got := m.(*pgproto3.StartupMessage).Parameters["application_name"]; got != bigValue {
					t.Fatalf("application_name has %d bytes, want %d", len(got), len(bigValue))
				}
			},
		},
		{
			name: "SSLRequest",
			in:   startupPacket(codeSSLRequest, nil),
			check: func(t *testing.T, m pgproto3.FrontendMessage) {
				if _, ok := m.(*pgproto3.SSLRequest); !ok {
					t.Fatalf("got %T, want *pgproto3.SSLRequest", m)
				}
			},
		},
		{
			name: "GSSEncRequest",
			in:   startupPacket(codeGSSEncRequest, nil),
			check: func(t *testing.T, m pgproto3.FrontendMessage) {
				if _, ok := m.(*pgproto3.GSSEncRequest); !ok {
					t.Fatalf("got %T, want *pgproto3.GSSEncRequest", m)
				}
			},
		},
		{
			name: "CancelRequest 3.0",
			in:   cancelPacket(4242, []byte{1, 2, 3, 4}),
			check: func(t *testing.T, m pgproto3.FrontendMessage) {
				cr := m.(*pgproto3.CancelRequest)
				if cr.ProcessID != 4242 || !bytes.Equal(cr.SecretKey, []byte{1, 2, 3, 4}) {
					t.Fatalf("got pid %d key %x", cr.ProcessID, cr.SecretKey)
				}
			},
		},
		{
			name: "CancelRequest 3.2 long key",
			in:   cancelPacket(7, key32),
			check: func(t *testing.T, m pgproto3.FrontendMessage) {
				cr := m.(*pgproto3.CancelRequest)
				if cr.ProcessID != 7 || !bytes.Equal(cr.SecretKey, key32) {
					t.Fatalf("got pid %d key %x", cr.ProcessID, cr.SecretKey)
				}
			},
		},
		{name: "empty input", in: nil, kind: errEOF},
		{name: "truncated length", in: []byte{0, 0}, kind: errUnexpectedEOF},
		{name: "truncated body", in: startupMsg(pgproto3.ProtocolVersion30, "user", "alice")[:12], kind: errUnexpectedEOF},
		{name: "length only", in: rawPacket(8, nil), kind: errUnexpectedEOF},
		{name: "length 0", in: rawPacket(0, nil), kind: errProto},
		{name: "length 7", in: rawPacket(7, []byte{0, 3, 0}), kind: errProto},
		{name: "negative length", in: rawPacket(0xFFFFFFFF, make([]byte, 16)), kind: errProto},
		{name: "length over limit", in: rawPacket(MaxStartupPacket+1, make([]byte, MaxStartupPacket)), kind: errProto},
		{name: "HTTP garbage", in: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), kind: errProto},
		{name: "TLS ClientHello", in: []byte{0x16, 0x03, 0x01, 0x00, 0xf1, 0x01, 0x00, 0x00}, kind: errProto},
		{name: "unknown code", in: startupPacket(1234<<16|5678, nil), kind: errProto},
		{name: "protocol 2.0", in: startupPacket(2<<16, append(make([]byte, 64), 0)), kind: errProto},
		{name: "startup without terminator", in: startupPacket(pgproto3.ProtocolVersion30, cstr("user")), kind: errProto},
		{name: "startup with junk after terminator", in: startupPacket(pgproto3.ProtocolVersion30, concat(cstr("user"), cstr("a"), []byte{'x'})), kind: errProto},
		{name: "startup without params", in: startupPacket(pgproto3.ProtocolVersion30, []byte{0}), kind: errProto},
		{name: "cancel too short", in: startupPacket(codeCancelRequest, []byte{0, 0, 0, 1}), kind: errProto},
		{name: "cancel key too long", in: cancelPacket(1, make([]byte, 257)), kind: errProto},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			trailer := []byte("trailing bytes that belong to the next read")
			r := bytes.NewReader(append(bytes.Clone(tt.in), trailer...))
			if tt.kind == errEOF || tt.kind == errUnexpectedEOF {
				r = bytes.NewReader(tt.in) // the stream ends here
			}
			m, err := ReadStartup(iotest.HalfReader(r))
			checkErr(t, err, tt.kind)
			if tt.kind != errNone {
				if m != nil {
					t.Fatalf("got message %T with error", m)
				}
				return
			}
			if r.Len() != len(trailer) {
				t.Fatalf("%d bytes left unread, want %d (no read-ahead)", r.Len(), len(trailer))
			}
			tt.check(t, m)
		})
	}
}

func TestReadStartupTransportError(t *testing.T) {
	boom := errors.New("connection reset")
	_, err := ReadStartup(errReader{boom})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want %v", err, boom)
	}
	checkErr(t, err, errTransport)

	// A failure inside the body is passed through too.
	r := io.MultiReader(bytes.NewReader(startupMsg(pgproto3.ProtocolVersion30, "user", "a")[:9]), errReader{boom})
	_, err = ReadStartup(r)
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want %v", err, boom)
	}
	checkErr(t, err, errTransport)
}

func TestDecodeStartup(t *testing.T) {
	for _, body := range [][]byte{nil, {0}, {0, 3, 0}} {
		if _, err := DecodeStartup(body); !errors.Is(err, ErrProtocol) {
			t.Errorf("DecodeStartup(%x) err = %v, want ErrProtocol", body, err)
		}
	}
	m, err := DecodeStartup(startupMsg(pgproto3.ProtocolVersion30, "user", "u")[4:])
	if err != nil {
		t.Fatal(err)
	}
	if got := m.(*pgproto3.StartupMessage).Parameters["user"]; got != "u" {
		t.Fatalf("user = %q", got)
	}
}

// ---------------------------------------------------------------------------
// ReadMessage

func TestReadMessage(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		maxBody int
		kind    errKind
		typ     byte
		body    []byte
	}{
		{name: "query", in: query("SELECT 1"), maxBody: 100, typ: 'Q', body: cstr("SELECT 1")},
		{name: "empty body", in: typed('S', nil), maxBody: 0, typ: 'S', body: []byte{}},
		{name: "body at limit", in: typed('p', []byte("secret")), maxBody: 6, typ: 'p', body: []byte("secret")},
		{name: "empty input", in: nil, maxBody: 100, kind: errEOF},
		{name: "truncated header", in: []byte{'p', 0, 0}, maxBody: 100, kind: errUnexpectedEOF},
		{name: "truncated body", in: query("SELECT 1")[:8], maxBody: 100, kind: errUnexpectedEOF, typ: 'Q'},
		{name: "length 3", in: concat(header('p', 3), []byte("xyz")), maxBody: 100, kind: errProto, typ: 'p'},
		{name: "length 0", in: header('p', 0), maxBody: 100, kind: errProto, typ: 'p'},
		{name: "negative length", in: concat(header('p', 0xFFFFFFFF), make([]byte, 8)), maxBody: 100, kind: errProto, typ: 'p'},
		{name: "min negative length", in: concat(header('p', 0x80000000), make([]byte, 8)), maxBody: 1 << 30, kind: errProto, typ: 'p'},
		{name: "body over limit", in: typed('p', []byte("secret!")), maxBody: 6, kind: errProto, typ: 'p'},
		{name: "huge length not allocated", in: header('p', 0x7FFFFFFF), maxBody: 1 << 20, kind: errProto, typ: 'p'},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			trailer := []byte{'X', 0, 0, 0, 4}
			r := bytes.NewReader(append(bytes.Clone(tt.in), trailer...))
			if tt.kind == errEOF || tt.kind == errUnexpectedEOF {
				r = bytes.NewReader(tt.in)
			}
			typ, body, err := ReadMessage(iotest.OneByteReader(r), tt.maxBody)
			checkErr(t, err, tt.kind)
			if typ != tt.typ {
				t.Fatalf("type = %q, want %q", typ, tt.typ)
			}
			if tt.kind != errNone {
				if body != nil {
					t.Fatalf("body = %q with error", body)
				}
				return
			}
			if !bytes.Equal(body, tt.body) {
				t.Fatalf("body = %q, want %q", body, tt.body)
			}
			if r.Len() != len(trailer) {
				t.Fatalf("%d bytes left unread, want %d (no read-ahead)", r.Len(), len(trailer))
			}
		})
	}
}

func TestReadMessageTransportError(t *testing.T) {
	boom := errors.New("connection reset")
	r := io.MultiReader(bytes.NewReader(query("SELECT 1")[:7]), errReader{boom})
	typ, _, err := ReadMessage(r, 100)
	if !errors.Is(err, boom) || typ != 'Q' {
		t.Fatalf("got %q, %v; want 'Q', %v", typ, err, boom)
	}
	checkErr(t, err, errTransport)
}

// ---------------------------------------------------------------------------
// Framer: a model of the input and a harness that checks every call

// minFramerBuf is the smallest buffer NewFramer uses.
const minFramerBuf = 64

type modelMsg struct {
	off, total int
	typ        byte
	length     int
}

func (m modelMsg) end() int { return m.off + m.total }

// model is the message structure of an input, as the protocol defines it.
type model struct {
	msgs      []modelMsg // in order; the last may run past the input
	invalidAt int        // offset of the first header with an invalid length, or -1
	stop      int        // where parsing stopped (may exceed the input length)
}

func parseModel(data []byte, maxBody int) model {
	m := model{invalidAt: -1}
	off := 0
	for len(data)-off >= HeaderLen {
		n := int64(int32(binary.BigEndian.Uint32(data[off+1:])))
		if n < 4 || n-4 > int64(maxBody) {
			m.invalidAt = off
			break
		}
		mm := modelMsg{off: off, total: 1 + int(n), typ: data[off], length: int(n) - 4}
		m.msgs = append(m.msgs, mm)
		off += mm.total
	}
	m.stop = off
	return m
}

// startedBefore is the number of messages that start before pos.
func (m model) startedBefore(pos int) int {
	return sort.Search(len(m.msgs), func(i int) bool { return m.msgs[i].off >= pos })
}

// inside reports whether pos lies strictly inside a message.
func (m model) inside(pos int) bool {
	i := m.startedBefore(pos)
	return i > 0 && m.msgs[i-1].end() > pos
}

type framerOpts struct {
	bufSize    int
	maxBody    int
	whole      *[256]bool
	visitErrAt int // the visit (1-based) whose visitor fails with errVisit; 0 = none
}

var errVisit = errors.New("visitor says stop")

type visitRec struct {
	typ    byte
	length int
	body   []byte
	whole  bool
	call   int // index of the Next call that made the visit
}

type framerRun struct {
	relayed   []byte
	outs      []int // lengths of the non-empty slices returned
	visits    []visitRec
	err       error // the final error
	calls     int
	timeouts  int // read errors cleared with ClearErr
	visitErrs int // errVisit returns that were continued past
}

// runFramer relays data from src (which must yield exactly data) through a
// Framer until a final error, clearing timeouts and continuing past visitor
// errors, and checks after every call that the Framer's output agrees with
// the model of data. It returns what happened for further checks.
func runFramer(t testing.TB, src io.Reader, data []byte, o framerOpts) framerRun {
	t.Helper()
	cr := &countingReader{r: src}
	fr := NewFramer(cr, o.bufSize, o.maxBody, o.whole)
	m := parseModel(data, o.maxBody)
	eff := max(o.bufSize, minFramerBuf)
	marked := func(typ byte) bool { return o.whole != nil && o.whole[typ] }
	// mustWhole: a message the Framer has to hand over complete.
	mustWhole := func(mm modelMsg) bool { return marked(mm.typ) && mm.total <= eff }

	var run framerRun
	relayed := 0
	visitFail := ""
	visit := func(typ byte, length int, body []byte, whole bool) error {
		k := len(run.visits)
		if visitFail != "" {
			return nil
		}
		fail := func(format string, args ...any) {
			visitFail = fmt.Sprintf("visit %d (%q, %d, whole=%v): ", k, typ, length, whole) + fmt.Sprintf(format, args...)
		}
		switch {
		case k >= len(m.msgs):
			fail("the input has only %d messages", len(m.msgs))
			return nil
		case typ != m.msgs[k].typ || length != m.msgs[k].length:
			fail("want message %q with a %d-byte body", m.msgs[k].typ, m.msgs[k].length)
		case m.msgs[k].off < relayed:
			fail("message at %d visited after %d bytes were relayed", m.msgs[k].off, relayed)
		case whole && m.msgs[k].end() > len(data):
			fail("whole visit of a message the input truncates")
		case whole && !bytes.Equal(body, data[m.msgs[k].off+HeaderLen:m.msgs[k].end()]):
			fail("body %q, want %q", body, data[m.msgs[k].off+HeaderLen:m.msgs[k].end()])
		case whole && m.msgs[k].total > eff:
			fail("whole visit of a message larger than the %d-byte buffer", eff)
		case !whole && body != nil:
			fail("partial visit with a non-nil body")
		case !whole && mustWhole(m.msgs[k]):
			fail("marked message that fits the buffer visited in part")
		}
		run.visits = append(run.visits, visitRec{typ: typ, length: length, body: bytes.Clone(body), whole: whole, call: run.calls})
		if o.visitErrAt == len(run.visits) {
			return errVisit
		}
		return nil
	}

	// Every call returns at least a byte or an error; errors other than
	// the final one come from the reader's script or the visitor.
	maxCalls := 4*len(data) + 10000
	for ; ; run.calls++ {
		if run.calls > maxCalls {
			t.Fatalf("no end after %d calls to Next; relayed %d of %d bytes", run.calls, relayed, len(data))
		}
		out, err := fr.Next(visit)
		if visitFail != "" {
			t.Fatalf("call %d: %s", run.calls, visitFail)
		}
		if len(out) > eff {
			t.Fatalf("call %d returned %d bytes, more than the %d-byte buffer", run.calls, len(out), eff)
		}
		if relayed+len(out) > len(data) || !bytes.Equal(out, data[relayed:relayed+len(out)]) {
			t.Fatalf("call %d returned %d bytes at offset %d that are not the input's", run.calls, len(out), relayed)
		}
		if len(out) == 0 && err == nil {
			t.Fatalf("call %d returned nothing and no error", run.calls)
		}
		relayed += len(out)
		run.relayed = append(run.relayed, out...)
		if len(out) > 0 {
			run.outs = append(run.outs, len(out))
		}
		if got, want := len(run.visits), m.startedBefore(relayed); got != want {
			t.Fatalf("call %d: after relaying %d bytes, %d messages visited, want %d", run.calls, relayed, got, want)
		}
		for i := len(run.visits) - 1; i >= 0 && run.visits[i].call == run.calls; i-- {
			if run.visits[i].whole && m.msgs[i].end() > relayed {
				t.Fatalf("call %d: whole message %d (ends at %d) not wholly relayed (%d)", run.calls, i, m.msgs[i].end(), relayed)
			}
		}
		if got, want := fr.InMessage(), m.inside(relayed); got != want {
			t.Fatalf("call %d: InMessage() = %v after relaying %d bytes, want %v", run.calls, got, relayed, want)
		}
		if relayed+fr.Buffered() != cr.n {
			t.Fatalf("call %d: relayed %d + buffered %d != %d bytes read", run.calls, relayed, fr.Buffered(), cr.n)
		}
		switch {
		case err == nil:
			continue
		case errors.Is(err, errVisit):
			last := m.msgs[len(run.visits)-1]
			if run.visits[len(run.visits)-1].whole && relayed != last.end() {
				t.Fatalf("visitor error: relayed up to %d, want the end %d of the visited message", relayed, last.end())
			}
			if !run.visits[len(run.visits)-1].whole && relayed <= last.off {
				t.Fatalf("visitor error on a streamed message at %d: its start not relayed (%d)", last.off, relayed)
			}
			run.visitErrs++
			continue
		case isTimeout(err):
			if len(out) > 0 {
				t.Fatalf("read error returned with %d bytes", len(out))
			}
			if !isTimeout(fr.ReadErr()) {
				t.Fatalf("ReadErr() = %v after Next returned %v", fr.ReadErr(), err)
			}
			run.timeouts++
			fr.ClearErr()
			continue
		}
		run.err = err
		break
	}
	checkFramerEnd(t, fr, m, data, run, relayed, mustWhole)
	return run
}

// checkFramerEnd checks how the run ended against the model.
func checkFramerEnd(t testing.TB, fr *Framer, m model, data []byte, run framerRun, relayed int, mustWhole func(modelMsg) bool) {
	t.Helper()
	wantRelayed, wantVisits, wantKind := len(data), len(m.msgs), errEOF
	switch {
	case m.invalidAt >= 0:
		wantRelayed, wantKind = m.invalidAt, errProto
	case len(m.msgs) > 0 && m.msgs[len(m.msgs)-1].end() > len(data):
		wantKind = errUnexpectedEOF
		if last := m.msgs[len(m.msgs)-1]; mustWhole(last) {
			wantRelayed, wantVisits = last.off, len(m.msgs)-1
		}
	case m.stop < len(data):
		wantRelayed, wantKind = m.stop, errUnexpectedEOF
	}
	checkErr(t, run.err, wantKind)
	if relayed != wantRelayed {
		t.Fatalf("relayed %d bytes, want %d (final error %v)", relayed, wantRelayed, run.err)
	}
	if len(run.visits) != wantVisits {
		t.Fatalf("visited %d messages, want %d", len(run.visits), wantVisits)
	}
	// The end is sticky and returns nothing more.
	out, err := fr.Next(func(byte, int, []byte, bool) error {
		t.Fatalf("visit after the end")
		return nil
	})
	if len(out) != 0 {
		t.Fatalf("Next after the end returned %d bytes", len(out))
	}
	checkErr(t, err, wantKind)
}

// ---------------------------------------------------------------------------
// Framer tests

func marks(types string) *[256]bool {
	w := new([256]bool)
	for i := range len(types) {
		w[types[i]] = true
	}
	return w
}

func allTypes() *[256]bool {
	w := new([256]bool)
	for i := range w {
		w[i] = true
	}
	return w
}

func TestFramerRelay(t *testing.T) {
	bigRow := typed('D', bytes.Repeat([]byte("0123456789abcdef"), 1<<16)) // 1 MiB body
	inputs := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"query", query("SELECT 1")},
		{"pipeline", concat(pipeline(), pipeline(), query("SELECT 2"), typed('X', nil))},
		{"copy", copyStream(200)},
		{"server", concat(serverReply(), serverReply(), typed('E', concat([]byte{'S'}, cstr("ERROR"), []byte{'C'}, cstr("42P01"), []byte{0})), typed('Z', []byte{'I'}))},
		{"medium messages", concat(typed('d', bytes.Repeat([]byte{'a'}, 60)), typed('d', bytes.Repeat([]byte{'b'}, 200)), typed('Z', []byte{'T'}), typed('d', bytes.Repeat([]byte{'c'}, 5000)))},
		{"large row", concat(serverReply(), bigRow, typed('C', cstr("SELECT 1")), typed('Z', []byte{'I'}))},
	}
	readers := []struct {
		name string
		mk   func([]byte) io.Reader
		big  bool // fast enough for the large input
	}{
		{"bytes", func(b []byte) io.Reader { return bytes.NewReader(b) }, true},
		{"one-byte", func(b []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) }, false},
		{"half", func(b []byte) io.Reader { return iotest.HalfReader(bytes.NewReader(b)) }, true},
		{"data-err", func(b []byte) io.Reader { return iotest.DataErrReader(bytes.NewReader(b)) }, true},
		{"timeout", func(b []byte) io.Reader { return iotest.TimeoutReader(bytes.NewReader(b)) }, true},
		{"split", func(b []byte) io.Reader {
			var cuts []int
			for c := 1; c < len(b); c = c*2 + 3 {
				cuts = append(cuts, c)
			}
			return splitReader(b, cuts...)
		}, true},
		{"split-timeouts", func(b []byte) io.Reader {
			r := &stepReader{data: b, eofWithData: true}
			for i := range 40 {
				r.steps = append(r.steps, step{n: i%7 + 1}, step{err: errTimeout}, step{n: 3, err: errTimeout})
			}
			return r
		}, false},
	}
	wholes := []struct {
		name  string
		whole *[256]bool
	}{
		{"none", nil},
		{"server", marks("CEZ")},
		{"all", allTypes()},
	}
	for _, in := range inputs {
		for _, rd := range readers {
			if len(in.data) > 100000 && !rd.big {
				continue
			}
			for _, w := range wholes {
				for _, bufSize := range []int{0, 64, 100, 4096} {
					name := fmt.Sprintf("%s/%s/%s/%d", in.name, rd.name, w.name, bufSize)
					t.Run(name, func(t *testing.T) {
						run := runFramer(t, rd.mk(in.data), in.data, framerOpts{bufSize: bufSize, maxBody: 2 << 20, whole: w.whole})
						if !bytes.Equal(run.relayed, in.data) {
							t.Fatalf("relayed bytes differ from the input")
						}
						if rd.name == "timeout" && len(in.data) > 0 && run.timeouts != 1 {
							t.Fatalf("saw %d timeouts, want 1", run.timeouts)
						}
					})
				}
			}
		}
	}
}

func TestFramerLargeMessageStreamed(t *testing.T) {
	const bufSize = 4 << 10
	body := make([]byte, 1<<20)
	for i := range body {
		body[i] = byte(i * 7)
	}
	data := concat(typed('C', cstr("SELECT 1")), typed('D', body), typed('Z', []byte{'I'}))
	for _, w := range []*[256]bool{nil, marks("DCZ")} {
		run := runFramer(t, iotest.HalfReader(bytes.NewReader(data)), data, framerOpts{bufSize: bufSize, maxBody: 1 << 21, whole: w})
		if !bytes.Equal(run.relayed, data) {
			t.Fatal("large message not relayed exactly")
		}
		if len(run.visits) != 3 {
			t.Fatalf("%d visits, want 3", len(run.visits))
		}
		if v := run.visits[1]; v.typ != 'D' || v.length != len(body) || v.whole || v.body != nil {
			t.Fatalf("large row visit = %q %d whole=%v, want streamed 'D' %d", v.typ, v.length, v.whole, len(body))
		}
		if v := run.visits[2]; w != nil && (!v.whole || string(v.body) != "I") {
			t.Fatalf("ReadyForQuery visit whole=%v body %q, want whole \"I\"", v.whole, v.body)
		}
		if len(run.outs) < len(data)/bufSize {
			t.Fatalf("%d slices returned for %d bytes with a %d-byte buffer", len(run.outs), len(data), bufSize)
		}
		for _, n := range run.outs {
			if n > bufSize {
				t.Fatalf("slice of %d bytes exceeds the buffer", n)
			}
		}
	}
}

func TestFramerInMessage(t *testing.T) {
	body := bytes.Repeat([]byte{'z'}, 1000)
	data := concat(typed('d', body), typed('c', nil))
	fr := NewFramer(bytes.NewReader(data), 100, 1<<20, nil)
	visits := 0
	visit := func(typ byte, length int, _ []byte, whole bool) error {
		visits++
		return nil
	}
	var got []byte
	for {
		out, err := fr.Next(visit)
		got = append(got, out...)
		if err != nil {
			if err != io.EOF {
				t.Fatalf("err = %v", err)
			}
			break
		}
		if want := len(got) < 1+4+len(body); fr.InMessage() != want {
			t.Fatalf("after %d bytes InMessage() = %v, want %v", len(got), !want, want)
		}
	}
	if fr.InMessage() || visits != 2 || !bytes.Equal(got, data) {
		t.Fatalf("end: InMessage %v, %d visits, relayed %d of %d bytes", fr.InMessage(), visits, len(got), len(data))
	}
}

func TestFramerEnd(t *testing.T) {
	q := query("SELECT 1")
	big := typed('d', make([]byte, 500))
	tests := []struct {
		name     string
		data     []byte
		whole    *[256]bool
		kind     errKind
		relayed  int
		inMsg    bool
		nVisited int
	}{
		{name: "empty", data: nil, kind: errEOF},
		{name: "boundary", data: concat(q, q), kind: errEOF, relayed: 2 * len(q), nVisited: 2},
		{name: "mid header", data: concat(q, q[:3]), kind: errUnexpectedEOF, relayed: len(q), nVisited: 1},
		{name: "type byte only", data: concat(q, q[:1]), kind: errUnexpectedEOF, relayed: len(q), nVisited: 1},
		{name: "mid body streamed", data: concat(q, q[:7]), kind: errUnexpectedEOF, relayed: len(q) + 7, inMsg: true, nVisited: 2},
		{name: "mid body whole", data: concat(q, q[:7]), whole: marks("Q"), kind: errUnexpectedEOF, relayed: len(q), nVisited: 1},
		{name: "mid large body", data: concat(q, big[:300]), whole: marks("d"), kind: errUnexpectedEOF, relayed: len(q) + 300, inMsg: true, nVisited: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fr := NewFramer(iotest.HalfReader(bytes.NewReader(tt.data)), 128, 1<<20, tt.whole)
			var got []byte
			visits := 0
			var err error
			for err == nil {
				var out []byte
				out, err = fr.Next(func(byte, int, []byte, bool) error { visits++; return nil })
				got = append(got, out...)
			}
			checkErr(t, err, tt.kind)
			if len(got) != tt.relayed || !bytes.Equal(got, tt.data[:tt.relayed]) {
				t.Fatalf("relayed %d bytes, want the first %d", len(got), tt.relayed)
			}
			if fr.InMessage() != tt.inMsg || visits != tt.nVisited {
				t.Fatalf("InMessage %v, %d visits; want %v, %d", fr.InMessage(), visits, tt.inMsg, tt.nVisited)
			}
			runFramer(t, bytes.NewReader(tt.data), tt.data, framerOpts{bufSize: 128, maxBody: 1 << 20, whole: tt.whole})
		})
	}
}

func TestFramerInvalidLength(t *testing.T) {
	good := concat(query("SELECT 1"), typed('S', nil))
	tests := []struct {
		name string
		bad  []byte
	}{
		{"length 3", header('Q', 3)},
		{"length 0", header('Q', 0)},
		{"negative", concat(header('d', 0xFFFFFFFF), make([]byte, 32))},
		{"min int32", header('d', 0x80000000)},
		{"over maxBody", typed('d', make([]byte, 101))},
		{"huge", header('d', 0x7FFFFFFF)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := concat(good, tt.bad, query("SELECT 2"))
			fr := NewFramer(bytes.NewReader(data), 4096, 100, nil)
			var types []byte
			out, err := fr.Next(func(typ byte, _ int, _ []byte, _ bool) error { types = append(types, typ); return nil })
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("err = %v, want ErrProtocol", err)
			}
			if !bytes.Equal(out, good) || string(types) != "QS" {
				t.Fatalf("returned %q visiting %q; want the messages before the bad one", out, types)
			}
			if !strings.Contains(err.Error(), "invalid message length") {
				t.Fatalf("error %q does not say what is wrong", err)
			}
			out, err = fr.Next(func(byte, int, []byte, bool) error { t.Fatal("visit after error"); return nil })
			if len(out) != 0 || !errors.Is(err, ErrProtocol) {
				t.Fatalf("second call: %d bytes, %v", len(out), err)
			}
			for _, bs := range []int{64, 1000} {
				run := runFramer(t, iotest.OneByteReader(bytes.NewReader(data)), data, framerOpts{bufSize: bs, maxBody: 100})
				if !bytes.Equal(run.relayed, good) {
					t.Fatalf("one byte at a time, buffer %d: relayed %q, want %q", bs, run.relayed, good)
				}
			}
		})
	}
}

func TestFramerVisitorError(t *testing.T) {
	q1, q2 := query("SELECT 1"), query("SELECT 2")
	term := typed('X', nil)
	data := concat(q1, term, q2)
	stop := errors.New("stop")
	fr := NewFramer(bytes.NewReader(data), 4096, 1000, nil)
	var types []byte
	visit := func(typ byte, _ int, _ []byte, _ bool) error {
		types = append(types, typ)
		if typ == 'X' {
			return stop
		}
		return nil
	}
	out, err := fr.Next(visit)
	if !errors.Is(err, stop) || !bytes.Equal(out, concat(q1, term)) || string(types) != "QX" {
		t.Fatalf("got %q, %v visiting %q; want Query+Terminate and the visitor's error", out, err, types)
	}
	if fr.InMessage() {
		t.Fatal("InMessage after a whole message")
	}
	// The framer is still usable: the rest comes next, each message once.
	out, err = fr.Next(visit)
	if err != nil || !bytes.Equal(out, q2) || string(types) != "QXQ" {
		t.Fatalf("after the visitor error: %q, %v visiting %q", out, err, types)
	}

	// An error on a streamed message: the bytes of its start are returned
	// with the error and the message is not visited again.
	big := typed('d', bytes.Repeat([]byte{'r'}, 3000))
	data = concat(q1, big, q2)
	fr = NewFramer(bytes.NewReader(data), 256, 1<<20, nil)
	types = types[:0]
	visit = func(typ byte, _ int, _ []byte, whole bool) error {
		types = append(types, typ)
		if typ == 'd' {
			if whole {
				t.Fatal("3000-byte message visited whole with a 256-byte buffer")
			}
			return stop
		}
		return nil
	}
	out, err = fr.Next(visit)
	if !errors.Is(err, stop) || len(out) <= len(q1) || !bytes.Equal(out, data[:len(out)]) {
		t.Fatalf("streamed visitor error: %d bytes, %v; want the Query and the start of the row", len(out), err)
	}
	if !fr.InMessage() {
		t.Fatal("InMessage false inside the streamed row")
	}
	got := bytes.Clone(out)
	for err == nil || errors.Is(err, stop) {
		out, err = fr.Next(visit)
		got = append(got, out...)
	}
	if err != io.EOF || !bytes.Equal(got, data) || string(types) != "QdQ" {
		t.Fatalf("end: %v, relayed %d of %d bytes, visited %q; want io.EOF, all, \"QdQ\"", err, len(got), len(data), types)
	}

	// The harness agrees for every visit position and a few buffers.
	data = concat(pipeline(), big, copyStream(5), serverReply())
	for at := 1; at <= len(parseModel(data, 1<<20).msgs); at++ {
		for _, bs := range []int{64, 512, 8192} {
			run := runFramer(t, iotest.HalfReader(bytes.NewReader(data)), data, framerOpts{bufSize: bs, maxBody: 1 << 20, whole: marks("CZ"), visitErrAt: at})
			if run.visitErrs != 1 || !bytes.Equal(run.relayed, data) {
				t.Fatalf("visit error at %d, buffer %d: %d visitor errors, relayed %d of %d", at, bs, run.visitErrs, len(run.relayed), len(data))
			}
		}
	}
}

func TestFramerReadErrorClearErr(t *testing.T) {
	big := typed('d', bytes.Repeat([]byte("copy"), 100))
	data := concat(query("SELECT 1"), big, typed('Z', []byte{'I'}), typed('c', nil))
	// Time out inside the header of the streamed row, inside its body,
	// inside the header of the whole-marked ReadyForQuery, and with data
	// inside its body.
	q := query("SELECT 1")
	r := &stepReader{data: data, steps: []step{
		{n: len(q) + 3}, {err: errTimeout},
		{n: 30}, {err: errTimeout},
		{n: len(big) - 33 + 3}, {err: errTimeout},
		{n: 2, err: errTimeout},
	}}
	fr := NewFramer(r, 64, 1<<20, marks("Z"))
	var got []byte
	var types []byte
	visit := func(typ byte, _ int, _ []byte, _ bool) error { types = append(types, typ); return nil }
	timeouts := 0
	for {
		out, err := fr.Next(visit)
		got = append(got, out...)
		if err == nil {
			continue
		}
		if !errors.Is(err, errTimeout) {
			if err != io.EOF {
				t.Fatalf("err = %v", err)
			}
			break
		}
		if len(out) != 0 {
			t.Fatalf("timeout returned with %d bytes", len(out))
		}
		timeouts++
		// Sticky until cleared, without touching the reader.
		reads := r.reads
		if out, err2 := fr.Next(visit); len(out) != 0 || !errors.Is(err2, errTimeout) || r.reads != reads {
			t.Fatalf("second call after a timeout: %d bytes, %v, %d reads", len(out), err2, r.reads-reads)
		}
		if !errors.Is(fr.ReadErr(), errTimeout) {
			t.Fatalf("ReadErr() = %v", fr.ReadErr())
		}
		fr.ClearErr()
		if fr.ReadErr() != nil {
			t.Fatal("ReadErr() after ClearErr")
		}
	}
	if timeouts != 4 {
		t.Fatalf("saw %d timeouts, want 4", timeouts)
	}
	if !bytes.Equal(got, data) || string(types) != "QdZc" {
		t.Fatalf("relayed %d of %d bytes, visited %q", len(got), len(data), types)
	}
}

func TestFramerReadErrorAfterData(t *testing.T) {
	// A reader that returns data and a hard error together: the data comes
	// first, the error after it.
	boom := errors.New("connection reset")
	q := query("SELECT 1")
	r := &stepReader{data: concat(q, q[:3]), steps: []step{{n: len(q) + 3, err: boom}}}
	fr := NewFramer(r, 64, 1000, nil)
	out, err := fr.Next(func(byte, int, []byte, bool) error { return nil })
	if err != nil || !bytes.Equal(out, q) {
		t.Fatalf("got %q, %v; want the query first", out, err)
	}
	out, err = fr.Next(func(byte, int, []byte, bool) error { return nil })
	if len(out) != 0 || !errors.Is(err, boom) || errors.Is(err, ErrProtocol) {
		t.Fatalf("got %d bytes, %v; want %v", len(out), err, boom)
	}
	if fr.Buffered() != 3 {
		t.Fatalf("Buffered() = %d, want 3", fr.Buffered())
	}
}

// ---------------------------------------------------------------------------
// Error

func TestError(t *testing.T) {
	cause := errors.New("dial tcp: refused")
	e := Fatal(CodeConnectionFailure, "cannot reach store %q after %d tries", "pg1", 3).
		WithHint("Check that %s is up.", "pg1").
		WithCause(cause)
	if e.Severity != "FATAL" || e.Code != "08006" || e.Message != `cannot reach store "pg1" after 3 tries` || e.Hint != "Check that pg1 is up." {
		t.Fatalf("Fatal built %+v", e)
	}
	if !errors.Is(e, cause) {
		t.Fatal("Error does not unwrap to its cause")
	}
	var pe *Error
	if !errors.As(fmt.Errorf("wrapped: %w", e), &pe) || pe != e {
		t.Fatal("errors.As does not find the *Error")
	}
	if got, want := e.Error(), `FATAL: cannot reach store "pg1" after 3 tries (SQLSTATE 08006): dial tcp: refused`; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
	if got, want := Fatal(CodeAdminShutdown, "bye").Error(), "FATAL: bye (SQLSTATE 57P01)"; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}

	resp := e.Response()
	if resp.Severity != "FATAL" || resp.SeverityUnlocalized != "FATAL" || resp.Code != CodeConnectionFailure ||
		resp.Message != e.Message || resp.Hint != e.Hint || resp.Detail != "" {
		t.Fatalf("Response() = %+v", resp)
	}
	if strings.Contains(resp.Message, cause.Error()) || strings.Contains(resp.Detail, cause.Error()) {
		t.Fatal("the cause leaks to the client")
	}
	e2 := &Error{Severity: "ERROR", Code: CodeFeatureNotSupported, Message: "no", Detail: "because"}
	if r := e2.Response(); r.Severity != "ERROR" || r.Detail != "because" || r.Hint != "" {
		t.Fatalf("Response() = %+v", r)
	}
}

func TestAppendMessages(t *testing.T) {
	e := Fatal(CodeTooManyConnections, "too many clients for %s", "pg1").WithHint("Raise limits.")
	prefix := []byte("prefix")
	b, err := AppendMessages(bytes.Clone(prefix),
		&pgproto3.ParameterStatus{Name: "server_version", Value: "17.0"},
		e.Response(),
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
	)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, prefix) {
		t.Fatal("dst not kept")
	}
	fe := pgproto3.NewFrontend(bytes.NewReader(b[len(prefix):]), io.Discard)
	m, err := fe.Receive()
	if ps, ok := m.(*pgproto3.ParameterStatus); err != nil || !ok || ps.Name != "server_version" || ps.Value != "17.0" {
		t.Fatalf("first message %#v, %v", m, err)
	}
	m, err = fe.Receive()
	if er, ok := m.(*pgproto3.ErrorResponse); err != nil || !ok || er.Severity != "FATAL" || er.Code != "53300" ||
		er.Message != "too many clients for pg1" || er.Hint != "Raise limits." {
		t.Fatalf("second message %#v, %v", m, err)
	}
	m, err = fe.Receive()
	if rq, ok := m.(*pgproto3.ReadyForQuery); err != nil || !ok || rq.TxStatus != 'I' {
		t.Fatalf("third message %#v, %v", m, err)
	}
	if _, err = fe.Receive(); err == nil {
		t.Fatal("more messages than appended")
	}

	// The same bytes frame as three whole messages.
	data := b[len(prefix):]
	run := runFramer(t, bytes.NewReader(data), data, framerOpts{bufSize: 256, maxBody: 1000, whole: allTypes()})
	var got []byte
	for _, v := range run.visits {
		if !v.whole {
			t.Fatalf("message %q not visited whole", v.typ)
		}
		got = append(got, v.typ)
	}
	if string(got) != "SEZ" {
		t.Fatalf("framed as %q, want \"SEZ\"", got)
	}

	// Encoding errors are reported.
	if _, err := AppendMessages(nil, &pgproto3.DataRow{Values: make([][]byte, 1<<16)}); err == nil {
		t.Fatal("no error for an unencodable message")
	}
}

// TestReadMessageAllocatesAsBytesArrive: a peer that announces a message
// of the largest allowed size and then sends a few bytes makes the reader
// hold about one chunk, not the announced length (a few such sessions used
// to take a gigabyte of heap); a body that arrives whole is read whole.
func TestReadMessageAllocatesAsBytesArrive(t *testing.T) {
	const announced = 256 << 20
	hdr := []byte{'Q', 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], announced+4)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, _, err := ReadMessage(io.MultiReader(bytes.NewReader(hdr), bytes.NewReader([]byte("SELECT"))), announced)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("want an unexpected EOF, got %v", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 8<<20 {
		t.Fatalf("reading a 6-byte start of a %d-byte message allocated %d bytes", announced, got)
	}
	for _, size := range []int{0, 10, bodyChunk, bodyChunk + 1, 3*bodyChunk + 17} {
		body := bytes.Repeat([]byte{'x'}, size)
		msg := append([]byte{'d', 0, 0, 0, 0}, body...)
		binary.BigEndian.PutUint32(msg[1:], uint32(size+4))
		typ, got, err := ReadMessage(bytes.NewReader(msg), 4*bodyChunk)
		if err != nil || typ != 'd' || !bytes.Equal(got, body) {
			t.Fatalf("size %d: got %q, %d bytes, %v", size, typ, len(got), err)
		}
	}
}
