package pgtest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sys/unix"
)

var (
	// errAddrInUse marks a start that failed because the port was taken.
	errAddrInUse = errors.New("port already in use")
	// errShmemInUse marks a start that failed because processes of a
	// previous incarnation of the server still hold its shared memory.
	errShmemInUse = errors.New("shared memory of a previous server still in use")
)

// process is one running postmaster.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once cmd.Wait has returned
	err    error         // cmd.Wait's result; valid after exited is closed
}

func (p *process) done() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// stop requests a fast shutdown and waits for the postmaster to exit; the
// postmaster itself waits for its children first. If ctx ends first, the
// server is killed.
func (p *process) stop(ctx context.Context) error {
	if err := p.cmd.Process.Signal(syscall.SIGINT); err != nil && !errors.Is(err, os.ErrProcessDone) {
		p.kill()
		return err
	}
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		p.kill()
		return ctx.Err()
	}
}

// kill SIGKILLs the postmaster, its process group and all its descendants,
// and waits until they are gone.
func (p *process) kill() {
	if p.done() {
		return
	}
	proc := p.cmd.Process
	pid := proc.Pid
	// Freeze the postmaster so that it cannot fork while its descendants are
	// collected. Process.Signal is immune to pid reuse; once the postmaster is
	// stopped it cannot exit, so its pid stays valid for the raw kills below.
	// (Postmaster children call setsid, so killing the group is not enough.)
	var kids []procID
	if err := proc.Signal(syscall.SIGSTOP); err == nil {
		kids = descendants(pid)
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		for _, k := range kids {
			_ = syscall.Kill(k.pid, syscall.SIGKILL)
		}
	}
	_ = proc.Signal(syscall.SIGKILL)
	<-p.exited
	waitGone(kids, 10*time.Second)
	reapAdopted()
}

// Server processes orphaned by a killed postmaster are adopted by the nearest
// "child subreaper" ancestor, or else by init. Init is not guaranteed to reap
// them (in some containers it never does), so the first launch makes this
// process a subreaper and reapAdopted collects the orphans.
var (
	subreaperOnce sync.Once

	launchedMu sync.Mutex
	launched   = map[int]bool{} // postmasters whose exec.Cmd has not been waited for
)

func becomeSubreaper() {
	subreaperOnce.Do(func() {
		_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	})
}

// reapAdopted reaps exited server processes that were adopted by this
// process, leaving alone the postmasters that their exec.Cmd waits for and
// all other children.
func reapAdopted() {
	launchedMu.Lock()
	defer launchedMu.Unlock()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || launched[pid] {
			continue
		}
		state, ppid, _, ok := procStat(pid)
		if !ok || state != 'Z' || ppid != self {
			continue
		}
		if comm, _ := os.ReadFile("/proc/" + e.Name() + "/comm"); strings.TrimSpace(string(comm)) != "postgres" {
			continue
		}
		var ws unix.WaitStatus
		_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	}
}

// launch starts the postmaster and waits until it accepts connections. On
// failure nothing is left running and the error includes the tail of the
// server log.
func (c *Cluster) launch(ctx context.Context) error {
	logFile, err := os.OpenFile(c.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	var logStart int64
	if st, err := logFile.Stat(); err == nil {
		logStart = st.Size()
	}
	cmd := exec.Command(filepath.Join(c.env.binDir, "postgres"), "-D", c.dataDir)
	cmd.Dir = c.dir
	cmd.Env = serverEnviron()
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL, // do not outlive the process that started it
		Credential: c.env.cred,
	}
	becomeSubreaper()
	launchedMu.Lock()
	err = cmd.Start()
	if err == nil {
		launched[cmd.Process.Pid] = true
	}
	launchedMu.Unlock()
	_ = logFile.Close() // the child has its own descriptor
	if err != nil {
		return fmt.Errorf("pgtest: starting postgres: %w", err)
	}
	p := &process{cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		launchedMu.Lock()
		delete(launched, cmd.Process.Pid)
		launchedMu.Unlock()
		close(p.exited)
	}()

	if err := waitReady(ctx, p, c.DSN("postgres")); err != nil {
		p.kill()
		logText := logTail(c.logPath, logStart, 4096)
		switch {
		case strings.Contains(logText, "Address already in use"):
			err = fmt.Errorf("%w: %w", errAddrInUse, err)
		case strings.Contains(logText, "pre-existing shared memory block"):
			err = fmt.Errorf("%w: %w", errShmemInUse, err)
		}
		return fmt.Errorf("pgtest: PostgreSQL on port %d (dir %s) failed to start: %w\n--- server log ---\n%s", c.port, c.dir, err, logText)
	}
	c.mu.Lock()
	c.proc = p
	c.mu.Unlock()
	return nil
}

// waitReady polls until a connection to dsn succeeds, the process exits, or
// ctx ends.
func waitReady(ctx context.Context, p *process, dsn string) error {
	const interval = 15 * time.Millisecond
	timer := time.NewTimer(0)
	defer timer.Stop()
	var lastErr error
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("server exited: %v", p.err)
		case <-ctx.Done():
			if lastErr != nil {
				return fmt.Errorf("%w (last connection error: %v)", ctx.Err(), lastErr)
			}
			return ctx.Err()
		case <-timer.C:
		}
		// Whatever answers on the port may not be our server (if the port
		// was taken), so give up on the attempt as soon as the server exits.
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		go func() {
			select {
			case <-p.exited:
				cancel()
			case <-actx.Done():
			}
		}()
		conn, err := pgconn.Connect(actx, dsn)
		cancel()
		if err == nil {
			_ = conn.Close(ctx)
			return nil
		}
		lastErr = err
		timer.Reset(interval)
	}
}

// serverEnviron is the environment for initdb and postgres: the caller's,
// minus libpq variables (PGPORT, PGDATA, ... could change server defaults),
// with the C locale so that messages are predictable.
func serverEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "LC_") || strings.HasPrefix(kv, "LANG=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LC_ALL=C", "LANG=C")
}

// logTail returns up to max bytes from the end of the file, starting no
// earlier than offset.
func logTail(path string, offset int64, max int64) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read server log: %v)", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(cannot read server log: %v)", err)
	}
	if st.Size()-offset > max {
		offset = st.Size() - max
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return fmt.Sprintf("(cannot read server log: %v)", err)
	}
	b, _ := io.ReadAll(f)
	if len(bytes.TrimSpace(b)) == 0 {
		return "(empty)"
	}
	return strings.TrimRight(string(b), "\n")
}

// freePort returns a TCP port on the loopback address that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", host+":0")
	if err != nil {
		return 0, fmt.Errorf("pgtest: finding a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	return port, nil
}

// procID identifies a process robustly against pid reuse.
type procID struct {
	pid       int
	startTime string
}

// procStat returns the state, parent pid and start time of a process from
// /proc/<pid>/stat.
func procStat(pid int) (state byte, ppid int, startTime string, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, "", false
	}
	// The command name is in parentheses and may itself contain ") ".
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, "", false
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 of proc(5) (state), f[1] field 4 (ppid), f[19] field 22 (starttime).
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, "", false
	}
	ppid, err = strconv.Atoi(f[1])
	if err != nil {
		return 0, 0, "", false
	}
	return f[0][0], ppid, f[19], true
}

// descendants lists all live descendants of pid.
func descendants(pid int) []procID {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]procID{}
	for _, e := range entries {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		state, ppid, start, ok := procStat(n)
		if !ok || state == 'Z' || state == 'X' {
			continue
		}
		children[ppid] = append(children[ppid], procID{n, start})
	}
	var out []procID
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, k := range children[p] {
			out = append(out, k)
			queue = append(queue, k.pid)
		}
	}
	return out
}

// alive reports whether the process still exists and is not a zombie.
func (p procID) alive() bool {
	state, _, start, ok := procStat(p.pid)
	return ok && start == p.startTime && state != 'Z' && state != 'X'
}

// waitGone waits until none of procs is alive, or timeout passes.
func waitGone(procs []procID, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, p := range procs {
		for p.alive() && time.Now().Before(deadline) {
			time.Sleep(2 * time.Millisecond)
		}
	}
}

// removeLeftoverShmem removes the System V shared memory segment recorded in
// dataDir/postmaster.pid, if the postmaster died without removing it and no
// process is attached to it any more.
func removeLeftoverShmem(dataDir string) {
	f, err := os.Open(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return
	}
	defer f.Close()
	// Line 7 holds "<key> <shmid>".
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		if line != 7 {
			continue
		}
		fields := strings.Fields(sc.Text())
		if len(fields) != 2 {
			return
		}
		key, err1 := strconv.ParseUint(fields[0], 10, 32)
		id, err2 := strconv.Atoi(fields[1])
		if err1 != nil || err2 != nil {
			return
		}
		var ds unix.SysvShmDesc
		if _, err := unix.SysvShmCtl(id, unix.IPC_STAT, &ds); err != nil {
			return
		}
		if uint32(ds.Perm.Key) != uint32(key) || uint64(ds.Nattch) != 0 {
			return
		}
		_, _ = unix.SysvShmCtl(id, unix.IPC_RMID, nil)
		return
	}
}
