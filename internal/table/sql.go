package table

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// maxParams is the most bind parameters one statement may carry (the
// protocol counts them in an int16).
const maxParams = 65535

// UpsertSQL returns the statement that applies rows row images to m
// idempotently:
//
//	INSERT INTO "s"."t" ("c1","c2") [OVERRIDING SYSTEM VALUE] VALUES ($1::type1,$2::type2),(...)
//	ON CONFLICT ("k1") DO UPDATE SET "c2" = EXCLUDED."c2"
//
// m is the target store's Meta, so user-defined types resolve there. cols
// names the columns each row carries, in order; they must include every key
// column and no generated column. Parameters are numbered row-major and each
// is cast to its column's ParamType. The conflict action is DO NOTHING when
// no column is left to update. OVERRIDING SYSTEM VALUE is added when cols
// holds a GENERATED ALWAYS identity column; such a column is never in the
// SET list, because Postgres refuses to update it to anything but DEFAULT
// (so an existing row keeps its value there).
func UpsertSQL(m *Meta, cols []string, rows int) (string, error) {
	idx, err := writeColumns(m, cols, rows)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString("INSERT INTO ")
	b.WriteString(m.Name.Quoted())
	b.WriteString(" (")
	b.WriteString(identList(cols))
	b.WriteString(")")
	if overriding(m, idx) {
		b.WriteString(" OVERRIDING SYSTEM VALUE")
	}
	b.WriteString(" VALUES ")
	n := 0
	for r := range rows {
		if r > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		for j, i := range idx {
			if j > 0 {
				b.WriteByte(',')
			}
			n++
			writeParam(&b, n, m.Columns[i].ParamType)
		}
		b.WriteByte(')')
	}
	b.WriteString(onConflict(m, idx))
	return b.String(), nil
}

// DeleteSQL returns the statement that deletes rows rows of m by key:
//
//	DELETE FROM "s"."t" WHERE ("k1","k2") IN (($1::t1,$2::t2),(...))
//
// or, for a single-column key, DELETE FROM "s"."t" WHERE "k" IN ($1::t,...).
// Parameters are the key values in key order, row-major.
func DeleteSQL(m *Meta, rows int) (string, error) {
	if !m.HasKey() {
		return "", fmt.Errorf("deleting from %s by key: %w", m.Name, ErrNoKey)
	}
	if rows < 1 {
		return "", fmt.Errorf("deleting from %s: need at least one row, got %d", m.Name, rows)
	}
	if rows*len(m.Key) > maxParams {
		return "", fmt.Errorf("deleting from %s: %d rows of %d key columns exceed %d parameters", m.Name, rows, len(m.Key), maxParams)
	}
	composite := len(m.Key) > 1
	var b strings.Builder
	b.WriteString("DELETE FROM ")
	b.WriteString(m.Name.Quoted())
	b.WriteString(" WHERE ")
	if composite {
		b.WriteString("(" + identList(m.KeyNames()) + ")")
	} else {
		b.WriteString(quoteIdent(m.Columns[m.Key[0]].Name))
	}
	b.WriteString(" IN (")
	n := 0
	for r := range rows {
		if r > 0 {
			b.WriteByte(',')
		}
		if composite {
			b.WriteByte('(')
		}
		for j, k := range m.Key {
			if j > 0 {
				b.WriteByte(',')
			}
			n++
			writeParam(&b, n, m.Columns[k].ParamType)
		}
		if composite {
			b.WriteByte(')')
		}
	}
	b.WriteByte(')')
	return b.String(), nil
}

// writeColumns checks that cols can be written to m as rows rows by key and
// returns their indexes in m.Columns.
func writeColumns(m *Meta, cols []string, rows int) ([]int, error) {
	if !m.HasKey() {
		return nil, fmt.Errorf("upserting into %s: %w", m.Name, ErrNoKey)
	}
	if len(cols) == 0 {
		return nil, fmt.Errorf("upserting into %s: no columns", m.Name)
	}
	if rows < 1 {
		return nil, fmt.Errorf("upserting into %s: need at least one row, got %d", m.Name, rows)
	}
	if rows*len(cols) > maxParams {
		return nil, fmt.Errorf("upserting into %s: %d rows of %d columns exceed %d parameters", m.Name, rows, len(cols), maxParams)
	}
	idx := make([]int, len(cols))
	seen := make(map[int]bool, len(cols))
	for j, name := range cols {
		i, ok := m.Column(name)
		switch {
		case !ok:
			return nil, fmt.Errorf("table %s has no column %q", m.Name, name)
		case m.Columns[i].Generated:
			return nil, fmt.Errorf("column %q of %s is generated and cannot be written", name, m.Name)
		case seen[i]:
			return nil, fmt.Errorf("column %q of %s is listed twice", name, m.Name)
		}
		seen[i] = true
		idx[j] = i
	}
	for _, k := range m.Key {
		if !seen[k] {
			return nil, fmt.Errorf("upserting into %s: key column %q is missing from the columns", m.Name, m.Columns[k].Name)
		}
	}
	return idx, nil
}

// overriding reports whether writing columns idx of m needs OVERRIDING
// SYSTEM VALUE.
func overriding(m *Meta, idx []int) bool {
	for _, i := range idx {
		if m.Columns[i].Identity == 'a' {
			return true
		}
	}
	return false
}

// onConflict returns the ON CONFLICT clause (with a leading space) for rows
// that carry columns idx of m: update every non-key column that may be
// updated, or do nothing when none is left.
func onConflict(m *Meta, idx []int) string {
	isKey := make(map[int]bool, len(m.Key))
	for _, k := range m.Key {
		isKey[k] = true
	}
	var set []string
	for _, i := range idx {
		c := m.Columns[i]
		if isKey[i] || c.Identity == 'a' {
			continue
		}
		q := quoteIdent(c.Name)
		set = append(set, q+" = EXCLUDED."+q)
	}
	s := " ON CONFLICT (" + identList(m.KeyNames()) + ")"
	if len(set) == 0 {
		return s + " DO NOTHING"
	}
	return s + " DO UPDATE SET " + strings.Join(set, ", ")
}

func writeParam(b *strings.Builder, n int, typ string) {
	b.WriteByte('$')
	b.WriteString(strconv.Itoa(n))
	b.WriteString("::")
	b.WriteString(typ)
}

// identList quotes names and joins them with commas.
func identList(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = quoteIdent(n)
	}
	return strings.Join(q, ",")
}

// ErrNoKey is wrapped by the errors of operations that need a primary key
// on a table that has none; such tables fall back to statement mirroring
// and whole-table copies.
var ErrNoKey = errors.New("the table has no primary key")
