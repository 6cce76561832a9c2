package pgtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// clusterDirPrefix names cluster directories inside the temp base.
const clusterDirPrefix = "pgt-"

// ownerFile, inside a cluster directory, identifies the process that created
// it ("pid starttime pid-namespace"), so that directories of processes that died without cleaning up (a test
// timeout, Ctrl-C) can be recognised and removed later.
const ownerFile = "pgtest-owner"

var sweepOnce sync.Once

func writeOwner(dir string) error {
	self := os.Getpid()
	_, _, start, ok := procStat(self)
	if !ok {
		return fmt.Errorf("pgtest: cannot read /proc/%d/stat", self)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), fmt.Appendf(nil, "%d %s %s\n", self, start, pidNamespace()), 0o644); err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	return nil
}

// sweepStale removes cluster directories under base whose creating process
// no longer exists and whose server is not running. Servers die with the
// process that started them, but their directories would otherwise stay,
// which on a tmpfs means memory.
func sweepStale(base string, logf func(string, ...any)) {
	dirs, _ := filepath.Glob(filepath.Join(base, clusterDirPrefix+"*"))
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue // not ours, or still being set up
		}
		// Process ids mean nothing outside their pid namespace (another
		// container sharing the directory), so only judge our own.
		fields := strings.Fields(string(b))
		if len(fields) != 3 || fields[2] != pidNamespace() {
			continue
		}
		pid, err := strconv.Atoi(fields[0])
		if err != nil || (procID{pid, fields[1]}).alive() {
			continue
		}
		dataDir := filepath.Join(dir, "data")
		if postmasterAlive(dataDir) {
			continue
		}
		removeLeftoverShmem(dataDir)
		if err := os.RemoveAll(dir); err == nil {
			logf("pgtest: removed %s, left behind by process %d", dir, pid)
		}
	}
}

// postmasterAlive reports whether the postmaster recorded in
// dataDir/postmaster.pid still runs.
func postmasterAlive(dataDir string) bool {
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return false
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil || pid <= 0 {
		return false
	}
	state, _, _, ok := procStat(pid)
	return ok && state != 'Z' && state != 'X'
}

// pidNamespace identifies the pid namespace of this process.
func pidNamespace() string {
	ns, err := os.Readlink("/proc/self/ns/pid")
	if err != nil {
		return "unknown"
	}
	return ns
}
