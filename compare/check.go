package compare

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// Checker checks given keys of one table on both stores: a point lookup
// of each key's row hash on each store, then, for the keys that differ,
// the verify's race-free re-check (confirm: the primary's table held, the
// in-flight mirror writes settled). The change feed uses it for the keys
// a committed transaction changed; it is the verify's code, not a copy.
//
// A Checker owns neither connection and is not safe for concurrent use;
// it uses old and new until it is discarded.
type Checker struct {
	v *verifier
	// Grace is how long differing keys are re-read without locks before
	// the locked re-check: a write committed on the primary reaches the
	// secondary right after, and most first-read differences are that.
	Grace time.Duration
}

// NewChecker prepares checks of m's keys on old and new. It sets the
// session settings SessionSQL on both connections, which must not be in a
// transaction. opts.Settle and opts.PrimaryNew apply; the run, repair and
// walk options do not. It wraps ErrNotComparable like Table.
func NewChecker(ctx context.Context, old, new *pgx.Conn, m *table.Mapping, opts Options) (*Checker, error) {
	opts = opts.withDefaults()
	newKey, ok := m.KeyPreserving()
	if !ok || !m.Old.HasKey() {
		return nil, fmt.Errorf("checking %s: %w", m.Old.Name, ErrNotComparable)
	}
	oldKey := make([]table.Column, len(m.Old.Key))
	for i, k := range m.Old.Key {
		oldKey[i] = m.Old.Columns[k]
	}
	record, err := bothAtLeast(ctx, 140000, old, new)
	if err != nil {
		return nil, fmt.Errorf("checking %s: %w", m.Old.Name, err)
	}
	hashSQL := m.HashSQL
	if record {
		hashSQL = m.RecordHashSQL
	}
	ho, err := hashSQL("old")
	if err != nil {
		return nil, err
	}
	hn, err := hashSQL("new")
	if err != nil {
		return nil, err
	}
	for _, c := range []*pgx.Conn{old, new} {
		if _, err := c.Exec(ctx, SessionSQL); err != nil {
			return nil, fmt.Errorf("checking %s: session settings: %w", m.Old.Name, err)
		}
	}
	sum := &TableSummary{Table: m.Old.Name.String(), NewTable: m.New.Name.String(), Counts: map[Kind]int{}}
	v := &verifier{m: m, old: old, new: new, o: newSide(m.Old.Name, oldKey, ho, record).filtered(m.Where()), n: newSide(m.New.Name, newKey, hn, record).filtered(m.NewWhere()),
		opts: opts, sum: sum, seen: map[string]struct{}{}}
	return &Checker{v: v, Grace: 50 * time.Millisecond}, nil
}

// Check returns the confirmed differences among keys (the key values as
// text, in key order; the same values on both stores, as the mapping
// carries the key column for column). A key absent from both stores is
// equal. Transient counts the keys that differed at first and not after.
func (c *Checker) Check(ctx context.Context, keys [][]string) (diffs []Difference, transient int, err error) {
	const per = 1000
	for start := 0; start < len(keys); start += per {
		part := keys[start:min(start+per, len(keys))]
		found, err := c.lookup(ctx, part)
		if err != nil {
			return nil, transient, err
		}
		// Re-read without locks for a moment: a mirror write in flight
		// closes most differences by itself, without holding the table.
		for wait := 10 * time.Millisecond; len(found) > 0 && c.Grace > 0; wait *= 2 {
			if wait > c.Grace {
				break
			}
			select {
			case <-ctx.Done():
				return nil, transient, ctx.Err()
			case <-time.After(wait):
			}
			left := make([][]string, len(found))
			for i, d := range found {
				left[i] = d.Key
			}
			again, err := c.lookup(ctx, left)
			if err != nil {
				return nil, transient, err
			}
			transient += len(found) - len(again)
			found = again
		}
		if len(found) == 0 {
			continue
		}
		before := c.v.sum.Transient
		confirmed, err := c.v.confirm(ctx, found)
		if err != nil {
			return nil, transient, err
		}
		transient += c.v.sum.Transient - before
		diffs = append(diffs, confirmed...)
	}
	c.v.sum.Diffs, c.v.sum.Counts = nil, map[Kind]int{} // only confirm's bookkeeping; nothing accumulates
	return diffs, transient, nil
}

// lookup reads keys on both stores without locks and types what differs.
func (c *Checker) lookup(ctx context.Context, keys [][]string) ([]Difference, error) {
	om, err := c.v.o.keysHashes(ctx, c.v.old, keys, false)
	if err != nil {
		return nil, err
	}
	nm, err := c.v.n.keysHashes(ctx, c.v.new, keys, false)
	if err != nil {
		return nil, err
	}
	return diffKeys(om, nm, keys), nil
}
