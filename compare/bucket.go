package compare

import (
	"context"
	"fmt"
	"math/bits"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/sync/errgroup"
)

// Bucket counts of the whole-table pass: about bucketRows rows per bucket,
// a power of two between minBuckets and maxBuckets. Measured on one
// PostgreSQL 15 backend over 2M rows of 8 columns (CPU time, no parallel
// workers): the plain whole-table hash 530 ms, grouped into 1024 to 16384
// buckets 690-750 ms, into 65536 buckets 1000 ms (the hash table outgrows
// the caches); fetching the rows of 100 differing buckets of 4096, 160 ms.
// A differing bucket costs its rows in the fetch (Options.FetchMax bounds
// them), so a bigger table gets more buckets, up to maxBuckets.
const (
	bucketRows    = 1024
	minBuckets    = 1 << 10
	maxBuckets    = 1 << 14
	bucketWorkMem = "64MB"
)

// bucketCount returns the number of key buckets for a table of about est
// rows (est < 0: unknown).
func bucketCount(est int64) int64 {
	if est < 0 {
		return 1 << 12
	}
	n := int64(1) << bits.Len64(uint64(est/bucketRows))
	return min(max(n, minBuckets), maxBuckets)
}

// bucket is the SQL of a row's key bucket: the low bits of the row hash's
// key seed (table.Mapping.RecordHashSeedSQL), computed from the key alone
// and equal on both stores for one key, so a key's row falls in the same
// bucket on each.
func (s side) bucket(buckets int64) string {
	return "((" + s.seed + ") & " + strconv.FormatInt(buckets-1, 10) + ")"
}

// bucketSettings are hashBuckets' settings: the aggregate states of every
// bucket fit in work_mem (no spill to disk), and no JIT (the query is one
// scan; compiling it costs more than it saves).
const bucketSettings = "SET LOCAL work_mem = '" + bucketWorkMem + "'; SET LOCAL jit = off"

// bucketsSQL is hashBucketsIn's query over the rows where cond holds (a
// page range, see pageScan), to run under bucketSettings. The row hash and
// the bucket are computed below an OFFSET 0, which keeps the planner from
// flattening the subquery: grouped directly, the planner cannot estimate
// the buckets (no statistics on the bucket expression), expects a group
// per row, and sorts every row's columns (to disk) for a GroupAggregate or
// pre-sizes a hash table for millions of groups, twice the CPU; over the
// subquery it groups two bigints in a small hash table. The price: no
// parallel workers, which the plain whole-table hash gets; the page ranges
// on connections of their own make up for them.
func (s side) bucketsSQL(buckets int64, cond string) string {
	return "SELECT b, count(*), " + s.aggregate("h", "") + " FROM (SELECT " + s.bucket(buckets) + " AS b, " + s.rowHash +
		" AS h FROM " + s.name.Quoted() + " t WHERE " + s.inPredicate(cond) + " OFFSET 0) AS r GROUP BY 1"
}

// hashBucketsIn hashes the rows where cond holds, in tx, grouped by key
// bucket: bucket -> row count and summed row hash.
func (s side) hashBucketsIn(ctx context.Context, tx pgx.Tx, buckets int64, cond string) (map[int64]rangeHash, error) {
	rows, err := tx.Query(ctx, s.bucketsSQL(buckets, cond))
	if err != nil {
		return nil, fmt.Errorf("hashing %s: %w", s.name, err)
	}
	defer rows.Close()
	out := map[int64]rangeHash{}
	for rows.Next() {
		var b int64
		var r rangeHash
		if err := rows.Scan(&b, &r.n, &r.hash); err != nil {
			return nil, fmt.Errorf("hashing %s: %w", s.name, err)
		}
		out[b] = r
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("hashing %s: %w", s.name, err)
	}
	return out, nil
}

// bucketRowHashes returns the key (joined) -> row hash of the rows in the
// given buckets, and the keys in key order: one scan, hashing only those
// rows.
func (s side) bucketRowHashes(ctx context.Context, q table.Querier, buckets int64, in []int64) (map[string]string, [][]string, error) {
	return s.collect(ctx, q, "SELECT "+s.keyText()+", "+s.hash+" FROM "+s.from()+" t WHERE "+s.bucket(buckets)+
		" IN (SELECT unnest($1::bigint[])) ORDER BY "+s.order, []any{in})
}

// bucketed verifies the table in one pass when both stores hash records
// (PostgreSQL 14 or later): each store hashes its whole table grouped into
// key buckets, both stores at once and each in page ranges on all of the
// verify's connections to it, in one snapshot per store (pageScan); the
// rows of the buckets that differ are then fetched from both stores in one
// query each (one more scan in the same snapshot, hashing only those
// rows), diffed, and the differences confirmed (and repaired) as the
// walk's are. A clean table costs that one pass, and one with a few
// differences, or under live writes, one pass and the fetch, rather than a
// walk of every range.
//
// It returns false, having found nothing, when the differing buckets hold
// more than Options.FetchMax rows: the range walk then finds what differs,
// range by range with checkpoints.
func (v *verifier) bucketed(ctx context.Context) (bool, error) {
	est, err := reltuples(ctx, v.old, v.m.Old.Name)
	if err != nil {
		return false, err
	}
	nb := bucketCount(est)
	oldConns, newConns := make([]*pgx.Conn, len(v.pairs)), make([]*pgx.Conn, len(v.pairs))
	for i, p := range v.pairs {
		oldConns[i], newConns[i] = p.old, p.new
	}
	var extra []*pgx.Conn
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		for _, c := range extra {
			_ = c.Close(cctx)
		}
	}()
	for _, cs := range []*[]*pgx.Conn{&oldConns, &newConns} {
		more, err := scanConns(ctx, (*cs)[0], len(*cs))
		extra = append(extra, more...)
		if err != nil {
			return false, err
		}
		*cs = append(*cs, more...)
	}
	var ob, nbk map[int64]rangeHash
	var om, nm map[string]string
	var okeys, nkeys [][]string
	var differ []int64
	var rows, fetch int64
	// Both stores' scans are open until the fetch is done, and closed
	// before the re-check, which uses the first connections.
	var oldScan, newScan *pageScan
	defer func() {
		for _, ps := range []*pageScan{oldScan, newScan} {
			if ps != nil {
				ps.close(ctx)
			}
		}
	}()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) {
		if oldScan, err = openPageScan(gctx, oldConns, v.m.Old.Name); err == nil {
			err = oldScan.exec(gctx, bucketSettings)
		}
		return
	})
	g.Go(func() (err error) {
		if newScan, err = openPageScan(gctx, newConns, v.m.New.Name); err == nil {
			err = newScan.exec(gctx, bucketSettings)
		}
		return
	})
	if err := g.Wait(); err != nil {
		return false, err
	}
	if k := v.opts.Knobs; k != nil && k.PageRanges != nil {
		k.PageRanges(oldScan.conds, newScan.conds)
	}
	g, gctx = errgroup.WithContext(ctx)
	g.Go(func() (err error) { ob, err = v.o.hashBuckets(gctx, oldScan, nb); return })
	g.Go(func() (err error) { nbk, err = v.n.hashBuckets(gctx, newScan, nb); return })
	if err := g.Wait(); err != nil {
		return false, err
	}
	for b, o := range ob {
		rows += o.n
		if n := nbk[b]; n != o {
			differ = append(differ, b)
			fetch += max(o.n, n.n)
		}
	}
	for b, n := range nbk {
		if _, ok := ob[b]; !ok {
			differ = append(differ, b)
			fetch += n.n
		}
	}
	if fetch > int64(v.opts.FetchMax) {
		v.opts.Logger.Debug("too many rows differ for the bucketed pass; walking key ranges", "table", v.sum.Table,
			"buckets", len(differ), "rows", fetch, "fetch_max", v.opts.FetchMax)
		return false, nil
	}
	v.sum.Buckets = int(nb)
	v.sum.Bisected += len(differ)
	if len(differ) > 0 {
		v.opts.Logger.Debug("key buckets differ", "table", v.sum.Table, "buckets", len(differ), "rows", fetch)
		g, gctx := errgroup.WithContext(ctx)
		g.Go(func() (err error) { om, okeys, err = v.o.bucketRowHashes(gctx, oldScan.txs[0], nb, differ); return })
		g.Go(func() (err error) { nm, nkeys, err = v.n.bucketRowHashes(gctx, newScan.txs[0], nb, differ); return })
		if err := g.Wait(); err != nil {
			return false, err
		}
	}
	oldScan.close(ctx)
	newScan.close(ctx)
	if len(differ) > 0 {
		v.found = append(v.found, diff(om, nm, okeys, nkeys)...)
		if err := v.settle(ctx); err != nil {
			return false, err
		}
	}
	v.sum.Ranges, v.sum.Rows, v.sum.WholeTable = 1, rows, len(differ) == 0
	v.progress()
	return true, nil
}

// scanConns opens the connections to first's store that the bucketed
// pass needs beyond the have it has: it scans a store in as many page
// ranges at once as PostgreSQL gives a plain scan of a big table
// processes (its leader and max_parallel_workers_per_gather workers), so
// that it is as parallel as the whole-table hash it replaces, and in at
// least Options.Workers. The caller closes them.
func scanConns(ctx context.Context, first *pgx.Conn, have int) ([]*pgx.Conn, error) {
	var workers int
	if err := first.QueryRow(ctx, "SELECT least(current_setting('max_parallel_workers_per_gather')::int, current_setting('max_parallel_workers')::int)").Scan(&workers); err != nil {
		return nil, fmt.Errorf("reading max_parallel_workers_per_gather: %w", err)
	}
	var out []*pgx.Conn
	for have+len(out) < 1+workers {
		c, err := pgx.ConnectConfig(ctx, first.Config().Copy())
		if err != nil {
			return out, fmt.Errorf("connecting for the bucketed pass: %w", err)
		}
		out = append(out, c)
		if _, err := c.Exec(ctx, SessionSQL); err != nil {
			return out, fmt.Errorf("session settings: %w", err)
		}
	}
	return out, nil
}

// reltuples returns n's row estimate from pg_class, -1 when the table was
// never analysed.
func reltuples(ctx context.Context, q table.Querier, n table.Name) (int64, error) {
	var est float64
	if err := q.QueryRow(ctx, "SELECT reltuples FROM pg_class WHERE oid = $1::regclass", n.Quoted()).Scan(&est); err != nil {
		return 0, fmt.Errorf("estimating the rows of %s: %w", n, err)
	}
	return int64(est), nil
}
