package compare

import (
	"context"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"
)

// bisect finds the differing rows of the range after lo and at most hi,
// whose hashes differ, on the connection pair pr; it returns them (to be
// confirmed) and how many ranges it found differing, this one included.
// Both stores are queried at once. With summed record hashes a range's
// hash is its two halves' summed, so only the lower half is hashed and
// the upper half's hash is the difference.
func (v *verifier) bisect(ctx context.Context, pr connPair, lo, hi []string, oh, nh rangeHash) ([]Difference, int, error) {
	v.opts.Logger.Debug("range differs", "table", v.sum.Table, "after", lo, "upto", hi, "old_rows", oh.n, "new_rows", nh.n)
	if max(oh.n, nh.n) <= int64(v.opts.Leaf) {
		d, err := v.diffRows(ctx, pr, lo, hi)
		return d, 1, err
	}
	// Split at the middle row of the side with more rows.
	s, q, n := v.o, pr.old, oh.n
	if nh.n > oh.n {
		s, q, n = v.n, pr.new, nh.n
	}
	if len(s.key) == 1 {
		return v.split(ctx, pr, s, q, lo, hi)
	}
	mid, err := s.midKey(ctx, q, lo, hi, n/2-1)
	if err != nil {
		return nil, 0, err
	}
	a, b, err := v.hashBoth(ctx, pr, lo, mid)
	if err != nil {
		return nil, 0, err
	}
	var c, d rangeHash
	if v.o.record {
		c, d = oh.minus(a), nh.minus(b)
	} else if c, d, err = v.hashBoth(ctx, pr, mid, hi); err != nil {
		return nil, 0, err
	}
	var out []Difference
	bisected := 1
	for _, r := range []struct {
		lo, hi []string
		a, b   rangeHash
	}{{lo, mid, a, b}, {mid, hi, c, d}} {
		if r.a != r.b {
			found, k, err := v.bisect(ctx, pr, r.lo, r.hi, r.a, r.b)
			if err != nil {
				return nil, 0, err
			}
			out = append(out, found...)
			bisected += k
		}
	}
	return out, bisected, nil
}

// split is bisect's step for a one-column key, in three round trips
// instead of one or two per halving: the ends of subranges of Leaf rows
// (on s, the side with more rows, over q), then every subrange hashed on
// both stores at once in one query each, then each differing subrange
// bisected (at most Leaf rows on s: diffed by rows).
func (v *verifier) split(ctx context.Context, pr connPair, s side, q *pgx.Conn, lo, hi []string) ([]Difference, int, error) {
	ends, err := s.bounds(ctx, q, lo, hi, v.opts.Leaf)
	if err != nil {
		return nil, 0, err
	}
	if len(ends) == 0 {
		// Fewer than Leaf rows now (a write since the range was hashed).
		d, err := v.diffRows(ctx, pr, lo, hi)
		return d, 1, err
	}
	var og, ng map[int]rangeHash
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { og, err = v.o.hashGroups(gctx, pr.old, lo, hi, ends); return })
	g.Go(func() (err error) { ng, err = v.n.hashGroups(gctx, pr.new, lo, hi, ends); return })
	if err := g.Wait(); err != nil {
		return nil, 0, err
	}
	var out []Difference
	bisected := 1
	for j := 0; j <= len(ends); j++ {
		a, b := og[j], ng[j]
		if a == b {
			continue
		}
		sublo, subhi := lo, hi
		if j > 0 {
			sublo = []string{ends[j-1]}
		}
		if j < len(ends) {
			subhi = []string{ends[j]}
		}
		found, k, err := v.bisect(ctx, pr, sublo, subhi, a, b)
		if err != nil {
			return nil, 0, err
		}
		out = append(out, found...)
		bisected += k
	}
	return out, bisected, nil
}

// hashBoth hashes the range after lo and at most hi on both stores of pr
// at once.
func (v *verifier) hashBoth(ctx context.Context, pr connPair, lo, hi []string) (oh, nh rangeHash, err error) {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { oh, err = v.o.hashRange(gctx, pr.old, lo, hi); return })
	g.Go(func() (err error) { nh, err = v.n.hashRange(gctx, pr.new, lo, hi); return })
	err = g.Wait()
	return oh, nh, err
}

// diffRows fetches a small range's row hashes from both stores at once and
// returns the keys that differ.
func (v *verifier) diffRows(ctx context.Context, pr connPair, lo, hi []string) ([]Difference, error) {
	var om, nm map[string]string
	var okeys, nkeys [][]string
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { om, okeys, err = v.o.rowHashes(gctx, pr.old, lo, hi); return })
	g.Go(func() (err error) { nm, nkeys, err = v.n.rowHashes(gctx, pr.new, lo, hi); return })
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return diff(om, nm, okeys, nkeys), nil
}

// diff types the differences between two key -> hash maps, in old's key
// order, then new's for the keys old lacks.
func diff(om, nm map[string]string, okeys, nkeys [][]string) []Difference {
	var out []Difference
	for _, k := range okeys {
		h, ok := nm[joinKey(k)]
		switch {
		case !ok:
			out = append(out, Difference{Kind: MissingOnNew, Key: k})
		case h != om[joinKey(k)]:
			out = append(out, Difference{Kind: ValueDiff, Key: k})
		}
	}
	for _, k := range nkeys {
		if _, ok := om[joinKey(k)]; !ok {
			out = append(out, Difference{Kind: MissingOnOld, Key: k})
		}
	}
	return out
}
