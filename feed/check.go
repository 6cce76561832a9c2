package feed

import (
	"context"
	"fmt"
	"time"

	"github.com/tandemdb/tandem/compare"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// check checks the batch: each key's row on both stores, a difference
// confirmed and recorded in the drift ledger; a truncated table whose
// secondary is not empty, or a table whose keys cannot be read, is
// recorded whole. Then the batch is checked: its end may be confirmed.
func (s *session) check(ctx context.Context, b *changes) error {
	if k := s.r.opts.Knobs.BeforeCheck; k != nil {
		if err := k(ctx, b.end); err != nil {
			return err
		}
	}
	var entries []table.DriftEntry
	var detected []time.Time
	rels := map[uint32]bool{}
	for id := range b.keys {
		rels[id] = true
	}
	for id := range b.whole {
		rels[id] = true
	}
	for id := range rels {
		rel := s.rels[id]
		if rel == nil {
			continue
		}
		// A batch over many tables may take a while: stay alive meanwhile.
		if time.Since(s.beat) > statusEvery {
			if err := s.heartbeat(ctx); err != nil {
				return err
			}
		}
		if w, ok := b.whole[id]; ok {
			empty := false
			if w.truncate { // fine if the secondary's table is empty too
				var err error
				if empty, err = s.secondaryEmpty(ctx, rel); err != nil {
					return err
				}
			}
			if !empty {
				entries = append(entries, table.DriftEntry{Table: rel.name, Reason: Reason, Stale: string(s.secondary)})
				detected = append(detected, w.at)
				s.r.opts.Metrics.Differences(rel.name.String(), "whole table", 1)
				continue
			}
		}
		m := b.keys[id]
		if len(m) == 0 {
			continue
		}
		keys := make([][]string, 0, len(m))
		for _, ch := range m {
			keys = append(keys, ch.key)
		}
		// A split old table's key is checked through every part: its row
		// is a row of each part's new table (or of none, outside a
		// dependent's where); a merged new table's key through every
		// table of the merge. A key that differs in any is one entry of
		// the changed table, which the repair copies through all of them.
		differs := map[string]bool{}
		for _, pm := range rel.parts() {
			c, err := s.checker(ctx, pm)
			if err != nil {
				return err
			}
			diffs, _, err := c.Check(ctx, keys)
			if err != nil {
				return fmt.Errorf("checking %s: %w", rel.name, err)
			}
			for _, d := range diffs {
				s.r.opts.Metrics.Differences(rel.name.String(), string(d.Kind), 1)
				if k := joinKey(d.Key); !differs[k] {
					differs[k] = true
					entries = append(entries, table.DriftEntry{Table: rel.name, Key: d.Key, Reason: Reason, Stale: string(s.secondary)})
					detected = append(detected, m[k].at)
				}
			}
		}
		s.r.opts.Metrics.Checked(rel.name.String(), len(keys))
	}
	if len(entries) > 0 && s.until == 0 {
		// Before recording which store is stale, make sure this store is
		// still the primary: a difference in a mirror write that the new
		// primary made after a flip is stale on this store, not the other.
		if err := s.follow(ctx); err != nil {
			return err
		}
	}
	if !s.flippedAt.IsZero() {
		kept, keptAt := entries[:0], detected[:0]
		for i, e := range entries {
			if detected[i].Before(s.flippedAt) {
				kept, keptAt = append(kept, e), append(keptAt, detected[i])
			}
		}
		entries, detected = kept, keptAt
	}
	if err := table.RecordDrift(ctx, s.control, entries); err != nil {
		return err
	}
	if len(entries) > 0 {
		s.r.log.Info("the change feed found differences; recorded as drift", "entries", len(entries), "stale", s.secondary)
	}
	if k := s.r.opts.Knobs.Detected; k != nil {
		for _, at := range detected {
			k(at)
		}
	}
	s.checked = max(s.checked, b.end)
	if !b.last.IsZero() {
		s.lastAt = b.last
	}
	return nil
}

// secondaryEmpty reports whether the secondary's tables of rel (every
// part's new table for a split old table) have no rows.
func (s *session) secondaryEmpty(ctx context.Context, rel *relation) (bool, error) {
	for _, pm := range rel.parts() {
		conn, name := s.new, pm.New.Name
		if s.store == route.New {
			conn, name = s.old, pm.Old.Name
		}
		var exists bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+name.Quoted()+")").Scan(&exists); err != nil {
			return false, fmt.Errorf("reading %s on the %s store: %w", name, s.secondary, err)
		}
		if exists {
			return false, nil
		}
	}
	return true, nil
}

// checker is the Checker of mapping m (a table's, or one part's of a
// split), made once per session.
func (s *session) checker(ctx context.Context, m *table.Mapping) (*compare.Checker, error) {
	if c := s.checkers[m]; c != nil {
		return c, nil
	}
	c, err := compare.NewChecker(ctx, s.old, s.new, m, compare.Options{Settle: s.r.opts.Settle, PrimaryNew: s.primaryNow == route.New})
	if err != nil {
		return nil, err
	}
	s.checkers[m] = c
	return c, nil
}
