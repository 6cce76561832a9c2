package proxy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/tandemdb/tandem/internal/pgwire"
)

// The routed engine's memory bounds (issue 12). A message body is
// allocated as its bytes arrive (pgwire.ReadMessage), so a client that
// announces a large message and sends little holds little; the rest of a
// message must arrive within limits.message_timeout; and the requests the
// engine holds whole (a Query, an extended-protocol batch up to its Sync)
// are capped per session (limits.max_batch_bytes, max_batch_messages) and
// for all sessions together (limits.max_buffered_bytes, Server.buffered).

// readClientMsg reads the next client message. Once a message's header has
// arrived and its body has not, the body must arrive within
// limits.message_timeout: past it the session ends with 08P01.
func (rs *routedSession) readClientMsg(br *bufio.Reader) (byte, []byte, error) {
	d := rs.srv.config().Limits.MessageTimeout.Duration()
	if d <= 0 {
		return pgwire.ReadMessage(br, rs.maxBody)
	}
	hdr, err := br.Peek(5)
	if err != nil {
		return 0, nil, err // the idle timeout, or the client gone, between messages
	}
	n := int(binary.BigEndian.Uint32(hdr[1:5]))
	if n >= 4 && n-4 <= rs.maxBody && br.Buffered() < 1+n {
		start := time.Now()
		rs.ss.msgDeadline.Store(start.Add(d).UnixNano())
		defer rs.ss.msgDeadline.Store(0)
		typ, body, err := pgwire.ReadMessage(br, rs.maxBody)
		if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			return typ, nil, fmt.Errorf("%w: the client sent only part of a %d-byte %q message in %s (limits.message_timeout)",
				pgwire.ErrProtocol, n-4, typ, d)
		}
		return typ, body, err
	}
	return pgwire.ReadMessage(br, rs.maxBody)
}

// holdMsg counts m, just added to u, against the session's and the proxy's
// caps on held requests; past one, the session ends with 54000.
func (rs *routedSession) holdMsg(u *unit, m clientMsg) error {
	lim := rs.srv.config().Limits
	size := int64(5 + len(m.body))
	u.held += size
	total := rs.srv.buffered.Add(size)
	maxBatch := int64(lim.MaxBatchBytes)
	if maxBatch == 0 {
		maxBatch = int64(lim.MaxMessageBytes)
	}
	switch {
	case u.held > maxBatch:
		return pgwire.Fatal(pgwire.CodeProgramLimitExceeded, "the request's messages up to its Sync hold more than %d bytes (limits.max_batch_bytes)", maxBatch).
			WithHint("Send a Sync more often, or raise limits.max_batch_bytes.")
	case len(u.msgs) > lim.MaxBatchMessages:
		return pgwire.Fatal(pgwire.CodeProgramLimitExceeded, "the request has more than %d messages before its Sync (limits.max_batch_messages)", lim.MaxBatchMessages).
			WithHint("Send a Sync more often, or raise limits.max_batch_messages.")
	case total > int64(lim.MaxBufferedBytes):
		return pgwire.Fatal(pgwire.CodeProgramLimitExceeded, "the proxy holds more than %d bytes of requests for all sessions (limits.max_buffered_bytes)", int64(lim.MaxBufferedBytes)).
			WithHint("Retry when other sessions' large requests have finished, or raise limits.max_buffered_bytes.")
	}
	return nil
}

// release gives back what u held; u must not be used after.
func (rs *routedSession) release(u *unit) {
	if u == nil {
		return
	}
	if u.held > 0 {
		rs.srv.buffered.Add(-u.held)
		u.held = 0
	}
	// Kept for the next unit (newUnit), emptied so that it holds on to no
	// message, statement or plan of this one.
	if cap(u.msgs) <= spareUnitMsgs && cap(u.dec) <= spareUnitMsgs {
		clear(u.msgs[:cap(u.msgs)])
		clear(u.dec[:cap(u.dec)])
		clear(u.tables[:cap(u.tables)])
		rs.spare = u
	}
}
