package table

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/tandemdb/tandem/internal/config"
)

// A merge (tables.map entries with merge_into) makes several old tables
// that share a key one new table. Each old table is a member, an ordinary
// Mapping from it to the new table carrying the key column for column and
// some of the new table's columns; what is particular to a merge is how
// the members share the new row, which is a split turned around:
//
//   - Forward, the owner (the entry the others name in merge_into) holds
//     the new row's existence: its writes upsert its columns of the new
//     row and its deletes delete it. Another member's writes update its
//     columns of the new row by key (an insert could not give the new row
//     the owner's NOT NULL columns), and a write that finds no new row
//     (the owner's row is not there yet) is drift; a member's delete sets
//     its columns to their defaults. A locked copy through the owner
//     copies the members' rows of the same keys in the same unit.
//   - In reverse, a new row is every member's row: a write to the new
//     table is applied through every member, and a member's old row exists
//     exactly when one of the new columns it writes (but the key) is not
//     NULL (its predicate, Where over old and NewWhere over new), so an
//     update that NULLs them all deletes the member's old row.

// mergeInfo is what the members of one merge share.
type mergeInfo struct {
	members []*Mapping // owner first
}

// NewMerge checks the merge of the old tables olds (the owner first, then
// the members in the order of decls) into the new table new and builds
// their mappings. Each is checked as NewMapping checks a mapping (every
// column of its old table placed), and must carry its old key, column for
// column, as new's whole key; a new column is written by at most one
// member. Errors are *MappingError values about the member at fault.
func NewMerge(decls []config.TableMap, olds []*Meta, new *Meta) ([]*Mapping, error) {
	if len(decls) != len(olds) || len(olds) < 2 {
		return nil, fmt.Errorf("merge into %s: %d declarations for %d old tables (a merge needs two or more)", new.Name, len(decls), len(olds))
	}
	info := &mergeInfo{}
	writer := map[int]*Mapping{} // new column -> the member that writes it
	for i, old := range olds {
		m, err := NewMapping(decls[i], old, new)
		if err != nil {
			return nil, err
		}
		if _, _, ok := m.fwd.keyPairs(); !ok || !old.HasKey() {
			return nil, m.fail("new", "", "does not carry the key of %s (%s) as the primary key of %s (%s), column for column: every table of a merge carries the whole new key (rename it as you like)",
				old.Name, strings.Join(old.KeyNames(), ", "), new.Name, strings.Join(new.KeyNames(), ", "))
		}
		if len(m.disc) > 0 || m.where != "" {
			return nil, m.fail("", "", "a table of a merge cannot carry a where or a discriminator")
		}
		for _, t := range m.fwd.targets {
			if slices.Contains(new.Key, t.col) {
				continue
			}
			if o := writer[t.col]; o != nil {
				return nil, m.fail("new", new.Columns[t.col].Name, "is written by %s too: each column of a merged table is written by one old table", o.Old.Name)
			}
			writer[t.col] = m
		}
		m.identity = false
		m.merge, m.member = info, i
		info.members = append(info.members, m)
	}
	for _, m := range info.members[1:] {
		if err := m.memberPredicate(); err != nil {
			return nil, err
		}
	}
	return info.members, nil
}

// memberPredicate gives a member (not the owner) its row predicate: one of
// the new columns it writes, but the key, is not NULL; over the old row
// (where) as the values the forward direction writes, over the new row
// (the reverse filter) as the columns. Forward the member's every row is
// applied (an update NULLing its columns is the same as its delete), so
// the forward direction has no filter.
func (m *Mapping) memberPredicate() error {
	var onOld, onNew []string
	for _, t := range m.fwd.targets {
		if slices.Contains(m.New.Key, t.col) {
			continue
		}
		c := m.New.Columns[t.col].Name
		v := "(" + t.expr + ")"
		if t.src != "" {
			v = quoteIdent(t.src)
		}
		onOld = append(onOld, v+" IS NOT NULL")
		onNew = append(onNew, quoteIdent(c)+" IS NOT NULL")
		m.rev.filterRefs = append(m.rev.filterRefs, c)
	}
	if len(onNew) == 0 {
		return m.fail("", "", "writes no column of %s but the key: a table of a merge carries some of the new table's columns", m.New.Name)
	}
	m.where = "(" + strings.Join(onOld, " OR ") + ")"
	m.rev.filter = "(" + strings.Join(onNew, " OR ") + ")"
	m.rev.filterDeletes = false
	return nil
}

// Merged reports whether the mapping is a table of a merge.
func (m *Mapping) Merged() bool { return m.merge != nil }

// MergeMember reports whether the mapping is a table of a merge other than
// its owner: its writes update its columns of the owner's new rows.
func (m *Mapping) MergeMember() bool { return m.merge != nil && m.member > 0 }

// Members returns the tables of the merge m is a table of, owner first, or
// m alone.
func (m *Mapping) Members() []*Mapping {
	if m.merge == nil {
		return []*Mapping{m}
	}
	return slices.Clone(m.merge.members)
}

// ForwardUpdateSQL is the forward write of a merge member (MergeMember)
// for rows row images of its old table (oldCols, as ForwardUpsertSQL
// takes them): an UPDATE of the member's columns of the new rows by key,
// which returns one row per image whose key has no new row, that key as
// text, one column per new key column in key order (the owner's row is not
// there yet: the caller records it as drift).
func (m *Mapping) ForwardUpdateSQL(oldCols []string, rows int) (string, error) {
	return m.memberSQL(oldCols, rows, (*direction).reverseUpdate)
}

// ForwardClearSQL is the forward delete of a merge member: it sets the
// member's columns of the new rows of the images' keys to their defaults
// (the new row stays: the owner holds its existence), and returns, as
// ForwardUpdateSQL does, the keys it found no new row for.
func (m *Mapping) ForwardClearSQL(oldCols []string, rows int) (string, error) {
	return m.memberSQL(oldCols, rows, (*direction).reverseClear)
}

func (m *Mapping) memberSQL(oldCols []string, rows int, stmt func(*direction, string, []string) (string, error)) (string, error) {
	if !m.MergeMember() {
		return "", fmt.Errorf("mapping %s: a keyed update of %s is for a member of a merge other than its owner", m.Old.Name, m.New.Name)
	}
	from, err := m.fwd.source(oldCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	return stmt(&m.fwd, from, oldCols)
}

// ReverseDeleteUnmatchedSQL is, for a merge member, the reverse of
// ForwardDeleteUnmatchedSQL: it deletes on the old table the rows of the
// new row images its predicate does not pass (every column it writes
// NULL: an UPDATE moved the row out of the member). It returns "" for a
// mapping that is not a member.
func (m *Mapping) ReverseDeleteUnmatchedSQL(newCols []string, rows int) (string, error) {
	if !m.MergeMember() {
		return "", nil
	}
	from, err := m.rev.source(newCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	if miss := m.rev.missingFilterRef(newCols); miss != "" {
		return "", fmt.Errorf("mapping %s: the rows lack %q, which says whether %s has the row: %w", m.Old.Name, miss, m.Old.Name, errNotDerivable)
	}
	keys, err := m.rev.keyValues(newCols)
	if err != nil {
		return "", err
	}
	return m.rev.deleteWhere(from, keys, " WHERE NOT coalesce("+m.rev.filter+", false)"), nil
}

// mergeGroups returns, per old table that entries name in merge_into (the
// owner), the old tables that name it, in name order; and the problems of
// entries whose owner is not an entry of its own or is a member itself.
func mergeGroups(decls map[Name]config.TableMap) (map[Name][]Name, []Problem) {
	groups := map[Name][]Name{}
	var probs []Problem
	for _, n := range slices.SortedFunc(maps.Keys(decls), func(a, b Name) int { return strings.Compare(a.String(), b.String()) }) {
		d := decls[n]
		if d.MergeInto == "" {
			continue
		}
		sch, tab, err := config.ParseTableName(d.MergeInto)
		if err != nil {
			probs = append(probs, Problem{Table: n, Field: "merge_into", Message: "merge_into: " + err.Error()})
			continue
		}
		owner := Name{sch, tab}
		od, ok := decls[owner]
		switch {
		case !ok:
			probs = append(probs, Problem{Table: n, Field: "merge_into", Message: fmt.Sprintf("merge_into names %s, which has no entry in tables.map: declare the owner's mapping to the merged table", owner)})
		case od.MergeInto != "":
			probs = append(probs, Problem{Table: n, Field: "merge_into", Message: fmt.Sprintf("merge_into names %s, which is merged into %s itself: name the owner", owner, od.MergeInto)})
		default:
			groups[owner] = append(groups[owner], n)
		}
	}
	return groups, probs
}

// loadMerge builds and checks the merge whose owner is the old table n and
// whose other members are members, each as loadMapping checks a mapping.
// It returns the owner, or nil when the problems make the merge unusable
// (one member unusable makes it all unusable: a write of the new table is
// a write of every member).
func loadMerge(ctx context.Context, old, new Querier, n Name, members []Name, decls map[Name]config.TableMap) (*Mapping, []Problem, error) {
	names := append([]Name{n}, members...)
	ds := make([]config.TableMap, len(names))
	olds := make([]*Meta, len(names))
	for i, mn := range names {
		om, err := LoadByName(ctx, old, mn)
		var nf *NotFoundError
		if errors.As(err, &nf) {
			return nil, []Problem{{Table: mn, Side: "old", Field: "merge_into", Message: fmt.Sprintf("is merged into %s but the old store has no such table", decls[mn].MergeInto)}}, nil
		} else if err != nil {
			return nil, nil, fmt.Errorf("on the old store: %w", err)
		}
		olds[i], ds[i] = om, decls[mn]
	}
	to := n
	if ds[0].To != "" {
		sch, tab, err := config.ParseTableName(ds[0].To)
		if err != nil {
			return nil, []Problem{{Table: n, Side: "new", Field: "to", Message: "tables.map: to: " + err.Error()}}, nil
		}
		to = Name{sch, tab}
	}
	for i, d := range ds[1:] {
		if d.To == "" {
			ds[i+1].To = to.String() // a member's to may be left out: the owner's
			continue
		}
		if sch, tab, err := config.ParseTableName(d.To); err != nil || (Name{sch, tab}) != to {
			return nil, []Problem{{Table: names[i+1], Side: "new", Field: "to", Message: fmt.Sprintf("is merged into %s, whose new table is %s: its to must be that table (or left out)", n, to)}}, nil
		}
	}
	nm, err := LoadByName(ctx, new, to)
	var nf *NotFoundError
	if errors.As(err, &nf) {
		return nil, []Problem{{Table: n, Side: "new", Field: "to", Message: fmt.Sprintf("the new store has no table %s (the merged table)", to)}}, nil
	} else if err != nil {
		return nil, nil, fmt.Errorf("on the new store: %w", err)
	}
	if !nm.HasKey() {
		return nil, []Problem{{Table: n, Side: "new", Field: "to", Message: fmt.Sprintf("%s has no primary key: the tables of a merge share its rows by key", nm.Name)}}, nil
	}
	ms, err := NewMerge(ds, olds, nm)
	var me *MappingError
	if errors.As(err, &me) {
		return nil, []Problem{{Table: me.Table, Side: me.Side, Column: me.Column, Field: me.Field, Message: me.Msg}}, nil
	} else if err != nil {
		return nil, nil, err
	}
	var probs []Problem
	for _, m := range ms {
		ps, err := m.checkServer(ctx, old, new)
		if err != nil {
			return nil, nil, err
		}
		if len(ps) == 0 && m.MergeMember() {
			// A member's forward write is an UPDATE, not the upsert
			// check compiled: compile it too.
			if ps, err = m.checkKeyedUpdate(ctx, checkDir{d: &m.fwd, on: new, fromSide: "old", toSide: "new"}, "the update of this table's columns of the merged row"); err != nil {
				return nil, nil, err
			}
		}
		probs = append(probs, ps...)
		for _, c := range m.reverseMissing {
			probs = append(probs, Problem{Table: m.Old.Name, Side: "old", Column: c, FlipOnly: true,
				Message: "cannot be derived from a row of the merged table (no rename, no same-named column, no reverse expression): declare tables.map reverse for it, or the write flip stays blocked"})
		}
	}
	for _, p := range probs {
		if !p.FlipOnly {
			return nil, probs, nil
		}
	}
	return ms[0], probs, nil
}

// KeyFrom turns a key of the old table of o, another table of m's merge
// (as text, in its key order), into the key of the same new row on m's old
// table, in m's key order: both carry the new key column for column.
func (m *Mapping) KeyFrom(o *Mapping, key []string) []string {
	_, mine, _ := m.fwd.keyPairs()
	_, theirs, _ := o.fwd.keyPairs()
	out := make([]string, len(mine))
	for i, c := range mine {
		if j := slices.IndexFunc(theirs, func(t Column) bool { return t.Name == c.Name }); j >= 0 && j < len(key) {
			out[i] = key[j]
		}
	}
	return out
}

// NewColumns returns the new table's columns the mapping writes (but its
// key), in column order.
func (m *Mapping) NewColumns() []string {
	var out []string
	for _, t := range m.fwd.targets {
		if !slices.Contains(m.New.Key, t.col) {
			out = append(out, m.New.Columns[t.col].Name)
		}
	}
	return out
}
