package compare

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/sync/errgroup"
)

// pageScan is one store's table read in page ranges on several
// connections at once, all in one snapshot: the first connection opens a
// REPEATABLE READ transaction and exports its snapshot, the others adopt
// it (SET TRANSACTION SNAPSHOT), so together they see each row exactly
// once, as a single scan would, however the table is written meanwhile (a
// row an update moved to another page is still seen in its old place).
//
// Page ranges are TID range scans (PostgreSQL 14 or later), so each
// connection reads only its pages; they split the store's physical layout,
// which differs between the stores, so whatever is computed per range must
// be keyed by something of the row's own (the key bucket), and added up
// across ranges.
//
// A pageScan owns its transactions, not its connections: close ends them
// and must be called before the connections are used for anything else.
type pageScan struct {
	txs   []pgx.Tx
	conds []string // each transaction's page range, a condition on t.ctid ("true": the whole table)
}

// openPageScan begins the snapshot on conns (one range per connection, or
// fewer for a table of fewer pages) and cuts name's pages into ranges. The
// last range is open-ended.
func openPageScan(ctx context.Context, conns []*pgx.Conn, name table.Name) (*pageScan, error) {
	ps := &pageScan{}
	begin := func(c *pgx.Conn) (pgx.Tx, error) {
		tx, err := c.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
		if err != nil {
			return nil, fmt.Errorf("hashing %s: %w", name, err)
		}
		ps.txs = append(ps.txs, tx)
		return tx, nil
	}
	first, err := begin(conns[0])
	if err != nil {
		return nil, err
	}
	var pages int64
	if err := first.QueryRow(ctx, "SELECT pg_relation_size($1::regclass) / current_setting('block_size')::bigint", name.Quoted()).Scan(&pages); err != nil {
		ps.close(ctx)
		return nil, fmt.Errorf("sizing %s: %w", name, err)
	}
	n := min(int64(len(conns)), max(1, pages))
	if n > 1 {
		var snap string
		if err := first.QueryRow(ctx, "SELECT pg_export_snapshot()").Scan(&snap); err != nil {
			ps.close(ctx)
			return nil, fmt.Errorf("exporting a snapshot of %s: %w", name, err)
		}
		for _, c := range conns[1:n] {
			tx, err := begin(c)
			if err != nil {
				ps.close(ctx)
				return nil, err
			}
			if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(snap)); err != nil {
				ps.close(ctx)
				return nil, fmt.Errorf("adopting the snapshot of %s: %w", name, err)
			}
		}
	}
	tid := func(page int64) string { return "'(" + strconv.FormatInt(page, 10) + ",0)'::tid" }
	for i := range n {
		var c []string
		if i > 0 {
			c = append(c, "t.ctid >= "+tid(i*pages/n))
		}
		if i < n-1 {
			c = append(c, "t.ctid < "+tid((i+1)*pages/n))
		}
		switch len(c) {
		case 0:
			ps.conds = append(ps.conds, "true")
		case 1:
			ps.conds = append(ps.conds, c[0])
		default:
			ps.conds = append(ps.conds, c[0]+" AND "+c[1])
		}
	}
	return ps, nil
}

// exec runs sql in every transaction.
func (ps *pageScan) exec(ctx context.Context, sql string) error {
	for _, tx := range ps.txs {
		if _, err := tx.Exec(ctx, sql); err != nil {
			return err
		}
	}
	return nil
}

// close ends the transactions (read-only: rolled back).
func (ps *pageScan) close(ctx context.Context) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	for _, tx := range ps.txs {
		_ = tx.Rollback(cctx)
	}
	ps.txs = nil
}

// hashBuckets hashes the table grouped by key bucket, each page range in
// its transaction, all at once, and adds the ranges' partial counts and
// sums: bucket -> row count and summed row hash (empty buckets are
// missing).
func (s side) hashBuckets(ctx context.Context, ps *pageScan, buckets int64) (map[int64]rangeHash, error) {
	parts := make([]map[int64]rangeHash, len(ps.txs))
	g, gctx := errgroup.WithContext(ctx)
	for i, tx := range ps.txs {
		g.Go(func() (err error) { parts[i], err = s.hashBucketsIn(gctx, tx, buckets, ps.conds[i]); return })
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	out := parts[0]
	for _, p := range parts[1:] {
		for b, r := range p {
			out[b] = out[b].plus(r)
		}
	}
	return out, nil
}

// quoteLiteral quotes s as an SQL string literal.
func quoteLiteral(s string) string {
	out := []byte{'\''}
	for i := 0; i < len(s); i++ {
		if s[i] == '\'' {
			out = append(out, '\'')
		}
		out = append(out, s[i])
	}
	return string(append(out, '\''))
}
