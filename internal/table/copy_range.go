package table

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// RangeOptions say which key range CopyRangeMapped copies and give the
// caller hooks into each locked-copy unit.
type RangeOptions struct {
	// Lo is where the range starts: after Lo, or at Lo when LoInclusive.
	// nil: the first key. Hi is the last key of the range (inclusive);
	// nil: no end. Both are key values as text, in the source's key order.
	Lo          []string
	LoInclusive bool
	Hi          []string
	// Chunk is the most rows one unit reads and locks.
	Chunk int
	// FastRows is the chunk size from which a unit moves its rows with
	// COPY through a staging table on the secondary (the fast path)
	// instead of as JSON: 0 is the default (1000), a negative value means
	// never. Both paths lock and write the same rows.
	FastRows int

	// Checkpoint, when set, runs inside each unit's secondary transaction
	// after the unit's rows are written, with the last key the unit covers
	// (its cursor; nil only when the range is empty) and the rows it read. A
	// checkpoint written with tx commits atomically with the data, so a
	// resumed copy neither skips nor repeats. An error rolls the unit back.
	Checkpoint func(ctx context.Context, tx pgx.Tx, cursor []string, rows int) error
	// Done, when set, runs after each unit has committed, with what it did.
	// An error stops the copy (the unit stays committed); use it to
	// throttle and to log units.
	Done func(ctx context.Context, u UnitReport) error
	// KeyFailed, when set, isolates failures: when a unit fails for a reason
	// other than a closed connection or a cancelled ctx, its keys are copied
	// one locked-copy unit per key, each key that still fails is reported to
	// KeyFailed (and reported, as a unit, to Done), and the range goes on
	// past it. Without KeyFailed, a failing unit ends the copy.
	KeyFailed func(ctx context.Context, key []string, err error) error
}

// UnitReport is one committed locked-copy unit of CopyRangeMapped.
type UnitReport struct {
	Lo          []string // the unit's range: after Lo (at Lo when LoInclusive); nil = from the start
	LoInclusive bool
	Hi          []string // last key covered; nil = to the end
	Rows        int      // rows read on the primary (copied)
	Deleted     int      // rows deleted on the secondary
	Duration    time.Duration
	Isolated    bool // a single key copied after its unit failed
}

// CopyRangeMapped makes the key range opts describes of m's target table
// equal to its source, through the mapping (forward: old -> new), in units
// of opts.Chunk rows in key order. Each unit is the locked-copy unit of
// CopyTable: the chunk is read FOR SHARE on the primary, upserted on the
// secondary (with opts.Checkpoint in the same transaction), keys in the
// unit's range absent on the primary are deleted on the secondary and
// re-read, and the secondary commits before the primary. The cursor (the
// last key of the previous unit) must strictly advance; CopyRangeMapped
// checks it. It returns what it changed and the last committed cursor
// (nil if no unit committed).
func CopyRangeMapped(ctx context.Context, primary, secondary *pgx.Conn, m *Mapping, forward bool, opts RangeOptions) (CopyResult, []string, error) {
	p, err := newMappedCopier(m, forward)
	if err != nil {
		return CopyResult{}, nil, err
	}
	if !p.src.HasKey() {
		return CopyResult{}, nil, fmt.Errorf("copying %s by range: %w", p.src.Name, ErrNoKey)
	}
	if opts.Chunk < 1 {
		return CopyResult{}, nil, fmt.Errorf("copying %s: chunk must be at least 1, got %d", p.src.Name, opts.Chunk)
	}
	for _, k := range [][]string{opts.Lo, opts.Hi} {
		if k != nil && len(k) != len(p.srcKey) {
			return CopyResult{}, nil, fmt.Errorf("copying %s: a range bound has %d values, the primary key (%s) has %d",
				p.src.Name, len(k), strings.Join(p.src.KeyNames(), ", "), len(p.srcKey))
		}
	}
	return p.copyRange(ctx, primary, secondary, opts)
}

// copyRange copies the range chunk by chunk. The cursor is the last key of
// the previous chunk, as text; each chunk starts strictly after it.
func (p *copier) copyRange(ctx context.Context, primary, secondary *pgx.Conn, opts RangeOptions) (CopyResult, []string, error) {
	var res CopyResult
	fast := opts.Chunk >= fastRows(opts.FastRows) && !p.noFast && !p.replace
	cursor, incl := opts.Lo, opts.LoInclusive
	var committed []string
	for {
		var out rangeUnitOut
		start := time.Now()
		r, err := p.runCopyUnit(ctx, primary, secondary, func(u *copyUnit) error {
			var err error
			out, err = u.rangeUnit(ctx, opts, cursor, incl, fast)
			return err
		})
		res.add(r)
		last, final := out.last, out.final
		if err != nil {
			if opts.KeyFailed == nil || ctx.Err() != nil || primary.IsClosed() || secondary.IsClosed() {
				return res, committed, err
			}
			// Isolate: copy this unit's keys one at a time, so one bad row
			// does not hold the others back.
			end, ir, ierr := p.isolate(ctx, primary, secondary, opts, cursor, incl)
			res.add(ir)
			if ierr != nil {
				return res, committed, errors.Join(err, ierr)
			}
			if end == nil {
				// No key to blame: the failure is not a row's.
				return res, committed, err
			}
			last, final = end, false
		} else if opts.Done != nil {
			if derr := opts.Done(ctx, UnitReport{Lo: cursor, LoInclusive: incl, Hi: unitHi(last, final, opts.Hi),
				Rows: out.rows, Deleted: r.Deleted, Duration: time.Since(start)}); derr != nil {
				return res, last, derr
			}
		}
		if final {
			if last != nil {
				committed = last
			}
			return res, committed, nil
		}
		// The keyset query only returns keys after the cursor; check that
		// it advanced rather than trust it, so a bug cannot loop forever.
		if last == nil || slices.Equal(last, cursor) && !incl {
			return res, committed, fmt.Errorf("copying %s: the key cursor did not advance past %q", p.src.Name, cursor)
		}
		cursor, incl, committed = last, false, last
		if opts.Hi != nil && slices.Equal(last, opts.Hi) {
			return res, committed, nil
		}
	}
}

// rangeUnitOut is what one unit of copyRange covered: its last key, whether
// it reached the range's end, and the rows it read.
type rangeUnitOut struct {
	last  []string
	final bool
	rows  int
}

// rangeUnit is the body of one locked-copy unit of copyRange, after cursor
// (at it when incl): lock and write the next chunk (by COPY when fast),
// copy or delete the keys of the chunk's range the secondary has and the
// chunk does not, and write the checkpoint.
func (u *copyUnit) rangeUnit(ctx context.Context, opts RangeOptions, cursor []string, incl, fast bool) (rangeUnitOut, error) {
	chunk := opts.Chunk
	var out rangeUnitOut
	var rows rowSet
	var err error
	if fast {
		// One locked-copy unit either way: the fast path locks and
		// writes the same rows, by COPY instead of as JSON.
		rows, err = u.lockChunkCopy(ctx, cursor, incl, opts.Hi, chunk)
	} else if rows, err = u.lockChunk(ctx, cursor, incl, opts.Hi, chunk); err == nil {
		err = u.write(ctx, rows)
	}
	if err != nil {
		return out, err
	}
	out.rows = len(rows.keys)
	// The range this chunk covers on the secondary: after the cursor, up
	// to the chunk's last key, or to the range's end after the last chunk.
	hi := opts.Hi
	if len(rows.keys) < chunk {
		out.final = true
	} else {
		hi = rows.keys[len(rows.keys)-1]
	}
	if n := len(rows.keys); n > 0 {
		out.last = rows.keys[n-1]
	}
	// Rows in that range that the chunk does not have: look them up on
	// the primary under lock (the secondary may order keys differently, or
	// a row may have been inserted since) and copy or delete them, a page
	// at a time.
	// A split's owner looks in every part's new table.
	for _, q := range u.p.parts() {
		lo, loIncl := cursor, incl
		for {
			extra, err := u.candidates(ctx, q, lo, loIncl, hi, rows.keys, chunk)
			if err != nil {
				return out, err
			}
			if len(extra) > 0 {
				if err := u.copyKeys(ctx, extra, true); err != nil {
					return out, err
				}
				lo, loIncl = extra[len(extra)-1], false
			}
			if len(extra) < chunk {
				break
			}
		}
	}
	if opts.Checkpoint != nil {
		cp := out.last
		if out.final && opts.Hi != nil {
			cp = opts.Hi
		}
		if cp == nil {
			cp = cursor
		}
		if err := opts.Checkpoint(ctx, u.stx, cp, out.rows); err != nil {
			return out, fmt.Errorf("writing the checkpoint: %w", err)
		}
	}
	return out, nil
}

func unitHi(last []string, final bool, hi []string) []string {
	if final {
		return hi
	}
	return last
}

// isolate copies the keys of the failed unit after cursor (at it when
// incl), one locked-copy unit per key: the primary's next chunk of keys
// and the secondary's keys up to the last of them. Each failing key goes to
// opts.KeyFailed. It returns the last key covered (nil: no key, so no row
// is to blame) and writes the checkpoint there in its own secondary
// transaction after every key has been handled.
func (p *copier) isolate(ctx context.Context, primary, secondary *pgx.Conn, opts RangeOptions, cursor []string, incl bool) ([]string, CopyResult, error) {
	var res CopyResult
	src := p.srcKey
	where, args := rangeCond("r", src, cursor, incl, opts.Hi, nil)
	keys, err := collectKeys(ctx, primary, "SELECT "+keyText("r", src)+" FROM "+p.srcFrom()+" r"+where+
		" ORDER BY "+keyList("r", src)+" LIMIT "+strconv.Itoa(opts.Chunk), args)
	if err != nil {
		return nil, res, err
	}
	// The keys to blame: the primary's next chunk, and the secondary's up
	// to its last key; with no key left on the primary, the secondary's
	// next chunk up to the range's end (keys to delete).
	var end []string
	if len(keys) > 0 {
		end = keys[len(keys)-1]
	} else {
		end = opts.Hi
	}
	where, args = rangeCond("d", p.dstKey, cursor, incl, end, nil)
	extra, err := collectKeys(ctx, secondary, "SELECT "+keyText("d", p.dstKey)+" FROM "+p.dstFrom()+" d"+where+
		" ORDER BY "+keyList("d", p.dstKey)+" LIMIT "+strconv.Itoa(opts.Chunk), args)
	if err != nil {
		return nil, res, err
	}
	if len(keys) == 0 && len(extra) > 0 {
		end = extra[len(extra)-1]
	}
	for _, k := range extra {
		if !slices.ContainsFunc(keys, func(x []string) bool { return slices.Equal(x, k) }) {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil, res, nil
	}
	for _, k := range keys {
		start := time.Now()
		r, err := p.runCopyUnit(ctx, primary, secondary, func(u *copyUnit) error {
			return u.copyKeys(ctx, [][]string{k}, true)
		})
		res.add(r)
		if ctx.Err() != nil || primary.IsClosed() || secondary.IsClosed() {
			return nil, res, errors.Join(err, ctx.Err())
		}
		if err != nil {
			if kerr := opts.KeyFailed(ctx, k, err); kerr != nil {
				return nil, res, kerr
			}
			continue
		}
		if opts.Done != nil {
			if derr := opts.Done(ctx, UnitReport{Lo: k, LoInclusive: true, Hi: k, Rows: r.Upserted, Deleted: r.Deleted,
				Duration: time.Since(start), Isolated: true}); derr != nil {
				return nil, res, derr
			}
		}
	}
	if opts.Checkpoint != nil {
		if err := pgx.BeginFunc(ctx, secondary, func(tx pgx.Tx) error {
			return opts.Checkpoint(ctx, tx, end, 0)
		}); err != nil {
			return nil, res, fmt.Errorf("copying %s: writing the checkpoint: %w", p.src.Name, err)
		}
	}
	return end, res, nil
}

func collectKeys(ctx context.Context, q Querier, sql string, args []any) ([][]string, error) {
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[[]string])
}

// SplitKeys returns at most n-1 keys of m's old table (as text, in key
// order, strictly increasing) that cut it into n ranges of about the same
// number of rows: range i is after bound i-1 and at most bound i, the first
// from the start and the last to the end. The bounds come from the ntile
// of the keys, over a TABLESAMPLE of about sampleRows rows when the table
// is estimated to hold more than that. rows is the row count the split
// used (estimated from the statistics when they exist, else counted).
func SplitKeys(ctx context.Context, q Querier, m *Mapping, n, sampleRows int) (bounds [][]string, rows int64, err error) {
	src := m.fwd.from
	if !src.HasKey() {
		return nil, 0, fmt.Errorf("splitting %s: %w", src.Name, ErrNoKey)
	}
	var est float64
	if err := q.QueryRow(ctx, "SELECT reltuples FROM pg_class WHERE oid = $1::regclass", src.Name.Quoted()).Scan(&est); err != nil {
		return nil, 0, fmt.Errorf("splitting %s: %w", src.Name, err)
	}
	rows = int64(est)
	if est < 0 || est < float64(sampleRows) {
		if err := q.QueryRow(ctx, "SELECT count(*) FROM "+src.Name.Quoted()).Scan(&rows); err != nil {
			return nil, 0, fmt.Errorf("splitting %s: %w", src.Name, err)
		}
	}
	if n <= 1 || rows == 0 {
		return nil, rows, nil
	}
	key := m.fwd.from.Key
	cols := make([]Column, len(key))
	for i, k := range key {
		cols[i] = src.Columns[k]
	}
	from := src.Name.Quoted() + " r"
	if rows > int64(sampleRows) && sampleRows > 0 {
		pct := 100 * float64(sampleRows) / float64(rows)
		from += " TABLESAMPLE SYSTEM (" + strconv.FormatFloat(pct, 'f', 6, 64) + ")"
	}
	desc := make([]string, len(cols))
	for i, c := range cols {
		desc[i] = "s." + quoteIdent(c.Name) + " DESC"
	}
	sql := "SELECT DISTINCT ON (s.t) s.k FROM (SELECT " +
		keyText("r", cols) + " AS k, " + keyList("r", cols) + ", ntile(" + strconv.Itoa(n) + ") OVER (ORDER BY " + keyList("r", cols) +
		") AS t FROM " + from + ") s ORDER BY s.t, " + strings.Join(desc, ", ")
	all, err := collectKeys(ctx, q, sql, nil)
	if err != nil {
		return nil, rows, fmt.Errorf("splitting %s: %w", src.Name, err)
	}
	if len(all) > 0 {
		all = all[:len(all)-1] // the last range runs to the end
	}
	return all, rows, nil
}
