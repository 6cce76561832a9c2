package table

import (
	"context"
	"fmt"
	"hash/fnv"
	"io"
	"strconv"
	"strings"
)

// fastPathRows is the chunk size from which a range copy moves a chunk with
// COPY instead of as JSON (RangeOptions.FastRows): below it, the two extra
// round trips of the COPY path cost more than the JSON encoding saves.
const fastPathRows = 1000

// Column names of the staging table that are not the source's: the row's
// position in the chunk, and its key as text.
const (
	stageOrd = "tandem.ord"
	stageKey = "tandem.key"
)

// stage is how a copier stages a chunk on the secondary for the fast path: a
// temporary table (one per connection and column layout, emptied at every
// commit) that COPY fills with the source columns, and the upsert that
// writes it to dst.
type stage struct {
	name   string // pg_temp."tandem_stage_<hash>"
	create string // CREATE TEMP TABLE IF NOT EXISTS ...
	upsert string // INSERT INTO dst ... SELECT ... FROM (staged rows) AS src ON CONFLICT ...
}

// newStage builds p's staging table and upsert: types[i] is the type the
// source column p.cols[i] is staged as, and upsertFrom makes the upsert
// from a FROM item aliased src that carries p.cols.
func (p *copier) newStage(types []string, upsertFrom func(from string) (string, error)) error {
	defs := make([]string, len(p.cols))
	for i, c := range p.cols {
		defs[i] = quoteIdent(c) + " " + types[i]
	}
	h := fnv.New64a()
	h.Write([]byte(strings.Join(defs, ","))) //nolint:errcheck // hash writes cannot fail
	p.stage.name = "pg_temp." + quoteIdent("tandem_stage_"+strconv.FormatUint(h.Sum64(), 16))
	p.stage.create = "CREATE TEMP TABLE IF NOT EXISTS " + p.stage.name + " (" + quoteIdent(stageOrd) +
		" bigint GENERATED ALWAYS AS IDENTITY, " + quoteIdent(stageKey) + " text[], " + strings.Join(defs, ", ") +
		") ON COMMIT DELETE ROWS"
	// Only the source columns, so that the mapping sees the row it expects.
	var err error
	p.stage.upsert, err = upsertFrom("(SELECT " + identList(p.cols) + " FROM " + p.stage.name + ") AS src")
	return err
}

// fastRows returns the chunk size from which copyRange takes the fast path,
// given RangeOptions.FastRows: 0 is the default, a negative value never.
func fastRows(opt int) int {
	switch {
	case opt == 0:
		return fastPathRows
	case opt < 0:
		return int(^uint(0) >> 1)
	}
	return opt
}

// copySettings make a value's text the same on both stores: the primary
// writes it and the secondary reads it back with the same styles, and
// floats keep every digit.
const copySettings = "SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; " +
	"SET LOCAL extra_float_digits = 3; SET LOCAL bytea_output = 'hex'"

// lockChunkCopy is lockChunk and write in one, for large chunks: on the
// primary, COPY (SELECT ... FOR SHARE) streams the next chunk of at most
// limit rows after after (at it when incl), at most hi, in key order, and
// locks them as it reads, in the unit's primary transaction; on the
// secondary, COPY ... FROM STDIN puts them into the staging table, and one
// INSERT ... SELECT through the copier's upsert (the mapping's, for a mapped
// copier) writes them, in the unit's secondary transaction. The rows pass
// through an io.Pipe, so memory does not grow with the chunk; only the
// keys are returned (json is nil), in key order.
func (u *copyUnit) lockChunkCopy(ctx context.Context, after []string, incl bool, hi []string, limit int) (rowSet, error) {
	p := u.p
	if _, err := u.ptx.Exec(ctx, copySettings); err != nil {
		return rowSet{}, fmt.Errorf("reading the primary: %w", err)
	}
	if _, err := u.stx.Exec(ctx, copySettings+"; "+p.stage.create); err != nil {
		return rowSet{}, fmt.Errorf("staging on the secondary: %w", err)
	}
	src := p.srcKey
	out := "COPY (SELECT " + keyText("r", src) + ", " + prefixedList("r", p.cols) + " FROM " + p.srcFrom() + " r" +
		literalRange("r", src, after, incl, hi) + " ORDER BY " + keyList("r", src) + " LIMIT " + strconv.Itoa(limit) +
		" FOR SHARE OF r) TO STDOUT"
	in := "COPY " + p.stage.name + " (" + quoteIdent(stageKey) + ", " + identList(p.cols) + ") FROM STDIN"

	pr, pw := io.Pipe()
	readErr := make(chan error, 1)
	go func() {
		_, err := u.ptx.Conn().PgConn().CopyTo(ctx, pw, out)
		pw.CloseWithError(err) // nil: the reader sees io.EOF
		readErr <- err
	}()
	_, werr := u.stx.Conn().PgConn().CopyFrom(ctx, pr, in)
	if werr != nil {
		// Let the primary's COPY run to its end: a CopyTo whose writer
		// fails closes the primary connection.
		_, _ = io.Copy(io.Discard, pr)
	}
	rerr := <-readErr
	if rerr != nil {
		return rowSet{}, fmt.Errorf("reading the primary: %w", rerr)
	}
	if werr != nil {
		return rowSet{}, fmt.Errorf("staging on the secondary: %w", werr)
	}
	if _, err := u.stx.Exec(ctx, p.stage.upsert); err != nil {
		return rowSet{}, fmt.Errorf("writing the secondary: %w", err)
	}
	rows, err := u.stx.Query(ctx, "SELECT "+quoteIdent(stageKey)+" FROM "+p.stage.name+" ORDER BY "+quoteIdent(stageOrd))
	if err != nil {
		return rowSet{}, fmt.Errorf("reading the staged keys: %w", err)
	}
	var rs rowSet
	for rows.Next() {
		var k []string
		if err := rows.Scan(&k); err != nil {
			rows.Close()
			return rowSet{}, fmt.Errorf("reading the staged keys: %w", err)
		}
		rs.keys = append(rs.keys, k)
	}
	if err := rows.Err(); err != nil {
		return rowSet{}, fmt.Errorf("reading the staged keys: %w", err)
	}
	u.res.Upserted += len(rs.keys)
	return rs, nil
}

// literalRange is rangeCond with the bounds as SQL literals, for a
// statement that takes no parameters (COPY).
func literalRange(alias string, key []Column, lo []string, incl bool, hi []string) string {
	var conds []string
	if lo != nil {
		op := " > "
		if incl {
			op = " >= "
		}
		conds = append(conds, keyTuple(alias, key)+op+literalTuple(lo, key))
	}
	if hi != nil {
		conds = append(conds, keyTuple(alias, key)+" <= "+literalTuple(hi, key))
	}
	if len(conds) == 0 {
		return ""
	}
	return " WHERE " + strings.Join(conds, " AND ")
}

// literalTuple returns ('v1'::t1, 'v2'::t2, ...).
func literalTuple(vals []string, key []Column) string {
	parts := make([]string, len(key))
	for i, c := range key {
		parts[i] = quoteLiteral(vals[i]) + "::" + c.ParamType
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

// quoteLiteral quotes s as an SQL string literal that reads the same
// whatever standard_conforming_strings is.
func quoteLiteral(s string) string {
	q := "'" + strings.ReplaceAll(s, "'", "''") + "'"
	if strings.Contains(s, `\`) {
		q = "E" + strings.ReplaceAll(q, `\`, `\\`)
	}
	return q
}
