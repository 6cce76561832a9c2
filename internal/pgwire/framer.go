package pgwire

import (
	"encoding/binary"
	"errors"
	"io"
)

// HeaderLen is the size of a typed message's header: one type byte and an
// int32 length that counts itself but not the type byte.
const HeaderLen = 5

// Visitor is told about each message the Framer passes. When whole is true,
// body is the complete message body; that is always so for the types marked
// in the Framer's whole-set that fit the buffer, and for other types only when
// the message happened to be wholly buffered. Otherwise body is nil and whole
// is false. A non-nil error stops the Framer; bytes of messages already
// visited (for a streamed message, the bytes buffered so far) are still
// returned, and a message is never visited twice.
type Visitor func(typ byte, length int, body []byte, whole bool) error

// Framer splits a stream of typed protocol messages for relaying without
// copying them: Next returns a slice of its own buffer holding whole messages
// and, at most, the start of one large message being streamed through. It
// decodes nothing but headers, and holds a message whole only when its type
// needs inspecting.
//
// The slice returned by Next is borrowed: it is valid until the next call to
// Next. A Framer is not safe for concurrent use.
type Framer struct {
	src        io.Reader
	buf        []byte
	start, end int
	remaining  int // bytes of a streamed message still to pass through
	maxBody    int
	whole      *[256]bool
	err        error // sticky read error, reported once buffered bytes are drained
}

// NewFramer returns a Framer reading from src with a buffer of bufSize bytes.
// Messages whose body exceeds maxBody are a protocol violation. whole marks the
// message types that the visitor needs complete (nil = none).
func NewFramer(src io.Reader, bufSize, maxBody int, whole *[256]bool) *Framer {
	if bufSize < 64 {
		bufSize = 64
	}
	if whole == nil {
		whole = new([256]bool)
	}
	return &Framer{src: src, buf: make([]byte, bufSize), maxBody: maxBody, whole: whole}
}

// Buffered reports how many bytes are read but not yet returned.
func (f *Framer) Buffered() int { return f.end - f.start }

// InMessage reports whether the Framer is in the middle of streaming a
// message, that is whether the bytes returned so far end inside a message.
func (f *Framer) InMessage() bool { return f.remaining > 0 }

// Next blocks until it can return at least one byte of whole or streamed
// messages, visiting each message as its header is passed. At end of stream
// it returns io.EOF when it stopped at a message boundary, and
// io.ErrUnexpectedEOF when it stopped inside a message.
func (f *Framer) Next(visit Visitor) ([]byte, error) {
	for {
		p := f.start
		if f.remaining > 0 {
			n := min(f.remaining, f.end-p)
			p += n
			f.remaining -= n
		}
		var verr error
		if f.remaining == 0 {
			p, verr = f.scan(p, visit)
		}
		if p > f.start || verr != nil {
			out := f.buf[f.start:p]
			f.start = p
			return out, verr
		}
		if f.err != nil {
			if errors.Is(f.err, io.EOF) && (f.end > f.start || f.remaining > 0) {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, f.err
		}
		f.fill()
	}
}

// scan passes whole messages from p on, and starts streaming the first one
// that is not wholly buffered when its type does not need it whole.
func (f *Framer) scan(p int, visit Visitor) (int, error) {
	for f.end-p >= HeaderLen {
		typ := f.buf[p]
		n := int64(int32(binary.BigEndian.Uint32(f.buf[p+1 : p+HeaderLen])))
		if n < 4 || n-4 > int64(f.maxBody) {
			return p, protoErr("invalid message length %d for message type %q (limit %d)", n, typ, f.maxBody)
		}
		total := 1 + int(n)
		if f.end-p >= total {
			if err := visit(typ, int(n)-4, f.buf[p+HeaderLen:p+total], true); err != nil {
				return p + total, err
			}
			p += total
			continue
		}
		if f.whole[typ] && total <= len(f.buf) {
			break // wait for the rest of a message we must inspect
		}
		// The message is passed on even if the visitor fails, as a whole
		// one is: its start goes out with the error and it is not visited
		// again.
		f.remaining = total - (f.end - p)
		return f.end, visit(typ, int(n)-4, nil, false)
	}
	return p, nil
}

// fill compacts the buffer and reads more; errors are kept for Next.
func (f *Framer) fill() {
	if f.start > 0 {
		copy(f.buf, f.buf[f.start:f.end])
		f.end -= f.start
		f.start = 0
	}
	n, err := f.src.Read(f.buf[f.end:])
	f.end += n
	if err != nil {
		f.err = err
	}
}

// ReadErr returns the sticky read error, if any, without consuming anything.
func (f *Framer) ReadErr() error { return f.err }

// ClearErr forgets a sticky read error, so that a caller that decided a
// timeout was harmless can go on reading.
func (f *Framer) ClearErr() { f.err = nil }

// Rest returns the bytes read but not yet returned by Next, and with
// before, the n bytes Next returned last (which precede them in the buffer),
// as one new slice. A relay that stops forwarding hands them to whoever
// reads the stream next.
func (f *Framer) Rest(before int) []byte {
	from := max(f.start-before, 0)
	return append([]byte(nil), f.buf[from:f.end]...)
}
