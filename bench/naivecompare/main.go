// Command naivecompare is the benchmark baseline for tandem compare
// (bench/verify.sh): it streams a table from both stores ordered by its
// bigint key, one connection each, and compares the rows in Go, column by
// column on their binary encoding. It prints the rows read and the
// differences found.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

func main() {
	oldDSN := flag.String("old", "", "old store DSN")
	newDSN := flag.String("new", "", "new store DSN")
	tbl := flag.String("table", "", "table, with a bigint key as its first column")
	key := flag.String("key", "id", "the key column")
	flag.Parse()
	if *oldDSN == "" || *newDSN == "" || *tbl == "" {
		flag.Usage()
		os.Exit(2)
	}
	start := time.Now()
	rows, diffs, err := run(context.Background(), *oldDSN, *newDSN, *tbl, *key)
	if err != nil {
		fmt.Fprintln(os.Stderr, "naivecompare:", err)
		os.Exit(1)
	}
	fmt.Printf("rows %d diffs %d seconds %.3f\n", rows, diffs, time.Since(start).Seconds())
}

func quote(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// stream is one store's rows in key order.
type stream struct {
	rows pgx.Rows
	key  int64
	vals [][]byte
	done bool
}

func open(ctx context.Context, dsn, tbl, key string) (*pgx.Conn, *stream, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, nil, err
	}
	sql := "SELECT " + quote(key) + ", * FROM " + quote(tbl) + " ORDER BY " + quote(key)
	rows, err := conn.Query(ctx, sql, pgx.QueryResultFormats{pgx.BinaryFormatCode})
	if err != nil {
		conn.Close(ctx)
		return nil, nil, fmt.Errorf("%s: %w", sql, err)
	}
	s := &stream{rows: rows}
	s.next()
	return conn, s, nil
}

func (s *stream) next() {
	if !s.rows.Next() {
		s.done = true
		return
	}
	raw := s.rows.RawValues()
	s.key = int64(binary.BigEndian.Uint64(raw[0]))
	s.vals = raw[1:]
}

func run(ctx context.Context, oldDSN, newDSN, tbl, key string) (rows, diffs int64, err error) {
	oc, o, err := open(ctx, oldDSN, tbl, key)
	if err != nil {
		return 0, 0, fmt.Errorf("old: %w", err)
	}
	defer oc.Close(ctx)
	nc, n, err := open(ctx, newDSN, tbl, key)
	if err != nil {
		return 0, 0, fmt.Errorf("new: %w", err)
	}
	defer nc.Close(ctx)
	for !o.done || !n.done {
		switch {
		case n.done || (!o.done && o.key < n.key): // missing on new
			diffs++
			rows++
			o.next()
		case o.done || n.key < o.key: // missing on old
			diffs++
			n.next()
		default:
			if !equal(o.vals, n.vals) {
				diffs++
			}
			rows++
			o.next()
			n.next()
		}
	}
	for _, s := range []*stream{o, n} {
		s.rows.Close()
		if err := s.rows.Err(); err != nil {
			return rows, diffs, err
		}
	}
	return rows, diffs, nil
}

func equal(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if (a[i] == nil) != (b[i] == nil) || !bytes.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}
