package table

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"github.com/tandemdb/tandem/internal/classify"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// defaultSchema is the schema RewriteRead gives an unqualified table name:
// it does not know the client's search_path.
const defaultSchema = "public"

// RewriteRead rewrites a read query written against the old store so that
// it reads the same rows from the new one, for shadow reads (design
// section 5): each mapped table name becomes its new name and each column
// reference its new column's name, qualified or not, through aliases. A
// selected column that is renamed keeps its old output name (`"mail" AS
// email`), so results compare column by column. The rewritten text is
// deparsed from the modified parse tree, so every identifier is quoted as
// needed.
//
// ok is false, with a reason for the shadow-read counters, when the query
// cannot be shadowed faithfully: it is not one plain SELECT (SELECT INTO,
// FOR UPDATE/SHARE and WITH are refused); it reads a table outside the
// scope or without a usable mapping; it touches a computed or dropped
// column ("touches computed column full_name"); a `*` would expand to other
// columns on the new table; a NATURAL join, a whole-row reference, or a
// column reference that cannot be attributed to one mapping. A query whose
// tables all map to themselves (or that reads no table) is returned
// unchanged.
//
// Unqualified table names are taken to be in schema public. RewriteRead is
// safe for concurrent use.
func (ms *Mappings) RewriteRead(sql string) (rewritten string, ok bool, reason string) {
	if classify.TooDeep(sql) {
		return "", false, "nested too deeply to parse safely"
	}
	tree, err := pg_query.Parse(sql)
	if err != nil {
		return "", false, "does not parse: " + err.Error()
	}
	if len(tree.Stmts) != 1 || tree.Stmts[0].GetStmt().GetSelectStmt() == nil {
		return "", false, "not a single SELECT"
	}
	r := &rewriter{ms: ms, refs: map[string][]tableRef{}, skip: map[*pg_query.ColumnRef]bool{},
		outputOf: map[*pg_query.ColumnRef]*pg_query.ResTarget{}}
	root := tree.Stmts[0].GetStmt().ProtoReflect()
	walkMessages(root, r.collect)
	if r.reason != "" {
		return "", false, r.reason
	}
	if !slices.ContainsFunc(r.tables, func(t tableRef) bool { return !t.m.Identity() }) {
		return sql, true, ""
	}
	walkMessages(root, r.rewrite)
	if r.reason != "" {
		return "", false, r.reason
	}
	for _, t := range r.tables {
		if t.composed != nil {
			continue // replaced whole by composeSplits
		}
		n := t.m.New.Name
		if t.rv.Schemaname != "" || n.Schema != defaultSchema {
			t.rv.Schemaname = n.Schema
		}
		t.rv.Relname = n.Table
	}
	if err := restrictNew(root, r.tables); err != nil {
		return "", false, err.Error()
	}
	if err := composeSplits(root, r.tables); err != nil {
		return "", false, err.Error()
	}
	out, err := pg_query.Deparse(tree)
	if err != nil {
		return "", false, "cannot deparse the rewritten query: " + err.Error()
	}
	return out, true, ""
}

// tableRef is one table a query reads: its RangeVar and its mapping.
type tableRef struct {
	rv *pg_query.RangeVar
	m  *Mapping // nil for a FROM item that is not a table (a subquery, a function)
	// composed is set for a split old table: the reference is replaced by
	// the subquery that composes the old rows from the parts (splitRows),
	// whose columns keep their old names.
	composed *composedRows
}

// composedRows is the old rows of a split table as the new store can give
// them back: the owner's table left-joined to every dependent's on the key,
// each old column read from the first part that passes it through.
type composedRows struct {
	sql  string          // SELECT ... FROM owner LEFT JOIN ... (no alias)
	cols map[string]bool // the old columns it has
	all  bool            // it has every old column, in the old order
}

// splitRows composes the old rows of the split whose owner is m. A column
// that no part passes through unchanged (computed, or dropped) is left out,
// and a read of it is not shadowed. A user outside a dependent's where has
// no row in its table: its columns read as NULL, as the reverse write
// leaves them (design section 6).
func splitRows(m *Mapping) *composedRows {
	parts := m.Parts()
	c := &composedRows{cols: map[string]bool{}, all: true}
	var sel []string
	for _, col := range m.Old.Columns {
		found := false
		for i, p := range parts {
			if t := p.fwd.passFrom(col.Name); t != nil {
				sel = append(sel, "p"+strconv.Itoa(i)+"."+quoteIdent(p.New.Columns[t.col].Name)+" AS "+quoteIdent(col.Name))
				c.cols[col.Name], found = true, true
				break
			}
		}
		if !found {
			c.all = false
		}
	}
	_, ownerKey, _ := m.fwd.keyPairs()
	var b strings.Builder
	b.WriteString("SELECT " + strings.Join(sel, ", ") + " FROM " + m.New.Name.Quoted() + " p0")
	for i, p := range parts[1:] {
		_, key, _ := p.fwd.keyPairs() // every part carries the old key, column for column
		alias := "p" + strconv.Itoa(i+1)
		b.WriteString(" LEFT JOIN " + p.New.Name.Quoted() + " " + alias + " ON " + keyTuple(alias, key) + " = " + keyTuple("p0", ownerKey))
	}
	c.sql = b.String()
	return c
}

type rewriter struct {
	ms     *Mappings
	tables []tableRef
	// refs are the FROM items by the name a column reference qualifies
	// them with: an alias, or a table's own name.
	refs map[string][]tableRef
	// skip are ORDER BY references that name output columns, not table
	// columns; outputOf is the unnamed select-list entry a column
	// reference makes up alone.
	skip     map[*pg_query.ColumnRef]bool
	outputOf map[*pg_query.ColumnRef]*pg_query.ResTarget
	reason   string // the first reason the query cannot be rewritten
}

func (r *rewriter) fail(format string, args ...any) {
	if r.reason == "" {
		r.reason = fmt.Sprintf(format, args...)
	}
}

// collect finds the query's tables and aliases, and refuses the shapes
// RewriteRead does not shadow.
func (r *rewriter) collect(msg protoreflect.Message) {
	switch x := msg.Interface().(type) {
	case *pg_query.SelectStmt:
		switch {
		case x.IntoClause != nil:
			r.fail("SELECT INTO writes")
		case len(x.LockingClause) > 0:
			r.fail("locks rows (FOR UPDATE/SHARE)")
		case x.WithClause != nil:
			r.fail("has a WITH clause")
		}
		explicit := map[string]bool{}
		for _, t := range x.TargetList {
			rt := t.GetResTarget()
			if rt == nil {
				continue
			}
			if rt.Name != "" {
				explicit[rt.Name] = true
			} else if cr := rt.GetVal().GetColumnRef(); cr != nil {
				r.outputOf[cr] = rt
			}
		}
		setOp := x.Op != pg_query.SetOperation_SETOP_NONE && x.Op != pg_query.SetOperation_SET_OPERATION_UNDEFINED
		for _, s := range x.SortClause {
			cr := s.GetSortBy().GetNode().GetColumnRef()
			if cr == nil || len(cr.Fields) != 1 || cr.Fields[0].GetString_() == nil {
				continue
			}
			// ORDER BY name means the output column of that name first;
			// after a UNION it can mean nothing else.
			if setOp || explicit[cr.Fields[0].GetString_().Sval] {
				r.skip[cr] = true
			}
		}
	case *pg_query.RangeVar:
		if x.Catalogname != "" {
			r.fail("names a database in %s.%s.%s", x.Catalogname, x.Schemaname, x.Relname)
			return
		}
		n := Name{Schema: x.Schemaname, Table: x.Relname}
		if n.Schema == "" {
			n.Schema = defaultSchema
		}
		m := r.ms.ForOld(n)
		switch {
		case m == nil && r.ms.InScope(n):
			r.fail("table %s has no usable mapping", n)
			return
		case m == nil:
			r.fail("table %s is not in the migration's scope", n)
			return
		}
		if m.MergeMember() {
			// Its rows are those of the new table where one of its columns
			// is not NULL; an old row with all of them NULL has none there.
			r.fail("table %s is merged into %s, which holds only its rows with a column not NULL: a read of a merged table other than its owner is not shadowed", n, m.New.Name)
			return
		}
		if m.Where() != "" {
			// The new table holds only the rows of the predicate: a read of
			// the old table would have rows the new one lacks.
			r.fail("table %s maps only the rows of its where predicate to %s", n, m.New.Name)
			return
		}
		t := tableRef{rv: x, m: m}
		if m.Split() {
			if x.Alias != nil && len(x.Alias.Colnames) > 0 {
				r.fail("renames the columns of split table %s in its alias", n)
				return
			}
			t.composed = splitRows(m)
		}
		r.tables = append(r.tables, t)
		name := x.Relname
		if x.Alias != nil {
			name = x.Alias.Aliasname
		}
		r.refs[name] = append(r.refs[name], t)
	case *pg_query.RangeSubselect:
		r.other(x.Alias)
	case *pg_query.RangeFunction:
		r.other(x.Alias)
	case *pg_query.RangeTableFunc:
		r.other(x.Alias)
	case *pg_query.JoinExpr:
		r.other(x.Alias)
		r.other(x.JoinUsingAlias)
	}
}

// other records a FROM item that is not a table under its alias.
func (r *rewriter) other(a *pg_query.Alias) {
	if a != nil {
		r.refs[a.Aliasname] = append(r.refs[a.Aliasname], tableRef{})
	}
}

// rewrite renames the column references (and the qualifiers that name a
// renamed table) and the join columns of USING.
func (r *rewriter) rewrite(msg protoreflect.Message) {
	if r.reason != "" {
		return
	}
	switch x := msg.Interface().(type) {
	case *pg_query.JoinExpr:
		if x.IsNatural {
			r.fail("has a NATURAL join")
			return
		}
		for _, u := range x.UsingClause {
			if s := u.GetString_(); s != nil {
				if nn, found := r.resolve(s.Sval, r.tables); found {
					s.Sval = nn
				}
			}
		}
	case *pg_query.ColumnRef:
		if !r.skip[x] {
			r.columnRef(x)
		}
	}
}

func (r *rewriter) columnRef(cr *pg_query.ColumnRef) {
	var parts []*pg_query.String // the qualifier's parts
	for _, f := range cr.Fields[:len(cr.Fields)-1] {
		s := f.GetString_()
		if s == nil {
			r.fail("has a column reference it cannot read")
			return
		}
		parts = append(parts, s)
	}
	last := cr.Fields[len(cr.Fields)-1]
	star := last.GetAStar() != nil
	col := last.GetString_()
	if !star && col == nil {
		r.fail("has a column reference it cannot read")
		return
	}

	var cands []tableRef
	switch len(parts) {
	case 0:
		cands = r.tables
	case 1:
		cands = r.refs[parts[0].Sval]
		if len(cands) == 0 {
			return // an outer query's or unknown: Postgres decides
		}
		if len(cands) > 1 && slices.ContainsFunc(cands[1:], func(t tableRef) bool { return t.m != cands[0].m }) {
			r.fail("qualifier %q names more than one FROM item", parts[0].Sval)
			return
		}
		if cands[0].m == nil {
			return // a subquery's or function's column
		}
		if cands[0].rv.Alias == nil && cands[0].composed == nil { // a composed table keeps its old name as its alias
			parts[0].Sval = cands[0].m.New.Name.Table
		}
		cands = cands[:1]
	case 2:
		n := Name{Schema: parts[0].Sval, Table: parts[1].Sval}
		i := slices.IndexFunc(r.tables, func(t tableRef) bool { return t.m.Old.Name == n && t.rv.Alias == nil })
		if i < 0 {
			return
		}
		cands = r.tables[i : i+1]
		if cands[0].composed != nil {
			r.fail("qualifies a column of split table %s with its schema", n)
			return
		}
		parts[0].Sval, parts[1].Sval = cands[0].m.New.Name.Schema, cands[0].m.New.Name.Table
	default:
		r.fail("has a column reference with a database name")
		return
	}

	if star {
		for _, t := range cands {
			if t.composed != nil && !t.composed.all {
				r.fail("* expands to columns of %s that no part of its split passes through unchanged", t.m.Old.Name)
				return
			}
			if t.composed == nil && !sameStar(t.m) {
				r.fail("* expands to other columns on %s", t.m.New.Name)
				return
			}
		}
		return
	}
	nn, found := r.resolve(col.Sval, cands)
	switch {
	case r.reason != "":
		return
	case found:
		if nn != col.Sval {
			if rt := r.outputOf[cr]; rt != nil {
				rt.Name = col.Sval // keep the output column's name
			}
			col.Sval = nn
		}
	case len(parts) == 0:
		for _, t := range r.refs[col.Sval] {
			if t.m != nil && !t.m.Identity() {
				r.fail("reads the whole row of %s", t.m.Old.Name)
				return
			}
		}
		for _, t := range cands {
			if _, ok := t.m.New.Column(col.Sval); ok && !t.m.Identity() {
				r.fail("column %q is not a column of %s but is one of %s", col.Sval, t.m.Old.Name, t.m.New.Name)
				return
			}
		}
		// An output column's name, a function's column or an outer
		// reference: left alone.
	}
}

// resolve returns the new name of the old column col of the tables cands
// (found is false when none has it). It fails the rewrite when the column
// has no new counterpart, or when tables that have it disagree on its new
// name.
func (r *rewriter) resolve(col string, cands []tableRef) (newName string, found bool) {
	for _, t := range cands {
		if t.m == nil {
			continue
		}
		if _, ok := t.m.Old.Column(col); !ok {
			continue
		}
		if t.composed != nil && t.composed.cols[col] {
			nn := col // the composed rows keep the old names
			if found && nn != newName {
				r.fail("column %q is ambiguous: it is renamed differently in the tables read", col)
				return "", false
			}
			newName, found = nn, true
			continue
		}
		nn, why := t.m.newColumn(col)
		if why != "" {
			r.fail("%s", why)
			return "", false
		}
		if found && nn != newName {
			r.fail("column %q is ambiguous: it is renamed differently in the tables read", col)
			return "", false
		}
		newName, found = nn, true
	}
	return newName, found
}

// newColumn returns the new column the old column col passes to, or why it
// has none.
func (m *Mapping) newColumn(col string) (string, string) {
	if t := m.fwd.passFrom(col); t != nil {
		return m.New.Columns[t.col].Name, ""
	}
	for _, t := range m.fwd.targets {
		if t.src == "" && slices.Contains(t.refs, col) {
			return "", fmt.Sprintf("touches computed column %s", m.New.Columns[t.col].Name)
		}
	}
	if slices.Contains(m.decl.Drop, col) {
		return "", fmt.Sprintf("touches dropped column %s", col)
	}
	if m.Split() {
		// A read of a split table reads the old rows composed from the
		// parts; a column no part passes through is not among them.
		for _, p := range m.Parts() {
			if p.carried[col] {
				return "", fmt.Sprintf("touches column %s, which the split of %s computes in %s: a read of a split table is shadowed only when every column it reads passes through a part unchanged",
					col, m.Old.Name, p.New.Name)
			}
		}
	}
	return "", fmt.Sprintf("touches column %s, which %s does not have", col, m.New.Name)
}

// sameStar reports whether * over the old table expands to the same
// columns, in the same order, as over the new one (renamed or not).
func sameStar(m *Mapping) bool {
	if m.Identity() {
		return true
	}
	if len(m.Old.Columns) != len(m.New.Columns) {
		return false
	}
	for i, c := range m.Old.Columns {
		t := m.fwd.passFrom(c.Name)
		if t == nil || t.col != i {
			return false
		}
	}
	return true
}

// restrictNew replaces, in the tree under root, each table of tables whose
// mapping has a discriminator by the subquery of its rows on new:
// `orders AS o` becomes `(SELECT * FROM orders WHERE tenant = 'shop') AS o`,
// so a shadow read of one deployment's old table reads only its own rows of
// the shared new one (design section 6).
func restrictNew(root protoreflect.Message, tables []tableRef) error {
	return replaceTables(root, tables, "restrict it to its discriminator", func(t tableRef) string {
		if t.m.NewWhere() == "" {
			return ""
		}
		return "SELECT * FROM " + t.m.New.Name.Quoted() + " WHERE " + t.m.NewWhere()
	})
}

// composeSplits replaces, in the tree under root, each split table of
// tables by the subquery of its old rows composed from its parts:
// `users AS u` becomes `(SELECT p0.id AS id, ..., p1.bio AS bio FROM
// accounts p0 LEFT JOIN profiles p1 ON (p1.user_id) = (p0.id)) AS u`, and
// the query's column references, left with their old names, read it.
func composeSplits(root protoreflect.Message, tables []tableRef) error {
	return replaceTables(root, tables, "compose its rows from the split's parts", func(t tableRef) string {
		if t.composed == nil {
			return ""
		}
		return t.composed.sql
	})
}

// replaceTables replaces, in the tree under root, each reference of tables
// for which sub gives a query ("" leaves it) by that query as a subquery
// under the reference's alias (or its table name); what names the step in
// an error.
func replaceTables(root protoreflect.Message, tables []tableRef, what string, sub func(tableRef) string) error {
	var err error
	walkMessages(root, func(msg protoreflect.Message) {
		n, ok := msg.Interface().(*pg_query.Node)
		if !ok || err != nil {
			return
		}
		rv := n.GetRangeVar()
		if rv == nil {
			return
		}
		i := slices.IndexFunc(tables, func(t tableRef) bool { return t.rv == rv })
		if i < 0 {
			return
		}
		q := sub(tables[i])
		if q == "" {
			return
		}
		alias := rv.Relname
		if rv.Alias != nil {
			alias = rv.Alias.Aliasname
		}
		var tree *pg_query.ParseResult
		if tree, err = pg_query.Parse("SELECT * FROM (" + q + ") AS " + quoteIdent(alias)); err != nil {
			err = fmt.Errorf("cannot %s (%s): %w", what, tables[i].m.Old.Name, err)
			return
		}
		n.Node = tree.Stmts[0].GetStmt().GetSelectStmt().FromClause[0].Node
	})
	return err
}
