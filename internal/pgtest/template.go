package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// serverEnv describes how server processes are run on this machine.
type serverEnv struct {
	binDir  string
	version string // e.g. "15.19"
	uid     int    // owner of server processes and their files
	gid     int
	cred    *syscall.Credential // non-nil when servers run as another user
	base    string              // directory for cluster dirs and the template
}

var (
	envMu    sync.Mutex
	envCache = map[string]*serverEnv{} // by bin dir
)

// environment resolves (once per bin dir) the binaries, version, server user
// and temp directory.
func environment() (*serverEnv, error) {
	binDir, err := resolveBinDir()
	if err != nil {
		return nil, err
	}
	envMu.Lock()
	defer envMu.Unlock()
	if e := envCache[binDir]; e != nil {
		return e, nil
	}
	e := &serverEnv{binDir: binDir}
	if e.version, err = serverVersion(binDir); err != nil {
		return nil, err
	}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("pgtest: running as root, PostgreSQL must run as OS user \"postgres\": %w", err)
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("pgtest: bad uid/gid %q/%q for OS user postgres", u.Uid, u.Gid)
		}
		e.uid, e.gid = uid, gid
		e.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}
	} else {
		e.uid, e.gid = os.Geteuid(), os.Getegid()
	}
	if e.base, err = tempBase(e.uid, e.gid); err != nil {
		return nil, err
	}
	envCache[binDir] = e
	return e, nil
}

var (
	fallbackBinDirOnce sync.Once
	fallbackBinDir     string
	fallbackBinDirErr  error
)

func resolveBinDir() (string, error) {
	if d := os.Getenv("PG_BINDIR"); d != "" {
		if !hasServerBinaries(d) {
			return "", fmt.Errorf("pgtest: PG_BINDIR=%s does not contain initdb and postgres", d)
		}
		return filepath.Clean(d), nil
	}
	fallbackBinDirOnce.Do(func() {
		fallbackBinDir, fallbackBinDirErr = findBinDir()
	})
	return fallbackBinDir, fallbackBinDirErr
}

func findBinDir() (string, error) {
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if d := strings.TrimSpace(string(out)); hasServerBinaries(d) {
			return d, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	best, bestVer := "", []int(nil)
	for _, d := range dirs {
		if !hasServerBinaries(d) {
			continue
		}
		v := parseVersionNumbers(filepath.Base(filepath.Dir(d)))
		if best == "" || slices.Compare(v, bestVer) > 0 {
			best, bestVer = d, v
		}
	}
	if best == "" {
		return "", errors.New("pgtest: no PostgreSQL server binaries found (set PG_BINDIR, or install them so that pg_config --bindir or /usr/lib/postgresql/*/bin has initdb)")
	}
	return best, nil
}

func hasServerBinaries(dir string) bool {
	for _, name := range []string{"initdb", "postgres"} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.IsDir() || st.Mode().Perm()&0o111 == 0 {
			return false
		}
	}
	return true
}

func parseVersionNumbers(s string) []int {
	var v []int
	for _, part := range strings.Split(s, ".") {
		n, err := strconv.Atoi(part)
		if err != nil {
			break
		}
		v = append(v, n)
	}
	return v
}

var versionRE = regexp.MustCompile(`\(PostgreSQL\) (\S+)`)

// serverVersion asks the postgres binary for its version, e.g. "15.19".
func serverVersion(binDir string) (string, error) {
	out, err := exec.Command(filepath.Join(binDir, "postgres"), "--version").Output()
	if err != nil {
		return "", fmt.Errorf("pgtest: %s/postgres --version: %w", binDir, err)
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("pgtest: cannot parse version from %q", bytes.TrimSpace(out))
	}
	return string(m[1]), nil
}

// maxBaseLen keeps Unix socket paths (base/pgt-NNNNNNNNNN/.s.PGSQL.NNNNN.lock)
// within the 107 bytes the kernel allows.
const maxBaseLen = 107 - len("/pgt-4294967295/.s.PGSQL.65535.lock")

// tempBase picks the directory under which cluster dirs and the template
// live. An explicitly set $TMPDIR is honoured. Otherwise /dev/shm is
// preferred when it is a tmpfs with room to spare, because creating the
// thousand-odd files of a data directory there is many times cheaper than on
// a disk file system; /tmp is the fallback. Directories whose paths are too
// long for Unix sockets, or that the server user cannot reach, are skipped.
func tempBase(uid, gid int) (string, error) {
	var candidates []string
	if os.Getenv("TMPDIR") != "" {
		candidates = []string{os.TempDir()}
	} else if roomyTmpfs("/dev/shm") {
		candidates = []string{"/dev/shm"}
	}
	candidates = append(candidates, "/tmp")
	for _, d := range candidates {
		d, err := filepath.Abs(d)
		if err != nil || len(d) > maxBaseLen {
			continue
		}
		if st, err := os.Stat(d); err != nil || !st.IsDir() {
			continue
		}
		if uid == os.Geteuid() || searchable(d, uid, gid) {
			return d, nil
		}
	}
	return "", fmt.Errorf("pgtest: no usable temp directory among %q (must be at most %d bytes long and reachable by uid %d)", candidates, maxBaseLen, uid)
}

// minTmpfsFree is how much free space a tmpfs needs to be used for clusters.
const minTmpfsFree = 2 << 30

func roomyTmpfs(dir string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false
	}
	return st.Type == unix.TMPFS_MAGIC && st.Bavail*uint64(st.Bsize) >= minTmpfsFree
}

// searchable reports whether uid/gid may traverse dir and all its ancestors.
func searchable(dir string, uid, gid int) bool {
	for d := dir; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return false
		}
		sys, ok := st.Sys().(*syscall.Stat_t)
		if !ok {
			return false
		}
		perm := st.Mode().Perm()
		var x fs.FileMode
		switch {
		case int(sys.Uid) == uid:
			x = 0o100
		case int(sys.Gid) == gid:
			x = 0o010
		default:
			x = 0o001
		}
		if perm&x == 0 {
			return false
		}
		if d == "/" {
			return true
		}
	}
}

// chown gives path to the server user (a no-op unless running as root).
func (e *serverEnv) chown(path string) error {
	if e.cred == nil {
		return nil
	}
	return os.Lchown(path, e.uid, e.gid)
}

// writeFile writes a 0600 file owned by the server user.
func (e *serverEnv) writeFile(path string, data []byte) error {
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	if err := e.chown(path); err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	return nil
}

// templatePath is the shared, initdb'ed data directory that clusters copy.
func (e *serverEnv) templatePath() string {
	return filepath.Join(e.base, fmt.Sprintf("tandem-pgtest-template-%s-%d", e.version, os.Geteuid()))
}

// populateDataDir creates dataDir as a copy of the template, creating the
// template first if needed.
func populateDataDir(ctx context.Context, e *serverEnv, dataDir string, logf func(string, ...any)) error {
	tmpl := e.templatePath()
	lock, err := os.OpenFile(tmpl+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("pgtest: template lock: %w", err)
	}
	defer lock.Close() // releases the flock

	// Readers share the lock; builders (and removers of a broken template)
	// hold it exclusively.
	if err := flock(ctx, lock, unix.LOCK_SH); err != nil {
		return err
	}
	if !templateValid(tmpl, e.version) {
		_ = unix.Flock(int(lock.Fd()), unix.LOCK_UN)
		if err := flock(ctx, lock, unix.LOCK_EX); err != nil {
			return err
		}
		if !templateValid(tmpl, e.version) {
			if err := buildTemplate(ctx, e, tmpl, logf); err != nil {
				return err
			}
		}
	}
	if err := copyTree(tmpl, dataDir, e); err != nil {
		return fmt.Errorf("pgtest: copying template %s: %w", tmpl, err)
	}
	return nil
}

// flock acquires the lock, polling so that ctx is honoured.
func flock(ctx context.Context, f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("pgtest: locking %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pgtest: waiting for template lock %s: %w", f.Name(), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// templateValid reports whether tmpl looks like a complete data directory of
// the given server version.
func templateValid(tmpl, version string) bool {
	b, err := os.ReadFile(filepath.Join(tmpl, "PG_VERSION"))
	if err != nil {
		return false
	}
	major := strings.TrimSpace(string(b))
	if major == "" || !strings.HasPrefix(version, major) ||
		(len(version) > len(major) && version[len(major)] >= '0' && version[len(major)] <= '9') {
		return false
	}
	for _, f := range []string{"global/pg_control", "base/1/PG_VERSION", "postgresql.conf", "pg_hba.conf"} {
		if st, err := os.Stat(filepath.Join(tmpl, f)); err != nil || !st.Mode().IsRegular() {
			return false
		}
	}
	wal, err := os.ReadDir(filepath.Join(tmpl, "pg_wal"))
	if err != nil {
		return false
	}
	for _, w := range wal {
		if len(w.Name()) == 24 && w.Type().IsRegular() {
			return true
		}
	}
	return false
}

// buildTemplate runs initdb into a scratch directory and renames the result
// to tmpl. The caller holds the template lock exclusively.
func buildTemplate(ctx context.Context, e *serverEnv, tmpl string, logf func(string, ...any)) error {
	began := time.Now()
	logf("pgtest: creating template %s with initdb (once per machine and version)", tmpl)
	// Clear a broken template and scratch dirs of builders that died.
	if err := os.RemoveAll(tmpl); err != nil {
		return fmt.Errorf("pgtest: removing broken template: %w", err)
	}
	stale, _ := filepath.Glob(tmpl + ".tmp-*")
	for _, s := range stale {
		_ = os.RemoveAll(s)
	}

	scratch, err := os.MkdirTemp(e.base, filepath.Base(tmpl)+".tmp-")
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	defer os.RemoveAll(scratch)
	if err := e.chown(scratch); err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	data := filepath.Join(scratch, "data")
	cmd := exec.CommandContext(ctx, filepath.Join(e.binDir, "initdb"),
		"-N", "-U", "postgres", "-E", "UTF8", "--locale=C", "--auth=trust", "-D", data)
	cmd.Dir = scratch
	cmd.Env = serverEnviron()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: e.cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("pgtest: initdb failed: %w\n%s", err, strings.TrimSpace(out.String()))
	}
	if err := os.Rename(data, tmpl); err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	logf("pgtest: template created in %v", time.Since(began).Round(time.Millisecond))
	return nil
}

// copyTree copies the directory tree src to dst (which must not exist),
// preserving permissions and symlinks, and gives the copy to the server user.
func copyTree(src, dst string, e *serverEnv) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		perm := info.Mode().Perm()
		switch {
		case d.IsDir():
			if err := os.Mkdir(target, perm); err != nil {
				return err
			}
			if err := os.Chmod(target, perm); err != nil { // undo the umask
				return err
			}
			return e.chown(target)
		case d.Type()&fs.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
			return e.chown(target)
		case d.Type().IsRegular():
			return copyFile(path, target, perm, e)
		default:
			return fmt.Errorf("unexpected file type %v at %s", d.Type(), path)
		}
	})
}

func copyFile(src, dst string, perm fs.FileMode, e *serverEnv) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Chmod(perm)
	}
	if err == nil && e.cred != nil {
		err = out.Chown(e.uid, e.gid)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}
