//go:build linux

package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/tandemdb/tandem/internal/pgwire"
)

// The epoll relay engine moves the bytes of plaintext sessions on event
// loops that own their sockets. Each loop is one goroutine locked to its
// thread; it reads and writes non-blocking sockets with raw system calls and
// waits in epoll_wait, so a round trip costs no goroutine parking, no
// netpoller wake-ups and no runtime bookkeeping per system call. The
// per-direction logic (framing, request accounting, drain, metrics) is the
// same as the goroutine engine's; only the I/O differs.
//
// A session enters a loop after startup and leaves it when it ends; its
// handling goroutine then takes the sockets back to send the final error and
// close them, exactly as the goroutine engine does.

// errWouldBlock is a non-blocking read or write that would have blocked.
var errWouldBlock = errors.New("would block")

// loopPollIdle bounds a blocking epoll_wait, so loops see stop requests and
// run idle-timeout checks even when no socket is active.
const loopPollIdle = 100 * time.Millisecond

type evloop struct {
	srv  *Server
	epfd int
	evfd int // eventfd: wakes the loop for adds, ends and stop

	mu      sync.Mutex
	adds    []*loopSession
	ends    []loopEnd
	stop    bool
	stopped chan struct{}

	// Owned by the loop goroutine.
	fds         map[int32]*loopFD
	sessions    map[*loopSession]struct{}
	lastIdle    time.Time
	idleTimeout time.Duration // limits.idle_session_timeout; 0 = off
}

type loopEnd struct {
	ls     *loopSession
	reason error
}

// loopFD is one socket of a session, as the loop sees it.
type loopFD struct {
	fd      int
	ls      *loopSession
	fr      *pgwire.Framer // reads this socket
	pending []byte         // bytes waiting to be written to this socket
	events  uint32         // what epoll is asked for now
}

// loopSession is a session relayed by a loop.
type loopSession struct {
	ss         *session
	client, up *loopFD
	toStore    *toStore
	toClient   *toClient
	lastClient time.Time // last bytes from the client, for the idle-session timeout
	drainAfter bool      // end with errShutdown once pending bytes to the client are written
	ended      bool
	result     chan error // the end reason, sent once
	handoff    *handoff   // set with errHandoff: the bytes the routed engine takes over
}

func (ls *loopSession) other(f *loopFD) *loopFD {
	if f == ls.client {
		return ls.up
	}
	return ls.client
}

func newEvloop(srv *Server) (*evloop, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	r1, _, e := syscall.Syscall(syscall.SYS_EVENTFD2, 0, syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if e != 0 {
		syscall.Close(epfd)
		return nil, fmt.Errorf("eventfd2: %w", e)
	}
	evfd := int(r1)
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, evfd, &syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(evfd)}); err != nil {
		syscall.Close(epfd)
		syscall.Close(evfd)
		return nil, err
	}
	l := &evloop{srv: srv, epfd: epfd, evfd: evfd, stopped: make(chan struct{}),
		fds: map[int32]*loopFD{}, sessions: map[*loopSession]struct{}{},
		idleTimeout: srv.config().Limits.IdleSessionTimeout.Duration()}
	go l.run()
	return l, nil
}

// wake makes the loop look at its queues.
func (l *evloop) wake() {
	one := uint64(1)
	_, _, _ = syscall.RawSyscall(syscall.SYS_WRITE, uintptr(l.evfd), uintptr(unsafe.Pointer(&one)), 8)
}

// shutdown stops the loop once it has no sessions left, and releases it.
func (l *evloop) shutdown() {
	l.mu.Lock()
	l.stop = true
	l.mu.Unlock()
	l.wake()
	<-l.stopped
	syscall.Close(l.epfd)
	syscall.Close(l.evfd)
}

// requestEnd asks the loop to end ls with reason; the reason arrives on
// ls.result (unless the loop ended it first, with its own reason).
func (l *evloop) requestEnd(ls *loopSession, reason error) {
	l.mu.Lock()
	l.ends = append(l.ends, loopEnd{ls, reason})
	l.mu.Unlock()
	l.wake()
}

func (l *evloop) run() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer close(l.stopped)
	events := make([]syscall.EpollEvent, 256)
	for {
		n := l.poll(events)
		for i := range n {
			ev := &events[i]
			if int(ev.Fd) == l.evfd {
				var buf [8]byte
				_, _, _ = syscall.RawSyscall(syscall.SYS_READ, uintptr(l.evfd), uintptr(unsafe.Pointer(&buf[0])), 8)
				continue
			}
			f := l.fds[ev.Fd]
			if f == nil || f.ls.ended {
				continue
			}
			if ev.Events&syscall.EPOLLOUT != 0 && len(f.pending) > 0 {
				l.flush(f)
			}
			if !f.ls.ended && ev.Events&(syscall.EPOLLHUP|syscall.EPOLLERR) != 0 && len(f.ls.other(f).pending) > 0 {
				// f is gone while its peer still holds bytes from it: nothing
				// more can move, and a hang-up cannot be masked, so end now
				// rather than spin on it.
				if f == f.ls.client {
					l.end(f.ls, errClientGone)
				} else {
					l.end(f.ls, errUpstreamLost)
				}
				continue
			}
			if !f.ls.ended && ev.Events&(syscall.EPOLLIN|syscall.EPOLLHUP|syscall.EPOLLERR|syscall.EPOLLRDHUP) != 0 {
				l.pump(f)
			}
		}
		if l.queues() {
			return
		}
		l.idleCheck()
	}
}

// poll returns ready events: first without blocking, with a raw system call
// that costs the runtime nothing; when nothing is ready, with a blocking
// call that lets the runtime use the thread's P meanwhile.
func (l *evloop) poll(events []syscall.EpollEvent) int {
	r1, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_WAIT, uintptr(l.epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e == 0 && r1 > 0 {
		return int(r1)
	}
	n, err := syscall.EpollWait(l.epfd, events, int(loopPollIdle/time.Millisecond))
	if err != nil {
		return 0 // EINTR
	}
	return n
}

// queues applies adds and ends; it reports whether the loop should exit.
func (l *evloop) queues() bool {
	l.mu.Lock()
	adds, ends, stop := l.adds, l.ends, l.stop
	l.adds, l.ends = nil, nil
	l.mu.Unlock()
	for _, ls := range adds {
		l.sessions[ls] = struct{}{}
		for _, f := range []*loopFD{ls.client, ls.up} {
			l.fds[int32(f.fd)] = f
			f.events = syscall.EPOLLIN | syscall.EPOLLRDHUP
			if err := syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, f.fd, &syscall.EpollEvent{Events: f.events, Fd: int32(f.fd)}); err != nil {
				l.end(ls, errUpstreamLost)
				break
			}
		}
	}
	for _, e := range ends {
		l.end(e.ls, e.reason)
	}
	return stop && len(l.sessions) == 0
}

// idleCheck ends sessions idle outside a transaction for longer than the
// idle-session timeout.
func (l *evloop) idleCheck() {
	timeout := l.idleTimeout
	if timeout <= 0 {
		return
	}
	now := time.Now()
	if now.Sub(l.lastIdle) < min(timeout/4, loopPollIdle) {
		return
	}
	l.lastIdle = now
	for ls := range l.sessions {
		if now.Sub(ls.lastClient) < timeout {
			continue
		}
		ls.ss.mu.Lock()
		idle := ls.ss.idleLocked()
		ls.ss.mu.Unlock()
		if idle {
			l.end(ls, errIdleTimeout)
		}
	}
}

// pump relays what src has to offer to its peer until src would block, the
// peer's socket is full, or the session ends.
func (l *evloop) pump(src *loopFD) {
	ls := src.ls
	dst := ls.other(src)
	fromClient := src == ls.client
	for !ls.ended && len(dst.pending) == 0 {
		var out []byte
		var err error
		if fromClient {
			out, err = src.fr.Next(ls.toStore.visit)
		} else {
			out, err = src.fr.Next(ls.toClient.visit)
		}
		if len(out) > 0 {
			if fromClient {
				if l.idleTimeout > 0 {
					ls.lastClient = time.Now()
				}
				if e := ls.toStore.before(); e != nil {
					if e == errHandoff {
						if ls.up.fr.InMessage() {
							e = pgwire.Fatal(pgwire.CodeConnectionFailure, "could not switch the session to routed mode in the middle of a store message").
								WithHint("Reconnect; the new session is routed from its start.")
						} else {
							ls.handoff = &handoff{clientIn: ls.client.fr.Rest(len(out)), upIn: ls.up.fr.Rest(0),
								clientOut: append([]byte(nil), ls.client.pending...)}
						}
					}
					l.end(ls, e)
					return
				}
			}
			// Account before writing, so a client that reads the reply sees
			// its request in the metrics; act on a drain after writing.
			if fromClient {
				ls.toStore.after(len(out))
			} else if ls.toClient.after(len(out)) {
				ls.drainAfter = true
			}
			w, werr := rawWrite(dst.fd, out)
			if werr != nil && !errors.Is(werr, errWouldBlock) {
				if fromClient {
					l.end(ls, errUpstreamLost)
				} else {
					l.end(ls, errClientGone)
				}
				return
			}
			if w < len(out) {
				dst.pending = append(dst.pending[:0], out[w:]...) // the framer's buffer is borrowed
				l.update(dst)
				l.update(src)
				return
			}
			if ls.drainAfter {
				l.end(ls, errShutdown)
				return
			}
		}
		if err != nil {
			if errors.Is(err, errWouldBlock) {
				src.fr.ClearErr()
				return
			}
			if fromClient {
				if reason, stop := ls.toStore.readErr(src.fr, err); stop {
					l.end(ls, reason)
				}
			} else {
				l.end(ls, ls.toClient.readErr(err))
			}
			return
		}
	}
}

// flush writes pending bytes to f; once they are out, the other side of the
// session reads again.
func (l *evloop) flush(f *loopFD) {
	ls := f.ls
	w, err := rawWrite(f.fd, f.pending)
	if err != nil && !errors.Is(err, errWouldBlock) {
		if f == ls.client {
			l.end(ls, errClientGone)
		} else {
			l.end(ls, errUpstreamLost)
		}
		return
	}
	f.pending = f.pending[w:]
	if len(f.pending) > 0 {
		return
	}
	f.pending = nil
	if ls.drainAfter && f == ls.client {
		l.end(ls, errShutdown)
		return
	}
	l.update(f)
	src := ls.other(f)
	l.update(src)
	l.pump(src) // its framer may hold bytes that no epoll event will announce
}

// update asks epoll for what f needs: input unless its peer has unwritten
// bytes from it, output while it has unwritten bytes itself.
func (l *evloop) update(f *loopFD) {
	var want uint32
	if len(f.ls.other(f).pending) == 0 {
		want |= syscall.EPOLLIN | syscall.EPOLLRDHUP
	}
	if len(f.pending) > 0 {
		want |= syscall.EPOLLOUT
	}
	if want == f.events {
		return
	}
	f.events = want
	_ = syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_MOD, f.fd, &syscall.EpollEvent{Events: want, Fd: int32(f.fd)})
}

// end takes ls off the loop and reports reason to its goroutine. The first
// end wins.
func (l *evloop) end(ls *loopSession, reason error) {
	if ls.ended {
		return
	}
	ls.ended = true
	for _, f := range []*loopFD{ls.client, ls.up} {
		_ = syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_DEL, f.fd, nil)
		delete(l.fds, int32(f.fd))
	}
	delete(l.sessions, ls)
	ls.result <- reason
}

// fdReader reads a non-blocking socket without the runtime's involvement.
// A read that returns less than asked for has emptied the socket; the next
// read then reports errWouldBlock without a system call, since the
// level-triggered epoll will announce any bytes that arrive later.
type fdReader struct {
	fd      int
	drained bool
}

func (r *fdReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if r.drained {
		r.drained = false
		return 0, errWouldBlock
	}
	for {
		r1, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(r.fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch e {
		case 0:
			if r1 == 0 {
				return 0, io.EOF
			}
			r.drained = int(r1) < len(p)
			return int(r1), nil
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return 0, errWouldBlock
		default:
			return 0, e
		}
	}
}

// rawWrite writes as much of b as the socket takes now.
func rawWrite(fd int, b []byte) (int, error) {
	done := 0
	for done < len(b) {
		r1, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&b[done])), uintptr(len(b)-done))
		switch e {
		case 0:
			done += int(r1)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return done, errWouldBlock
		default:
			return done, e
		}
	}
	return done, nil
}

// detach takes the socket out of the Go runtime's poller: it duplicates the
// descriptor and closes the net.Conn, which unregisters the original. The
// duplicate shares the original's non-blocking mode.
func detach(c net.Conn) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("%T has no file descriptor", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(orig uintptr) {
		fd, derr = syscall.Dup(int(orig))
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, derr
	}
	syscall.CloseOnExec(fd)
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return -1, err
	}
	c.Close()
	return fd, nil
}

// attach gives a detached socket back to the Go runtime as a net.Conn.
func attach(fd int, name string) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	return net.FileConn(f)
}

// epollCapable reports whether the session can be relayed by a loop:
// plaintext TCP or Unix sockets on both sides, with no bytes read ahead.
func (ss *session) epollCapable() bool {
	if ss.tlsOn || ss.upstream.reader != io.Reader(ss.upstream.conn) {
		return false
	}
	switch ss.upstream.conn.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return false
	}
	_, ok := ss.client.(*net.TCPConn)
	return ok
}

// relayEpoll relays the session on loop l until it ends, then finishes it
// like the goroutine engine. It reports false, with nothing changed, when the
// sockets could not be handed over; the caller then uses the goroutine
// engine.
func (ss *session) relayEpoll(l *evloop) (bool, *handoff) {
	cfd, err := detach(ss.client)
	if err != nil {
		return false, nil
	}
	ufd, err := detach(ss.upstream.conn)
	if err != nil {
		// The client's net.Conn is closed already: take its socket back.
		c, aerr := attach(cfd, "client")
		if aerr != nil {
			return true, nil // the client's socket is gone; the session ends
		}
		ss.client = c
		return false, nil
	}
	maxBody := int(ss.srv.config().Limits.MaxMessageBytes)
	ls := &loopSession{ss: ss, toStore: &toStore{ss: ss}, toClient: &toClient{ss: ss},
		lastClient: time.Now(), result: make(chan error, 1)}
	ls.client = &loopFD{fd: cfd, ls: ls, fr: pgwire.NewFramer(&fdReader{fd: cfd}, relayBufSize, maxBody, nil)}
	ls.up = &loopFD{fd: ufd, ls: ls, fr: pgwire.NewFramer(&fdReader{fd: ufd}, relayBufSize, maxBody, serverWhole)}
	l.mu.Lock()
	l.adds = append(l.adds, ls)
	l.mu.Unlock()
	l.wake()
	ss.srv.looped.Add(1)
	ss.srv.metrics.Relayed(ss.ctx, "epoll")

	var reason error
	select {
	case reason = <-ls.result:
	case <-ss.killCh:
		l.requestEnd(ls, ss.killErr)
		reason = <-ls.result
	}

	// The loop no longer touches the sockets: finish on the goroutine path.
	// attach closes the descriptor it is given, whether or not it succeeds.
	client, cerr := attach(cfd, "client")
	up, uerr := attach(ufd, "upstream")
	if cerr != nil || uerr != nil {
		for _, c := range []net.Conn{client, up} {
			if c != nil {
				c.Close()
			}
		}
		return true, nil
	}
	ss.client, ss.upstream.conn = client, up
	if reason == errHandoff && ls.handoff != nil {
		ss.upstream.reader = up
		return true, ls.handoff
	}
	ss.sayGoodbye(reason, !ls.client.fr.InMessage())
	ss.upstream.conn.Close()
	ss.closeClient(reason, ls.up.fr, true)
	return true, nil
}

// startLoops creates the epoll engine's loops: one per two Ps, so the
// runtime keeps Ps for session startup, the admin API and the rest. (Two
// loops on two Ps measured clearly worse than one: each idle loop's blocking
// wait hands its P off and back.)
func (s *Server) startLoops() error {
	for range max(1, runtime.GOMAXPROCS(0)/2) {
		l, err := newEvloop(s)
		if err != nil {
			s.stopLoops()
			return err
		}
		s.loops = append(s.loops, l)
	}
	return nil
}

// stopLoops stops the loops once their sessions are gone; idempotent.
func (s *Server) stopLoops() {
	s.loopsOnce.Do(func() {
		for _, l := range s.loops {
			l.shutdown()
		}
	})
}

// relayWithEngine relays an authenticated session with the configured
// engine, and hands it to the routed engine when the routing state needs
// it routed message by message.
func (ss *session) relayWithEngine() {
	if !ss.srv.wantRouted(ss) {
		if s := ss.srv; len(s.loops) > 0 && ss.epollCapable() {
			l := s.loops[int(s.nextLoop.Add(1))%len(s.loops)]
			if ok, h := ss.relayEpoll(l); ok {
				ss.endRelayWriter()
				if h != nil {
					ss.serveRouted(h)
				}
				return
			}
		}
		h := ss.relay()
		ss.endRelayWriter()
		if h == nil {
			return
		}
		ss.serveRouted(h)
		return
	}
	ss.serveRouted(&handoff{})
}
