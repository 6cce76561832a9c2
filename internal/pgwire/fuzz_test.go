package pgwire

import (
	"bytes"
	"encoding/binary"
	"io"
	"maps"
	"reflect"
	"testing"
	"testing/iotest"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Seed inputs shared by the fuzz targets.
func startupSeeds() [][]byte {
	return [][]byte{
		startupMsg(pgproto3.ProtocolVersion30, "user", "alice", "database", "app", "application_name", "psql", "client_encoding", "UTF8"),
		startupMsg(pgproto3.ProtocolVersion32, "user", "bob", "options", "-c statement_timeout=5s"),
		startupMsg(pgproto3.ProtocolVersion30, "user", "a", "user", "b"),
		startupPacket(codeSSLRequest, nil),
		startupPacket(codeGSSEncRequest, nil),
		cancelPacket(12345, []byte{0xde, 0xad, 0xbe, 0xef}),
		cancelPacket(1, bytes.Repeat([]byte{7}, 32)),
		startupPacket(2<<16, append(make([]byte, 64), 0)),
		startupPacket(pgproto3.ProtocolVersion30, cstr("user")),
		rawPacket(0xFFFFFFFF, make([]byte, 8)),
		rawPacket(7, []byte{0, 3, 0}),
		rawPacket(MaxStartupPacket+1, nil),
		[]byte("GET / HTTP/1.1\r\nHost: example\r\n\r\n"),
		{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03},
		startupMsg(pgproto3.ProtocolVersion30, "user", "alice")[:10],
		{0, 0},
		nil,
	}
}

func messageSeeds() [][]byte {
	return [][]byte{
		query("SELECT 1"),
		pipeline(),
		copyStream(3),
		serverReply(),
		typed('p', cstr("secret")),
		typed('p', concat(cstr("SCRAM-SHA-256"), []byte{0, 0, 0, 4}, []byte("n,,n"))),
		typed('X', nil),
		concat(header('Q', 3), []byte("xyz")),
		concat(header('d', 0xFFFFFFFF), make([]byte, 8)),
		header('d', 0x7FFFFFFF),
		query("SELECT 1")[:9],
		[]byte("GET / HTTP/1.1\r\n\r\n"),
		{'Q'},
	}
}

func FuzzReadStartup(f *testing.F) {
	for _, s := range startupSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		m, err := ReadStartup(r)
		consumed := len(data) - r.Len()
		if err != nil && m != nil {
			t.Fatalf("message %T returned with error %v", m, err)
		}
		if len(data) < 4 {
			if len(data) == 0 {
				checkErr(t, err, errEOF)
			} else {
				checkErr(t, err, errUnexpectedEOF)
			}
			return
		}
		n := int(int32(binary.BigEndian.Uint32(data)))
		if n < 8 || n > MaxStartupPacket {
			checkErr(t, err, errProto)
			if consumed != 4 {
				t.Fatalf("read %d bytes for an invalid length, want 4", consumed)
			}
			return
		}
		if len(data) < n {
			checkErr(t, err, errUnexpectedEOF)
			return
		}
		if consumed != n {
			t.Fatalf("read %d bytes of a %d-byte packet", consumed, n)
		}
		body := data[4:n]
		dm, derr := DecodeStartup(body)
		if (err == nil) != (derr == nil) || !reflect.DeepEqual(m, dm) {
			t.Fatalf("ReadStartup = %#v, %v but DecodeStartup = %#v, %v", m, err, dm, derr)
		}
		if err != nil {
			checkErr(t, err, errProto)
			return
		}
		code := binary.BigEndian.Uint32(body)
		switch m := m.(type) {
		case *pgproto3.StartupMessage:
			if m.ProtocolVersion != code || (code != pgproto3.ProtocolVersion30 && code != pgproto3.ProtocolVersion32) {
				t.Fatalf("startup message with version %d from code %d", m.ProtocolVersion, code)
			}
			if body[len(body)-1] != 0 {
				t.Fatal("startup message accepted without its terminator")
			}
			// What was accepted re-encodes to a packet that reads back the same.
			enc, err := m.Encode(nil)
			if err != nil {
				t.Fatalf("re-encoding: %v", err)
			}
			if len(enc) > n {
				t.Fatalf("re-encoded to %d bytes, from %d", len(enc), n)
			}
			m2, err := ReadStartup(bytes.NewReader(enc))
			if err != nil {
				t.Fatalf("re-reading %q: %v", enc, err)
			}
			if sm := m2.(*pgproto3.StartupMessage); sm.ProtocolVersion != m.ProtocolVersion || !maps.Equal(sm.Parameters, m.Parameters) {
				t.Fatalf("round trip changed %v to %v", m.Parameters, sm.Parameters)
			}
		case *pgproto3.SSLRequest:
			if code != codeSSLRequest {
				t.Fatalf("SSLRequest from code %d", code)
			}
		case *pgproto3.GSSEncRequest:
			if code != codeGSSEncRequest {
				t.Fatalf("GSSEncRequest from code %d", code)
			}
		case *pgproto3.CancelRequest:
			if code != codeCancelRequest || len(body) < 12 {
				t.Fatalf("CancelRequest from code %d, %d bytes", code, len(body))
			}
			if m.ProcessID != binary.BigEndian.Uint32(body[4:]) || !bytes.Equal(m.SecretKey, body[8:]) {
				t.Fatalf("CancelRequest %d %x from %x", m.ProcessID, m.SecretKey, body)
			}
		default:
			t.Fatalf("unexpected message type %T", m)
		}
	})
}

func FuzzReadMessage(f *testing.F) {
	for _, s := range messageSeeds() {
		f.Add(s, uint16(1000))
		f.Add(s, uint16(4))
	}
	f.Add(typed('p', []byte("12345")), uint16(5))
	f.Add(typed('p', []byte("123456")), uint16(5))
	f.Fuzz(func(t *testing.T, data []byte, maxBody uint16) {
		mb := int(maxBody)
		r := bytes.NewReader(data)
		typ, body, err := ReadMessage(iotest.HalfReader(r), mb)
		consumed := len(data) - r.Len()
		if err != nil && body != nil {
			t.Fatalf("body returned with error %v", err)
		}
		if len(data) < HeaderLen {
			if len(data) == 0 {
				checkErr(t, err, errEOF)
			} else {
				checkErr(t, err, errUnexpectedEOF)
			}
			return
		}
		if typ != data[0] {
			t.Fatalf("type %q, want %q", typ, data[0])
		}
		n := int64(int32(binary.BigEndian.Uint32(data[1:])))
		if n < 4 || n-4 > int64(mb) {
			checkErr(t, err, errProto)
			if consumed != HeaderLen {
				t.Fatalf("read %d bytes for an invalid length, want %d", consumed, HeaderLen)
			}
			return
		}
		total := 1 + int(n)
		if len(data) < total {
			checkErr(t, err, errUnexpectedEOF)
			return
		}
		checkErr(t, err, errNone)
		if consumed != total {
			t.Fatalf("read %d bytes of a %d-byte message", consumed, total)
		}
		if !bytes.Equal(body, data[HeaderLen:total]) || body == nil {
			t.Fatalf("body %q, want %q", body, data[HeaderLen:total])
		}
		// A Framer marking every type sees the same first message.
		fr := NewFramer(bytes.NewReader(data), total, mb, allTypes())
		visited := false
		_, _ = fr.Next(func(ftyp byte, length int, fbody []byte, whole bool) error {
			if !visited && (ftyp != typ || length != len(body) || !whole || !bytes.Equal(fbody, body)) {
				t.Fatalf("Framer visited %q %d whole=%v, ReadMessage read %q %d", ftyp, length, whole, typ, len(body))
			}
			visited = true
			return nil
		})
		if !visited {
			t.Fatal("Framer did not visit the message ReadMessage read")
		}
	})
}

// fuzzReader turns control bytes into a stepReader: each byte is one piece.
// 0xFF is a timeout with no data; otherwise the piece is (c&0x7f)+1 bytes,
// with a timeout returned along with it when c&0x80 is set. When ctl has odd
// length, the last bytes come with io.EOF.
func fuzzReader(data, ctl []byte) *stepReader {
	r := &stepReader{data: data, eofWithData: len(ctl)%2 == 1}
	for _, c := range ctl {
		switch {
		case c == 0xFF:
			r.steps = append(r.steps, step{err: errTimeout})
		case c&0x80 != 0:
			r.steps = append(r.steps, step{n: int(c&0x7f) + 1, err: errTimeout})
		default:
			r.steps = append(r.steps, step{n: int(c) + 1})
		}
	}
	return r
}

func FuzzFramer(f *testing.F) {
	big := typed('d', bytes.Repeat([]byte("row data "), 40))
	add := func(data []byte, whole string, ctl []byte, bufSize, maxBody, visitErrAt uint16) {
		f.Add(data, whole, ctl, bufSize, maxBody, visitErrAt)
	}
	add(pipeline(), "Z", nil, 64, 1000, 0)
	add(concat(pipeline(), pipeline(), typed('X', nil)), "", []byte{1, 2, 3, 0xFF, 40, 0x85}, 64, 1000, 6)
	add(copyStream(20), "", []byte{3, 7, 0x85, 0xFF, 1, 100}, 100, 4000, 3)
	add(copyStream(5), "dc", []byte{0, 0, 0, 0}, 0, 200, 0)
	add(concat(serverReply(), serverReply()), "CEZ", []byte{9, 0xFF, 30}, 0, 500, 0)
	add(concat(serverReply(), big, serverReply()), "CDZ", []byte{20, 0x9f, 4}, 64, 2000, 2)
	add(concat(serverReply(), big, serverReply()), "CDZd", nil, 512, 2000, 5)
	add(concat(query("SELECT 1"), big), "", []byte{5, 0xFF, 0xFF, 2}, 64, 300, 0)
	add(concat(query("SELECT 1"), header('Q', 3), query("SELECT 2")), "", nil, 64, 1000, 0)
	add(concat(query("SELECT 1"), header('d', 0xFFFFFFFF), make([]byte, 8)), "Q", []byte{1}, 64, 1000, 0)
	add(concat(query("SELECT 1"), query("SELECT 2")[:7]), "Q", []byte{2, 2}, 64, 1000, 0)
	add(concat(query("SELECT 1"), query("SELECT 2")[:3]), "", nil, 64, 1000, 0)
	add(concat(typed('Z', []byte{'I'}), big[:200]), "Z", []byte{0x83}, 70, 1000, 0)
	add(startupMsg(pgproto3.ProtocolVersion30, "user", "alice"), "", nil, 64, 1000, 0)
	add([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "", nil, 64, 1000, 0)
	add(nil, "", nil, 0, 0, 0)
	f.Fuzz(func(t *testing.T, data []byte, whole string, ctl []byte, bufSize, maxBody, visitErrAt uint16) {
		if len(data) > 1<<16 || len(ctl) > 1<<12 {
			return
		}
		var w *[256]bool
		if whole != "" {
			w = marks(whole)
		}
		o := framerOpts{
			bufSize:    int(bufSize) % 1024,
			maxBody:    int(maxBody) % 4096,
			whole:      w,
			visitErrAt: int(visitErrAt) % 64,
		}
		run := runFramer(t, fuzzReader(data, ctl), data, o)
		if !bytes.HasPrefix(data, run.relayed) {
			t.Fatal("relayed bytes are not a prefix of the input")
		}
		if run.err == io.EOF && !bytes.Equal(run.relayed, data) {
			t.Fatalf("io.EOF after relaying %d of %d bytes", len(run.relayed), len(data))
		}
		sum := 0
		for _, v := range run.visits {
			if v.length < 0 || v.length > o.maxBody {
				t.Fatalf("visited a %d-byte body with a limit of %d", v.length, o.maxBody)
			}
			sum += HeaderLen + v.length
		}
		if sum < len(run.relayed) {
			t.Fatalf("visited messages cover %d bytes, fewer than the %d relayed", sum, len(run.relayed))
		}
		if n := len(run.visits); n > 0 && sum-HeaderLen-run.visits[n-1].length >= len(run.relayed) {
			t.Fatalf("the last visited message starts at %d, not inside the %d bytes relayed", sum-HeaderLen-run.visits[n-1].length, len(run.relayed))
		}
	})
}
