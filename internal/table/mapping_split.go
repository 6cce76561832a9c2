package table

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/tandemdb/tandem/internal/config"
)

// A vertical split (tables.map's split) makes one old table several new
// tables that share its key. Each part is a Mapping of its own, from the
// whole old table to one new table, so every path that moves or compares
// rows of one pair does so through an ordinary mapping; what is particular
// to a split is how the parts share the old row:
//
//   - Forward, an old row is every part's row: a write to the old table is
//     applied through every part, and a locked copy through the owner (the
//     first part) copies every part in one unit (newMappedCopier).
//   - In reverse, the owner's new table holds the row's existence: its
//     writes upsert the owner's columns on old and its deletes delete the
//     old row. A dependent's writes update its columns of the old row by
//     key (an insert could not give the old row the owner's NOT NULL
//     columns), and a write that finds no old row (the owner's has not been
//     written yet) is drift; a dependent's delete sets its columns to their
//     defaults.
//   - An old column comes back from the first part that carries it back;
//     the flip waits only for columns no part gives back (ReverseMissing
//     is over all the parts).

// splitInfo is what the parts of one split share.
type splitInfo struct {
	parts []*Mapping
	// reverseMissing are the old columns no part gives back.
	reverseMissing []string
}

// NewSplit checks the split declared by decl (decl.Split, one part per new
// table of news, in the same order) against the tables' metadata and
// builds its parts, owner first. Each part is checked as NewMapping checks
// a mapping, except that it need not place every old column; over the
// parts, every old column must be carried by some part or dropped by one,
// and each part must carry the old key, column for column, as its new
// table's whole key. Errors are *MappingError values whose Field is
// relative to the table's entry (split[1].rename.id).
func NewSplit(decl config.TableMap, old *Meta, news []*Meta) ([]*Mapping, error) {
	if len(decl.Split) != len(news) {
		return nil, fmt.Errorf("split of %s: %d parts declared, %d new tables given", old.Name, len(decl.Split), len(news))
	}
	info := &splitInfo{}
	seen := map[Name]int{}
	for i, pd := range decl.Split {
		field := "split[" + strconv.Itoa(i) + "]"
		partErr := func(side, col, msg string) error {
			return &MappingError{Table: old.Name, Side: side, Column: col, Field: field, Msg: msg}
		}
		switch {
		case len(pd.Split) > 0:
			return nil, partErr("", "", "a part cannot be split again")
		case len(pd.Discriminator) > 0:
			return nil, partErr("new", "", "a split part cannot carry a discriminator")
		case i == 0 && strings.TrimSpace(pd.Where) != "":
			return nil, partErr("", "", "the first part is the owner, whose new table holds every row of the old table: it cannot carry a where")
		}
		if j, dup := seen[news[i].Name]; dup {
			return nil, partErr("new", "", fmt.Sprintf("writes %s, as part %d does: each part writes a new table of its own", news[i].Name, j))
		}
		seen[news[i].Name] = i
		m, err := newMapping(pd, old, news[i], true)
		if err != nil {
			if me, ok := err.(*MappingError); ok {
				me.Field = joinField(field, me.Field)
			}
			return nil, err
		}
		if _, _, ok := m.fwd.keyPairs(); !ok || !old.HasKey() {
			return nil, partErr("new", "", fmt.Sprintf("does not carry the key of %s (%s) as the primary key of %s (%s), column for column: every part needs the whole old key (rename it as you like)",
				old.Name, strings.Join(old.KeyNames(), ", "), news[i].Name, strings.Join(news[i].KeyNames(), ", ")))
		}
		m.split, m.part = info, i
		info.parts = append(info.parts, m)
	}
	// Every old column is carried by a part or dropped by one.
	for _, c := range old.Columns {
		if c.Generated {
			continue
		}
		if !slices.ContainsFunc(info.parts, func(p *Mapping) bool { return p.carried[c.Name] || p.dropped(c.Name) }) {
			return nil, &MappingError{Table: old.Name, Side: "old", Column: c.Name, Field: "split",
				Msg: "is carried by no part of the split: rename it in a part, compute a new column from it, or drop it in one"}
		}
	}
	// An old column comes back from the first part that gives it back: a
	// later part's reverse target for it goes (the key stays: every part
	// names the old row by it).
	back := map[int]bool{}
	for _, p := range info.parts {
		p.rev.targets = slices.DeleteFunc(p.rev.targets, func(t target) bool {
			return back[t.col] && !slices.Contains(old.Key, t.col)
		})
		for _, t := range p.rev.targets {
			back[t.col] = true
		}
	}
	for i, c := range old.Columns {
		if c.Generated || back[i] {
			continue
		}
		if slices.Contains(old.Key, i) || !slices.ContainsFunc(info.parts, func(p *Mapping) bool { return p.dropped(c.Name) }) {
			info.reverseMissing = append(info.reverseMissing, c.Name)
		}
	}
	for _, p := range info.parts {
		p.reverseMissing = info.reverseMissing
	}
	return info.parts, nil
}

func joinField(prefix, field string) string {
	if field == "" {
		return prefix
	}
	return prefix + "." + field
}

// Carries reports whether the old column c goes to m's new table (passed
// through, renamed, or read by a computed column).
func (m *Mapping) Carries(c string) bool { return m.carried[c] }

// Split reports whether the mapping is a part of a vertical split.
func (m *Mapping) Split() bool { return m.split != nil }

// Owner reports whether the mapping holds its old rows' existence: a
// mapping that is not a split's part, or a split's first part.
func (m *Mapping) Owner() bool { return m.split == nil || m.part == 0 }

// Parts returns the parts of the split m is a part of, owner first, or m
// alone.
func (m *Mapping) Parts() []*Mapping {
	if m.split == nil {
		return []*Mapping{m}
	}
	return slices.Clone(m.split.parts)
}

// Part returns m's index among its split's parts (0 for the owner and for
// a mapping that is not a part).
func (m *Mapping) Part() int { return m.part }

// UnitName is the name m's own records are kept under where they are kept
// per table of the old store (a verify's runs): the old table's name, and
// for a dependent part of a split the old name with its new table
// (users[profiles]), so the parts' verifies are told apart. A split's
// backfill is one unit per old table, under the owner's name.
func (m *Mapping) UnitName() Name {
	if m.Owner() {
		return m.Old.Name
	}
	n := m.Old.Name
	to := m.New.Name.Table
	if m.New.Name.Schema != n.Schema {
		to = m.New.Name.String()
	}
	n.Table += "[" + to + "]"
	return n
}

// reverseUpdate returns, for a dependent part, the statement that writes
// its columns of rows from (a FROM item aliased src carrying the new
// columns cols) onto the old rows of their keys, and returns the keys (as
// text, one column per old key column, in key order) of the rows it found
// no old row for:
//
//	WITH v AS (SELECT <old key values> AS k0, ..., <old column values> AS c0, ... FROM <from>),
//	     u AS (UPDATE old AS d SET "c" = v.c0, ... FROM v WHERE (d.key) = (v.k0, ...) RETURNING d.key)
//	SELECT v.k0::text, ... FROM v WHERE NOT EXISTS (SELECT FROM u WHERE (u.key) = (v.k0, ...))
func (d *direction) reverseUpdate(from string, cols []string) (string, error) {
	var sel, sets []string
	for _, t := range d.targets {
		c := d.to.Columns[t.col]
		if slices.Contains(d.to.Key, t.col) || c.Identity == 'a' || !t.available(cols) {
			continue // the key names the row; an ALWAYS identity cannot be updated; a column not given is left alone
		}
		a := quoteIdent("c" + strconv.Itoa(len(sets)))
		sel = append(sel, t.value("src")+" AS "+a)
		sets = append(sets, quoteIdent(c.Name)+" = v."+a)
	}
	if len(sets) == 0 {
		return "", fmt.Errorf("writing %s: no column of it but the key can be derived from the columns given", d.to.Name)
	}
	return d.keyedUpdate(from, cols, sel, sets)
}

// reverseClear is reverseUpdate for the old rows of a dependent part's
// deleted rows: it sets the part's columns (every column it gives back
// but the key) to their defaults (NULL without one), and returns the keys
// it found no old row for, as reverseUpdate does. An old row being
// inserted by a transaction not yet committed there is not seen by an
// UPDATE (an upsert would wait for it, but an insert of a dependent's
// columns alone fails the owner's NOT NULL columns): such a key is drift
// for the caller, not a clear that never happened.
func (d *direction) reverseClear(from string, cols []string) (string, error) {
	var sets []string
	for _, c := range d.clearColumns() {
		sets = append(sets, quoteIdent(c)+" = DEFAULT")
	}
	if len(sets) == 0 {
		return "", fmt.Errorf("clearing %s: the part gives back no column but the key", d.to.Name)
	}
	return d.keyedUpdate(from, cols, nil, sets)
}

// keyedUpdate is the statement of reverseUpdate and reverseClear: v holds
// the rows' old keys (k0, ...) and the values sel, and sets are the
// UPDATE's assignments over v.
func (d *direction) keyedUpdate(from string, cols, sel, sets []string) (string, error) {
	keys, err := d.keyValues(cols)
	if err != nil {
		return "", err
	}
	var ks []string
	for i, k := range keys {
		ks = append(ks, k+" AS "+quoteIdent("k"+strconv.Itoa(i)))
	}
	where := ""
	if d.filter != "" {
		if miss := d.missingFilterRef(cols); miss != "" {
			return "", fmt.Errorf("writing %s: the rows lack %q of %s, which says which rows are carried: %w", d.to.Name, miss, d.from.Name, errNotDerivable)
		}
		where = " WHERE " + d.filter
	}
	keyNames := d.to.KeyNames()
	var vk, kt []string
	for i := range keys {
		a := "v." + quoteIdent("k"+strconv.Itoa(i))
		vk = append(vk, a)
		kt = append(kt, a+"::text")
	}
	return "WITH v AS (SELECT " + strings.Join(append(ks, sel...), ", ") + " FROM " + from + where + "), " +
		"u AS (UPDATE " + d.to.Name.Quoted() + " AS d SET " + strings.Join(sets, ", ") + " FROM v WHERE (" + prefixedList("d", keyNames) + ") = (" +
		strings.Join(vk, ", ") + ") RETURNING " + prefixedList("d", keyNames) + ") " +
		"SELECT " + strings.Join(kt, ", ") + " FROM v WHERE NOT EXISTS (SELECT FROM u WHERE (" + prefixedList("u", keyNames) + ") = (" +
		strings.Join(vk, ", ") + "))", nil
}

// clearColumns returns the columns of to a dependent part's reverse
// writes: the ones its DELETE sets to their defaults (every column it
// gives back but the key).
func (d *direction) clearColumns() []string {
	var out []string
	for _, t := range d.targets {
		c := d.to.Columns[t.col]
		if !slices.Contains(d.to.Key, t.col) && c.Identity != 'a' {
			out = append(out, c.Name)
		}
	}
	return out
}

// ReverseUpdateSQL is the reverse write of a dependent part of a split
// (Owner false) for rows row images of its new table (newCols, as
// ForwardUpsertSQL takes them): an UPDATE of the part's columns of the old
// rows by key, which returns one row per image whose key has no old row,
// that key as text, one column per old key column in key order (the owner's row is not
// there yet: the caller records it as drift).
func (m *Mapping) ReverseUpdateSQL(newCols []string, rows int) (string, error) {
	if m.Owner() {
		return "", fmt.Errorf("mapping %s: ReverseUpdateSQL is for a dependent part of a split; %s is the owner", m.Old.Name, m.New.Name)
	}
	from, err := m.rev.source(newCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	return m.rev.reverseUpdate(from, newCols)
}

// ReverseClearSQL is the reverse delete of a dependent part of a split:
// it sets the part's columns of the old rows of the images' keys to their
// defaults (the old row stays: the owner holds its existence), and
// returns, as ReverseUpdateSQL does, the keys it found no old row for.
func (m *Mapping) ReverseClearSQL(newCols []string, rows int) (string, error) {
	if m.Owner() {
		return "", fmt.Errorf("mapping %s: ReverseClearSQL is for a dependent part of a split; %s is the owner", m.Old.Name, m.New.Name)
	}
	from, err := m.rev.source(newCols, rows)
	if err != nil {
		return "", fmt.Errorf("mapping %s: %w", m.Old.Name, err)
	}
	return m.rev.reverseClear(from, newCols)
}
