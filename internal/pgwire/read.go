package pgwire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/jackc/pgx/v5/pgproto3"
)

// MaxStartupPacket is PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
const MaxStartupPacket = 10000

// Startup packet codes (the first int32 of a packet without a type byte).
const (
	codeSSLRequest    = 80877103
	codeGSSEncRequest = 80877104
	codeCancelRequest = 80877102
)

// ErrProtocol marks a malformed message from a peer. Errors returned by the
// readers in this package wrap it when the bytes, not the transport, are at
// fault; the proxy answers them with SQLSTATE 08P01.
var ErrProtocol = errors.New("protocol violation")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}

// ReadStartup reads exactly one startup-phase packet from r (no read-ahead):
// a *pgproto3.StartupMessage, *pgproto3.SSLRequest, *pgproto3.GSSEncRequest
// or *pgproto3.CancelRequest. The returned message is owned by the caller.
func ReadStartup(r io.Reader) (pgproto3.FrontendMessage, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(int32(binary.BigEndian.Uint32(hdr[:])))
	if n < 8 || n > MaxStartupPacket {
		return nil, protoErr("invalid length of startup packet: %d", n)
	}
	body := make([]byte, n-4)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, unexpectedEOF(err)
	}
	return DecodeStartup(body)
}

// DecodeStartup decodes the body of a startup-phase packet (after the length).
func DecodeStartup(body []byte) (pgproto3.FrontendMessage, error) {
	if len(body) < 4 {
		return nil, protoErr("startup packet too short")
	}
	code := binary.BigEndian.Uint32(body)
	var msg pgproto3.FrontendMessage
	switch code {
	case pgproto3.ProtocolVersion30, pgproto3.ProtocolVersion32:
		msg = &pgproto3.StartupMessage{}
	case codeSSLRequest:
		msg = &pgproto3.SSLRequest{}
	case codeGSSEncRequest:
		msg = &pgproto3.GSSEncRequest{}
	case codeCancelRequest:
		msg = &pgproto3.CancelRequest{}
	default:
		return nil, protoErr("unsupported frontend protocol %d.%d", code>>16, code&0xffff)
	}
	if err := msg.Decode(body); err != nil {
		return nil, protoErr("invalid startup packet: %v", err)
	}
	return msg, nil
}

// ReadMessage reads exactly one typed message from r (no read-ahead) and
// returns its type and body. A length outside [4, 4+maxBody] is a protocol
// violation; the body is not read then.
func ReadMessage(r io.Reader, maxBody int) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := int64(int32(binary.BigEndian.Uint32(hdr[1:])))
	if n < 4 || n-4 > int64(maxBody) {
		return hdr[0], nil, protoErr("invalid message length %d for message type %q (limit %d)", n, hdr[0], maxBody)
	}
	body, err := readBody(r, int(n-4))
	if err != nil {
		return hdr[0], nil, unexpectedEOF(err)
	}
	return hdr[0], body, nil
}

// bodyChunk is how much of a message body is allocated before its bytes
// arrive. A peer that announces a large message and sends little of it
// holds this much, not the announced length; a body that does arrive is
// allocated at most about twice over as it grows (doubling). It was 1 MiB:
// 200 sessions that each announce 200 MB then held 200 MiB (issue 12).
const bodyChunk = 16 << 10

// readBody reads a body of size bytes, allocating as they arrive.
func readBody(r io.Reader, size int) ([]byte, error) {
	if size <= bodyChunk {
		body := make([]byte, size)
		_, err := io.ReadFull(r, body)
		return body, err
	}
	body := make([]byte, 0, bodyChunk)
	for len(body) < size {
		step := min(size-len(body), max(len(body), bodyChunk))
		body = slices.Grow(body, step)
		m, err := io.ReadFull(r, body[len(body):len(body)+step])
		body = body[:len(body)+m]
		if err != nil {
			return nil, err
		}
	}
	return body, nil
}

func unexpectedEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
