package proxy

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/tandemdb/tandem/internal/table"
)

// Referential actions. The secondary applies row images in replica mode
// (session_replication_role = replica), where PostgreSQL's own foreign-key
// triggers do not fire: deleting a parent's row there leaves its children.
// So the proxy reads, from the primary's catalog, every foreign key with an
// action (ON DELETE/UPDATE CASCADE, SET NULL, SET DEFAULT), and:
//
//   - for a delete of a referenced table, applies the actions to the
//     secondary itself, in the same secondary transaction, right after the
//     parent's rows (recursively down chains of cascades): lockstep;
//   - for an update that writes referenced columns with an ON UPDATE action
//     (the old values, which the children match, are not in the row image),
//     records the referencing tables as whole-table drift before the
//     client's acknowledgement: the ledger.
//
// A table that no such key references costs one map lookup per write.

// fkAction is one foreign key with a referential action, as the primary's
// catalog defines it.
type fkAction struct {
	name       string
	child      table.Name
	childCols  []string // referencing columns, in key order
	childTypes []string // their types (format_type without modifier), for the casts
	parentCols []string // referenced columns, in the same order
	onDelete   byte     // confdeltype: 'a' no action, 'r' restrict, 'c' cascade, 'n' set null, 'd' set default
	onUpdate   byte     // confupdtype
	setCols    []string // ON DELETE SET NULL/DEFAULT (cols): only these; empty = all of childCols
}

func hasAction(b byte) bool { return b == 'c' || b == 'n' || b == 'd' }

// fkGraph is every foreign key with an action in one database, by the
// referenced table.
type fkGraph struct {
	byParent map[table.Name][]fkAction
}

// fkCache holds the graph of each catalog, loaded on first use and dropped
// with the catalogs' cache on DDL.
type fkCache struct {
	mu  sync.Mutex
	gen uint64
	g   *fkGraph
}

func (c *fkCache) invalidate() {
	c.mu.Lock()
	c.gen++
	c.g = nil
	c.mu.Unlock()
}

// fkSQL reads the foreign keys with an action. confdelsetcols (PostgreSQL
// 15's ON DELETE SET NULL (cols)) is read through to_jsonb so that the query
// also runs on older servers, where the column does not exist.
const fkSQL = `
SELECT con.conname, cn.nspname, cc.relname, pn.nspname, pc.relname,
	con.confdeltype::text, con.confupdtype::text,
	ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
		JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i),
	ARRAY(SELECT format_type(a.atttypid, -1) FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
		JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i),
	ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
		JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i),
	ARRAY(SELECT a.attname::text FROM jsonb_array_elements_text(coalesce(nullif(to_jsonb(con) -> 'confdelsetcols', 'null'), '[]')) WITH ORDINALITY k(n, i)
		JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n::int2 ORDER BY k.i)
FROM pg_constraint con
JOIN pg_class cc ON cc.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
JOIN pg_class pc ON pc.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
	AND (con.confdeltype IN ('c', 'n', 'd') OR con.confupdtype IN ('c', 'n', 'd'))`

// fkGraphOf returns the foreign keys with actions of the catalog's database.
func (s *Server) fkGraphOf(ctx context.Context, c *catalog) (*fkGraph, error) {
	c.fks.mu.Lock()
	g, gen := c.fks.g, c.fks.gen
	c.fks.mu.Unlock()
	if g != nil {
		return g, nil
	}
	rows, err := c.pool.Query(ctx, fkSQL)
	if err != nil {
		return nil, fmt.Errorf("reading foreign keys: %w", err)
	}
	defer rows.Close()
	g = &fkGraph{byParent: map[table.Name][]fkAction{}}
	for rows.Next() {
		var f fkAction
		var parent table.Name
		var del, upd string
		if err := rows.Scan(&f.name, &f.child.Schema, &f.child.Table, &parent.Schema, &parent.Table, &del, &upd,
			&f.childCols, &f.childTypes, &f.parentCols, &f.setCols); err != nil {
			return nil, fmt.Errorf("reading foreign keys: %w", err)
		}
		f.onDelete, f.onUpdate = del[0], upd[0]
		g.byParent[parent] = append(g.byParent[parent], f)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading foreign keys: %w", err)
	}
	c.fks.mu.Lock()
	if c.fks.gen == gen {
		c.fks.g = g
	}
	c.fks.mu.Unlock()
	return g, nil
}

// deleteActions returns the keys referencing parent with an ON DELETE action.
func (g *fkGraph) deleteActions(parent table.Name) []fkAction {
	var out []fkAction
	for _, f := range g.byParent[parent] {
		if hasAction(f.onDelete) {
			out = append(out, f)
		}
	}
	return out
}

// updateActions returns the keys referencing parent with an ON UPDATE
// action on some of cols.
func (g *fkGraph) updateActions(parent table.Name, cols []string) []fkAction {
	var out []fkAction
	for _, f := range g.byParent[parent] {
		if hasAction(f.onUpdate) && slices.ContainsFunc(f.parentCols, func(c string) bool { return slices.Contains(cols, c) }) {
			out = append(out, f)
		}
	}
	return out
}

// queueUpdateActions queues, on the secondary and before the parent's row
// images are applied there, the ON UPDATE action of each of acts for the
// rows of pm whose images are rows (columns names): the children that
// match a row's referenced values as the secondary still has them (read
// FOR UPDATE, so a transaction changing them there is waited for) get the
// new values, NULL or their default. Rows whose referenced values did not
// change are left alone, as PostgreSQL does.
func (rs *routedSession) queueUpdateActions(sec *rstore, pm *table.Meta, acts []fkAction, names []string, rows [][][]byte) error {
	keys := pm.KeyNames()
	for _, f := range acts {
		var cols []string // key columns, then the referenced columns
		var types []string
		for _, c := range append(slices.Clone(keys), f.parentCols...) {
			j, ok := pm.Column(c)
			if !ok {
				return fmt.Errorf("foreign key %s: column %q of %s is unknown", f.name, c, pm.Name)
			}
			cols, types = append(cols, c), append(types, pm.Columns[j].ParamType)
		}
		pos := make([]int, len(cols))
		for i, c := range cols {
			if pos[i] = slices.Index(names, c); pos[i] < 0 {
				return fmt.Errorf("row image of %s lacks column %q", pm.Name, c)
			}
		}
		params := make([][]byte, len(cols))
		for i, p := range pos {
			vals := make([]*string, len(rows))
			for r, row := range rows {
				if row[p] != nil {
					v := string(row[p])
					vals[r] = &v
				}
			}
			params[i] = []byte(textArrayNull(vals))
		}
		nk := len(keys)
		var sel, on, args, set, match, olds, news []string
		for i := range cols {
			args = append(args, fmt.Sprintf("$%d::text[]", i+1))
		}
		for i, k := range keys {
			on = append(on, fmt.Sprintf("p.%s = n.a%d::%s", quoteIdent(k), i+1, types[i]))
		}
		for i, c := range f.parentCols {
			sel = append(sel, fmt.Sprintf("p.%s AS o%d, n.a%d::%s AS n%d", quoteIdent(c), i+1, nk+i+1, types[nk+i], i+1))
			match = append(match, fmt.Sprintf("c.%s = x.o%d", quoteIdent(f.childCols[i]), i+1))
			olds, news = append(olds, fmt.Sprintf("x.o%d", i+1)), append(news, fmt.Sprintf("x.n%d", i+1))
			switch f.onUpdate {
			case 'c':
				set = append(set, fmt.Sprintf("%s = x.n%d", quoteIdent(f.childCols[i]), i+1))
			case 'n':
				set = append(set, quoteIdent(f.childCols[i])+" = NULL")
			default:
				set = append(set, quoteIdent(f.childCols[i])+" = DEFAULT")
			}
		}
		alias := make([]string, len(cols))
		for i := range cols {
			alias[i] = fmt.Sprintf("a%d", i+1)
		}
		sql := fmt.Sprintf("UPDATE %s c SET %s FROM (SELECT %s FROM %s p JOIN unnest(%s) AS n(%s) ON %s FOR UPDATE OF p) x WHERE %s AND ROW(%s) IS DISTINCT FROM ROW(%s)",
			f.child.Quoted(), strings.Join(set, ", "), strings.Join(sel, ", "), pm.Name.Quoted(), strings.Join(args, ", "), strings.Join(alias, ", "),
			strings.Join(on, " AND "), strings.Join(match, " AND "), strings.Join(olds, ", "), strings.Join(news, ", "))
		rs.queueExec(sec, "LOCK TABLE "+f.child.Quoted()+" IN SHARE ROW EXCLUSIVE MODE", nil)
		rs.queueExec(sec, sql, params)
	}
	return nil
}

// updateDrift returns whole-table drift entries for the tables an update of
// cols of parent may change through ON UPDATE actions (and, through those,
// further down), or nil when none.
func (g *fkGraph) updateDrift(parent table.Name, cols []string) []table.DriftEntry {
	if len(g.byParent[parent]) == 0 {
		return nil // the common case, without allocating
	}
	var out []table.DriftEntry
	seen := map[table.Name]bool{}
	var walk func(parent table.Name, cols []string)
	walk = func(parent table.Name, cols []string) {
		for _, f := range g.byParent[parent] {
			if !hasAction(f.onUpdate) || !slices.ContainsFunc(f.parentCols, func(c string) bool { return slices.Contains(cols, c) }) {
				continue
			}
			if !seen[f.child] {
				seen[f.child] = true
				out = append(out, table.DriftEntry{Table: f.child, Reason: fmt.Sprintf("ON UPDATE action of foreign key %s", f.name)})
			}
			walk(f.child, f.childCols)
		}
	}
	walk(parent, cols)
	return out
}

// setDrift returns the whole-table drift entries an ON DELETE SET NULL/SET
// DEFAULT of f causes further down: the child's changed columns may be
// referenced with ON UPDATE actions themselves (rare).
func (g *fkGraph) setDrift(f fkAction) []table.DriftEntry {
	cols := f.setCols
	if len(cols) == 0 {
		cols = f.childCols
	}
	return g.updateDrift(f.child, cols)
}

// maxCascadeDepth bounds the levels of cascades applied in lockstep (a
// self-referencing tree counts one level per generation); deeper ones go
// to the ledger.
const maxCascadeDepth = 64

// fkDeleted is a set of rows deleted from one table: the values of the
// columns the table's referencing keys need, as text.
type fkDeleted struct {
	table table.Name
	cols  []string
	rows  [][][]byte
}

// applyDeleteActions applies, on the secondary (sec, inside the mirror's
// transaction), the ON DELETE actions of every foreign key referencing
// the deleted rows, recursively. It returns drift entries for what it could
// not apply in lockstep.
func (rs *routedSession) applyDeleteActions(sec *rstore, g *fkGraph, first fkDeleted) ([]table.DriftEntry, error) {
	var drift []table.DriftEntry
	queue := []fkDeleted{first}
	for depth := 0; len(queue) > 0; depth++ {
		if depth == maxCascadeDepth {
			for _, d := range queue {
				for _, f := range g.deleteActions(d.table) {
					drift = append(drift, table.DriftEntry{Table: f.child, Reason: "ON DELETE actions deeper than the proxy applies in lockstep"})
				}
			}
			return drift, nil
		}
		var next []fkDeleted
		for _, d := range queue {
			for _, f := range g.deleteActions(d.table) {
				params, ok := fkParams(f, d)
				if !ok {
					continue // no deleted row was referenceable
				}
				var returning []string
				if f.onDelete == 'c' {
					// The children's columns their own referencing keys need.
					for _, cf := range g.deleteActions(f.child) {
						for _, c := range cf.parentCols {
							if !slices.Contains(returning, c) {
								returning = append(returning, c)
							}
						}
					}
				} else {
					drift = append(drift, g.setDrift(f)...)
				}
				// A child inserted by a transaction that committed on the
				// primary but not yet on the secondary is invisible to
				// the action's statement there: wait for such writers,
				// and hold off new ones until this transaction ends.
				// SHARE ROW EXCLUSIVE conflicts with their ROW EXCLUSIVE
				// and with itself, so two cascades into one table queue
				// instead of deadlocking.
				// (Outside a transaction, the secondary runs without replica
				// mode, where PostgreSQL's own actions fire.)
				if rs.tx.open {
					rs.queueExec(sec, "LOCK TABLE "+f.child.Quoted()+" IN SHARE ROW EXCLUSIVE MODE", nil)
				}
				rs.queueExec(sec, fkActionSQL(f, returning), params)
				rows, err := rs.execQueuedRows(sec)
				if err != nil {
					return drift, fmt.Errorf("applying foreign key %s to %s: %w", f.name, f.child, err)
				}
				if len(returning) > 0 && len(rows) > 0 {
					nd := fkDeleted{table: f.child, cols: returning}
					for _, r := range rows {
						row := make([][]byte, len(r))
						for i, v := range r {
							if v != nil {
								row[i] = []byte(*v)
							}
						}
						nd.rows = append(nd.rows, row)
					}
					next = append(next, nd)
				}
			}
		}
		queue = next
	}
	return drift, nil
}

// fkParams returns one text[] parameter per referenced column of f, with
// the values of d's rows (rows with a NULL there reference nothing).
func fkParams(f fkAction, d fkDeleted) ([][]byte, bool) {
	pos := make([]int, len(f.parentCols))
	for i, c := range f.parentCols {
		if pos[i] = slices.Index(d.cols, c); pos[i] < 0 {
			return nil, false
		}
	}
	arrays := make([][]string, len(pos))
	n := 0
	for _, r := range d.rows {
		if slices.ContainsFunc(pos, func(p int) bool { return r[p] == nil }) {
			continue
		}
		for i, p := range pos {
			arrays[i] = append(arrays[i], string(r[p]))
		}
		n++
	}
	if n == 0 {
		return nil, false
	}
	params := make([][]byte, len(arrays))
	for i, a := range arrays {
		params[i] = []byte(textArray(a))
	}
	return params, true
}

// textArray encodes vals as a text[] literal.
func textArray(vals []string) string {
	p := make([]*string, len(vals))
	for i := range vals {
		p[i] = &vals[i]
	}
	return textArrayNull(p)
}

// textArrayNull encodes vals as a text[] literal, nil as NULL.
func textArrayNull(vals []*string) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, v := range vals {
		if i > 0 {
			b.WriteByte(',')
		}
		if v == nil {
			b.WriteString("NULL")
			continue
		}
		b.WriteByte('"')
		for _, r := range *v {
			if r == '"' || r == '\\' {
				b.WriteByte('\\')
			}
			b.WriteRune(r)
		}
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

// fkActionSQL is the statement that applies f's ON DELETE action to the
// children of the rows given as text arrays $1..$n, returning the
// columns returning of the rows a cascade deleted (as text).
func fkActionSQL(f fkAction, returning []string) string {
	var from, where strings.Builder
	from.WriteString("unnest(")
	for i := range f.childCols {
		if i > 0 {
			from.WriteString(", ")
			where.WriteString(" AND ")
		}
		fmt.Fprintf(&from, "$%d::text[]", i+1)
		fmt.Fprintf(&where, "c.%s = x.k%d::%s", quoteIdent(f.childCols[i]), i+1, f.childTypes[i])
	}
	from.WriteString(") AS x(")
	for i := range f.childCols {
		if i > 0 {
			from.WriteString(", ")
		}
		fmt.Fprintf(&from, "k%d", i+1)
	}
	from.WriteString(")")
	target := f.child.Quoted() + " c"
	switch f.onDelete {
	case 'c':
		sql := fmt.Sprintf("DELETE FROM %s USING %s WHERE %s", target, from.String(), where.String())
		if len(returning) > 0 {
			quoted := make([]string, len(returning))
			for i, c := range returning {
				quoted[i] = "c." + quoteIdent(c) + "::text"
			}
			sql += " RETURNING " + strings.Join(quoted, ", ")
		}
		return sql
	default:
		val := "NULL"
		if f.onDelete == 'd' {
			val = "DEFAULT"
		}
		cols := f.setCols
		if len(cols) == 0 {
			cols = f.childCols
		}
		sets := make([]string, len(cols))
		for i, c := range cols {
			sets[i] = quoteIdent(c) + " = " + val
		}
		return fmt.Sprintf("UPDATE %s SET %s FROM %s WHERE %s", target, strings.Join(sets, ", "), from.String(), where.String())
	}
}

// execQueuedRows is execQueued returning the rows the queued statements
// returned.
func (rs *routedSession) execQueuedRows(sec *rstore) ([][]*string, error) {
	deadline := rs.budget()
	sec.out = append(sec.out, syncMsg...)
	if err := rs.send(sec, deadline); err != nil {
		return nil, err
	}
	return rs.drainInternal(sec, deadline)
}

// deleteDrift returns whole-table entries for every table the ON DELETE
// actions of keys referencing parent can reach, recursively.
func (g *fkGraph) deleteDrift(parent table.Name) []table.DriftEntry {
	var out []table.DriftEntry
	seen := map[table.Name]bool{parent: true}
	var walk func(t table.Name)
	walk = func(t table.Name) {
		for _, f := range g.deleteActions(t) {
			if f.onDelete != 'c' {
				out = append(out, g.setDrift(f)...)
			}
			if seen[f.child] {
				continue
			}
			seen[f.child] = true
			out = append(out, table.DriftEntry{Table: f.child, Reason: fmt.Sprintf("ON DELETE action of foreign key %s", f.name)})
			walk(f.child)
		}
	}
	walk(parent)
	return out
}
