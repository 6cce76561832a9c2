package table

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/agnivade/levenshtein"
	"github.com/tandemdb/tandem/internal/config"
)

// Mapping says how one old table becomes one new table (design section 6):
// a new name, renamed and dropped columns, computed new columns (SQL over
// the old row) and reverse expressions (SQL over the new row, for mirroring
// new -> old after the write flip). It produces the SQL of every path that
// moves rows between the stores, so the mirror, the backfill, verify and
// repair transform a row in exactly the same way; the expressions are
// evaluated by the server, never in Go.
//
// A Mapping is immutable once built and safe for concurrent use.
type Mapping struct {
	Old, New *Meta
	decl     config.TableMap
	identity bool

	fwd direction // old -> new
	rev direction // new -> old

	reverseMissing []string

	// where is the declaration's row predicate over the old row ("" for
	// every row); disc the discriminator, in new's column order.
	where string
	disc  []discColumn

	// split is the vertical split the mapping is a part of (nil when the
	// old table maps to one new table), part its index there (0: the
	// owner).
	split *splitInfo
	part  int
	// merge is the merge the mapping is a table of (nil when its new
	// table is its own), member its index there (0: the owner).
	merge  *mergeInfo
	member int
	// carried are the old columns the forward direction reads.
	carried map[string]bool
}

// discColumn is one discriminator column of the new table and its value as
// text.
type discColumn struct {
	col   int
	value string
}

// direction is how rows of one side (from) become rows of the other (to).
type direction struct {
	from, to *Meta
	targets  []target // one per column of to that can be derived, in to's column order
	// exprRefs are the columns of from that some expression reads: they
	// keep from's own type in the generated SQL.
	exprRefs map[string]bool
	// filter is the predicate over the source row (unqualified column
	// names) that a row must satisfy to be carried: the declaration's where
	// forward, its discriminator in reverse; "" carries every row.
	// filterRefs are the columns it reads. filterDeletes applies it to
	// deletes by key too (the reverse: a key of another deployment's row
	// on new names a row of this one on old).
	filter        string
	filterRefs    []string
	filterDeletes bool
	// fixed are the columns of the new table (to forward, from in
	// reverse) the discriminator sets: a constant per deployment, so not
	// part of the key that names a row on both sides (keyPairs).
	fixedTo, fixedFrom map[int]bool
}

// target is how one column of the destination is derived.
type target struct {
	col  int      // index in to.Columns
	src  string   // the source column (pass-through), or "" for an expression
	expr string   // SQL over the source row's columns, when src is ""
	refs []string // the columns expr reads
}

// MappingError is a static problem with a mapping: it names the table (by
// its old name), the side ("old" or "new") and the column concerned.
type MappingError struct {
	Table  Name   // the old table
	Side   string // "old", "new" or "" when about the whole mapping
	Column string // "" when about the table
	// Field is the declaration's key the problem is about, relative to the
	// table's entry in tables.map ("where", "discriminator.tenant"), or ""
	// when it is not one of those.
	Field string
	Msg   string
}

func (e *MappingError) Error() string {
	var b strings.Builder
	b.WriteString("mapping " + e.Table.String())
	if e.Column != "" {
		b.WriteString(": " + e.Side + " column " + strconv.Quote(e.Column))
	}
	b.WriteString(": " + e.Msg)
	return b.String()
}

// NewMapping checks decl against the two tables' metadata and builds the
// mapping; a zero decl maps old to a table of the same shape (identity).
// Every old column must go somewhere: to the new column of the same name,
// through a rename, into a computed column's expression, or be dropped.
// Every new key column must be derivable from the old row. An old column
// without a way back (neither a rename or same-named column nor a reverse
// expression) is not an error: it is listed by ReverseMissing and blocks
// only the write flip. Errors are *MappingError values.
func NewMapping(decl config.TableMap, old, new *Meta) (*Mapping, error) {
	return newMapping(decl, old, new, false)
}

// newMapping is NewMapping; a part of a split (part) need not place every
// old column (NewSplit checks that over all the parts).
func newMapping(decl config.TableMap, old, new *Meta, part bool) (*Mapping, error) {
	m := &Mapping{Old: old, New: new, decl: decl}
	if part {
		m.split = &splitInfo{} // NewSplit fills it in
	}
	m.fwd = direction{from: old, to: new, exprRefs: map[string]bool{}}
	m.rev = direction{from: new, to: old, exprRefs: map[string]bool{}}
	renameTo := make(map[string]string, len(decl.Rename)) // new -> old
	for o, n := range decl.Rename {
		renameTo[n] = o
	}
	if err := m.checkDeclared(renameTo); err != nil {
		return nil, err
	}
	if err := m.discriminator(); err != nil {
		return nil, err
	}
	if err := m.forward(renameTo); err != nil {
		return nil, err
	}
	if err := m.predicate(); err != nil {
		return nil, err
	}
	if err := m.reverse(); err != nil {
		return nil, err
	}
	m.identity = !part && decl.To == "" && len(decl.Rename) == 0 && len(decl.Drop) == 0 && len(decl.Compute) == 0 &&
		len(decl.Reverse) == 0 && decl.Where == "" && len(decl.Discriminator) == 0
	return m, nil
}

// discriminator checks the declaration's discriminator columns against new
// and records them: each must be a plain column of new and, when new has a
// primary key, part of it (two deployments' rows with one old key must not
// be one row on new).
func (m *Mapping) discriminator() error {
	m.fwd.fixedTo, m.rev.fixedFrom = map[int]bool{}, map[int]bool{}
	for _, name := range slices.Sorted(maps.Keys(m.decl.Discriminator)) {
		j := must(m.New.Column(name))
		c := m.New.Columns[j]
		field := "discriminator." + name
		switch {
		case c.Generated:
			return &MappingError{Table: m.Old.Name, Side: "new", Column: name, Field: field, Msg: "is a generated column and cannot be a discriminator"}
		case m.New.HasKey() && !slices.Contains(m.New.Key, j):
			return &MappingError{Table: m.Old.Name, Side: "new", Column: name, Field: field, Msg: fmt.Sprintf(
				"is a discriminator but not in the primary key of %s (%s): rows of two deployments with one old key would be one row; add it to the key",
				m.New.Name, strings.Join(m.New.KeyNames(), ", "))}
		}
		m.disc = append(m.disc, discColumn{col: j, value: m.decl.Discriminator[name]})
		m.fwd.fixedTo[j], m.rev.fixedFrom[j] = true, true
	}
	slices.SortFunc(m.disc, func(a, b discColumn) int { return a.col - b.col })
	var conds []string
	for _, d := range m.disc {
		c := m.New.Columns[d.col]
		conds = append(conds, quoteIdent(c.Name)+" = "+m.discValue(d))
		m.rev.filterRefs = append(m.rev.filterRefs, c.Name)
		m.rev.exprRefs[c.Name] = true
	}
	m.rev.filter = strings.Join(conds, " AND ")
	m.rev.filterDeletes = true
	return nil
}

// discValue is the SQL of a discriminator column's value: the text cast to
// the column's type.
func (m *Mapping) discValue(d discColumn) string {
	return quoteLiteral(d.value) + "::" + m.New.Columns[d.col].Type
}

// predicate checks the declaration's row predicate and makes it the
// forward filter: it must be one expression over old columns.
func (m *Mapping) predicate() error {
	w := strings.TrimSpace(m.decl.Where)
	if w == "" {
		return nil
	}
	refs, err := exprColumns(w)
	if err != nil {
		return &MappingError{Table: m.Old.Name, Field: "where", Msg: "where: " + err.Error()}
	}
	for _, r := range refs {
		if _, ok := m.Old.Column(r); !ok {
			return &MappingError{Table: m.Old.Name, Side: "old", Column: r, Field: "where",
				Msg: fmt.Sprintf("is read by the where predicate but %s has no such column%s", m.Old.Name, suggest(r, m.Old))}
		}
		m.fwd.exprRefs[r] = true
	}
	m.where = w
	m.fwd.filter = "(" + w + ")"
	m.fwd.filterRefs = refs
	return nil
}

// fail is a *MappingError about the mapping's old table.
func (m *Mapping) fail(side, col, format string, args ...any) error {
	return &MappingError{Table: m.Old.Name, Side: side, Column: col, Msg: fmt.Sprintf(format, args...)}
}

// dropped reports whether the declaration drops the old column c.
func (m *Mapping) dropped(c string) bool { return slices.Contains(m.decl.Drop, c) }

// checkDeclared checks that every column the declaration names exists on
// its side; renameTo is the declaration's renames, new -> old.
func (m *Mapping) checkDeclared(renameTo map[string]string) error {
	decl, old, new := m.decl, m.Old, m.New
	check := func(side string, meta *Meta, cols []string, what string) error {
		for _, c := range cols {
			if _, ok := meta.Column(c); !ok {
				return m.fail(side, c, "%s names a column that %s does not have%s", what, meta.Name, suggest(c, meta))
			}
		}
		return nil
	}
	for _, c := range []struct {
		side string
		meta *Meta
		cols []string
		what string
	}{
		{"old", old, slices.Sorted(maps.Keys(decl.Rename)), "rename"},
		{"new", new, slices.Sorted(maps.Keys(renameTo)), "rename"},
		{"old", old, decl.Drop, "drop"},
		{"new", new, slices.Sorted(maps.Keys(decl.Compute)), "compute"},
		{"old", old, slices.Sorted(maps.Keys(decl.Reverse)), "reverse"},
		{"new", new, slices.Sorted(maps.Keys(decl.Discriminator)), "discriminator"},
	} {
		if err := check(c.side, c.meta, c.cols, c.what); err != nil {
			return err
		}
	}
	return nil
}

// forward builds the forward direction (old -> new); renameTo is the
// declaration's renames, new -> old.
func (m *Mapping) forward(renameTo map[string]string) error {
	decl, old, new := m.decl, m.Old, m.New
	// Forward: each new column from a computed expression, a renamed old
	// column, or the old column of the same name.
	consumed := map[string]bool{}
	for j, c := range new.Columns {
		if m.fwd.fixedTo[j] {
			// A discriminator: the same constant on every row this
			// deployment carries.
			for _, d := range m.disc {
				if d.col == j {
					m.fwd.targets = append(m.fwd.targets, target{col: j, expr: m.discValue(d)})
				}
			}
			continue
		}
		if expr, ok := decl.Compute[c.Name]; ok {
			if c.Generated {
				return m.fail("new", c.Name, "is a generated column and cannot be computed by the mapping")
			}
			refs, err := exprColumns(expr)
			if err != nil {
				return m.fail("new", c.Name, "compute: %v", err)
			}
			for _, r := range refs {
				if _, ok := old.Column(r); !ok {
					return m.fail("old", r, "is read by the expression computing %q but %s has no such column%s", c.Name, old.Name, suggest(r, old))
				}
				m.fwd.exprRefs[r] = true
				consumed[r] = true
			}
			m.fwd.targets = append(m.fwd.targets, target{col: j, expr: expr, refs: refs})
			continue
		}
		src, ok := renameTo[c.Name]
		if !ok {
			if _, has := old.Column(c.Name); has && decl.Rename[c.Name] == "" && !m.dropped(c.Name) {
				src = c.Name
			}
		}
		if src == "" {
			continue // not derived: a new column with a default, or NULL
		}
		if c.Generated {
			if ok {
				return m.fail("new", c.Name, "is a generated column and cannot receive the renamed old column %q", src)
			}
			consumed[src] = true // the new store computes it
			continue
		}
		m.fwd.targets = append(m.fwd.targets, target{col: j, src: src})
		consumed[src] = true
	}
	m.carried = consumed
	for _, c := range old.Columns {
		if m.split != nil {
			break // a part carries some columns: NewSplit checks that every one is carried by some part
		}
		if !c.Generated && !consumed[c.Name] && !m.dropped(c.Name) {
			return m.fail("old", c.Name, "has no place in %s: rename it, drop it, or compute a new column from it%s", new.Name, suggest(c.Name, new))
		}
	}
	for _, k := range new.KeyNames() {
		if m.fwd.target(k) == nil {
			return m.fail("new", k, "is in the primary key of %s but is not derived from %s: rename an old column to it or compute it", new.Name, old.Name)
		}
	}
	return nil
}

// reverse builds the reverse direction (new -> old), listing the old
// columns without a way back in reverseMissing.
func (m *Mapping) reverse() error {
	decl, old, new := m.decl, m.Old, m.New
	// Reverse: each old column from a reverse expression, the new column it
	// was renamed to, or the same-named new column it passes through to.
	for i, c := range old.Columns {
		if c.Generated {
			continue
		}
		if expr, ok := decl.Reverse[c.Name]; ok {
			refs, err := exprColumns(expr)
			if err != nil {
				return m.fail("old", c.Name, "reverse: %v", err)
			}
			for _, r := range refs {
				if _, ok := new.Column(r); !ok {
					return m.fail("new", r, "is read by the reverse expression of %q but %s has no such column%s", c.Name, new.Name, suggest(r, new))
				}
				m.rev.exprRefs[r] = true
			}
			m.rev.targets = append(m.rev.targets, target{col: i, expr: expr, refs: refs})
			continue
		}
		if t := m.fwd.passFrom(c.Name); t != nil {
			m.rev.targets = append(m.rev.targets, target{col: i, src: new.Columns[t.col].Name})
			continue
		}
		if !m.dropped(c.Name) || slices.Contains(old.Key, i) {
			m.reverseMissing = append(m.reverseMissing, c.Name)
		}
	}
	return nil
}

// suggest returns ` (did you mean "x"?)` naming the column of meta nearest
// to name, or "".
func suggest(name string, meta *Meta) string {
	best, bestDist := "", len(name)/3+2
	for _, c := range meta.Columns {
		if d := levenshtein.ComputeDistance(strings.ToLower(name), strings.ToLower(c.Name)); d < bestDist {
			best, bestDist = c.Name, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// Identity reports whether the mapping declares nothing: the new table has
// the old one's name and columns match by name.
func (m *Mapping) Identity() bool { return m.identity }

// Decl returns the declaration the mapping was built from.
func (m *Mapping) Decl() config.TableMap { return m.decl }

// ReverseMissing lists the old columns (in column order) that cannot be
// derived from a new row: neither renamed nor passed through, with no
// reverse expression, and not declared dropped (a dropped old column gets
// its default or NULL when a row comes back from new). An old key column is
// listed even when dropped. A non-empty list blocks the write flip, since
// after it writes are mirrored from new to old.
func (m *Mapping) ReverseMissing() []string { return slices.Clone(m.reverseMissing) }

// target returns the target that produces the to-column called name, or nil.
func (d *direction) target(name string) *target {
	for i := range d.targets {
		if d.to.Columns[d.targets[i].col].Name == name {
			return &d.targets[i]
		}
	}
	return nil
}

// passFrom returns the pass-through target whose source is the from-column
// called name, or nil.
func (d *direction) passFrom(name string) *target {
	for i := range d.targets {
		if d.targets[i].src == name {
			return &d.targets[i]
		}
	}
	return nil
}

// srcType is the type a from-column is given in the generated SQL: its own
// type when an expression reads it (so the expression means what it means
// on from), else the type of the to-column it passes to (so a text value is
// read exactly as a direct write to that column would read it), else text
// (the value is not used).
func (d *direction) srcType(name string) string {
	i, ok := d.from.Column(name)
	if ok && d.exprRefs[name] {
		return d.from.Columns[i].ParamType
	}
	if t := d.passFrom(name); t != nil {
		return d.to.Columns[t.col].ParamType
	}
	if ok {
		return d.from.Columns[i].ParamType
	}
	return "text"
}

// value returns the SQL for target t over the source row alias src.
func (t *target) value(alias string) string {
	if t.src != "" {
		return alias + "." + quoteIdent(t.src)
	}
	return "(" + t.expr + ")"
}

// available reports whether t can be computed from the columns cols.
func (t *target) available(cols []string) bool {
	if t.src != "" {
		return slices.Contains(cols, t.src)
	}
	for _, r := range t.refs {
		if !slices.Contains(cols, r) {
			return false
		}
	}
	return true
}

// source returns `(VALUES ($1::t1, ...), ...) AS src("c1", ...)` for rows
// rows of the from-columns cols, with parameters numbered row-major.
func (d *direction) source(cols []string, rows int) (string, error) {
	if len(cols) == 0 {
		return "", fmt.Errorf("%s: no columns", d.from.Name)
	}
	if rows < 1 {
		return "", fmt.Errorf("%s: need at least one row, got %d", d.from.Name, rows)
	}
	if rows*len(cols) > maxParams {
		return "", fmt.Errorf("%s: %d rows of %d columns exceed %d parameters", d.from.Name, rows, len(cols), maxParams)
	}
	seen := make(map[string]bool, len(cols))
	types := make([]string, len(cols))
	for j, c := range cols {
		if seen[c] {
			return "", fmt.Errorf("column %q of %s is listed twice", c, d.from.Name)
		}
		if _, ok := d.from.Column(c); !ok {
			return "", fmt.Errorf("table %s has no column %q", d.from.Name, c)
		}
		seen[c] = true
		types[j] = d.srcType(c)
	}
	var b strings.Builder
	b.WriteString("(VALUES ")
	n := 0
	for r := range rows {
		if r > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		for j := range cols {
			if j > 0 {
				b.WriteByte(',')
			}
			n++
			writeParam(&b, n, types[j])
		}
		b.WriteByte(')')
	}
	b.WriteString(") AS src(" + identList(cols) + ")")
	return b.String(), nil
}

// upsert returns INSERT INTO to (...) SELECT ... FROM <from> ON CONFLICT ...
// for rows whose source carries the from-columns cols; from is a FROM item
// aliased src.
func (d *direction) upsert(from string, cols []string, conflict bool) (string, error) {
	if conflict && !d.to.HasKey() {
		return "", fmt.Errorf("upserting into %s: %w", d.to.Name, ErrNoKey)
	}
	var names, values []string
	var idx []int
	for i := range d.targets {
		t := &d.targets[i]
		name := d.to.Columns[t.col].Name
		if !t.available(cols) {
			if t.src == "" {
				missing := ""
				for _, r := range t.refs {
					if !slices.Contains(cols, r) {
						missing = r
						break
					}
				}
				return "", fmt.Errorf("writing %s: column %q is computed from %q of %s, which the rows lack: %w", d.to.Name, name, missing, d.from.Name, errNotDerivable)
			}
			if slices.Contains(d.to.Key, t.col) {
				return "", fmt.Errorf("writing %s: key column %q comes from %q of %s, which the rows lack: %w", d.to.Name, name, t.src, d.from.Name, errNotDerivable)
			}
			continue // not carried: left as it is (or its default, on insert)
		}
		names = append(names, name)
		values = append(values, t.value("src"))
		idx = append(idx, t.col)
	}
	if len(names) == 0 {
		return "", fmt.Errorf("writing %s: no column of it can be derived from the columns given", d.to.Name)
	}
	var b strings.Builder
	b.WriteString("INSERT INTO " + d.to.Name.Quoted() + " (" + identList(names) + ")")
	if overriding(d.to, idx) {
		b.WriteString(" OVERRIDING SYSTEM VALUE")
	}
	b.WriteString(" SELECT " + strings.Join(values, ", ") + " FROM " + from)
	if d.filter != "" {
		if miss := d.missingFilterRef(cols); miss != "" {
			return "", fmt.Errorf("writing %s: the rows lack %q of %s, which says which rows are carried: %w", d.to.Name, miss, d.from.Name, errNotDerivable)
		}
		b.WriteString(" WHERE " + d.filter)
	}
	if conflict {
		b.WriteString(onConflict(d.to, idx))
	}
	return b.String(), nil
}

// keyValues returns the SQL values of to's key columns, each cast to the
// column's type, over the source alias src; it fails when the columns cols
// cannot produce them.
func (d *direction) keyValues(cols []string) ([]string, error) {
	if !d.to.HasKey() {
		return nil, fmt.Errorf("deleting from %s by key: %w", d.to.Name, ErrNoKey)
	}
	var out []string
	for _, k := range d.to.Key {
		c := d.to.Columns[k]
		t := d.target(c.Name)
		if t == nil || !t.available(cols) {
			return nil, fmt.Errorf("deleting from %s: key column %q cannot be derived from the columns given: %w", d.to.Name, c.Name, errNotDerivable)
		}
		out = append(out, t.value("src")+"::"+c.ParamType)
	}
	return out, nil
}

// delete returns DELETE FROM to WHERE (key) IN (SELECT <key values> FROM <from>).
func (d *direction) delete(from string, cols []string) (string, error) {
	keys, err := d.keyValues(cols)
	if err != nil {
		return "", err
	}
	where := ""
	if d.filterDeletes && d.filter != "" {
		if miss := d.missingFilterRef(cols); miss != "" {
			return "", fmt.Errorf("deleting from %s: the rows lack %q of %s, which says which rows are carried: %w", d.to.Name, miss, d.from.Name, errNotDerivable)
		}
		where = " WHERE " + d.filter
	}
	return d.deleteWhere(from, keys, where), nil
}

// deleteWhere returns DELETE FROM to WHERE (key) IN (SELECT keys FROM from where).
func (d *direction) deleteWhere(from string, keys []string, where string) string {
	lhs := quoteIdent(d.to.Columns[d.to.Key[0]].Name)
	if len(keys) > 1 {
		lhs = "(" + identList(d.to.KeyNames()) + ")"
	}
	return "DELETE FROM " + d.to.Name.Quoted() + " WHERE " + lhs + " IN (SELECT " + strings.Join(keys, ", ") + " FROM " + from + where + ")"
}

// missingFilterRef returns a column the filter reads that cols lacks, or "".
func (d *direction) missingFilterRef(cols []string) string {
	for _, r := range d.filterRefs {
		if !slices.Contains(cols, r) {
			return r
		}
	}
	return ""
}

// ForwardUpsertSQL returns the statement that applies rows row images of
// the old table to the new one idempotently:
//
//	INSERT INTO new (n1, ...) [OVERRIDING SYSTEM VALUE]
//	SELECT src."o1", (expr), ... FROM (VALUES ($1::t1, ...), ...) AS src("o1", ...)
//	ON CONFLICT (newkey) DO UPDATE SET n1 = EXCLUDED.n1, ...
//
// oldCols names the old columns each row carries (old names, in the order
// of the parameters, row-major, as text). Every parameter appears in the
// statement. A new column whose old source is not among oldCols is left
// alone; a computed column whose inputs are not all there is an error, as
// is a new key column that cannot be derived.
func (m *Mapping) ForwardUpsertSQL(oldCols []string, rows int) (string, error) {
	from, err := m.fwd.source(oldCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	return m.fwd.upsert(from, oldCols, true)
}

// ForwardUpsertFromSQL is ForwardUpsertSQL for rows that come from a FROM
// item rather than parameters: from must be aliased src and yield columns
// named as the old table's (a staging table, json_to_recordset, ...).
func (m *Mapping) ForwardUpsertFromSQL(from string, oldCols []string) (string, error) {
	return m.fwd.upsert(from, oldCols, true)
}

// ForwardDeleteSQL returns the statement that deletes on the new table the
// rows whose mapped key rows row images give:
//
//	DELETE FROM new WHERE (k1, ...) IN (SELECT <key exprs> FROM (VALUES ...) AS src(...))
//
// The images may be whole old rows or just the columns the new key needs.
func (m *Mapping) ForwardDeleteSQL(oldCols []string, rows int) (string, error) {
	from, err := m.fwd.source(oldCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	return m.fwd.delete(from, oldCols)
}

// ForwardDeleteUnmatchedSQL returns, for a mapping with a where predicate,
// the statement that deletes on the new table the rows whose old images do
// not satisfy it (an UPDATE that moved a row out of the predicate):
//
//	DELETE FROM new WHERE (k1, ...) IN (SELECT <key exprs> FROM (VALUES ...) AS src(...) WHERE NOT coalesce((where), false))
//
// It returns "" when the mapping has no predicate. The images must carry
// the columns the predicate reads.
func (m *Mapping) ForwardDeleteUnmatchedSQL(oldCols []string, rows int) (string, error) {
	if m.fwd.filter == "" {
		return "", nil
	}
	from, err := m.fwd.source(oldCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	if miss := m.fwd.missingFilterRef(oldCols); miss != "" {
		return "", fmt.Errorf("mapping %s: the rows lack %q, which the where predicate reads: %w", m.Old.Name, miss, errNotDerivable)
	}
	keys, err := m.fwd.keyValues(oldCols)
	if err != nil {
		return "", err
	}
	return m.fwd.deleteWhere(from, keys, " WHERE NOT coalesce("+m.fwd.filter+", false)"), nil
}

// Where returns the declaration's row predicate over the old row, with
// unqualified column names ("" when every old row is carried): put it in
// the WHERE of a query over the old table alone.
func (m *Mapping) Where() string { return m.where }

// NewWhere returns the predicate over the new row that the discriminator
// implies ("tenant" = 'shop'::text AND ...), with unqualified column names,
// or "" without a discriminator: the rows of the new table that belong to
// this mapping.
func (m *Mapping) NewWhere() string { return m.rev.filter }

// Filtered reports whether the mapping carries only some rows of one side
// or the other: a where predicate or a discriminator.
func (m *Mapping) Filtered() bool { return m.where != "" || len(m.disc) > 0 }

// OwnsNewRow reports whether a row of the new table, given as its columns'
// text (names, values; nil is NULL), carries this mapping's discriminator
// values; true without a discriminator. A row image lacking a
// discriminator column is not owned.
func (m *Mapping) OwnsNewRow(names []string, values [][]byte) bool {
	for _, d := range m.disc {
		i := slices.Index(names, m.New.Columns[d.col].Name)
		if i < 0 || values[i] == nil || string(values[i]) != d.value {
			return false
		}
	}
	return true
}

// ownKey turns a key of the new table (its whole primary key as text, in
// key order, as the drift ledger holds it) into the key without the
// discriminator columns, which names the row on both sides; ok is false
// when the key's discriminator values are not this mapping's (another
// deployment's row) or it has the wrong width.
func (m *Mapping) ownKey(key []string) ([]string, bool) {
	if len(key) != len(m.New.Key) {
		return key, true // already without them, or of a wrong width the copy refuses
	}
	var out []string
	for i, k := range m.New.Key {
		if !m.rev.fixedFrom[k] {
			out = append(out, key[i])
			continue
		}
		for _, d := range m.disc {
			if d.col == k && d.value != key[i] {
				return nil, false
			}
		}
	}
	return out, true
}

// CheckpointName is the name the mapping's progress is recorded under in
// the tables Tandem keeps on the new store (the backfill's checkpoints and
// recheck keys): the old table's name, and with a discriminator its values
// too (orders[tenant=shop]), so the deployments that consolidate tables of
// one old name into one new store never share a checkpoint.
func (m *Mapping) CheckpointName() Name {
	n := m.Old.Name
	if len(m.disc) == 0 {
		return n
	}
	parts := make([]string, len(m.disc))
	for i, d := range m.disc {
		parts[i] = m.New.Columns[d.col].Name + "=" + d.value
	}
	n.Table += "[" + strings.Join(parts, ",") + "]"
	return n
}

// ReverseUpsertSQL is ForwardUpsertSQL from new to old: newCols are new
// column names, and old columns are derived through renames, same-named
// columns and reverse expressions. Old columns in ReverseMissing are not
// written (an inserted row gets their default).
func (m *Mapping) ReverseUpsertSQL(newCols []string, rows int) (string, error) {
	from, err := m.rev.source(newCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	return m.rev.upsert(from, newCols, true)
}

// ReverseDeleteSQL is ForwardDeleteSQL from new to old.
func (m *Mapping) ReverseDeleteSQL(newCols []string, rows int) (string, error) {
	from, err := m.rev.source(newCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	return m.rev.delete(from, newCols)
}

// HashSQL returns an expression over the table alias t (a row of the old
// table for side "old", of the new table for "new") that gives the md5 of
// the row as the new table holds it: every new column derived from old, in
// column order, each cast to the new column's type, as a row's text. A row
// on old and the row the mapping makes of it on new hash equal, so verify
// compares hashes only. Run it with the same DateStyle, IntervalStyle,
// TimeZone and extra_float_digits on both stores.
func (m *Mapping) HashSQL(side string) (string, error) {
	parts, err := m.hashParts(side, false)
	if err != nil {
		return "", err
	}
	return "md5(ROW(" + strings.Join(parts, ", ") + ")::text)", nil
}

// RecordHashSQL is HashSQL's faster twin for stores that both run
// PostgreSQL 14 or later: hash_record_extended over the same cast values,
// a bigint computed from each type's own hash function instead of from
// the row's text and md5. It hashes values, so it needs no session
// settings; columns of types without a hash function (json, xml, point...)
// are hashed as their text. Both stores must run on machines of the same
// byte order (the hash functions are not portable across it).
//
// The hash is seeded with the row's key (RecordHashSeedSQL): a verify sums
// row hashes per range, and hash_record_extended is linear in its columns'
// hashes (h = 31*h + column hash), so with one seed for every row the sum
// of a range is a sum of per-column sums, and two rows that swapped a
// column's values would hash equal as a range. Seeded by the key, each
// column's hash depends on the row it is in.
func (m *Mapping) RecordHashSQL(side string) (string, error) {
	parts, err := m.hashParts(side, true)
	if err != nil {
		return "", err
	}
	seed, err := m.RecordHashSeedSQL(side)
	if err != nil {
		return "", err
	}
	return "hash_record_extended(ROW(" + strings.Join(parts, ", ") + "), " + seed + ")", nil
}

// RecordHashSeedSQL is the seed RecordHashSQL hashes a row with: a bigint
// from the new key's values as side holds them (the value itself for one
// integer column, else hash_record_extended over the key), 0 when the new
// table has no key derived from old.
func (m *Mapping) RecordHashSeedSQL(side string) (string, error) {
	all, err := m.hashParts(side, true)
	if err != nil {
		return "", err
	}
	var parts, types []string
	for _, k := range m.New.Key {
		for i, t := range m.fwd.targets {
			if t.col == k {
				parts = append(parts, all[i])
				types = append(types, m.New.Columns[k].Type)
			}
		}
	}
	switch {
	case len(parts) == 0:
		return "0", nil
	case len(parts) == 1 && (types[0] == "bigint" || types[0] == "integer" || types[0] == "smallint"):
		return "(" + parts[0] + ")::bigint", nil
	}
	return "hash_record_extended(ROW(" + strings.Join(parts, ", ") + "), 0)", nil
}

// hashParts returns, per new column derived from old, the value as side
// holds it cast to the new column's type (and on to text for a type
// without a hash function, when forHash).
func (m *Mapping) hashParts(side string, forHash bool) ([]string, error) {
	var parts []string
	for _, t := range m.fwd.targets {
		c := m.New.Columns[t.col]
		var v string
		switch side {
		case "new":
			v = "t." + quoteIdent(c.Name)
		case "old":
			if t.src != "" {
				v = "t." + quoteIdent(t.src)
			} else if len(t.refs) == 0 {
				v = "(" + t.expr + ")" // a constant (a discriminator): no row to evaluate it over
			} else {
				v = "(SELECT (" + t.expr + ") FROM (SELECT t.*) AS src)"
			}
		default:
			return nil, fmt.Errorf("HashSQL: side must be \"old\" or \"new\", not %q", side)
		}
		p := "(" + v + ")::" + c.Type
		if forHash && !hashable(c.Type) {
			p = "(" + p + ")::text"
		}
		parts = append(parts, p)
	}
	return parts, nil
}

// hashableTypes are the built-in types (as format_type names them, without
// a modifier) that have an extended hash function.
var hashableTypes = map[string]bool{
	"smallint": true, "integer": true, "bigint": true, "numeric": true, "real": true, "double precision": true,
	"text": true, "character varying": true, "character": true, `"char"`: true, "name": true, "boolean": true,
	"date": true, "time without time zone": true, "time with time zone": true, "timestamp without time zone": true,
	"timestamp with time zone": true, "interval": true, "uuid": true, "bytea": true, "jsonb": true, "inet": true,
	"cidr": true, "macaddr": true, "oid": true,
}

// hashable reports whether a column of type typ (format_type's text) can
// go into hash_record_extended as it is.
func hashable(typ string) bool {
	typ = strings.TrimSuffix(typ, "[]")
	if i := strings.IndexByte(typ, '('); i >= 0 { // numeric(12,2), character varying(20), timestamp(3) with time zone
		typ = strings.TrimSpace(typ[:i] + typ[strings.IndexByte(typ, ')')+1:])
	}
	return hashableTypes[typ]
}

// KeyPreserving reports whether the new key is the old key, column by
// column, through renames or same names: then a key's values (as text) name
// the same row on both sides, which keyset copying by key ranges needs. It
// returns, for each old key column in key order, the new column it becomes.
func (m *Mapping) KeyPreserving() ([]Column, bool) {
	_, to, ok := m.fwd.keyPairs()
	return to, ok
}

// keyPairs returns from's key columns in key order and, for each, the key
// column of to it passes to (by rename or same name); ok is false unless
// from's key becomes to's whole key that way.
//
// Discriminator columns of the new table's key are left out on both sides:
// they are one constant for every row of the mapping, so the rest of the
// key names the row (with the discriminator's predicate on new).
func (d *direction) keyPairs() (from, to []Column, ok bool) {
	fromKey := slices.DeleteFunc(slices.Clone(d.from.Key), func(k int) bool { return d.fixedFrom[k] })
	toKey := slices.DeleteFunc(slices.Clone(d.to.Key), func(k int) bool { return d.fixedTo[k] })
	if !d.from.HasKey() || len(fromKey) != len(toKey) || len(fromKey) == 0 {
		return nil, nil, false
	}
	for _, k := range fromKey {
		t := d.passFrom(d.from.Columns[k].Name)
		if t == nil || !slices.Contains(toKey, t.col) {
			return nil, nil, false
		}
		from = append(from, d.from.Columns[k])
		to = append(to, d.to.Columns[t.col])
	}
	return from, to, true
}
