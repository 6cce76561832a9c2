package plan

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// auditCol is how one column of new gets its value from an old row.
type auditCol struct {
	name     string // new's column
	newType  string // format_type on new
	notNull  bool
	value    string // SQL over the old row: a quoted old column, or (expr)
	from     string // the old column, or "" for a computed one
	srcType  string // format_type on old of value
	computed bool
	// cast and length are true (as SQL) for a value new rejects; need
	// is an aggregate input for the fix (the longest value); typed is
	// the value as new's type, NULL where cast or length reject it; ""
	// when the value cannot be typed without risking an error.
	cast, length, need, typed string
	unchecked                 string // why castability is not checked exactly
}

// auditSide is one table's rows as new's columns, on old.
type auditSide struct {
	old, new *relation
	m        Mapping
	cols     []*auditCol
}

func (s *auditSide) col(name string) *auditCol {
	for _, c := range s.cols {
		if c.name == name {
			return c
		}
	}
	return nil
}

// from is the FROM item of the table's rows as new's columns: the row's
// ctid (tandem_t), the old key (tandem_k), each column's value as new
// receives it (tandem_vN), whether its type cast or its length rejects it
// (tandem_cN, tandem_lN), and its value typed as new's column, under new's
// name (NULL where the cast or the length rejects it). It is plain nested
// subqueries, which the planner flattens into the query that reads them:
// a condition on tandem_t reaches the table's scan (a TID range scan), and
// the scan can run with parallel workers.
func (s *auditSide) from() string { return s.fromCols(nil, "") }

// fromCols is from with only the columns named in only (all when nil):
// a unique key's GROUP BY and a foreign key's parent read just theirs.
// With sieve, from has one more column, tandem_s: sieve, as SQL over the
// row with new's names bound to the typed values unguarded (computed
// whether or not the cast or the length rejects the value: it may raise an
// error where they do, so sieve must evaluate them only where no flag of
// any column is set; sieveSQL does).
func (s *auditSide) fromCols(only []string, sieve string) string {
	key := "tandem_o.ctid AS tandem_t, tandem_o.ctid AS tandem_k"
	if len(s.old.key) > 0 {
		ks := make([]string, len(s.old.key))
		for i, k := range s.old.key {
			ks[i] = fmt.Sprintf("tandem_o.%s AS tandem_k%d", quoteIdent(k), i)
		}
		key = "tandem_o.ctid AS tandem_t, " + strings.Join(ks, ", ")
	}
	var values, raw []string
	use := func(c *auditCol) bool { return only == nil || slices.Contains(only, c.name) }
	for i, c := range s.cols {
		if use(c) {
			values = append(values, fmt.Sprintf("%s AS tandem_v%d", c.value, i))
		}
	}
	keys := append([]string{"tandem_t"}, s.keyCols()...)
	// unguarded (layer u, aliased m so that the checks' SQL reads it) and
	// guarded (the outer layer, what the checks read) typed values.
	unguarded, guarded := prefixed("r.", keys), prefixed("m.", keys)
	for i, c := range s.cols {
		if !use(c) {
			continue
		}
		v := fmt.Sprintf("tandem_v%d", i)
		raw = append(raw, "v."+v)
		unguarded, guarded = append(unguarded, "r."+v), append(guarded, "m."+v)
		var bad []string
		for _, p := range []struct{ name, sql string }{{"c", c.cast}, {"l", c.length}} {
			if p.sql != "" {
				col := fmt.Sprintf("tandem_%s%d", p.name, i)
				raw = append(raw, fmt.Sprintf("coalesce(%s, false) AS %s", strings.ReplaceAll(p.sql, "$v", "v."+v), col))
				unguarded, guarded = append(unguarded, "r."+col), append(guarded, "m."+col)
				bad = append(bad, "m."+col)
			}
		}
		if c.typed == "" {
			continue
		}
		name := quoteIdent(c.name)
		unguarded = append(unguarded, strings.ReplaceAll(c.typed, "$v", "r."+v)+" AS "+name)
		if len(bad) == 0 {
			guarded = append(guarded, "m."+name)
		} else {
			guarded = append(guarded, fmt.Sprintf("CASE WHEN NOT (%s) THEN m.%s END AS %s", strings.Join(bad, " OR "), name, name))
		}
	}
	if sieve != "" {
		guarded = append(guarded, sieve+" AS tandem_s")
	}
	return fmt.Sprintf("(SELECT %s FROM (SELECT %s FROM (SELECT %s FROM (SELECT %s%s FROM %s AS tandem_o%s) AS v) AS r) AS m)",
		strings.Join(guarded, ", "), strings.Join(unguarded, ", "), strings.Join(append(prefixed("v.", keys), raw...), ", "),
		key, prefixComma(values), s.old.name.Quoted(), s.where())
}

// where is the WHERE clause of the rows the mapping carries (the others
// never reach new), or "".
func (s *auditSide) where() string {
	if s.m.Where == "" {
		return ""
	}
	return " WHERE (" + s.m.Where + ")"
}

// countSQL counts the rows the mapping carries.
func (s *auditSide) countSQL() string {
	return fmt.Sprintf("SELECT count(*) FROM %s AS tandem_o%s", s.old.name.Quoted(), s.where())
}

// flags is SQL over from (aliased m) that is true when the cast or the
// length of any column rejects the row: where it is false, every typed
// value equals its unguarded one.
func (s *auditSide) flags() string {
	var bad []string
	for i, c := range s.cols {
		if c.cast != "" {
			bad = append(bad, fmt.Sprintf("m.tandem_c%d", i))
		}
		if c.length != "" {
			bad = append(bad, fmt.Sprintf("m.tandem_l%d", i))
		}
	}
	return strings.Join(bad, " OR ")
}

// keyCols are the names of the old key's columns in from: tandem_k0, ...,
// or tandem_k (the ctid) when old has no key.
func (s *auditSide) keyCols() []string {
	if len(s.old.key) == 0 {
		return []string{"tandem_k"}
	}
	out := make([]string, len(s.old.key))
	for i := range out {
		out[i] = fmt.Sprintf("tandem_k%d", i)
	}
	return out
}

// keyText is the old key as text over the FROM item alias.
func (s *auditSide) keyText(alias string) string {
	ks := prefixed(alias+".", s.keyCols())
	if len(ks) == 1 {
		return ks[0] + "::text"
	}
	return "ROW(" + strings.Join(ks, ", ") + ")::text"
}

func prefixed(prefix string, names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = prefix + n
	}
	return out
}

func prefixComma(list []string) string {
	if len(list) == 0 {
		return ""
	}
	return ", " + strings.Join(list, ", ")
}

// v returns column c's raw value in the FROM item aliased alias.
func (s *auditSide) v(alias string, c *auditCol) string {
	return fmt.Sprintf("%s.tandem_v%d", alias, slices.Index(s.cols, c))
}

// newAuditSide builds the columns of the table old maps to new by m. The
// computed expressions' types are read from old by describing them.
func newAuditSide(ctx context.Context, conn *pgx.Conn, old, new *relation, m Mapping, pg16 bool) (*auditSide, []string, error) {
	s := &auditSide{old: old, new: new, m: m}
	var notes []string
	renamedTo := map[string]string{}
	for o, n := range m.Renames {
		renamedTo[n] = o
	}
	for _, nc := range new.cols {
		if nc.generated {
			continue
		}
		if _, disc := m.Discriminator[nc.name]; disc {
			continue // one constant, checked against new's catalog by the mapping's load
		}
		c := &auditCol{name: nc.name, newType: nc.typ, notNull: nc.notNull}
		if expr, ok := m.Computed[nc.name]; ok {
			typ, err := exprType(ctx, conn, old, expr)
			if err != nil {
				notes = append(notes, fmt.Sprintf("column %s: its expression does not run on old (%v): not audited", nc.name, err))
				continue
			}
			c.value, c.srcType, c.computed = "("+expr+")", typ, true
		} else {
			src, ok := renamedTo[nc.name]
			if !ok {
				if _, renamed := m.Renames[nc.name]; !renamed && !slices.Contains(m.Dropped, nc.name) {
					src = nc.name
				}
			}
			oc := old.column(src)
			if src == "" || oc == nil {
				continue // not filled from old: new's default
			}
			c.value, c.from, c.srcType = "tandem_o."+quoteIdent(src), src, oc.typ
		}
		c.fits(pg16)
		if c.unchecked != "" {
			notes = append(notes, fmt.Sprintf("column %s: %s", c.name, c.unchecked))
		}
		s.cols = append(s.cols, c)
	}
	// A cast to a type old does not have fails when planned: such a column
	// stays untyped (its CHECKs, unique keys and foreign keys are not
	// audited).
	for _, c := range s.cols {
		if c.typed == "" || c.typed == "$v" {
			continue
		}
		q := fmt.Sprintf("EXPLAIN SELECT %s FROM (SELECT %s AS v FROM %s AS tandem_o) AS r",
			strings.ReplaceAll(c.typed, "$v", "r.v"), c.value, old.name.Quoted())
		if _, err := conn.Exec(ctx, q); err != nil {
			notes = append(notes, fmt.Sprintf("column %s: old cannot convert its values to %s (%v): its constraints are not audited", c.name, c.newType, firstLine(err)))
			c.typed = ""
		}
	}
	return s, notes, nil
}

// exprType is the type (format_type) of a mapping expression over old's row.
func exprType(ctx context.Context, conn *pgx.Conn, old *relation, expr string) (string, error) {
	sd, err := conn.Prepare(ctx, "", "SELECT ("+expr+") FROM "+old.name.Quoted()+" AS tandem_o")
	if err != nil {
		return "", err
	}
	if len(sd.Fields) != 1 {
		return "", fmt.Errorf("the expression gives %d columns", len(sd.Fields))
	}
	var typ string
	err = conn.QueryRow(ctx, "SELECT format_type($1::oid, nullif($2::int, -1))", sd.Fields[0].DataTypeOID, sd.Fields[0].TypeModifier).Scan(&typ)
	return typ, err
}

func firstLine(err error) string {
	s := err.Error()
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// Integer ranges by type.
var intRange = map[string][2]string{
	"smallint": {"-32768", "32767"},
	"integer":  {"-2147483648", "2147483647"},
	"bigint":   {"-9223372036854775808", "9223372036854775807"},
}

// Input syntax of the types the PostgreSQL 15 cast check knows, as their
// input functions accept it (case-insensitive regular expressions).
const (
	intSyntax     = `^\s*[+-]?[0-9]+\s*$`
	numericSyntax = `^\s*([+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(e[+-]?[0-9]+)?|nan|[+-]?inf(inity)?)\s*$`
	boolSyntax    = `^\s*(t(r(ue?)?)?|f(a(l(se?)?)?)?|y(es?)?|no?|on|off?|1|0)\s*$`
	uuidSyntax    = `^(\{[0-9a-f]{4}(-?[0-9a-f]{4}){7}\}|[0-9a-f]{4}(-?[0-9a-f]{4}){7})$`
)

// fits sets c's cast, length, need and typed SQL ($v stands for the raw
// value). A pass-through column travels as text and new's input function
// reads it (row images, the backfill and repair send text); a computed
// column's value is assigned to new's column (an assignment cast). It is
// one switch over the type families the check knows, kept whole so that
// each family's rule reads beside the others.
func (c *auditCol) fits(pg16 bool) {
	c.typed = "$v"
	if c.srcType == c.newType {
		return
	}
	if ch, _ := ClassifyType(c.srcType, c.newType); ch == Widening {
		c.typed = "($v)::" + c.newType
		return
	}
	s, d := parseType(c.srcType), parseType(c.newType)
	text := "($v)::text"
	numericSrc := s.dims == 0 && (intBytes[s.base] > 0 || floatBytes[s.base] > 0 || s.base == "numeric")
	// length: new's modifier.
	switch {
	case d.dims > 0:
	case stringType[d.base] && d.base != "name" && stringLimit(d) >= 0:
		n := stringLimit(d)
		// octet_length is at least char_length, and needs no counting.
		c.length = fmt.Sprintf("CASE WHEN octet_length(%s) <= %d THEN false ELSE char_length(rtrim(%s, ' ')) > %d END", text, n, text, n)
		c.need = fmt.Sprintf("char_length(rtrim(%s, ' '))", text)
	case d.base == "numeric" && len(d.mods) > 0:
		num := ""
		switch {
		case numericSrc:
			num = "($v)::numeric"
		case s.dims == 0 && stringType[s.base]:
			num = fmt.Sprintf("CASE WHEN %s OR %s ~* %s THEN (%s)::numeric END", digitsOnly(text, 0), text, quoteLiteral(numericSyntax), text)
		}
		if num != "" {
			p, sc := d.mod(0), scale(d)
			// abs(round(x, sc)) >= 1e(p-sc), without rounding every value:
			// x rounds to the limit from limit - 5e-(sc+1) on. NaN fits
			// and sorts above every number. The value (a computed
			// column's expression, inlined) is computed once for a value
			// that fits.
			bound := fmt.Sprintf("(1e%d - 5e%d)", p-sc, -(sc + 1))
			c.length = fmt.Sprintf("CASE WHEN abs(%s) < %s THEN false ELSE %s <> 'NaN'::numeric END", num, bound, num)
			c.need = fmt.Sprintf("abs(round(%s, %d))", num, sc)
		} else {
			c.unchecked = fmt.Sprintf("%s values into %s: the digits are not checked", c.srcType, c.newType)
		}
	}
	// cast: can the value become new's type at all?
	exact := true
	switch {
	case s.dims == 0 && d.dims == 0 && intBytes[d.base] > 0:
		r := intRange[d.base]
		switch {
		case intBytes[s.base] > 0:
			c.cast = fmt.Sprintf("$v NOT BETWEEN %s AND %s", r[0], r[1])
		case c.computed && numericSrc:
			c.cast = fmt.Sprintf("round($v) NOT BETWEEN %s AND %s", r[0], r[1]) // NaN sorts above every number
		case c.computed:
			exact = false
		case pg16:
			c.cast = fmt.Sprintf("NOT pg_input_is_valid(%s, %s)", text, quoteLiteral(d.base))
		default:
			// Fast path: a plain run of fewer digits than the type's
			// widest value always fits, without parsing a numeric.
			c.cast = fmt.Sprintf("CASE WHEN %s THEN false "+
				"ELSE NOT coalesce(CASE WHEN %s ~ %s THEN (%s)::numeric BETWEEN %s AND %s END, false) END",
				digitsOnly(text, intDigits[d.base]-1), text, quoteLiteral(intSyntax), text, r[0], r[1])
		}
	case s.dims == 0 && d.dims == 0 && d.base == "numeric":
		switch {
		case numericSrc:
		case c.computed:
			exact = false
		case pg16:
			c.cast = fmt.Sprintf("NOT pg_input_is_valid(%s, 'numeric')", text)
		default:
			c.cast = fmt.Sprintf("CASE WHEN %s THEN false ELSE %s !~* %s END", digitsOnly(text, 0), text, quoteLiteral(numericSyntax))
		}
	case d.dims == 0 && stringType[d.base]:
		// Every value has a text form.
	case c.computed:
		exact = false
	case pg16:
		c.cast = fmt.Sprintf("NOT pg_input_is_valid(%s, %s)", text, quoteLiteral(c.newType))
	case d.dims == 0 && d.base == "boolean":
		c.cast = fmt.Sprintf("%s !~* %s", text, quoteLiteral(boolSyntax))
	case d.dims == 0 && d.base == "uuid":
		c.cast = fmt.Sprintf("%s !~* %s", text, quoteLiteral(uuidSyntax))
	default:
		exact = false
	}
	if !exact {
		if ch, _ := ClassifyType(c.srcType, c.newType); ch != Conversion {
			how := "old values of " + c.srcType + " into " + c.newType + ": castability is not checked"
			if !c.computed && !pg16 {
				how += " (old is PostgreSQL 15 or older; pg_input_is_valid needs 16)"
			}
			c.unchecked = how
			c.typed = ""
			return
		}
	}
	if c.computed {
		// An assignment: the value keeps its type and new assigns it.
		c.typed = "($v)::" + c.newType
	} else {
		c.typed = "($v)::text::" + c.newType
	}
}

// digitsOnly is SQL that is true when text is a run of 1 to max ASCII
// digits (any length when max is 0), and false or NULL otherwise: the
// common value's fast path before a regular expression, which costs
// several times as much per row (docs/benchmarks.md). It trims the digits
// off the value's bytes (convert_to the database's own encoding converts
// nothing): in every server encoding the bytes 0-9 are only ever those
// digits, and a bytea trim compares bytes, where text's ltrim matches
// characters of the set one by one (about 0.1 s more per 1M values).
func digitsOnly(text string, max int) string {
	n := "octet_length(" + text + ") > 0"
	if max > 0 {
		n = fmt.Sprintf("octet_length(%s) BETWEEN 1 AND %d", text, max)
	}
	return fmt.Sprintf("(%s AND btrim(convert_to(%s, getdatabaseencoding()), decode('30313233343536373839', 'hex')) = ''::bytea)", n, text)
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
