package pgwire

import "bufio"

// ReadBatches reads typed messages from r until an error or until quit is
// closed, and hands them to out in batches: every message that one read
// from the peer made whole goes over at once, so the consumer wakes once
// per read, not once per message. first reads the first message of each
// batch (it may wait, or retry a timeout); the rest are read with
// ReadMessage, as they are already buffered. mk builds the caller's
// message value; the batch that holds an error is the last one.
func ReadBatches[M any](r *bufio.Reader, maxBody int, first func() (byte, []byte, error),
	mk func(typ byte, body []byte, err error) M, out chan<- []M, quit <-chan struct{}) {
	for {
		typ, body, err := first()
		batch := []M{mk(typ, body, err)}
		for err == nil && WholeBuffered(r) {
			typ, body, err = ReadMessage(r, maxBody)
			batch = append(batch, mk(typ, body, err))
		}
		select {
		case out <- batch:
		case <-quit:
			return
		}
		if err != nil {
			return
		}
	}
}

// WholeBuffered reports whether r holds a whole message already.
func WholeBuffered(r *bufio.Reader) bool {
	if r.Buffered() < HeaderLen {
		return false
	}
	h, err := r.Peek(HeaderLen)
	if err != nil {
		return false
	}
	n := int(int32(uint32(h[1])<<24 | uint32(h[2])<<16 | uint32(h[3])<<8 | uint32(h[4])))
	return n >= 4 && r.Buffered() >= 1+n
}
