package table

import (
	"context"
	"errors"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
)

// Problem is something wrong with the migration's tables found at load
// time. It names the table (by its old name) and, when it is about one, the
// column and the side it is on.
type Problem struct {
	Table  Name
	Side   string // "old", "new", or "" when about the mapping as a whole
	Column string // "" when about the table
	// FlipOnly is set when the problem blocks only the write flip (a column
	// that cannot be mirrored back from new to old); the mapping still
	// serves old -> new. Otherwise the table has no usable mapping.
	FlipOnly bool
	// Field is the key of the table's declaration the problem is about,
	// relative to its entry in tables.map ("where", "discriminator.tenant"),
	// or "" (config.Config.Position finds it in the file).
	Field   string
	Message string
}

func (p Problem) String() string {
	var b strings.Builder
	b.WriteString(p.Table.String())
	if p.Column != "" {
		fmt.Fprintf(&b, ": %s column %q", p.Side, p.Column)
	} else if p.Side != "" {
		b.WriteString(" (" + p.Side + ")")
	}
	b.WriteString(": " + p.Message)
	return b.String()
}

// Mappings are the mappings of every table in the migration's scope,
// indexed by old and by new name. It is immutable once loaded.
type Mappings struct {
	byOld   map[Name]*Mapping
	byNew   map[Name]*Mapping
	inScope map[Name]bool // old names in scope, including those without a usable mapping
	include []pattern
	exclude []pattern
}

type pattern struct{ schema, table string }

func (p pattern) match(n Name) bool {
	s, _ := path.Match(p.schema, n.Schema)
	t, _ := path.Match(p.table, n.Table)
	return s && t
}

// controlSchema is never in scope: it holds Tandem's own state.
const controlSchema = "tandem"

// InScope reports whether the old table n is in the migration's scope
// (tables.include and tables.exclude), whether or not its mapping is usable.
func (ms *Mappings) InScope(n Name) bool {
	if n.Schema == controlSchema || strings.HasPrefix(n.Schema, "pg_temp") || strings.HasPrefix(n.Schema, "pg_toast") ||
		n.Schema == "pg_catalog" || n.Schema == "information_schema" {
		return false // session-private and internal relations are never migrated
	}
	if ms.inScope[n] {
		return true
	}
	if len(ms.include) > 0 && !slices.ContainsFunc(ms.include, func(p pattern) bool { return p.match(n) }) {
		return false
	}
	return !slices.ContainsFunc(ms.exclude, func(p pattern) bool { return p.match(n) })
}

// ForOld returns the mapping of the old table n: nil when n is out of scope,
// unknown, or its mapping has problems (see the Problems of LoadMappings).
// For a split table it is the owner part: a forward locked copy through it
// copies every part (CopyKeysMapped); PartsOf gives each part.
func (ms *Mappings) ForOld(n Name) *Mapping { return ms.byOld[n] }

// PartsOf returns the mappings of the old table n: its split's parts,
// owner first, or its one mapping; nil as ForOld.
func (ms *Mappings) PartsOf(n Name) []*Mapping {
	if m := ms.byOld[n]; m != nil {
		return m.Parts()
	}
	return nil
}

// ForNew returns the mapping whose new table is n, or nil.
func (ms *Mappings) ForNew(n Name) *Mapping { return ms.byNew[n] }

// All returns the usable mappings, one per new table, ordered by old name
// (a split's parts in their order, owner first). A caller that needs one
// per old table takes the Owner ones.
func (ms *Mappings) All() []*Mapping {
	out := make([]*Mapping, 0, len(ms.byOld))
	for _, m := range ms.byOld {
		out = append(out, m.Parts()...)
	}
	slices.SortFunc(out, func(a, b *Mapping) int {
		if c := strings.Compare(a.Old.Name.String(), b.Old.Name.String()); c != 0 {
			return c
		}
		return a.part - b.part
	})
	return out
}

// userTablesSQL lists the ordinary and partitioned tables outside the
// system schemas and Tandem's control schema.
const userTablesSQL = `
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', '` + controlSchema + `')
  AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp\_%'
ORDER BY 1, 2`

// LoadMappings reads both stores' catalogs and builds the mapping of every
// table in scope: the declared ones from cfg.Map, every other one as the
// identity. Each mapping is then checked on the servers: the new store must
// accept the forward statement (old types exist there, each column can be
// assigned, each compute expression compiles over the old row), the old
// store the reverse one, and both the verify hash; each is checked by
// PREPARE, which runs nothing. old and new must not be in a transaction (a
// failed check would abort it); a pool is fine.
//
// Problems name the table and column. A table with a problem that is not
// FlipOnly has no mapping in the result. The error is for failures to read
// the catalogs.
func LoadMappings(ctx context.Context, cfg config.Tables, old, new Querier) (*Mappings, []Problem, error) {
	ms := &Mappings{byOld: map[Name]*Mapping{}, byNew: map[Name]*Mapping{}, inScope: map[Name]bool{}}
	for _, list := range []struct {
		src []string
		dst *[]pattern
	}{{cfg.Include, &ms.include}, {cfg.Exclude, &ms.exclude}} {
		for _, s := range list.src {
			sch, tab, err := config.ParseTablePattern(s)
			if err != nil {
				return nil, nil, fmt.Errorf("tables pattern %q: %w", s, err)
			}
			*list.dst = append(*list.dst, pattern{sch, tab})
		}
	}
	decls := make(map[Name]config.TableMap, len(cfg.Map))
	for k, d := range cfg.Map {
		sch, tab, err := config.ParseTableName(k)
		if err != nil {
			return nil, nil, fmt.Errorf("tables.map[%s]: %w", k, err)
		}
		decls[Name{sch, tab}] = d
	}

	rows, err := old.Query(ctx, userTablesSQL)
	if err != nil {
		return nil, nil, fmt.Errorf("listing the old store's tables: %w", err)
	}
	names, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Name, error) {
		var n Name
		err := r.Scan(&n.Schema, &n.Table)
		return n, err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("listing the old store's tables: %w", err)
	}

	merges, probs := mergeGroups(decls)
	for n := range decls {
		if !slices.Contains(names, n) {
			probs = append(probs, Problem{Table: n, Side: "old", Message: "is declared in tables.map but the old store has no such table"})
		} else if !ms.InScope(n) {
			probs = append(probs, Problem{Table: n, Message: "is declared in tables.map but excluded from the scope by tables.include/exclude"})
		}
	}
	for _, n := range names {
		if !ms.InScope(n) {
			continue
		}
		ms.inScope[n] = true
		var m *Mapping
		var ps []Problem
		switch {
		case decls[n].MergeInto != "":
			continue // loaded with the owner it names
		case len(merges[n]) > 0:
			m, ps, err = loadMerge(ctx, old, new, n, merges[n], decls)
		case len(decls[n].Split) > 0:
			m, ps, err = loadSplit(ctx, old, new, n, decls[n])
		default:
			m, ps, err = loadMapping(ctx, old, new, n, decls[n])
		}
		if err != nil {
			return nil, nil, err
		}
		probs = append(probs, ps...)
		if m == nil {
			continue
		}
		taken := false
		for i, p := range m.Parts() {
			if other := ms.byNew[p.New.Name]; other != nil {
				pr := Problem{Table: n, Side: "new", Message: fmt.Sprintf("maps to %s, which %s maps to as well: one new table per old table (merging several old tables into one new table is not supported)", p.New.Name, other.Old.Name)}
				if p.Split() {
					pr.Field = "split[" + strconv.Itoa(i) + "].to"
				}
				probs = append(probs, pr)
				taken = true
			}
		}
		if taken {
			continue
		}
		ms.byOld[n] = m
		for _, p := range m.Parts() {
			ms.byNew[p.New.Name] = p
		}
		for _, mm := range m.Members()[1:] {
			ms.byOld[mm.Old.Name] = mm
		}
	}
	slices.SortStableFunc(probs, func(a, b Problem) int { return strings.Compare(a.Table.String(), b.Table.String()) })
	return ms, probs, nil
}

// loadMapping builds and checks the mapping of the old table n. It returns
// a nil Mapping when the problems make it unusable.
func loadMapping(ctx context.Context, old, new Querier, n Name, decl config.TableMap) (*Mapping, []Problem, error) {
	om, err := LoadByName(ctx, old, n)
	if err != nil {
		return nil, nil, fmt.Errorf("on the old store: %w", err)
	}
	to := n
	if decl.To != "" {
		sch, tab, err := config.ParseTableName(decl.To)
		if err != nil {
			return nil, []Problem{{Table: n, Side: "new", Message: "tables.map: to: " + err.Error()}}, nil
		}
		to = Name{sch, tab}
	}
	nm, err := LoadByName(ctx, new, to)
	var nf *NotFoundError
	if errors.As(err, &nf) {
		return nil, []Problem{{Table: n, Side: "new", Message: fmt.Sprintf("the new store has no table %s", to)}}, nil
	} else if err != nil {
		return nil, nil, fmt.Errorf("on the new store: %w", err)
	}
	m, err := NewMapping(decl, om, nm)
	var me *MappingError
	if errors.As(err, &me) {
		return nil, []Problem{{Table: n, Side: me.Side, Column: me.Column, Field: me.Field, Message: me.Msg}}, nil
	} else if err != nil {
		return nil, nil, err
	}
	var probs []Problem
	if om.HasKey() && !nm.HasKey() {
		probs = append(probs, Problem{Table: n, Side: "new", Message: fmt.Sprintf("%s has no primary key, so row images cannot be applied to it by key; add the key on the new store", nm.Name)})
	}
	ps, err := m.checkServer(ctx, old, new)
	if err != nil {
		return nil, nil, err
	}
	probs = append(probs, ps...)
	for _, c := range m.reverseMissing {
		probs = append(probs, Problem{Table: n, Side: "old", Column: c, FlipOnly: true,
			Message: "cannot be derived from a new row (no rename, no same-named column, no reverse expression): declare tables.map reverse for it, or the write flip stays blocked"})
	}
	for _, p := range probs {
		if !p.FlipOnly {
			return nil, probs, nil
		}
	}
	return m, probs, nil
}

// loadSplit builds and checks the parts of the split of the old table n,
// each as loadMapping checks a mapping. It returns the owner part, or nil
// when the problems make the split unusable (one part unusable makes it
// all unusable: a write of the old table is a write of every part).
func loadSplit(ctx context.Context, old, new Querier, n Name, decl config.TableMap) (*Mapping, []Problem, error) {
	om, err := LoadByName(ctx, old, n)
	if err != nil {
		return nil, nil, fmt.Errorf("on the old store: %w", err)
	}
	var news []*Meta
	var probs []Problem
	for i, pd := range decl.Split {
		field := "split[" + strconv.Itoa(i) + "]"
		to := n
		if pd.To != "" {
			sch, tab, err := config.ParseTableName(pd.To)
			if err != nil {
				probs = append(probs, Problem{Table: n, Side: "new", Field: field + ".to", Message: "tables.map: split: to: " + err.Error()})
				continue
			}
			to = Name{sch, tab}
		}
		nm, err := LoadByName(ctx, new, to)
		var nf *NotFoundError
		if errors.As(err, &nf) {
			probs = append(probs, Problem{Table: n, Side: "new", Field: field + ".to", Message: fmt.Sprintf("the new store has no table %s (part %d of the split)", to, i)})
			continue
		} else if err != nil {
			return nil, nil, fmt.Errorf("on the new store: %w", err)
		}
		if !nm.HasKey() {
			probs = append(probs, Problem{Table: n, Side: "new", Field: field + ".to", Message: fmt.Sprintf("%s has no primary key: every part of a split needs the old key as its primary key", nm.Name)})
			continue
		}
		news = append(news, nm)
	}
	if len(probs) > 0 {
		return nil, probs, nil
	}
	if !om.HasKey() {
		return nil, []Problem{{Table: n, Side: "old", Field: "split", Message: "has no primary key: a split's parts share the old row by its key"}}, nil
	}
	parts, err := NewSplit(decl, om, news)
	var me *MappingError
	if errors.As(err, &me) {
		return nil, []Problem{{Table: n, Side: me.Side, Column: me.Column, Field: me.Field, Message: me.Msg}}, nil
	} else if err != nil {
		return nil, nil, err
	}
	for i, m := range parts {
		field := "split[" + strconv.Itoa(i) + "]"
		ps, err := m.checkServer(ctx, old, new)
		if err != nil {
			return nil, nil, err
		}
		if len(ps) == 0 && !m.Owner() {
			// A dependent's way back is an UPDATE, not the upsert check
			// compiled: compile it too.
			if ps, err = m.checkReverseUpdate(ctx, old); err != nil {
				return nil, nil, err
			}
		}
		for _, p := range ps {
			p.Field = joinField(field, p.Field)
			probs = append(probs, p)
		}
	}
	for _, c := range parts[0].reverseMissing {
		probs = append(probs, Problem{Table: n, Side: "old", Column: c, FlipOnly: true, Field: "split",
			Message: "no part of the split gives it back from a new row (no rename, no same-named column, no reverse expression in any part): declare a reverse expression for it in a part, or the write flip stays blocked"})
	}
	for _, p := range probs {
		if !p.FlipOnly {
			return nil, probs, nil
		}
	}
	return parts[0], probs, nil
}

// checkReverseUpdate compiles a dependent part's reverse UPDATE (the
// mirror's and the repair's after the flip) on old, over a typed row of
// its new table.
func (m *Mapping) checkReverseUpdate(ctx context.Context, old Querier) ([]Problem, error) {
	return m.checkKeyedUpdate(ctx, checkDir{d: &m.rev, on: old, fromSide: "new", toSide: "old", flipOnly: true}, "the reverse update of this part")
}

// checkKeyedUpdate compiles dir's keyed UPDATE (a split dependent's in
// reverse, a merge member's forward) on its store, over a typed source row;
// what names the statement in a problem.
func (m *Mapping) checkKeyedUpdate(ctx context.Context, dir checkDir, what string) ([]Problem, error) {
	var probs []Problem
	add := func(side, col, msg string, flipOnly bool) {
		probs = append(probs, Problem{Table: m.Old.Name, Side: side, Column: col, Message: msg, FlipOnly: flipOnly})
	}
	from, cols, err := dir.sourceRow(ctx, add)
	if err != nil || len(probs) > 0 {
		return probs, err
	}
	sql, err := dir.d.reverseUpdate(from, cols)
	if err != nil {
		add(dir.toSide, "", err.Error(), dir.flipOnly)
		return probs, nil
	}
	msg, err := prepareCheck(ctx, dir.on, sql)
	if err != nil {
		return nil, err
	}
	if msg != "" {
		add(dir.toSide, "", what+" does not compile on the "+dir.toSide+" store: "+msg, dir.flipOnly)
	}
	return probs, nil
}

// check runs the server-side checks of the mapping: forward on new, reverse
// on old, hash on both. Each statement is checked whole first; when it
// fails, each column is checked alone to name the one at fault.
func (m *Mapping) check(ctx context.Context, old, new Querier) ([]Problem, error) {
	var probs []Problem
	add := func(side, col, msg string, flipOnly bool) {
		probs = append(probs, Problem{Table: m.Old.Name, Side: side, Column: col, Message: msg, FlipOnly: flipOnly})
	}
	for _, dir := range []checkDir{{&m.fwd, new, "old", "new", false}, {&m.rev, old, "new", "old", true}} {
		if len(dir.d.targets) == 0 {
			continue
		}
		if err := dir.check(ctx, add); err != nil {
			return nil, err
		}
	}
	if len(probs) > 0 {
		return probs, nil
	}
	if err := m.checkHashes(ctx, old, new, add); err != nil {
		return nil, err
	}
	return probs, nil
}

// addProblem records a problem check found: on side, about column col
// ("" for the table), needed only after the write flip when flipOnly.
type addProblem func(side, col, msg string, flipOnly bool)

// checkDir is one direction of a mapping as check compiles it: d's
// statements run on on, from the fromSide store's rows into the toSide
// store's; flipOnly for the reverse, which only the write flip needs.
type checkDir struct {
	d        *direction
	on       Querier
	fromSide string
	toSide   string
	flipOnly bool
}

// check compiles one direction: the source row's types, the pass-through
// columns' types, then the statement.
func (dir checkDir) check(ctx context.Context, add addProblem) error {
	from, cols, err := dir.sourceRow(ctx, add)
	if err != nil {
		return err
	}
	if err := dir.checkTypes(ctx, add); err != nil {
		return err
	}
	return dir.checkStatement(ctx, from, cols, add)
}

// sourceRow is the source row as a subquery (from) over its columns
// (cols); a column whose type the destination store lacks is text in it.
func (dir checkDir) sourceRow(ctx context.Context, add addProblem) (from string, cols []string, err error) {
	d := dir.d
	// The source row as typed NULLs: SELECT NULL::t1 AS "c1", ...
	var sel []string
	for _, c := range d.from.Columns {
		cols = append(cols, c.Name)
	}
	bad := map[string]bool{}
	for _, c := range cols {
		typ := d.srcType(c)
		if msg, err := prepareCheck(ctx, dir.on, "SELECT NULL::"+typ); err != nil {
			return "", nil, err
		} else if msg != "" {
			if d.exprRefs[c] || d.passFrom(c) != nil {
				add(dir.fromSide, c, fmt.Sprintf("its type %s does not exist on the %s store: %s", typ, dir.toSide, msg), dir.flipOnly)
			}
			bad[c] = true
		}
	}
	for _, c := range cols {
		typ := d.srcType(c)
		if bad[c] {
			typ = "text"
		}
		sel = append(sel, "NULL::"+typ+" AS "+quoteIdent(c))
	}
	from = "(SELECT " + strings.Join(sel, ", ") + ") AS src"
	return from, cols, nil
}

// checkTypes checks that each pass-through column's source type is
// assignable to its destination column's type.
func (dir checkDir) checkTypes(ctx context.Context, add addProblem) error {
	d := dir.d
	// A pass-through column reads its text as the destination type, so
	// the statement always compiles; check the types themselves: the
	// source type must be assignable to the destination's (when the
	// destination store knows the source type at all; when it does not,
	// only the text form travels). A string source is not checked.
	for _, t := range d.targets {
		if t.src == "" {
			continue
		}
		fc := d.from.Columns[must(d.from.Column(t.src))]
		c := d.to.Columns[t.col]
		if fc.Type == c.Type || slices.Contains([]string{"text", "character varying", "character", "name"}, fc.ParamType) {
			continue // a string's text may be any type's input: checked row by row, by the server
		}
		if msg, err := prepareCheck(ctx, dir.on, "SELECT NULL::"+fc.Type); err != nil {
			return err
		} else if msg != "" {
			continue
		}
		sql := "INSERT INTO " + d.to.Name.Quoted() + " (" + quoteIdent(c.Name) + ")"
		if c.Identity == 'a' {
			sql += " OVERRIDING SYSTEM VALUE" // as the forward statement writes it
		}
		sql += " SELECT NULL::" + fc.Type
		msg, err := prepareCheck(ctx, dir.on, sql)
		if err != nil {
			return err
		}
		if msg != "" {
			add(dir.toSide, c.Name, fmt.Sprintf("cannot take %s column %q (%s) as %s: %s", dir.fromSide, t.src, fc.Type, c.Type, msg), dir.flipOnly)
		}
	}
	return nil
}

// checkStatement compiles the direction's statement over the source row
// from; when it does not compile, each column alone, to name the one at
// fault.
func (dir checkDir) checkStatement(ctx context.Context, from string, cols []string, add addProblem) error {
	d := dir.d
	whole, err := d.upsert(from, cols, d.to.HasKey())
	if err != nil {
		add(dir.toSide, "", err.Error(), dir.flipOnly)
		return nil
	}
	msg, err := prepareCheck(ctx, dir.on, whole)
	if err != nil {
		return err
	}
	if msg == "" {
		return nil
	}
	found := false
	for _, t := range d.targets {
		c := d.to.Columns[t.col]
		one := &direction{from: d.from, to: d.to, targets: []target{t}, exprRefs: d.exprRefs}
		sql, err := one.upsert(from, cols, false)
		if err != nil {
			continue
		}
		cmsg, err := prepareCheck(ctx, dir.on, sql)
		if err != nil {
			return err
		}
		if cmsg == "" {
			continue
		}
		found = true
		if t.src != "" {
			fc := d.from.Columns[must(d.from.Column(t.src))]
			add(dir.toSide, c.Name, fmt.Sprintf("cannot take %s column %q (%s) as %s: %s", dir.fromSide, t.src, fc.Type, c.Type, cmsg), dir.flipOnly)
		} else {
			add(dir.toSide, c.Name, fmt.Sprintf("expression %q does not compile on the %s store: %s", t.expr, dir.toSide, cmsg), dir.flipOnly)
		}
	}
	if !found {
		add(dir.toSide, "", fmt.Sprintf("the %s statement does not compile on the %s store: %s", map[bool]string{false: "forward", true: "reverse"}[dir.flipOnly], dir.toSide, msg), dir.flipOnly)
	}
	return nil
}

// checkServer checks the mapping on the servers: the predicate and the
// discriminator first (every statement of the mapping carries them, so one
// that fails would fail all the others), then its statements (check).
func (m *Mapping) checkServer(ctx context.Context, old, new Querier) ([]Problem, error) {
	ps, err := m.checkFilters(ctx, old, new)
	if err != nil || len(ps) > 0 {
		return ps, err
	}
	return m.check(ctx, old, new)
}

// checkFilters checks the row predicate and the discriminator on the
// servers: the predicate must compile over the old row as a boolean
// (PREPARE of a query of the old table with it), and each discriminator
// value must be a value of its column's type written as the new store
// prints it (the proxy compares the text of row images with it).
func (m *Mapping) checkFilters(ctx context.Context, old, new Querier) ([]Problem, error) {
	var probs []Problem
	if m.where != "" {
		msg, err := prepareCheck(ctx, old, "SELECT 1 FROM "+m.Old.Name.Quoted()+" WHERE ("+m.where+")")
		if err != nil {
			return nil, err
		}
		if msg != "" {
			probs = append(probs, Problem{Table: m.Old.Name, Side: "old", Field: "where",
				Message: fmt.Sprintf("the where predicate %q does not compile over %s: %s", m.where, m.Old.Name, msg)})
		}
	}
	for _, d := range m.disc {
		c := m.New.Columns[d.col]
		field := "discriminator." + c.Name
		var text string
		err := new.QueryRow(ctx, "SELECT ("+m.discValue(d)+")::text", pgx.QueryExecModeSimpleProtocol).Scan(&text)
		var pe *pgconn.PgError
		switch {
		case errors.As(err, &pe):
			probs = append(probs, Problem{Table: m.Old.Name, Side: "new", Column: c.Name, Field: field,
				Message: fmt.Sprintf("discriminator value %q is not a valid %s: %s", d.value, c.Type, pe.Message)})
		case err != nil:
			return nil, fmt.Errorf("checking the discriminator of %s: %w", m.Old.Name, err)
		case text != d.value:
			probs = append(probs, Problem{Table: m.Old.Name, Side: "new", Column: c.Name, Field: field,
				Message: fmt.Sprintf("discriminator value %q is printed by the new store as %q: write it that way", d.value, text)})
		}
	}
	return probs, nil
}

// checkHashes compiles the verify's hash on both stores.
func (m *Mapping) checkHashes(ctx context.Context, old, new Querier, add addProblem) error {
	for _, s := range []struct {
		side string
		on   Querier
		tbl  *Meta
	}{{"old", old, m.Old}, {"new", new, m.New}} {
		h, err := m.HashSQL(s.side)
		if err != nil {
			return err
		}
		msg, err := prepareCheck(ctx, s.on, "SELECT "+h+" FROM "+s.tbl.Name.Quoted()+" AS t")
		if err != nil {
			return err
		}
		if msg != "" {
			add(s.side, "", "the verify hash does not compile on the "+s.side+" store: "+msg, false)
		}
	}
	return nil
}

func must(i int, ok bool) int {
	if !ok {
		panic("table: column vanished")
	}
	return i
}

// prepareCheck asks the server to PREPARE sql (and DEALLOCATE it, in the
// same simple-protocol message, so no session state is left behind). It
// returns the server's complaint, or "" when the statement compiles; err
// is for failures other than the statement's own.
func prepareCheck(ctx context.Context, q Querier, sql string) (string, error) {
	rows, err := q.Query(ctx, "PREPARE tandem_mapping_check AS "+sql+"; DEALLOCATE tandem_mapping_check", pgx.QueryExecModeSimpleProtocol)
	if err == nil {
		rows.Close()
		err = rows.Err()
	}
	var pe *pgconn.PgError
	switch {
	case err == nil:
		return "", nil
	case errors.As(err, &pe):
		msg := pe.Message
		if pe.Detail != "" {
			msg += " (" + pe.Detail + ")"
		}
		if pe.Hint != "" {
			msg += "; hint: " + pe.Hint
		}
		return msg, nil
	default:
		return "", fmt.Errorf("checking a table mapping: %w", err)
	}
}
