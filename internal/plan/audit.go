package plan

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/table"
)

// The data audit (tandem plan --audit, issue 17) counts, per table in
// scope, the old rows that new's schema will reject once the backfill or
// the mirror writes them, by reason, without copying anything: every check
// is SQL run on the old store over old's rows as the mapping turns them into
// new's columns (renamed, computed). One scan of the table computes every
// per-row reason (length, NULL, type cast, CHECK, and the foreign key
// orphans through a hash join with the parent's keys); a unique key that
// old does not enforce takes one GROUP BY more.

// Audit reasons.
const (
	RejectLength    = "length"           // too long for new's varchar(n)/char(n), or too many digits for numeric(p,s)
	RejectNull      = "null"             // NULL into a NOT NULL column of new
	RejectOrphan    = "fk_orphan"        // no parent row for a foreign key new declares
	RejectDuplicate = "unique_duplicate" // a duplicate for a unique key new declares and old does not enforce
	RejectCheck     = "check"            // fails a CHECK constraint new declares
	RejectCast      = "type_cast"        // cannot be converted to new's column type
)

// auditExamples is how many example keys a reject lists.
const auditExamples = 5

// Audit is the data audit of one table: what new's schema will reject of
// old's rows.
type Audit struct {
	Rows     int64            `json:"rows"`     // rows scanned on old
	Duration jsonout.Duration `json:"duration"` // the audit's queries, all together
	// Rejects are the reasons with at least one row, in a stable order
	// (by reason, then column or constraint); empty when the table is clean.
	Rejects []Reject `json:"rejects"`
	// Unchecked says what the audit could not check, and why.
	Unchecked []string `json:"unchecked"`
}

// Reject is one reason new rejects old rows for.
type Reject struct {
	Reason     string `json:"reason"`               // one of the Reject* constants
	Column     string `json:"column,omitempty"`     // new's column (columns, comma-separated, for a key)
	Constraint string `json:"constraint,omitempty"` // new's constraint or unique index
	Rows       int64  `json:"rows"`                 // rows rejected (for a duplicate: rows beyond the first of each value)
	// Keys are up to five examples: the rows' primary keys on old, as
	// text (ctid when old has no key); for unique_duplicate, the
	// duplicated values of the unique key.
	Keys []string `json:"keys"`
	Fix  string   `json:"fix"` // what to change, where Tandem can know it
}

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

// from is the FROM item of the table's rows as new's columns: the old key
// (tandem_k), each column's value as new receives it (tandem_vN), whether
// its type cast or its length rejects it (tandem_cN, tandem_lN, computed
// once per row: OFFSET 0 keeps the planner from inlining them into every
// use), and its value typed as new's column, under new's name.
func (s *auditSide) from() string { return s.fromCols(nil) }

// fromCols is from with only the columns named in only (all when nil):
// a unique key's GROUP BY and a foreign key's parent read just theirs.
func (s *auditSide) fromCols(only []string) string {
	key := "tandem_o.ctid AS tandem_k"
	if len(s.old.key) > 0 {
		ks := make([]string, len(s.old.key))
		for i, k := range s.old.key {
			ks[i] = fmt.Sprintf("tandem_o.%s AS tandem_k%d", quoteIdent(k), i)
		}
		key = strings.Join(ks, ", ")
	}
	var values, raw []string
	use := func(c *auditCol) bool { return only == nil || slices.Contains(only, c.name) }
	for i, c := range s.cols {
		if use(c) {
			values = append(values, fmt.Sprintf("%s AS tandem_v%d", c.value, i))
		}
	}
	keys := s.keyCols()
	typed := prefixed("r.", keys)
	for i, c := range s.cols {
		if !use(c) {
			continue
		}
		v := fmt.Sprintf("tandem_v%d", i)
		raw = append(raw, "v."+v)
		typed = append(typed, "r."+v)
		var bad []string
		for _, p := range []struct{ name, sql string }{{"c", c.cast}, {"l", c.length}} {
			if p.sql != "" {
				col := fmt.Sprintf("tandem_%s%d", p.name, i)
				raw = append(raw, fmt.Sprintf("coalesce(%s, false) AS %s", strings.ReplaceAll(p.sql, "$v", "v."+v), col))
				typed = append(typed, "r."+col)
				bad = append(bad, "r."+col)
			}
		}
		switch {
		case c.typed == "":
		case len(bad) == 0:
			typed = append(typed, strings.ReplaceAll(c.typed, "$v", "r."+v)+" AS "+quoteIdent(c.name))
		default:
			typed = append(typed, fmt.Sprintf("CASE WHEN NOT (%s) THEN %s END AS %s", strings.Join(bad, " OR "),
				strings.ReplaceAll(c.typed, "$v", "r."+v), quoteIdent(c.name)))
		}
	}
	return fmt.Sprintf("(SELECT %s FROM (SELECT %s FROM (SELECT %s%s FROM %s AS tandem_o) AS v OFFSET 0) AS r)",
		strings.Join(typed, ", "), strings.Join(append(prefixed("v.", keys), raw...), ", "),
		key, prefixComma(values), s.old.name.Quoted())
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

// auditInput is what auditTable needs.
type auditInput struct {
	old, new *pgx.Conn
	side     *auditSide
	notes    []string                             // what building side could not check
	parents  func(table.Name) (*auditSide, error) // the side of the old table that maps to a new table, nil when none
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
// column's value is assigned to new's column (an assignment cast).
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
			num = fmt.Sprintf("CASE WHEN %s ~* %s THEN (%s)::numeric END", text, quoteLiteral(numericSyntax), text)
		}
		if num != "" {
			p, sc := d.mod(0), scale(d)
			// abs(round(x, sc)) >= 1e(p-sc), without rounding every value:
			// x rounds to the limit from limit - 5e-(sc+1) on. NaN fits
			// and sorts above every number.
			bound := fmt.Sprintf("(1e%d - 5e%d)", p-sc, -(sc + 1))
			c.length = fmt.Sprintf("(%s >= %s OR %s <= -%s) AND %s <> 'NaN'::numeric", num, bound, num, bound, num)
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
			c.cast = fmt.Sprintf("CASE WHEN %s ~ '^[0-9]{1,%d}$' THEN false "+
				"ELSE NOT coalesce(CASE WHEN %s ~ %s THEN (%s)::numeric BETWEEN %s AND %s END, false) END",
				text, intDigits[d.base]-1, text, quoteLiteral(intSyntax), text, r[0], r[1])
		}
	case s.dims == 0 && d.dims == 0 && d.base == "numeric":
		switch {
		case numericSrc:
		case c.computed:
			exact = false
		case pg16:
			c.cast = fmt.Sprintf("NOT pg_input_is_valid(%s, 'numeric')", text)
		default:
			c.cast = fmt.Sprintf("%s !~* %s", text, quoteLiteral(numericSyntax))
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

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// scanCheck is one per-row reason in the table's scan.
type scanCheck struct {
	rej  Reject
	pred string // SQL over the scan's row m: true when new rejects the row
	need string // an aggregate input (max) for the fix, or ""
	join string // a LEFT JOIN the predicate needs, or ""
	fix  func(need string, keys []string) string
}

// constraints are a table's constraints that the audit checks.
type constraints struct {
	checks  []checkCon
	uniques []uniqueIdx
	fks     []fkCon
}

type checkCon struct{ name, expr string }

type uniqueIdx struct {
	name                    string
	cols                    []string
	nullsNotDistinct        bool
	partial, exprs, invalid bool
}

type fkCon struct {
	name        string
	cols, refs  []string
	ref         table.Name
	matchFull   bool
	description string
}

// readConstraints reads rel's CHECK constraints, unique indexes and foreign
// keys on conn.
func readConstraints(ctx context.Context, conn *pgx.Conn, rel *relation) (*constraints, error) {
	c := &constraints{}
	name := rel.name.Quoted()
	rows, err := conn.Query(ctx, `SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
		WHERE conrelid = $1::regclass AND contype = 'c' ORDER BY 1`, name)
	if err != nil {
		return nil, fmt.Errorf("reading the CHECK constraints of %s: %w", rel.name, err)
	}
	var ck checkCon
	if _, err := pgx.ForEachRow(rows, []any{&ck.name, &ck.expr}, func() error {
		e := strings.TrimSpace(ck.expr)
		for _, suffix := range []string{" NOT VALID", " NO INHERIT"} {
			e = strings.TrimSuffix(e, suffix)
		}
		c.checks = append(c.checks, checkCon{name: ck.name, expr: strings.TrimPrefix(e, "CHECK ")})
		return nil
	}); err != nil {
		return nil, fmt.Errorf("reading the CHECK constraints of %s: %w", rel.name, err)
	}

	rows, err = conn.Query(ctx, `SELECT ci.relname::text,
		ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
		      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		      WHERE k.ord <= i.indnkeyatts ORDER BY k.ord),
		coalesce((to_jsonb(i)->>'indnullsnotdistinct')::bool, false),
		i.indpred IS NOT NULL, i.indexprs IS NOT NULL, NOT i.indisvalid
		FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid
		WHERE i.indrelid = $1::regclass AND i.indisunique ORDER BY 1`, name)
	if err != nil {
		return nil, fmt.Errorf("reading the unique indexes of %s: %w", rel.name, err)
	}
	var u uniqueIdx
	if _, err := pgx.ForEachRow(rows, []any{&u.name, &u.cols, &u.nullsNotDistinct, &u.partial, &u.exprs, &u.invalid}, func() error {
		v := u
		v.cols = slices.Clone(u.cols)
		c.uniques = append(c.uniques, v)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("reading the unique indexes of %s: %w", rel.name, err)
	}

	rows, err = conn.Query(ctx, `SELECT con.conname::text, rn.nspname::text, rc.relname::text,
		ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
		      JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord),
		ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
		      JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord),
		con.confmatchtype = 'f', pg_get_constraintdef(con.oid)
		FROM pg_constraint con JOIN pg_class rc ON rc.oid = con.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
		WHERE con.conrelid = $1::regclass AND con.contype = 'f' ORDER BY 1`, name)
	if err != nil {
		return nil, fmt.Errorf("reading the foreign keys of %s: %w", rel.name, err)
	}
	var fk fkCon
	if _, err := pgx.ForEachRow(rows, []any{&fk.name, &fk.ref.Schema, &fk.ref.Table, &fk.cols, &fk.refs, &fk.matchFull, &fk.description}, func() error {
		v := fk
		v.cols, v.refs = slices.Clone(fk.cols), slices.Clone(fk.refs)
		c.fks = append(c.fks, v)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("reading the foreign keys of %s: %w", rel.name, err)
	}
	return c, nil
}

// auditTable audits one table: one scan for the per-row reasons and the
// foreign keys, one GROUP BY per unique key that old does not enforce.
func auditTable(ctx context.Context, in auditInput) (*Audit, error) {
	began := time.Now()
	s := in.side
	a := &Audit{Rejects: []Reject{}, Unchecked: slices.Clone(in.notes)}
	if a.Unchecked == nil {
		a.Unchecked = []string{}
	}
	newCons, err := readConstraints(ctx, in.new, s.new)
	if err != nil {
		return nil, fmt.Errorf("new store: %w", err)
	}
	oldCons, err := readConstraints(ctx, in.old, s.old)
	if err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	restore, err := raiseWorkMem(ctx, in.old)
	if err != nil {
		return nil, err
	}
	defer restore()
	checks := s.columnChecks()
	checks = append(checks, s.constraintChecks(newCons.checks, a)...)
	fks, err := s.foreignKeyChecks(newCons.fks, in.parents, a)
	if err != nil {
		return nil, err
	}
	checks = append(checks, fks...)
	if err := s.scan(ctx, in.old, checks, a); err != nil {
		return nil, err
	}
	for _, u := range newCons.uniques {
		if err := s.unique(ctx, in.old, u, oldCons.uniques, a); err != nil {
			return nil, err
		}
	}
	slices.SortStableFunc(a.Rejects, func(x, y Reject) int {
		return strings.Compare(x.Reason+"\x00"+x.Column+"\x00"+x.Constraint, y.Reason+"\x00"+y.Column+"\x00"+y.Constraint)
	})
	a.Duration = jsonout.Duration(time.Since(began))
	return a, nil
}

// auditWorkMem is the work_mem the audit's queries run with on old, so
// that a unique key's GROUP BY over a large table hashes in memory instead
// of spilling to disk in batches (at PostgreSQL's default 4MB, 1M text keys
// spill 17 batches and take several times as long).
const auditWorkMem = "64MB"

// raiseWorkMem sets work_mem for the session to auditWorkMem when it is
// lower, and returns what puts it back.
func raiseWorkMem(ctx context.Context, conn *pgx.Conn) (func(), error) {
	var was string
	var lower bool
	if err := conn.QueryRow(ctx, "SELECT current_setting('work_mem'), pg_size_bytes(current_setting('work_mem')) < pg_size_bytes($1)", auditWorkMem).Scan(&was, &lower); err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	if !lower {
		return func() {}, nil
	}
	if _, err := conn.Exec(ctx, "SELECT set_config('work_mem', $1, false)", auditWorkMem); err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	return func() { _, _ = conn.Exec(context.WithoutCancel(ctx), "SELECT set_config('work_mem', $1, false)", was) }, nil
}

// oldWhere names the old rows with keys, for a fix: a WHERE condition on
// old's key when it has one column.
func (s *auditSide) oldWhere(keys []string) string {
	if len(s.old.key) != 1 || len(keys) == 0 {
		return ""
	}
	lits := make([]string, len(keys))
	for i, k := range keys {
		lits[i] = quoteLiteral(k)
	}
	return fmt.Sprintf(" WHERE %s IN (%s)", quoteIdent(s.old.key[0]), strings.Join(lits, ", "))
}

// columnChecks are the per-column reasons: NULL, length, type cast.
func (s *auditSide) columnChecks() []scanCheck {
	var out []scanCheck
	for _, c := range s.cols {
		v := s.v("m", c)
		origin := "old's column " + c.from
		if c.computed {
			origin = "the mapping's expression " + c.value
		}
		if c.notNull {
			out = append(out, scanCheck{rej: Reject{Reason: RejectNull, Column: c.name}, pred: v + " IS NULL",
				fix: func(_ string, keys []string) string {
					if c.computed {
						return fmt.Sprintf("%s gives NULL for them: coalesce it there, or drop NOT NULL on new's column %s", origin, c.name)
					}
					return fmt.Sprintf("fill them on old (UPDATE %s SET %s = ...%s), or drop NOT NULL on new's column %s",
						s.old.name.Quoted(), quoteIdent(c.from), s.oldWhere(keys), c.name)
				}})
		}
		if c.length != "" {
			out = append(out, scanCheck{rej: Reject{Reason: RejectLength, Column: c.name}, pred: fmt.Sprintf("m.tandem_l%d", slices.Index(s.cols, c)),
				need: strings.ReplaceAll(c.need, "$v", v), fix: func(need string, _ []string) string {
					return fmt.Sprintf("%s, or shorten those values (%s) on old", widen(c.name, c.newType, need), origin)
				}})
		}
		if c.cast != "" {
			out = append(out, scanCheck{rej: Reject{Reason: RejectCast, Column: c.name}, pred: fmt.Sprintf("m.tandem_c%d", slices.Index(s.cols, c)),
				fix: func(_ string, keys []string) string {
					d := parseType(c.newType)
					if intBytes[d.base] > 0 && intBytes[d.base] < 8 && intBytes[parseType(c.srcType).base] > intBytes[d.base] {
						return fmt.Sprintf("widen new's column %s to %s, or change those values on old", c.name, c.srcType)
					}
					if c.computed {
						return fmt.Sprintf("change %s so that it gives a %s for them", origin, c.newType)
					}
					return fmt.Sprintf("clean those values on old (UPDATE %s SET %s = ...%s), or compute new's column %s in the mapping so that they convert",
						s.old.name.Quoted(), quoteIdent(c.from), s.oldWhere(keys), c.name)
				}})
		}
	}
	return out
}

// widen names the type new's column needs for the longest value need (as
// the length check's need aggregate gave it).
func widen(col, newType, need string) string {
	d := parseType(newType)
	switch {
	case need == "":
	case stringType[d.base]:
		t := "varchar"
		if d.base == "character" {
			t = "char"
		}
		return fmt.Sprintf("widen new's column %s to %s(%s)", col, t, need)
	case d.base == "numeric":
		ip := need
		if i := strings.IndexByte(ip, '.'); i >= 0 {
			ip = ip[:i]
		}
		if _, err := strconv.ParseUint(ip, 10, 64); err == nil || len(ip) > 18 && strings.Trim(ip, "0123456789") == "" {
			sc := scale(d)
			return fmt.Sprintf("widen new's column %s to numeric(%d,%d)", col, len(strings.TrimLeft(ip, "0"))+sc, sc)
		}
		return "remove the infinite values"
	}
	return "widen new's column " + col
}

// constraintChecks are new's CHECK constraints, evaluated over the mapped
// (typed) row; a CHECK passes when it is true or NULL.
func (s *auditSide) constraintChecks(cks []checkCon, a *Audit) []scanCheck {
	var out []scanCheck
	for _, ck := range cks {
		refs, err := table.ExprColumns(ck.expr)
		if err != nil {
			a.Unchecked = append(a.Unchecked, fmt.Sprintf("CHECK %s: %v", ck.name, err))
			continue
		}
		ok := true
		for _, r := range refs {
			switch c := s.col(r); {
			case c == nil:
				a.Unchecked = append(a.Unchecked, fmt.Sprintf("CHECK %s reads column %s, which the mapping does not fill (rows get new's default): not audited", ck.name, r))
				ok = false
			case c.typed == "":
				a.Unchecked = append(a.Unchecked, fmt.Sprintf("CHECK %s reads column %s, whose values are not typed: not audited", ck.name, r))
				ok = false
			}
			if !ok {
				break
			}
		}
		if !ok {
			continue
		}
		out = append(out, scanCheck{rej: Reject{Reason: RejectCheck, Constraint: ck.name}, pred: "NOT coalesce(" + ck.expr + ", true)",
			fix: func(_ string, keys []string) string {
				return fmt.Sprintf("change those rows on old (%s) so that they satisfy CHECK %s (through the mapping), or delete them", s.keysText(keys), ck.expr)
			}})
	}
	return out
}

func (s *auditSide) keysText(keys []string) string {
	if len(s.old.key) == 0 {
		return "ctid " + strings.Join(keys, ", ")
	}
	return strings.Join(s.old.key, ", ") + " " + strings.Join(keys, "; ")
}

// foreignKeyChecks are new's foreign keys whose parent table is mapped from
// old too: a row is an orphan when its (mapped) values are not among the
// parent's (mapped) values, found by a hash join in the table's one scan.
func (s *auditSide) foreignKeyChecks(fks []fkCon, parents func(table.Name) (*auditSide, error), a *Audit) ([]scanCheck, error) {
	var out []scanCheck
fks:
	for i, fk := range fks {
		p, err := parents(fk.ref)
		if err != nil {
			return nil, err
		}
		if p == nil {
			a.Unchecked = append(a.Unchecked, fmt.Sprintf("foreign key %s references %s, which no table in scope maps to: orphans not audited", fk.name, fk.ref))
			continue
		}
		for _, c := range fk.cols {
			if col := s.col(c); col == nil || col.typed == "" {
				a.Unchecked = append(a.Unchecked, fmt.Sprintf("foreign key %s: column %s is not filled from old or its values are not typed: orphans not audited", fk.name, c))
				continue fks
			}
		}
		alias := fmt.Sprintf("tandem_f%d", i)
		var sel, on, notNull []string
		for j, r := range fk.refs {
			if col := p.col(r); col == nil || col.typed == "" {
				a.Unchecked = append(a.Unchecked, fmt.Sprintf("foreign key %s: the parent's column %s is not filled from old (%s) or its values are not typed: orphans not audited", fk.name, r, p.old.name))
				continue fks
			}
			sel = append(sel, fmt.Sprintf("p.%s AS tandem_p%d", quoteIdent(r), j))
			notNull = append(notNull, fmt.Sprintf("p.%s IS NOT NULL", quoteIdent(r)))
			on = append(on, fmt.Sprintf("%s.tandem_p%d = m.%s", alias, j, quoteIdent(fk.cols[j])))
		}
		var childNotNull []string
		for _, c := range fk.cols {
			childNotNull = append(childNotNull, "m."+quoteIdent(c)+" IS NOT NULL")
		}
		join := fmt.Sprintf(" LEFT JOIN (SELECT DISTINCT %s FROM %s AS p WHERE %s) AS %s ON %s",
			strings.Join(sel, ", "), p.fromCols(fk.refs), strings.Join(notNull, " AND "), alias, strings.Join(on, " AND "))
		pred := fmt.Sprintf("%s AND %s.tandem_p0 IS NULL", strings.Join(childNotNull, " AND "), alias)
		if fk.matchFull && len(fk.cols) > 1 {
			pred = fmt.Sprintf("(%s) OR num_nulls(%s) BETWEEN 1 AND %d", pred, "m."+strings.Join(quoteAll(fk.cols), ", m."), len(fk.cols)-1)
		}
		parent := p.old.name
		out = append(out, scanCheck{rej: Reject{Reason: RejectOrphan, Column: strings.Join(fk.cols, ", "), Constraint: fk.name}, pred: pred, join: join,
			fix: func(_ string, keys []string) string {
				return fmt.Sprintf("delete the orphans on old (DELETE FROM %s%s), or add their parents to %s on old", s.old.name.Quoted(), s.oldWhereOr(keys), parent)
			}})
	}
	return out, nil
}

func (s *auditSide) oldWhereOr(keys []string) string {
	if w := s.oldWhere(keys); w != "" {
		return w
	}
	return " WHERE " + s.keysText(keys)
}

func quoteAll(names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = quoteIdent(n)
	}
	return out
}

// scanSQL is the table's one scan for checks: each predicate is computed
// once per row (OFFSET 0 again), then counted and its first keys kept.
func (s *auditSide) scanSQL(checks []scanCheck) string {
	sel := []string{"count(*)"}
	inner := prefixed("m.", s.keyCols())
	var joins strings.Builder
	for i, c := range checks {
		inner = append(inner, fmt.Sprintf("coalesce(%s, false) AS tandem_b%d", c.pred, i))
		need := "NULL::text"
		if c.need != "" {
			inner = append(inner, fmt.Sprintf("CASE WHEN coalesce(%s, false) THEN %s END AS tandem_n%d", c.pred, c.need, i))
			need = fmt.Sprintf("max(x.tandem_n%d)::text", i)
		}
		sel = append(sel, fmt.Sprintf("count(*) FILTER (WHERE x.tandem_b%d)", i),
			fmt.Sprintf("coalesce((array_agg(%s) FILTER (WHERE x.tandem_b%d))[1:%d], '{}')", s.keyText("x"), i, auditExamples), need)
		joins.WriteString(c.join)
	}
	return fmt.Sprintf("SELECT %s FROM (SELECT %s FROM %s AS m%s OFFSET 0) AS x",
		strings.Join(sel, ", "), strings.Join(inner, ", "), s.from(), joins.String())
}

// scan runs the table's one scan. A check that old cannot plan (a CHECK
// calling a function old lacks) is left out and listed as unchecked.
func (s *auditSide) scan(ctx context.Context, conn *pgx.Conn, checks []scanCheck, a *Audit) error {
	if _, err := conn.Exec(ctx, "EXPLAIN "+s.scanSQL(checks)); err != nil {
		var kept []scanCheck
		for _, c := range checks {
			if _, err := conn.Exec(ctx, "EXPLAIN "+s.scanSQL([]scanCheck{c})); err != nil {
				what := c.rej.Reason + " " + c.rej.Column + c.rej.Constraint
				a.Unchecked = append(a.Unchecked, fmt.Sprintf("%s: old cannot evaluate it (%s): not audited", what, firstLine(err)))
				continue
			}
			kept = append(kept, c)
		}
		checks = kept
	}
	dest := []any{&a.Rows}
	counts := make([]int64, len(checks))
	keys := make([][]string, len(checks))
	needs := make([]*string, len(checks))
	for i := range checks {
		dest = append(dest, &counts[i], &keys[i], &needs[i])
	}
	if err := conn.QueryRow(ctx, s.scanSQL(checks)).Scan(dest...); err != nil {
		if ctx.Err() != nil || conn.IsClosed() {
			return fmt.Errorf("auditing %s on old: %w", s.old.name, err)
		}
		a.Unchecked = append(a.Unchecked, fmt.Sprintf("the scan failed on old (%s): the per-row reasons are not audited", firstLine(err)))
		return nil
	}
	for i, c := range checks {
		if counts[i] == 0 {
			continue
		}
		need := ""
		if needs[i] != nil {
			need = *needs[i]
		}
		r := c.rej
		r.Rows, r.Keys, r.Fix = counts[i], keys[i], c.fix(need, keys[i])
		a.Rejects = append(a.Rejects, r)
	}
	return nil
}

// unique checks one of new's unique indexes, unless old enforces it: old
// has a unique index on a subset of the same columns, passed through with
// the same types.
func (s *auditSide) unique(ctx context.Context, conn *pgx.Conn, u uniqueIdx, oldUniques []uniqueIdx, a *Audit) error {
	if u.partial || u.exprs {
		a.Unchecked = append(a.Unchecked, fmt.Sprintf("unique index %s is partial or on expressions: duplicates not audited", u.name))
		return nil
	}
	var from []string
	same := true
	for _, name := range u.cols {
		c := s.col(name)
		if c == nil || c.typed == "" {
			a.Unchecked = append(a.Unchecked, fmt.Sprintf("unique index %s: column %s is not filled from old or its values are not typed: duplicates not audited", u.name, name))
			return nil
		}
		if c.computed || c.srcType != c.newType {
			same = false
		}
		from = append(from, c.from)
	}
	if same {
		for _, o := range oldUniques {
			if !o.partial && !o.exprs && !o.invalid && (o.nullsNotDistinct || !u.nullsNotDistinct) && subset(o.cols, from) {
				return nil // old enforces it
			}
		}
	}
	cols := make([]string, len(u.cols))
	var notNull []string
	for i, c := range u.cols {
		cols[i] = "m." + quoteIdent(c)
		notNull = append(notNull, cols[i]+" IS NOT NULL")
	}
	v := cols[0] + "::text"
	if len(cols) > 1 {
		v = "ROW(" + strings.Join(cols, ", ") + ")::text"
	}
	where := " WHERE " + strings.Join(notNull, " AND ")
	if u.nullsNotDistinct {
		where = ""
	}
	q := fmt.Sprintf(`SELECT coalesce(sum(n - 1), 0)::int8, coalesce((array_agg(v ORDER BY v))[1:%d], '{}') FROM (
		SELECT %s AS v, count(*) AS n FROM %s AS m%s GROUP BY %s HAVING count(*) > 1) AS d`,
		auditExamples, v, s.fromCols(u.cols), where, strings.Join(cols, ", "))
	var n int64
	var vals []string
	if err := conn.QueryRow(ctx, q).Scan(&n, &vals); err != nil {
		if ctx.Err() != nil || conn.IsClosed() {
			return fmt.Errorf("auditing %s on old: %w", s.old.name, err)
		}
		a.Unchecked = append(a.Unchecked, fmt.Sprintf("unique index %s: the query failed on old (%s): duplicates not audited", u.name, firstLine(err)))
		return nil
	}
	if n > 0 {
		a.Rejects = append(a.Rejects, Reject{Reason: RejectDuplicate, Column: strings.Join(u.cols, ", "), Constraint: u.name, Rows: n, Keys: vals,
			Fix: fmt.Sprintf("drop or clean the duplicates on old: values %s of (%s)", strings.Join(vals, "; "), strings.Join(u.cols, ", "))})
	}
	return nil
}

func subset(a, b []string) bool {
	for _, x := range a {
		if !slices.Contains(b, x) {
			return false
		}
	}
	return len(a) > 0
}

// audit runs the data audit of every table in scope that exists on new and
// that old lets Tandem read, and adds a blocking reason per reject.
func (r *Report) audit(ctx context.Context, o Options, rd *reading, scoped map[string]bool, mapOf func(table.Name) Mapping) error {
	var pg16 bool
	if err := o.Old.QueryRow(ctx, "SELECT current_setting('server_version_num')::int >= 160000").Scan(&pg16); err != nil {
		return fmt.Errorf("old store: %w", err)
	}
	mapped := func(n table.Name) Mapping {
		m := mapOf(n)
		if m.New == (table.Name{}) {
			m.New = n
		}
		return m
	}
	byNew := map[table.Name]table.Name{}
	for _, n := range rd.oldCat.order {
		if scoped[n.String()] {
			byNew[mapped(n).New] = n
		}
	}
	sides := map[table.Name]*auditSide{}
	notes := map[table.Name][]string{}
	side := func(n table.Name) (*auditSide, error) {
		if s, ok := sides[n]; ok {
			return s, nil
		}
		m := mapped(n)
		old, new := rd.oldCat.tables[n], rd.newCat.tables[m.New]
		if old == nil || new == nil || !old.sel {
			sides[n] = nil
			return nil, nil
		}
		s, ns, err := newAuditSide(ctx, o.Old, old, new, m, pg16)
		if err != nil {
			return nil, err
		}
		sides[n], notes[n] = s, ns
		return s, nil
	}
	parents := func(newName table.Name) (*auditSide, error) {
		n, ok := byNew[newName]
		if !ok {
			return nil, nil
		}
		return side(n)
	}
	for i := range r.Tables {
		t := &r.Tables[i]
		n := rd.oldCat.order[slices.IndexFunc(rd.oldCat.order, func(n table.Name) bool { return n.String() == t.Name })]
		s, err := side(n)
		if err != nil {
			return err
		}
		if s == nil {
			continue
		}
		a, err := auditTable(ctx, auditInput{old: o.Old, new: o.New, side: s, notes: notes[n], parents: parents})
		if err != nil {
			return err
		}
		t.Audit = a
		for _, rej := range a.Rejects {
			t.reason(Blocked, "audit: %s", rej.describe())
		}
		for _, u := range a.Unchecked {
			t.reason(Attention, "audit: %s", u)
		}
	}
	return nil
}

// describe is the reject as one sentence, with its examples and fix.
func (rj Reject) describe() string {
	var what string
	switch rj.Reason {
	case RejectLength:
		what = fmt.Sprintf("too long for new's column %s", rj.Column)
	case RejectNull:
		what = fmt.Sprintf("NULL into new's NOT NULL column %s", rj.Column)
	case RejectCast:
		what = fmt.Sprintf("cannot be converted to the type of new's column %s", rj.Column)
	case RejectCheck:
		what = fmt.Sprintf("fail new's CHECK constraint %s", rj.Constraint)
	case RejectOrphan:
		what = fmt.Sprintf("have no parent for new's foreign key %s (%s)", rj.Constraint, rj.Column)
	case RejectDuplicate:
		return fmt.Sprintf("%d row(s) duplicate new's unique key %s (%s), which old does not enforce: %s", rj.Rows, rj.Constraint, rj.Column, rj.Fix)
	}
	return fmt.Sprintf("%d row(s) %s (keys %s): %s", rj.Rows, what, strings.Join(rj.Keys, "; "), rj.Fix)
}
