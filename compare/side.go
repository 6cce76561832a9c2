package compare

import (
	"context"
	"errors"
	"fmt"
	"math/big"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// side is the SQL of one store's half of the verify.
type side struct {
	name  table.Name
	key   []table.Column
	hash  string // the row hash expression over alias t, as text
	order string // t."k1", t."k2"
	// rowHash is the row hash as it is aggregated; agg aggregates a
	// range's row hashes ($ stands for them) into one text.
	rowHash, agg string
	// record: the range hash is a sum of row hashes (see rangeHash.minus).
	record bool
	// seed is the record hash's key seed (a bigint from the key alone),
	// which buckets rows in the whole-table pass; "" without record.
	seed string
	// where restricts the side to the mapping's rows (the old table's
	// where predicate, the new table's discriminator; unqualified column
	// names), "" for the whole table: one deployment's verify never reads
	// another's rows.
	where string
}

// from is the FROM item of the side's rows: the table, or the rows of it
// where passes, as a subquery (which the planner flattens).
func (s side) from() string {
	if s.where == "" {
		return s.name.Quoted()
	}
	return "(SELECT * FROM " + s.name.Quoted() + " WHERE " + s.where + ")"
}

// inPredicate is cond and, when the mapping has one, the side's row predicate:
// for a page scan, whose cond names the table's own ctid, which the
// subquery of from does not carry.
func (s side) inPredicate(cond string) string {
	if s.where == "" {
		return cond
	}
	return "(" + cond + ") AND (" + s.where + ")"
}

// newSide builds one store's SQL. With record (both stores on PostgreSQL
// 14 or later) the row hash is hash_record_extended's bigint and a range's
// hash their sum, which needs no sort; otherwise the md5 of the row's text
// and the md5 of those in key order.
func newSide(name table.Name, key []table.Column, hash string, record bool) side {
	cols := make([]string, len(key))
	for i, c := range key {
		cols[i] = "t." + quoteIdent(c.Name)
	}
	s := side{name: name, key: key, hash: hash, rowHash: hash, order: strings.Join(cols, ", "), record: record}
	if record {
		s.hash = hash + "::text"
		s.agg = "coalesce(sum($)::text, '')"
	} else {
		s.agg = "coalesce(md5(string_agg($, '' ORDER BY %s)), '')"
	}
	return s
}

// filtered returns s restricted to the rows where passes ("" for all).
func (s side) filtered(where string) side {
	s.where = where
	return s
}

// aggregate is the range hash over the row hashes h, ordered by order when
// the aggregate needs an order.
func (s side) aggregate(h, order string) string {
	a := strings.Replace(s.agg, "$", h, 1)
	if strings.Contains(a, "%s") {
		a = fmt.Sprintf(a, order)
	}
	return a
}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// keyText is ARRAY[t."k1"::text, ...].
func (s side) keyText() string {
	parts := make([]string, len(s.key))
	for i, c := range s.key {
		parts[i] = "t." + quoteIdent(c.Name) + "::text"
	}
	return "ARRAY[" + strings.Join(parts, ", ") + "]"
}

// tuple returns ($n::t1, ...) for a key given as parameters from n.
func (s side) tuple(n int) string {
	parts := make([]string, len(s.key))
	for i, c := range s.key {
		parts[i] = "$" + strconv.Itoa(n+i) + "::" + c.ParamType
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

// cond returns the condition "after lo, at most hi" (nil = unbounded) and
// its arguments.
func (s side) cond(lo, hi []string) (string, []any) {
	var conds []string
	var args []any
	if lo != nil {
		conds = append(conds, "("+s.order+") > "+s.tuple(len(args)+1))
		for _, v := range lo {
			args = append(args, v)
		}
	}
	if hi != nil {
		conds = append(conds, "("+s.order+") <= "+s.tuple(len(args)+1))
		for _, v := range hi {
			args = append(args, v)
		}
	}
	if len(conds) == 0 {
		return "true", nil
	}
	return strings.Join(conds, " AND "), args
}

// rangeHash is a range's row count and hash on one store.
type rangeHash struct {
	n    int64
	hash string
}

// minus returns the hash of r's rows that are not in part, a subrange of
// r, when range hashes are sums of row hashes (side.record): counts and
// sums subtract. An empty range's sum is "".
func (r rangeHash) minus(part rangeHash) rangeHash {
	sum := func(s string) *big.Int {
		n, ok := new(big.Int).SetString(s, 10)
		if !ok {
			return new(big.Int)
		}
		return n
	}
	out := rangeHash{n: r.n - part.n}
	if out.n > 0 {
		out.hash = new(big.Int).Sub(sum(r.hash), sum(part.hash)).String()
	}
	return out
}

// plus returns the hash of r's rows and o's, disjoint sets of rows, when
// range hashes are sums of row hashes (side.record).
func (r rangeHash) plus(o rangeHash) rangeHash {
	switch {
	case o.n == 0:
		return r
	case r.n == 0:
		return o
	}
	a, _ := new(big.Int).SetString(r.hash, 10)
	b, _ := new(big.Int).SetString(o.hash, 10)
	if a == nil || b == nil {
		// Not a sum (cannot happen with record hashes): keep the
		// difference visible rather than invent a total.
		return rangeHash{n: r.n + o.n, hash: r.hash + "+" + o.hash}
	}
	return rangeHash{n: r.n + o.n, hash: a.Add(a, b).String()}
}

// hashRange hashes the rows after lo and at most hi.
func (s side) hashRange(ctx context.Context, q table.Querier, lo, hi []string) (rangeHash, error) {
	cond, args := s.cond(lo, hi)
	sql := "SELECT count(*), " + s.aggregate(s.rowHash, s.order) + " FROM " + s.from() + " t WHERE " + cond
	var r rangeHash
	if err := q.QueryRow(ctx, sql, args...).Scan(&r.n, &r.hash); err != nil {
		return r, fmt.Errorf("hashing %s: %w", s.name, err)
	}
	return r, nil
}

// rangeEnd returns the last key of the limit rows after lo, found with a
// key-only query (an index-only scan), or nil when no more than limit rows
// are left: the range then runs to the end of the table.
func (s side) rangeEnd(ctx context.Context, q table.Querier, lo []string, limit int) ([]string, error) {
	cond, args := s.cond(lo, nil)
	sql := "SELECT " + s.keyText() + " FROM " + s.from() + " t WHERE " + cond + " ORDER BY " + s.order +
		" OFFSET " + strconv.Itoa(limit-1) + " LIMIT 1"
	var last []string
	if err := q.QueryRow(ctx, sql, args...).Scan(&last); errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("finding the next range of %s: %w", s.name, err)
	}
	return last, nil
}

// midKey returns the key of the n-th row (from 0) after lo and at most hi.
func (s side) midKey(ctx context.Context, q table.Querier, lo, hi []string, n int64) ([]string, error) {
	cond, args := s.cond(lo, hi)
	sql := "SELECT " + s.keyText() + " FROM " + s.from() + " t WHERE " + cond + " ORDER BY " + s.order +
		" OFFSET " + strconv.FormatInt(n, 10) + " LIMIT 1"
	var k []string
	if err := q.QueryRow(ctx, sql, args...).Scan(&k); err != nil {
		return nil, fmt.Errorf("splitting a range of %s: %w", s.name, err)
	}
	return k, nil
}

// bounds returns, for a one-column key, the key of every every-th row
// after lo and at most hi, in key order (an index-only scan): the ends of
// the subranges hashGroups hashes.
func (s side) bounds(ctx context.Context, q table.Querier, lo, hi []string, every int) ([]string, error) {
	cond, args := s.cond(lo, hi)
	sql := "SELECT k FROM (SELECT t." + quoteIdent(s.key[0].Name) + "::text AS k, row_number() OVER (ORDER BY " + s.order + ") AS rn FROM " +
		s.from() + " t WHERE " + cond + ") AS r WHERE rn % " + strconv.Itoa(every) + " = 0 ORDER BY rn"
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("splitting a range of %s: %w", s.name, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("splitting a range of %s: %w", s.name, err)
	}
	return out, nil
}

// hashGroups hashes, in one query, the subranges of the range after lo
// and at most hi that ends (one-column keys, ascending) cut: subrange j
// holds the keys after ends[j-1] and at most ends[j] (lo and hi beyond
// either end). Empty subranges are missing from the map.
func (s side) hashGroups(ctx context.Context, q table.Querier, lo, hi, ends []string) (map[int]rangeHash, error) {
	cond, args := s.cond(lo, hi)
	args = append(args, ends)
	k := "t." + quoteIdent(s.key[0].Name)
	arr := "$" + strconv.Itoa(len(args)) + "::text[]::" + s.key[0].ParamType + "[]"
	// width_bucket counts the ends at or below the key; an end itself
	// belongs to the subrange it closes.
	b := "width_bucket(" + k + ", " + arr + ") - (" + k + " = ANY(" + arr + "))::int"
	sql := "SELECT " + b + ", count(*), " + s.aggregate(s.rowHash, s.order) + " FROM " + s.from() + " t WHERE " + cond + " GROUP BY 1"
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("hashing %s: %w", s.name, err)
	}
	defer rows.Close()
	out := map[int]rangeHash{}
	for rows.Next() {
		var j int
		var r rangeHash
		if err := rows.Scan(&j, &r.n, &r.hash); err != nil {
			return nil, fmt.Errorf("hashing %s: %w", s.name, err)
		}
		out[j] = r
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("hashing %s: %w", s.name, err)
	}
	return out, nil
}

// rowHashes returns the key (joined) -> row hash of the rows after lo and
// at most hi, and the keys in key order.
func (s side) rowHashes(ctx context.Context, q table.Querier, lo, hi []string) (map[string]string, [][]string, error) {
	cond, args := s.cond(lo, hi)
	return s.collect(ctx, q, "SELECT "+s.keyText()+", "+s.hash+" FROM "+s.from()+" t WHERE "+cond+" ORDER BY "+s.order, args)
}

// keysHashes returns the row hashes of the rows with these keys; lock adds
// FOR SHARE.
func (s side) keysHashes(ctx context.Context, q table.Querier, keys [][]string, lock bool) (map[string]string, error) {
	cols := make([]string, len(s.key))
	casts := make([]string, len(s.key))
	args := make([]any, len(s.key))
	for i, c := range s.key {
		cols[i] = "c" + strconv.Itoa(i)
		casts[i] = "x.c" + strconv.Itoa(i) + "::" + c.ParamType
		col := make([]string, len(keys))
		for j, k := range keys {
			col[j] = k[i]
		}
		args[i] = col
	}
	params := make([]string, len(s.key))
	for i := range params {
		params[i] = "$" + strconv.Itoa(i+1) + "::text[]"
	}
	sql := "SELECT " + s.keyText() + ", " + s.hash + " FROM " + s.from() + " t WHERE (" + s.order + ") IN (SELECT " +
		strings.Join(casts, ", ") + " FROM unnest(" + strings.Join(params, ", ") + ") AS x(" + strings.Join(cols, ", ") + "))"
	if lock {
		sql += " FOR SHARE OF t"
	}
	m, _, err := s.collect(ctx, q, sql, args)
	return m, err
}

func (s side) collect(ctx context.Context, q table.Querier, sql string, args []any) (map[string]string, [][]string, error) {
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", s.name, err)
	}
	defer rows.Close()
	out := map[string]string{}
	var keys [][]string
	for rows.Next() {
		var k []string
		var h string
		if err := rows.Scan(&k, &h); err != nil {
			return nil, nil, fmt.Errorf("reading %s: %w", s.name, err)
		}
		out[joinKey(k)] = h
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", s.name, err)
	}
	return out, keys, nil
}

// bothAtLeast reports whether every connection's server is at least
// version (server_version_num).
func bothAtLeast(ctx context.Context, version int, conns ...*pgx.Conn) (bool, error) {
	for _, c := range conns {
		var v int
		if err := c.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&v); err != nil {
			return false, fmt.Errorf("reading the server version: %w", err)
		}
		if v < version {
			return false, nil
		}
	}
	return true, nil
}

// joinKey makes a map key of a key's values; \x00 cannot occur in text.
func joinKey(k []string) string { return strings.Join(k, "\x00") }
