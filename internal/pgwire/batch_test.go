package pgwire

import (
	"bufio"
	"errors"
	"io"
	"testing"
)

// chunks is a reader that returns one chunk per Read.
type chunks [][]byte

func (c *chunks) Read(p []byte) (int, error) {
	if len(*c) == 0 {
		return 0, io.EOF
	}
	n := copy(p, (*c)[0])
	(*c)[0] = (*c)[0][n:]
	if len((*c)[0]) == 0 {
		*c = (*c)[1:]
	}
	return n, nil
}

func msg(typ byte, body string) []byte {
	n := len(body) + 4
	return append([]byte{typ, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}, body...)
}

// TestReadBatches: the messages one read made whole come as one batch; the
// error that ends reading comes last.
func TestReadBatches(t *testing.T) {
	src := &chunks{append(msg(ServerDataRow, "a"), msg(ServerCommandComplete, "b")...), msg(ServerReadyForQuery, "I")}
	r := bufio.NewReader(src)
	type m struct {
		typ byte
		err error
	}
	out := make(chan []m, 8)
	ReadBatches(r, 1<<10, func() (byte, []byte, error) { return ReadMessage(r, 1<<10) },
		func(typ byte, _ []byte, err error) m { return m{typ, err} }, out, make(chan struct{}))
	close(out)
	var got [][]m
	for b := range out {
		got = append(got, b)
	}
	if len(got) != 3 || len(got[0]) != 2 || got[0][0].typ != ServerDataRow || got[0][1].typ != ServerCommandComplete ||
		len(got[1]) != 1 || got[1][0].typ != ServerReadyForQuery || !errors.Is(got[2][0].err, io.EOF) {
		t.Fatalf("batches %+v", got)
	}
	for i, b := range got {
		if cap(b) != len(b) {
			t.Fatalf("batch %d: capacity %d for %d messages (one allocation per batch)", i, cap(b), len(b))
		}
	}
}

func TestErrorFields(t *testing.T) {
	body := []byte("SERROR\x00C23505\x00Mduplicate key\x00\x00")
	if code, message := ErrorFields(body); code != "23505" || message != "duplicate key" {
		t.Fatalf("%q %q", code, message)
	}
	if code, message := ErrorFields([]byte("SERROR\x00")); code != "" || message != "" {
		t.Fatalf("missing fields: %q %q", code, message)
	}
}
