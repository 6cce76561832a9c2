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
		// One allocation per batch: room for every message already whole
		// in r (growing by append cost a third of the routed engine's
		// allocated bytes; issue 15).
		batch := make([]M, 1, 1+wholeBuffered(r))
		batch[0] = mk(typ, body, err)
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

// wholeBuffered returns how many whole messages r holds already.
func wholeBuffered(r *bufio.Reader) int {
	b, _ := r.Peek(r.Buffered())
	n := 0
	for len(b) >= HeaderLen {
		size := int(int32(uint32(b[1])<<24 | uint32(b[2])<<16 | uint32(b[3])<<8 | uint32(b[4])))
		if size < 4 || len(b) < 1+size {
			break
		}
		b = b[1+size:]
		n++
	}
	return n
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
