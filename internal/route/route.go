// Package route holds Tandem's routing state: which store is primary,
// whether writes are mirrored, and what share of reads the new store serves
// or shadows. The state is versioned and kept in the control schema; every
// change is checked for legality, recorded in a history table, and announced
// to proxy replicas with NOTIFY.
package route

import (
	"errors"
	"fmt"
	"strings"
)

// Store names a store.
type Store string

const (
	Old Store = "old"
	New Store = "new"
)

// Settings are the four routing settings.
type Settings struct {
	Primary Store `json:"primary"` // the store of record, which runs each write first
	Mirror  bool  `json:"mirror"`  // writes are applied to the other store too
	Reads   int   `json:"reads"`   // percent of eligible reads served by the new store
	Shadow  int   `json:"shadow"`  // percent of reads also run on the other store and compared
}

// Passthrough is step 1 of the playbook: everything on old, nothing mirrored.
func Passthrough() Settings { return Settings{Primary: Old} }

func (s Settings) String() string {
	m := "off"
	if s.Mirror {
		m = "on"
	}
	return fmt.Sprintf("primary=%s mirror=%s reads=%d%% shadow=%d%%", s.Primary, m, s.Reads, s.Shadow)
}

// Secondary is the store that is not primary.
func (s Settings) Secondary() Store {
	if s.Primary == New {
		return Old
	}
	return New
}

// Check reports why s is not a coherent routing state, or nil. The rules
// keep every store that serves reads complete: a store that does not receive
// writes must serve none.
func (s Settings) Check() error {
	var errs []string
	if s.Primary != Old && s.Primary != New {
		errs = append(errs, fmt.Sprintf("primary must be old or new, not %q", s.Primary))
	}
	if s.Reads < 0 || s.Reads > 100 {
		errs = append(errs, fmt.Sprintf("reads must be 0..100, not %d", s.Reads))
	}
	if s.Shadow < 0 || s.Shadow > 100 {
		errs = append(errs, fmt.Sprintf("shadow must be 0..100, not %d", s.Shadow))
	}
	if !s.Mirror {
		if s.Primary == Old && s.Reads > 0 {
			errs = append(errs, "reads from new need mirror=on: without it new misses writes and would serve stale rows")
		}
		if s.Primary == New && s.Reads < 100 {
			errs = append(errs, "with primary=new and mirror=off, old misses writes: reads must be 100")
		}
		if s.Shadow > 0 {
			errs = append(errs, "shadow reads need mirror=on: comparing against a store that misses writes only finds noise")
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return &IllegalError{Reason: strings.Join(errs, "; ")}
}

// IllegalError is a refused state or transition; Reason says why in words an
// operator can act on.
type IllegalError struct {
	Reason string
	Gate   bool // refused by a cutover gate; --force overrides gates, never coherence rules
}

func (e *IllegalError) Error() string { return "refused: " + e.Reason }

// IsIllegal reports whether err is a refused state or transition.
func IsIllegal(err error) bool {
	var ie *IllegalError
	return errors.As(err, &ie)
}

// CheckTransition reports why moving from cur to next is refused. next must
// itself pass Check. force overrides only the rules marked as gates.
func CheckTransition(cur, next Settings, force bool) error {
	if err := next.Check(); err != nil {
		return err
	}
	if cur.Primary != next.Primary && (!cur.Mirror || !next.Mirror) {
		return &IllegalError{Reason: fmt.Sprintf("primary can change (%s -> %s) only while mirror is on before and after the flip, so the store losing the primary role stays complete for a rollback", cur.Primary, next.Primary)}
	}
	// Turning mirror on from passthrough is step 2: the backfill then fills
	// new. Turning it on again after a finish is different: old has missed
	// every write since, and nothing will copy them back.
	if cur.Primary == New && !cur.Mirror && next.Mirror && !force {
		return &IllegalError{Gate: true, Reason: "turning mirror on again after the finish: old missed every write while mirror was off; re-copy it before relying on it, or pass --force"}
	}
	return nil
}

// Rollback returns the settings a rollback moves to from cur: old is primary
// and serves every read. Mirroring stays on, so new keeps receiving writes
// and the migration can resume; shadowing is kept.
func Rollback(cur Settings) Settings {
	next := cur
	next.Primary = Old
	next.Reads = 0
	if !cur.Mirror {
		next.Shadow = 0
	}
	return next
}
