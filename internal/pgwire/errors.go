// Package pgwire holds Tandem's PostgreSQL protocol helpers: SQLSTATE error
// builders, exact-length readers for the startup phase, and a zero-copy
// message framer for relaying. It is a pure codec: it imports only pgproto3
// and the standard library, and knows nothing of networks, contexts or logs.
package pgwire

import (
	"bytes"
	"fmt"

	"github.com/jackc/pgx/v5/pgproto3"
)

// SQLSTATE codes that Tandem itself sends to clients. Errors that come from a
// store are relayed unchanged and never rewritten into one of these.
const (
	CodeFeatureNotSupported   = "0A000"
	CodeConnectionFailure     = "08006"
	CodeProtocolViolation     = "08P01"
	CodeInvalidAuthSpec       = "28000"
	CodeInvalidPassword       = "28P01"
	CodeTooManyConnections    = "53300"
	CodeProgramLimitExceeded  = "54000"
	CodeAdminShutdown         = "57P01"
	CodeCannotConnectNow      = "57P03"
	CodeIdleSessionTimeout    = "57P05"
	CodeInternalError         = "XX000"
	CodeQueryCanceled         = "57014"
	CodeInvalidParameterValue = "22023"
	CodeTransactionRollback   = "40000"
	CodeSerializationFailure  = "40001"
)

// Error is an error that Tandem reports to a client as an ErrorResponse. It
// carries a real SQLSTATE and, where it helps the operator, a hint.
type Error struct {
	Severity string // "FATAL" or "ERROR"
	Code     string // SQLSTATE
	Message  string
	Detail   string
	Hint     string
	Err      error // underlying cause, not sent to the client
}

func (e *Error) Error() string {
	s := e.Severity + ": " + e.Message + " (SQLSTATE " + e.Code + ")"
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// Response is the ErrorResponse message to send for e.
func (e *Error) Response() *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{
		Severity:            e.Severity,
		SeverityUnlocalized: e.Severity,
		Code:                e.Code,
		Message:             e.Message,
		Detail:              e.Detail,
		Hint:                e.Hint,
	}
}

// Fatal builds a FATAL error: the session ends after it is sent.
func Fatal(code, format string, args ...any) *Error {
	return &Error{Severity: "FATAL", Code: code, Message: fmt.Sprintf(format, args...)}
}

// WithHint returns e with its hint set, for chaining at the call site.
func (e *Error) WithHint(format string, args ...any) *Error {
	e.Hint = fmt.Sprintf(format, args...)
	return e
}

// WithCause returns e with its underlying cause set.
func (e *Error) WithCause(err error) *Error {
	e.Err = err
	return e
}

// AppendMessages encodes msgs onto dst, so a group of replies is written with
// one Write.
func AppendMessages(dst []byte, msgs ...pgproto3.BackendMessage) ([]byte, error) {
	var err error
	for _, m := range msgs {
		dst, err = m.Encode(dst)
		if err != nil {
			return dst, err
		}
	}
	return dst, nil
}

// ErrorFields returns the SQLSTATE (field C) and the message (field M) of
// an ErrorResponse or NoticeResponse body; a field that is missing is "".
func ErrorFields(body []byte) (code, message string) {
	for len(body) > 1 {
		f := body[0]
		end := bytes.IndexByte(body[1:], 0)
		if end < 0 {
			break
		}
		v := string(body[1 : 1+end])
		switch f {
		case 'C':
			code = v
		case 'M':
			message = v
		}
		body = body[end+2:]
	}
	return code, message
}
