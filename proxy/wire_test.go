package proxy

import (
	"bytes"
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/pgwire"
)

// The routed engine decodes Parse, Bind, RowDescription and DataRow bodies
// from the network and re-encodes what it changes: decoding must never
// panic, and a decoded message must re-encode to the same bytes.

func encodeFrontend(t testing.TB, m pgproto3.FrontendMessage) []byte {
	t.Helper()
	b, err := m.Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	return b[5:]
}

func encodeBackend(t testing.TB, m pgproto3.BackendMessage) []byte {
	t.Helper()
	b, err := m.Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	return b[5:]
}

func TestWireRoundTrips(t *testing.T) {
	parses := []*pgproto3.Parse{
		{Name: "", Query: "SELECT 1"},
		{Name: "s1", Query: "INSERT INTO t VALUES ($1, $2)", ParameterOIDs: []uint32{23, 25}},
	}
	for _, p := range parses {
		body := encodeFrontend(t, p)
		got, err := decodeParse(body)
		if err != nil || got.name != p.Name || got.sql != p.Query || len(got.oids) != len(p.ParameterOIDs) {
			t.Fatalf("decodeParse(%+v) = %+v, %v", p, got, err)
		}
		if re := encodeParse(nil, got.name, got.sql, got.oids)[5:]; !bytes.Equal(re, body) {
			t.Fatalf("Parse does not round-trip")
		}
	}
	binds := []*pgproto3.Bind{
		{},
		{DestinationPortal: "p", PreparedStatement: "s", ParameterFormatCodes: []int16{1, 0},
			Parameters: [][]byte{{0, 0, 0, 1}, nil, []byte("")}, ResultFormatCodes: []int16{1}},
	}
	for _, b := range binds {
		body := encodeFrontend(t, b)
		got, err := decodeBind(body)
		if err != nil {
			t.Fatal(err)
		}
		if re := encodeBind(nil, got)[5:]; !bytes.Equal(re, body) {
			t.Fatalf("Bind does not round-trip:\n%x\n%x", re, body)
		}
	}
	rd := &pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{
		{Name: []byte("a"), TableOID: 1234, TableAttributeNumber: 1, DataTypeOID: 23, DataTypeSize: 4, TypeModifier: -1},
		{Name: []byte("?tandem_image?"), DataTypeOID: 25, DataTypeSize: -1, TypeModifier: -1},
	}}
	body := encodeBackend(t, rd)
	fs, err := decodeRowDescription(body)
	if err != nil || len(fs) != 2 || fs[0].tableOID != 1234 || markerIndex(fs) != 1 {
		t.Fatalf("decodeRowDescription: %+v %v", fs, err)
	}
	if re := encodeRowDescription(nil, fs)[5:]; !bytes.Equal(re, body) {
		t.Fatal("RowDescription does not round-trip")
	}
	dr := &pgproto3.DataRow{Values: [][]byte{[]byte("1"), nil, []byte("")}}
	body = encodeBackend(t, dr)
	cols, err := splitDataRow(body, nil)
	if err != nil || len(cols) != 3 || cols[1] != nil || cols[2] == nil {
		t.Fatalf("splitDataRow: %q %v", cols, err)
	}
	if re := encodeDataRow(nil, cols)[5:]; !bytes.Equal(re, body) {
		t.Fatal("DataRow does not round-trip")
	}
	code, msg := pgwire.ErrorFields(encodeBackend(t, &pgproto3.ErrorResponse{Severity: "ERROR", Code: "23505", Message: "dup"}))
	if code != "23505" || msg != "dup" {
		t.Fatalf("errorFields: %q %q", code, msg)
	}
	for _, tc := range []struct {
		client        []int
		marker, total int
		want          []int
	}{
		{nil, 1, 4, nil},
		{[]int{0}, 1, 4, []int{0}},
		{[]int{1}, 2, 5, []int{1, 1, 0, 0, 0}},
		{[]int{1, 0}, 2, 5, []int{1, 0, 0, 0, 0}},
		{[]int{1}, 0, 3, []int{0, 0, 0}},
	} {
		if got := imageFormats(tc.client, tc.marker, tc.total); !equalInts(got, tc.want) {
			t.Errorf("imageFormats(%v, %d, %d) = %v, want %v", tc.client, tc.marker, tc.total, got, tc.want)
		}
	}
}

func equalInts(a, b []int) bool {
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

func FuzzWireDecoders(f *testing.F) {
	f.Add([]byte("s1\x00SELECT 1\x00\x00\x00"))
	f.Add([]byte("p\x00s\x00\x00\x01\x00\x01\x00\x01\x00\x00\x00\x01x\x00\x00"))
	f.Add([]byte("\x00\x02\x00\x00\x00\x01a\xff\xff\xff\xff"))
	f.Add([]byte("SERROR\x00C23505\x00Mdup\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if p, err := decodeParse(b); err == nil {
			if re := encodeParse(nil, p.name, p.sql, p.oids)[5:]; !bytes.Equal(re, b[:len(re)]) {
				t.Fatalf("Parse re-encodes differently")
			}
		}
		if m, err := decodeBind(b); err == nil {
			re := encodeBind(nil, m)[5:]
			if len(re) > len(b) || !bytes.Equal(re, b[:len(re)]) {
				t.Fatalf("Bind re-encodes differently")
			}
		}
		if fs, err := decodeRowDescription(b); err == nil {
			re := encodeRowDescription(nil, fs)[5:]
			if len(re) > len(b) || !bytes.Equal(re, b[:len(re)]) {
				t.Fatalf("RowDescription re-encodes differently")
			}
		}
		if cols, err := splitDataRow(b, nil); err == nil {
			re := encodeDataRow(nil, cols)[5:]
			if len(re) > len(b) || !bytes.Equal(re, b[:len(re)]) {
				t.Fatalf("DataRow re-encodes differently")
			}
		}
		pgwire.ErrorFields(b)
	})
}

// TestQuoteLiteral: the literals Tandem builds to replay a session's
// settings on another store mean the same value to PostgreSQL with
// standard_conforming_strings on and off.
func TestQuoteLiteral(t *testing.T) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, shared.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	values := []string{"", "plain", "it's", `back\slash`, `\'`, `C:\new\table`, `ends with \`, "tab\there", "é ☃"}
	for _, scs := range []string{"on", "off"} {
		if _, err := conn.Exec(ctx, "SET standard_conforming_strings = "+scs); err != nil {
			t.Fatal(err)
		}
		for _, v := range values {
			// The simple protocol, as the replay runs it (pgconn does not
			// refuse standard_conforming_strings=off as pgx does).
			got := queryOne(t, conn.PgConn(), "SELECT "+pgwire.QuoteLiteral(v))
			if got != v {
				t.Errorf("standard_conforming_strings=%s: %q quoted as %s reads back as %q", scs, v, pgwire.QuoteLiteral(v), got)
			}
		}
	}
}

func TestContainsFold(t *testing.T) {
	for _, tc := range []struct {
		text, sub string
		want      bool
	}{
		{"SELECT oid FROM PG_TYPE WHERE typname = $1", "pg_type", true},
		{"select 'mood'::RegType::oid", "::reg", true},
		{"SELECT * FROM accounts", "pg_type", false},
		{"pg_typ", "pg_type", false},
		{"", "pg_", false},
	} {
		if got := containsFold(tc.text, tc.sub); got != tc.want {
			t.Errorf("containsFold(%q, %q) = %v", tc.text, tc.sub, got)
		}
		if got := containsFold([]byte(tc.text), tc.sub); got != tc.want {
			t.Errorf("containsFold([]byte(%q), %q) = %v", tc.text, tc.sub, got)
		}
	}
}
