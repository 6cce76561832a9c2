package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"

	"github.com/tandemdb/tandem/internal/pgwire"
)

// Raw protocol message helpers for the routed engine: it decodes only the
// messages it routes by (Parse, Bind, Describe, Execute, Close, Query) or
// rewrites (RowDescription, DataRow), and re-encodes only what it changes.

var errMalformed = errors.New("malformed protocol message")

// msgReader reads fields from a message body.
type msgReader struct {
	b   []byte
	err bool
}

func (r *msgReader) cstring() string {
	i := bytes.IndexByte(r.b, 0)
	if i < 0 {
		r.err = true
		r.b = nil
		return ""
	}
	s := string(r.b[:i])
	r.b = r.b[i+1:]
	return s
}

func (r *msgReader) int16() int {
	if len(r.b) < 2 {
		r.err = true
		r.b = nil
		return 0
	}
	v := int(int16(binary.BigEndian.Uint16(r.b)))
	r.b = r.b[2:]
	return v
}

// count reads a 16-bit count. PostgreSQL reads counts as unsigned
// (pq_getmsgint(msg, 2)): a Bind may carry up to 65,535 parameters.
func (r *msgReader) count() int {
	if len(r.b) < 2 {
		r.err = true
		r.b = nil
		return 0
	}
	v := int(binary.BigEndian.Uint16(r.b))
	r.b = r.b[2:]
	return v
}

func (r *msgReader) int32() int32 {
	if len(r.b) < 4 {
		r.err = true
		r.b = nil
		return 0
	}
	v := int32(binary.BigEndian.Uint32(r.b))
	r.b = r.b[4:]
	return v
}

func (r *msgReader) bytesN(n int) []byte {
	if n < 0 || len(r.b) < n {
		r.err = true
		r.b = nil
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

// appendMsg appends one typed message with body to dst.
func appendMsg(dst []byte, typ byte, body []byte) []byte {
	dst = append(dst, typ, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(dst[len(dst)-4:], uint32(len(body)+4))
	return append(dst, body...)
}

func putCString(b []byte, s string) []byte { return append(append(b, s...), 0) }

func putInt16(b []byte, v int) []byte { return binary.BigEndian.AppendUint16(b, uint16(v)) }

func putInt32(b []byte, v int32) []byte { return binary.BigEndian.AppendUint32(b, uint32(v)) }

// parseMsg is a decoded Parse.
type parseMsg struct {
	name, sql string
	oids      []uint32
}

func decodeParse(body []byte) (parseMsg, error) {
	r := msgReader{b: body}
	p := parseMsg{name: r.cstring(), sql: r.cstring()}
	n := r.count()
	for i := 0; i < n && !r.err; i++ {
		p.oids = append(p.oids, uint32(r.int32()))
	}
	if r.err {
		return p, errMalformed
	}
	return p, nil
}

func encodeParse(dst []byte, name, sql string, oids []uint32) []byte {
	b := putCString(putCString(nil, name), sql)
	b = putInt16(b, len(oids))
	for _, o := range oids {
		b = putInt32(b, int32(o))
	}
	return appendMsg(dst, pgwire.ClientParse, b)
}

// bindMsg is a decoded Bind.
type bindMsg struct {
	portal, stmt  string
	paramFormats  []int
	params        [][]byte // nil = NULL
	resultFormats []int
}

func decodeBind(body []byte) (bindMsg, error) {
	r := msgReader{b: body}
	m := bindMsg{portal: r.cstring(), stmt: r.cstring()}
	n := r.count()
	for i := 0; i < n && !r.err; i++ {
		m.paramFormats = append(m.paramFormats, r.int16())
	}
	n = r.count()
	for i := 0; i < n && !r.err; i++ {
		l := r.int32()
		if l == -1 {
			m.params = append(m.params, nil)
			continue
		}
		m.params = append(m.params, r.bytesN(int(l)))
	}
	n = r.count()
	for i := 0; i < n && !r.err; i++ {
		m.resultFormats = append(m.resultFormats, r.int16())
	}
	if r.err {
		return m, errMalformed
	}
	return m, nil
}

func encodeBind(dst []byte, m bindMsg) []byte {
	b := putCString(putCString(nil, m.portal), m.stmt)
	b = putInt16(b, len(m.paramFormats))
	for _, f := range m.paramFormats {
		b = putInt16(b, f)
	}
	b = putInt16(b, len(m.params))
	for _, p := range m.params {
		if p == nil {
			b = putInt32(b, -1)
			continue
		}
		b = putInt32(b, int32(len(p)))
		b = append(b, p...)
	}
	b = putInt16(b, len(m.resultFormats))
	for _, f := range m.resultFormats {
		b = putInt16(b, f)
	}
	return appendMsg(dst, pgwire.ClientBind, b)
}

func encodeDescribe(dst []byte, kind byte, name string) []byte {
	return appendMsg(dst, pgwire.ClientDescribe, putCString([]byte{kind}, name))
}

func encodeClose(dst []byte, kind byte, name string) []byte {
	return appendMsg(dst, pgwire.ClientClose, putCString([]byte{kind}, name))
}

func encodeExecute(dst []byte, portal string, maxRows int32) []byte {
	return appendMsg(dst, pgwire.ClientExecute, putInt32(putCString(nil, portal), maxRows))
}

func encodeQuery(dst []byte, sql string) []byte {
	return appendMsg(dst, pgwire.ClientQuery, putCString(nil, sql))
}

var syncMsg = []byte{pgwire.ClientSync, 0, 0, 0, 4}
var flushMsg = []byte{pgwire.ClientFlush, 0, 0, 0, 4}

// field is one RowDescription field, kept raw for re-encoding.
type field struct {
	name     string
	tableOID uint32
	raw      []byte // the whole field, name included
}

func decodeRowDescription(body []byte) ([]field, error) {
	r := msgReader{b: body}
	n := r.count()
	fs := make([]field, 0, n)
	for i := 0; i < n && !r.err; i++ {
		start := r.b
		name := r.cstring()
		oid := uint32(r.int32())
		r.bytesN(2 + 4 + 2 + 4 + 2)
		if r.err {
			break
		}
		fs = append(fs, field{name: name, tableOID: oid, raw: start[:len(start)-len(r.b)]})
	}
	if r.err {
		return nil, errMalformed
	}
	return fs, nil
}

// rowDescriptionBody is the body of a RowDescription of fs.
func rowDescriptionBody(fs []field) []byte {
	b := putInt16(nil, len(fs))
	for _, f := range fs {
		b = append(b, f.raw...)
	}
	return b
}

func encodeRowDescription(dst []byte, fs []field) []byte {
	b := putInt16(nil, len(fs))
	for _, f := range fs {
		b = append(b, f.raw...)
	}
	return appendMsg(dst, pgwire.ServerRowDescription, b)
}

// splitDataRow returns the columns of a DataRow body (nil = NULL).
func splitDataRow(body []byte, cols [][]byte) ([][]byte, error) {
	r := msgReader{b: body}
	n := r.count()
	cols = cols[:0]
	for i := 0; i < n && !r.err; i++ {
		l := r.int32()
		if l == -1 {
			cols = append(cols, nil)
			continue
		}
		v := r.bytesN(int(l))
		if v == nil {
			v = []byte{}
		}
		cols = append(cols, v)
	}
	if r.err {
		return nil, errMalformed
	}
	return cols, nil
}

func encodeDataRow(dst []byte, cols [][]byte) []byte {
	size := 2
	for _, c := range cols {
		size += 4 + len(c)
	}
	dst = append(dst, pgwire.ServerDataRow, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(dst[len(dst)-4:], uint32(size+4))
	dst = putInt16(dst, len(cols))
	for _, c := range cols {
		if c == nil {
			dst = putInt32(dst, -1)
			continue
		}
		dst = putInt32(dst, int32(len(c)))
		dst = append(dst, c...)
	}
	return dst
}

// decodeParameterDescription returns the parameter type OIDs of a
// ParameterDescription (nil if it is malformed).
func decodeParameterDescription(body []byte) []uint32 {
	r := msgReader{b: body}
	n := r.count()
	oids := make([]uint32, 0, n)
	for i := 0; i < n && !r.err; i++ {
		oids = append(oids, uint32(r.int32()))
	}
	if r.err {
		return nil
	}
	return oids
}
