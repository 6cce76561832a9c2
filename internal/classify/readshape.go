package classify

import (
	"fmt"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// SortKey is one top-level ORDER BY key as an output column: Pos (1-based)
// when > 0, else Name (the output column name it refers to).
type SortKey struct {
	Name string
	Pos  int
}

// ReadShape says whether a read's results can be compared between two
// stores, and how. Shapes are shared between callers and must not be
// modified.
type ReadShape struct {
	Comparable bool
	Reason     string    // when !Comparable: why, short and specific ("volatile function random()", "LIMIT without ORDER BY", ...)
	Ordered    bool      // top-level ORDER BY
	SortKeys   []SortKey // nil when some key is not an output column (then the comparer falls back to a multiset)
	Limited    bool      // top-level LIMIT/FETCH FIRST (not LIMIT ALL or LIMIT NULL)
	Offset     bool      // top-level OFFSET (not OFFSET NULL)
}

// readShapeLimit bounds ShapeOf's cache.
const readShapeLimit = 4096

var readShapes textCache[*ReadShape]

// ShapeOf analyses sql (one statement) for the shadow-read comparer: whether
// its results can be compared between two stores at all (a single plain
// SELECT, without values that differ between stores or runs, without system
// columns or catalogs, without order-dependent results), and if so whether
// and by what the result is ordered. Results are cached by text in a
// bounded cache safe for concurrent use; the same text yields the same
// *ReadShape while it stays cached. The returned value must not be
// modified.
func ShapeOf(sql string) *ReadShape {
	if s, current, ok := readShapes.get(sql); current {
		return s
	} else if ok {
		return readShapes.put(sql, s, readShapeLimit) // promote from the old generation
	}
	return readShapes.put(sql, readShape(sql), readShapeLimit)
}

func refuse(format string, args ...any) *ReadShape {
	return &ReadShape{Reason: fmt.Sprintf(format, args...)}
}

func readShape(sql string) *ReadShape {
	if strings.IndexByte(sql, 0) >= 0 {
		return refuse("query text contains a NUL byte")
	}
	if TooDeep(sql) {
		return refuse("nested too deeply")
	}
	tree, err := pg_query.Parse(sql)
	if err != nil {
		return refuse("does not parse: %v", err)
	}
	if len(tree.Stmts) != 1 {
		return refuse("not a single SELECT")
	}
	top := tree.Stmts[0].GetStmt().GetSelectStmt()
	if top == nil {
		return refuse("not a single SELECT")
	}

	w := &shapeWalker{windows: map[string][]*pg_query.WindowDef{}, top: top}
	w.walk(top.ProtoReflect())
	if w.reason == "" {
		w.checkWindows()
	}
	if w.reason != "" {
		return &ReadShape{Reason: w.reason}
	}

	s := &ReadShape{
		Comparable: true,
		Ordered:    len(top.SortClause) > 0,
		Limited:    !isNullConst(top.LimitCount),
		Offset:     !isNullConst(top.LimitOffset),
	}
	switch {
	case s.Limited && !s.Ordered:
		s.Comparable, s.Reason = false, "LIMIT without ORDER BY"
	case s.Offset && !s.Ordered:
		s.Comparable, s.Reason = false, "OFFSET without ORDER BY"
	case distinctOnUnordered(top):
		s.Comparable, s.Reason = false, "DISTINCT ON without ORDER BY"
	}
	if s.Comparable && s.Ordered {
		s.SortKeys = sortKeys(top)
	}
	return s
}

// isNullConst reports an absent LIMIT/OFFSET expression, or one that is a
// NULL constant (LIMIT ALL parses as one).
func isNullConst(n *pg_query.Node) bool {
	if n == nil || n.GetNode() == nil {
		return true
	}
	c := n.GetAConst()
	return c != nil && c.Isnull
}

// distinctOnUnordered reports a DISTINCT ON without ORDER BY in the
// top-level SELECT or, for a set operation, in a branch that is not a
// subquery (a branch with its own ORDER BY is fine).
func distinctOnUnordered(s *pg_query.SelectStmt) bool {
	if s == nil || len(s.SortClause) > 0 {
		return false
	}
	if s.Op != pg_query.SetOperation_SETOP_NONE {
		return distinctOnUnordered(s.Larg) || distinctOnUnordered(s.Rarg)
	}
	for _, n := range s.DistinctClause {
		if n != nil && n.GetNode() != nil { // plain DISTINCT is one empty node
			return true
		}
	}
	return false
}

// volatileFunctions differ between stores or between runs (matched on the
// last part of the name, lower-case). age is handled apart: only its
// one-argument form reads the clock.
var volatileFunctions = setOf(`
random gen_random_uuid uuid_generate_v4 now clock_timestamp statement_timestamp transaction_timestamp
timeofday pg_backend_pid inet_server_addr inet_server_port inet_client_addr inet_client_port
pg_postmaster_start_time version pg_relation_size pg_total_relation_size pg_table_size pg_indexes_size
pg_database_size pg_column_size txid_current txid_current_snapshot pg_current_xact_id pg_current_snapshot
pg_current_wal_lsn nextval currval lastval setval pg_sleep
`)

// orderedAggregates give a result that depends on the order of their input.
var orderedAggregates = setOf(`
array_agg string_agg json_agg jsonb_agg json_object_agg jsonb_object_agg xmlagg
`)

// orderedWindowFunctions give a result that depends on the window's order.
var orderedWindowFunctions = setOf(`
first_value last_value nth_value row_number rank dense_rank lag lead ntile
`)

var systemColumns = setOf(`ctid xmin xmax cmin cmax tableoid`)

var catalogSchemas = setOf(`pg_catalog information_schema pg_toast`)

// volatileLiterals are the special date/time input strings that read the
// clock when cast ('now'::timestamptz, date 'today').
var volatileLiterals = setOf(`now today tomorrow yesterday`)

func setOf(words string) map[string]bool {
	m := map[string]bool{}
	for _, w := range strings.Fields(words) {
		m[w] = true
	}
	return m
}

var svfNames = map[pg_query.SQLValueFunctionOp]string{
	pg_query.SQLValueFunctionOp_SVFOP_CURRENT_DATE:        "CURRENT_DATE",
	pg_query.SQLValueFunctionOp_SVFOP_CURRENT_TIME:        "CURRENT_TIME",
	pg_query.SQLValueFunctionOp_SVFOP_CURRENT_TIME_N:      "CURRENT_TIME",
	pg_query.SQLValueFunctionOp_SVFOP_CURRENT_TIMESTAMP:   "CURRENT_TIMESTAMP",
	pg_query.SQLValueFunctionOp_SVFOP_CURRENT_TIMESTAMP_N: "CURRENT_TIMESTAMP",
	pg_query.SQLValueFunctionOp_SVFOP_LOCALTIME:           "LOCALTIME",
	pg_query.SQLValueFunctionOp_SVFOP_LOCALTIME_N:         "LOCALTIME",
	pg_query.SQLValueFunctionOp_SVFOP_LOCALTIMESTAMP:      "LOCALTIMESTAMP",
	pg_query.SQLValueFunctionOp_SVFOP_LOCALTIMESTAMP_N:    "LOCALTIMESTAMP",
}

var lockNames = map[pg_query.LockClauseStrength]string{
	pg_query.LockClauseStrength_LCS_FORKEYSHARE:    "FOR KEY SHARE",
	pg_query.LockClauseStrength_LCS_FORSHARE:       "FOR SHARE",
	pg_query.LockClauseStrength_LCS_FORNOKEYUPDATE: "FOR NO KEY UPDATE",
	pg_query.LockClauseStrength_LCS_FORUPDATE:      "FOR UPDATE",
}

// shapeWalker walks a whole statement tree for what makes a read
// incomparable; reason is the first found.
type shapeWalker struct {
	reason string
	top    *pg_query.SelectStmt          // the statement itself: its LIMIT is judged with its ORDER BY
	exists map[*pg_query.SelectStmt]bool // subqueries of EXISTS: their LIMIT does not matter
	// windows holds the named windows of every WINDOW clause (by name, all
	// definitions of a name across subqueries); over the window functions
	// whose OVER clause has no ORDER BY of its own, checked after the walk.
	windows map[string][]*pg_query.WindowDef
	over    []pendingWindow
}

type pendingWindow struct {
	desc string // e.g. "row_number() over an unordered window"
	def  *pg_query.WindowDef
}

func (w *shapeWalker) walk(m protoreflect.Message) {
	if w.reason != "" {
		return
	}
	w.visit(m)
	if w.reason != "" {
		return
	}
	eachChild(m, func(child protoreflect.Message) bool {
		w.walk(child)
		return w.reason == ""
	})
}

func (w *shapeWalker) visit(m protoreflect.Message) {
	switch n := m.Interface().(type) {
	case *pg_query.SelectStmt:
		if n.IntoClause != nil {
			w.reason = "SELECT INTO"
		}
		if n != w.top && !w.exists[n] && len(n.SortClause) == 0 && (!isNullConst(n.LimitCount) || !isNullConst(n.LimitOffset)) {
			// Which rows a nested LIMIT keeps is up to each store's plan.
			w.reason = "LIMIT or OFFSET without ORDER BY in a subquery"
		}
		for _, d := range n.WindowClause {
			if def := d.GetWindowDef(); def != nil && def.Name != "" {
				w.windows[def.Name] = append(w.windows[def.Name], def)
			}
		}
	case *pg_query.SubLink:
		// EXISTS (... LIMIT 1) is true or false whichever rows it keeps.
		if n.SubLinkType == pg_query.SubLinkType_EXISTS_SUBLINK {
			if sel := n.Subselect.GetSelectStmt(); sel != nil {
				if w.exists == nil {
					w.exists = map[*pg_query.SelectStmt]bool{}
				}
				w.exists[sel] = true
			}
		}
	case *pg_query.IntoClause:
		w.reason = "SELECT INTO"
	case *pg_query.LockingClause:
		name := lockNames[n.Strength]
		if name == "" {
			name = "FOR UPDATE/SHARE"
		}
		w.reason = "locking clause " + name
	case *pg_query.InsertStmt, *pg_query.UpdateStmt, *pg_query.DeleteStmt, *pg_query.MergeStmt:
		w.reason = "data-modifying CTE"
	case *pg_query.FuncCall:
		w.funcCall(n)
	case *pg_query.SQLValueFunction:
		if name := svfNames[n.Op]; name != "" {
			w.reason = "volatile function " + name
		}
	case *pg_query.TypeCast:
		if c := n.GetArg().GetAConst(); c != nil && !c.Isnull && dateTimeType(n.TypeName) {
			if s := c.GetSval(); s != nil && volatileLiterals[strings.ToLower(strings.TrimSpace(s.Sval))] {
				w.reason = fmt.Sprintf("volatile literal '%s'", strings.TrimSpace(s.Sval))
			}
		}
	case *pg_query.ColumnRef:
		if f := n.Fields; len(f) > 0 {
			if s := f[len(f)-1].GetString_(); s != nil && systemColumns[strings.ToLower(s.Sval)] {
				w.reason = "system column " + s.Sval
			}
		}
	case *pg_query.RangeVar:
		schema := strings.ToLower(n.Schemaname)
		switch {
		case catalogSchemas[schema]:
			w.reason = "reads system catalog " + n.Schemaname + "." + n.Relname
		case schema == "" && strings.HasPrefix(strings.ToLower(n.Relname), "pg_"):
			w.reason = "reads system catalog " + n.Relname
		}
	case *pg_query.RangeTableSample:
		w.reason = "TABLESAMPLE"
	case *pg_query.JsonArrayAgg:
		if c := n.Constructor; c != nil {
			w.aggregate("json_arrayagg without ORDER BY", len(c.AggOrder) > 0, c.Over)
		}
	case *pg_query.JsonObjectAgg:
		if c := n.Constructor; c != nil { // no ORDER BY of its own; json keeps key order, duplicates make jsonb's order matter
			w.aggregate("json_objectagg without ORDER BY", false, c.Over)
		}
	}
}

// aggregate checks an aggregate whose result depends on its input order:
// it needs an ORDER BY of its own or, as a window aggregate, an ordered
// window.
func (w *shapeWalker) aggregate(reason string, ordered bool, over *pg_query.WindowDef) {
	switch {
	case ordered || windowOrdered(over):
	case over != nil:
		w.over = append(w.over, pendingWindow{reason, over}) // may name an ordered window
	default:
		w.reason = reason
	}
}

// dateTimeType reports a date or time type, the types whose input reads
// the special strings 'now', 'today'...
func dateTimeType(t *pg_query.TypeName) bool {
	if t == nil || len(t.Names) == 0 {
		return false
	}
	s := t.Names[len(t.Names)-1].GetString_()
	if s == nil {
		return false
	}
	switch strings.ToLower(s.Sval) {
	case "date", "time", "timetz", "timestamp", "timestamptz":
		return true
	}
	return false
}

// windowOrdered reports a window definition with its own ORDER BY.
func windowOrdered(def *pg_query.WindowDef) bool {
	return def != nil && len(def.OrderClause) > 0
}

func (w *shapeWalker) funcCall(f *pg_query.FuncCall) {
	if len(f.Funcname) == 0 {
		return
	}
	s := f.Funcname[len(f.Funcname)-1].GetString_()
	if s == nil {
		return
	}
	name := strings.ToLower(s.Sval)
	switch {
	case volatileFunctions[name]:
		w.reason = "volatile function " + name + "()"
	case name == "age" && len(f.Args) == 1:
		w.reason = "volatile function age() with one argument"
	case orderedAggregates[name]:
		w.aggregate(name+" without ORDER BY", len(f.AggOrder) > 0, f.Over)
	case orderedWindowFunctions[name] && f.Over != nil && !windowOrdered(f.Over):
		w.over = append(w.over, pendingWindow{name + "() over an unordered window", f.Over})
	}
}

// checkWindows refuses a window function whose OVER clause has no ORDER BY
// of its own and does not name a window (WINDOW w AS (...)) that has one.
// Window names are matched across the whole statement: a name is ordered
// only when every definition of it is.
func (w *shapeWalker) checkWindows() {
	for _, p := range w.over {
		ref := p.def.Refname
		if ref == "" {
			ref = p.def.Name // OVER w
		}
		if ref == "" || !w.namedOrdered(ref, 0) {
			w.reason = p.desc
			return
		}
	}
}

func (w *shapeWalker) namedOrdered(name string, depth int) bool {
	defs := w.windows[name]
	if len(defs) == 0 || depth > 32 {
		return false
	}
	for _, d := range defs {
		if windowOrdered(d) {
			continue
		}
		if d.Refname == "" || d.Refname == name || !w.namedOrdered(d.Refname, depth+1) {
			return false
		}
	}
	return true
}

// outputColumn is one entry of the select list as the sort-key resolution
// sees it.
type outputColumn struct {
	name   string   // output name: the alias, or a plain column's last field; "" when unknown
	alias  bool     // named by AS
	ref    []string // for a plain un-aliased column reference: its fields
	star   []string // for * or t.*: the qualifier fields (empty for *)
	isStar bool
}

// sortKeys resolves the top-level ORDER BY keys of s to output columns, or
// returns nil when some key is not one.
func sortKeys(s *pg_query.SelectStmt) []SortKey {
	cols := outputColumns(s)
	keys := make([]SortKey, 0, len(s.SortClause))
	for _, n := range s.SortClause {
		sb := n.GetSortBy()
		if sb == nil || sb.Node == nil {
			return nil
		}
		if c := sb.Node.GetAConst(); c != nil {
			iv := c.GetIval()
			if c.Isnull || iv == nil || iv.Ival <= 0 || int(iv.Ival) > len(cols) && !hasStar(cols) {
				return nil
			}
			keys = append(keys, SortKey{Pos: int(iv.Ival)})
			continue
		}
		cr := sb.Node.GetColumnRef()
		if cr == nil {
			return nil
		}
		fields, ok := refFields(cr.Fields)
		if !ok {
			return nil
		}
		name, ok := resolveSortRef(fields, cols)
		if !ok {
			return nil
		}
		keys = append(keys, SortKey{Name: name})
	}
	return keys
}

func hasStar(cols []outputColumn) bool {
	for _, c := range cols {
		if c.isStar {
			return true
		}
	}
	return false
}

// resolveSortRef finds the output column an ORDER BY column reference
// names, as PostgreSQL does: a bare name first matches an output column
// name, then an input column, which must be output un-aliased (or through a
// star) to be a key.
func resolveSortRef(fields []string, cols []outputColumn) (string, bool) {
	last := fields[len(fields)-1]
	named := 0 // output columns known to be named last
	for _, c := range cols {
		if c.name == last {
			named++
		}
	}
	if len(fields) == 1 {
		for _, c := range cols {
			if c.alias && c.name == last {
				return last, named == 1
			}
		}
	}
	for _, c := range cols {
		if c.ref != nil && !c.alias && c.name == last && qualifiersMatch(fields, c.ref) {
			return last, named == 1
		}
	}
	if named > 0 {
		return "", false // output under that name, but as some other column
	}
	for _, c := range cols {
		if c.isStar && (len(c.star) == 0 || len(fields) == 1 || qualifiersMatch(fields, append(append([]string(nil), c.star...), last))) {
			return last, true
		}
	}
	return "", false
}

// qualifiersMatch reports whether two column references of the same last
// field may name the same column: their qualifiers agree on the parts both
// have (t.id and id may; t.id and u.id do not).
func qualifiersMatch(a, b []string) bool {
	qa, qb := a[:len(a)-1], b[:len(b)-1]
	for i, j := len(qa)-1, len(qb)-1; i >= 0 && j >= 0; i, j = i-1, j-1 {
		if qa[i] != qb[j] {
			return false
		}
	}
	return true
}

// refFields returns a column reference's fields as strings; ok is false
// when some field is not a name (a star).
func refFields(nodes []*pg_query.Node) ([]string, bool) {
	out := make([]string, 0, len(nodes))
	for _, n := range nodes {
		s := n.GetString_()
		if s == nil {
			return nil, false
		}
		out = append(out, s.Sval)
	}
	return out, len(out) > 0
}

// outputColumns lists the select list of s, or of its leftmost branch for
// a set operation; a VALUES list's columns are column1, column2, ...
func outputColumns(s *pg_query.SelectStmt) []outputColumn {
	for s.Op != pg_query.SetOperation_SETOP_NONE && s.Larg != nil {
		s = s.Larg
	}
	if len(s.ValuesLists) > 0 {
		var cols []outputColumn
		if l := s.ValuesLists[0].GetList(); l != nil {
			for i := range l.Items {
				cols = append(cols, outputColumn{name: fmt.Sprintf("column%d", i+1), alias: true})
			}
		}
		return cols
	}
	cols := make([]outputColumn, 0, len(s.TargetList))
	for _, n := range s.TargetList {
		rt := n.GetResTarget()
		if rt == nil {
			cols = append(cols, outputColumn{})
			continue
		}
		if rt.Name != "" {
			cols = append(cols, outputColumn{name: rt.Name, alias: true})
			continue
		}
		cr := rt.Val.GetColumnRef()
		if cr == nil || len(cr.Fields) == 0 {
			cols = append(cols, outputColumn{})
			continue
		}
		if cr.Fields[len(cr.Fields)-1].GetAStar() != nil {
			qual, ok := refFields(cr.Fields[:len(cr.Fields)-1])
			if !ok && len(cr.Fields) > 1 {
				cols = append(cols, outputColumn{})
				continue
			}
			cols = append(cols, outputColumn{isStar: true, star: qual})
			continue
		}
		fields, ok := refFields(cr.Fields)
		if !ok {
			cols = append(cols, outputColumn{})
			continue
		}
		cols = append(cols, outputColumn{name: fields[len(fields)-1], ref: fields})
	}
	return cols
}
