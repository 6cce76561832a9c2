package plan

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// scanCheck is one per-row reason in the table's scan.
type scanCheck struct {
	rej  Reject
	pred string // SQL over the scan's row m: true when new rejects the row
	need string // an aggregate input (max) for the fix, or ""
	join string // a LEFT JOIN the predicate needs, or ""
	// flagged: pred is a column's cast or length flag, which the scan's
	// sieve tests first (auditSide.flags).
	flagged bool
	fix     func(need string, keys []string) string
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
			out = append(out, scanCheck{rej: Reject{Reason: RejectLength, Column: c.name}, pred: fmt.Sprintf("m.tandem_l%d", slices.Index(s.cols, c)), flagged: true,
				need: strings.ReplaceAll(c.need, "$v", v), fix: func(need string, _ []string) string {
					return fmt.Sprintf("%s, or shorten those values (%s) on old", widen(c.name, c.newType, need), origin)
				}})
		}
		if c.cast != "" {
			out = append(out, scanCheck{rej: Reject{Reason: RejectCast, Column: c.name}, pred: fmt.Sprintf("m.tandem_c%d", slices.Index(s.cols, c)), flagged: true,
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
			strings.Join(sel, ", "), p.fromCols(fk.refs, ""), strings.Join(notNull, " AND "), alias, strings.Join(on, " AND "))
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

// scanSQL is the table's one scan for checks, as one row: the rows (their
// count(*), an InitPlan), then per check the rows that fail it, the
// largest value its fix needs, and the ctids of the first and the last of
// those rows (where examplesSQL starts and stops).
//
// A sieve keeps the rows that may fail a check, and only those are
// grouped by their outcomes (one group per combination that occurs), so
// that each predicate is a grouping expression, computed once per kept
// row, and the aggregates' FILTERs reuse it. A clean row costs the sieve
// alone: each column's cast and length flags; where none is set, the NULL
// checks and new's CHECKs over the typed values unguarded (equal to the
// guarded ones there, without computing the flags and a computed value
// once more for the guard); and the foreign keys' hash probes. The sieve
// keeps every row that fails a check: a flagged row is kept, and an
// unflagged row fails a CHECK exactly when its unguarded values do. Both
// the sieve and the grouping run with parallel workers and partial
// aggregation where the table is large enough.
func (s *auditSide) scanSQL(checks []scanCheck) string {
	var inner, group, groupSel, sel, others, fks []string
	for i, c := range checks {
		b := fmt.Sprintf("tandem_b%d", i)
		inner = append(inner, fmt.Sprintf("coalesce(%s, false) AS %s", c.pred, b))
		group, groupSel = append(group, "x."+b), append(groupSel, "x."+b)
		need := "NULL::text"
		if c.need != "" {
			inner = append(inner, fmt.Sprintf("%s AS tandem_n%d", c.need, i))
			groupSel = append(groupSel, fmt.Sprintf("max(x.tandem_n%d) FILTER (WHERE x.%s) AS tandem_n%d", i, b, i))
			need = fmt.Sprintf("(max(g.tandem_n%d) FILTER (WHERE g.%s))::text", i, b)
		}
		sel = append(sel, fmt.Sprintf("coalesce(sum(g.tandem_rows) FILTER (WHERE g.%s), 0)::int8", b), need,
			fmt.Sprintf("(min(g.tandem_first) FILTER (WHERE g.%s))::text", b), fmt.Sprintf("(max(g.tandem_last) FILTER (WHERE g.%s))::text", b))
		switch {
		case c.join != "":
			fks = append(fks, "coalesce("+c.pred+", false)")
		case !c.flagged:
			others = append(others, "coalesce("+c.pred+", false)")
		}
	}
	sieve := "false"
	if len(others) > 0 {
		sieve = strings.Join(others, " OR ")
	}
	if f := s.flags(); f != "" {
		sieve = fmt.Sprintf("CASE WHEN %s THEN true ELSE %s END", f, sieve)
	}
	var joins strings.Builder
	for _, c := range checks {
		joins.WriteString(c.join)
	}
	grouped := fmt.Sprintf("SELECT %s FROM (SELECT m.tandem_t%s FROM %s AS m%s WHERE %s) AS x",
		strings.Join(append(groupSel, "count(*) AS tandem_rows", "min(x.tandem_t) AS tandem_first", "max(x.tandem_t) AS tandem_last"), ", "),
		prefixComma(inner), s.fromCols(nil, sieve), joins.String(), strings.Join(append([]string{"m.tandem_s"}, fks...), " OR "))
	if len(group) > 0 {
		grouped += " GROUP BY " + strings.Join(group, ", ")
	}
	return fmt.Sprintf("SELECT (%s)::int8%s FROM (%s) AS g", s.countSQL(), prefixComma(sel), grouped)
}

// examplesSQL reads up to auditExamples keys of rows that fail c, between
// the ctids $1 and $2 of the first and the last that the scan found: a TID
// range scan that starts at the first and stops at the last it needs (the
// rows may have moved since the scan: then it finds fewer).
func (s *auditSide) examplesSQL(c scanCheck) string {
	return fmt.Sprintf("SELECT %s FROM (SELECT m.tandem_t, %s, coalesce(%s, false) AS tandem_b FROM %s AS m%s) AS x"+
		" WHERE x.tandem_t >= $1::tid AND x.tandem_t <= $2::tid AND x.tandem_b LIMIT %d",
		s.keyText("x"), strings.Join(prefixed("m.", s.keyCols()), ", "), c.pred, s.from(), c.join, auditExamples)
}

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
	needs := make([]*string, len(checks))
	first, last := make([]*string, len(checks)), make([]*string, len(checks))
	for i := range checks {
		dest = append(dest, &counts[i], &needs[i], &first[i], &last[i])
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
		keys := []string{}
		if first[i] != nil && last[i] != nil {
			rows, err := conn.Query(ctx, s.examplesSQL(c), *first[i], *last[i])
			if err != nil {
				return fmt.Errorf("auditing %s on old: %w", s.old.name, err)
			}
			if keys, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
				return fmt.Errorf("auditing %s on old: %w", s.old.name, err)
			}
		}
		r := c.rej
		r.Rows, r.Keys, r.Fix = counts[i], keys, c.fix(need, keys)
		a.Rejects = append(a.Rejects, r)
	}
	return nil
}

// uniqueCheck is the query for one of new's unique indexes that old does
// not enforce.
type uniqueCheck struct {
	idx uniqueIdx
	sql string
}

// uniqueCheck builds the query for one of new's unique indexes, unless
// old enforces it (old has a unique index on a subset of the same columns,
// passed through with the same types) or it cannot be audited (noted in
// a): then ok is false. With byteSort (no collation of old's is
// nondeterministic) its text columns are grouped under COLLATE "C", the
// same groups, so that the GROUP BY can sort them by bytes: the audit runs
// it with enable_hashagg off, since sorting 1M short text keys by bytes
// costs about 0.6 s of CPU and hashing them about 1.0 s (docs/benchmarks.md).
func (s *auditSide) uniqueCheck(u uniqueIdx, oldUniques []uniqueIdx, byteSort bool, a *Audit) (uc uniqueCheck, ok bool) {
	if u.partial || u.exprs {
		a.Unchecked = append(a.Unchecked, fmt.Sprintf("unique index %s is partial or on expressions: duplicates not audited", u.name))
		return uc, false
	}
	var from []string
	same := true
	for _, name := range u.cols {
		c := s.col(name)
		if c == nil || c.typed == "" {
			a.Unchecked = append(a.Unchecked, fmt.Sprintf("unique index %s: column %s is not filled from old or its values are not typed: duplicates not audited", u.name, name))
			return uc, false
		}
		if c.computed || c.srcType != c.newType {
			same = false
		}
		from = append(from, c.from)
	}
	if same {
		for _, o := range oldUniques {
			if !o.partial && !o.exprs && !o.invalid && (o.nullsNotDistinct || !u.nullsNotDistinct) && subset(o.cols, from) {
				return uc, false // old enforces it
			}
		}
	}
	cols := make([]string, len(u.cols))
	var notNull []string
	for i, c := range u.cols {
		cols[i] = "m." + quoteIdent(c)
		notNull = append(notNull, cols[i]+" IS NOT NULL")
		if d := parseType(s.col(c).newType); byteSort && d.dims == 0 && stringType[d.base] {
			cols[i] = "(" + cols[i] + ` COLLATE "C")`
		}
	}
	v := cols[0] + "::text"
	if len(cols) > 1 {
		v = "ROW(" + strings.Join(cols, ", ") + ")::text"
	}
	where := " WHERE " + strings.Join(notNull, " AND ")
	if u.nullsNotDistinct {
		where = ""
	}
	q := fmt.Sprintf(`SELECT coalesce(sum(n - 1), 0)::int8, coalesce((array_agg(v ORDER BY v COLLATE "default"))[1:%d], '{}') FROM (
		SELECT %s AS v, count(*) AS n FROM %s AS m%s GROUP BY %s HAVING count(*) > 1) AS d`,
		auditExamples, v, s.fromCols(u.cols, ""), where, strings.Join(cols, ", "))
	return uniqueCheck{idx: u, sql: q}, true
}

// unique runs the query of a unique index on conn, and adds its reject
// (or why it could not run) to a.
func (s *auditSide) unique(ctx context.Context, conn *pgx.Conn, uc uniqueCheck, a *Audit) error {
	u := uc.idx
	var n int64
	var vals []string
	if err := conn.QueryRow(ctx, uc.sql).Scan(&n, &vals); err != nil {
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
