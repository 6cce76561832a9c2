package config

import (
	"fmt"
	"path"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Tables is the `tables:` section: which tables the migration covers and how each old table becomes a new one
// (design section 6). It is read from the YAML file only; there are no flags or environment variables for it.
//
// Table names and patterns are written as SQL writes them: schema.table, an unqualified name meaning
// public.name, unquoted parts folded to lower case and double-quoted parts kept exactly ("My Schema"."My Table").
// Column names are exact (case-sensitive, no quoting) and expressions are SQL, evaluated by the stores.
type Tables struct {
	// Include lists glob patterns (path.Match syntax, matched separately against the schema and the table
	// part: "public.*", "*.*", "sales.order_?") for the tables in the migration's scope; empty = every user table.
	Include []string `yaml:"include"`
	// Exclude lists patterns, of the same form, for tables taken out of the scope even when included.
	Exclude []string `yaml:"exclude"`
	// Map declares, by old table name, how a table maps; a table in scope without an entry maps to itself.
	Map map[string]TableMap `yaml:"map"`
}

// TableMap is the declaration of how one old table maps to one new table.
type TableMap struct {
	To      string            `yaml:"to"`      // new table name; empty = the same name as the old table
	Rename  map[string]string `yaml:"rename"`  // old column -> new column
	Drop    []string          `yaml:"drop"`    // old columns that are not carried to the new table
	Compute map[string]string `yaml:"compute"` // new column -> SQL expression over the old columns
	Reverse map[string]string `yaml:"reverse"` // old column -> SQL expression over the new columns (new -> old mirroring after the write flip)
	// Where is a row predicate, SQL over the old row's columns: only old rows for which it is true are carried to
	// the new table (a horizontal split; empty = every row).
	Where string `yaml:"where"`
	// Discriminator gives new columns a constant value that marks this deployment's rows (new column -> value, in
	// the column's text form, cast to its type): it is written on every row carried forward and is the new-side
	// predicate of every path, so with several deployments consolidating into one new table (a tenant column in
	// the key), each reads, compares, repairs and mirrors back only its own rows.
	Discriminator map[string]string `yaml:"discriminator"`
	// Split makes the old table several new tables that share its key (a vertical split): each part is a
	// mapping of its own (to, rename, drop, compute, reverse, where) from the old table to one new table, and
	// every part carries the whole old key. The first part is the owner: its new table holds every old row, so a
	// row exists on new when it exists there; the others are dependents. An entry with split declares nothing
	// else itself.
	Split []TableMap `yaml:"split"`
	// MergeInto makes the old table part of a merge: several old tables that share a key become one new table.
	// It names the entry of the owner, the old table whose rows give the new rows their existence; the entry
	// maps its own old table to the owner's new table (to may be left out) and writes some of its columns.
	MergeInto string `yaml:"merge_into"`
}

// tableMapKeys are the keys of one entry under tables.map, in the order of TableMap.
var tableMapKeys = []string{"to", "rename", "drop", "compute", "reverse", "where", "discriminator", "split", "merge_into"}

// tablesKeys are the keys of the tables section, in the order of Tables.
var tablesKeys = []string{"include", "exclude", "map"}

// ParseTableName parses a table name written as SQL writes it: "table", "schema.table", with any part
// double-quoted ("My Schema"."My ""Big"" Table"). Unquoted parts fold to lower case (ASCII, as PostgreSQL folds
// them) and an unqualified name is in schema public.
func ParseTableName(s string) (schema, table string, err error) {
	parts, err := splitIdent(s, false)
	if err != nil {
		return "", "", err
	}
	if len(parts) == 1 {
		return "public", parts[0], nil
	}
	return parts[0], parts[1], nil
}

// ParseTablePattern parses an include or exclude pattern into its schema and table globs (path.Match syntax),
// with the quoting and folding rules of ParseTableName; an unqualified pattern is in schema public.
func ParseTablePattern(s string) (schema, table string, err error) {
	parts, err := splitIdent(s, true)
	if err != nil {
		return "", "", err
	}
	if len(parts) == 1 {
		parts = []string{"public", parts[0]}
	}
	for _, p := range parts {
		if _, err := path.Match(p, ""); err != nil {
			return "", "", fmt.Errorf("%q is not a valid glob pattern (path.Match syntax: *, ?, [a-z], \\ escapes)", p)
		}
	}
	return parts[0], parts[1], nil
}

// splitIdent splits a possibly qualified, possibly quoted name into one or two parts.
func splitIdent(s string, pattern bool) ([]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, fmt.Errorf("empty table name")
	}
	var parts []string
	i := 0
	for {
		var part strings.Builder
		if i < len(s) && s[i] == '"' {
			i++
			closed := false
			for i < len(s) {
				if s[i] == '"' {
					if i+1 < len(s) && s[i+1] == '"' {
						part.WriteByte('"')
						i += 2
						continue
					}
					i++
					closed = true
					break
				}
				part.WriteByte(s[i])
				i++
			}
			if !closed {
				return nil, fmt.Errorf("%q has an unterminated quoted identifier", s)
			}
			if part.Len() == 0 {
				return nil, fmt.Errorf("%q has an empty quoted identifier", s)
			}
		} else {
			for i < len(s) && s[i] != '.' {
				c := s[i]
				switch {
				case c == '"':
					return nil, fmt.Errorf("%q: a double quote may only start a part (quote the whole part)", s)
				case c == ' ' || c == '\t' || c == '\n' || c == '\r':
					return nil, fmt.Errorf("%q contains white space: double-quote a part that contains it", s)
				case !pattern && (c == '*' || c == '?' || c == '['):
					return nil, fmt.Errorf("%q looks like a pattern; a table name is wanted here", s)
				}
				if 'A' <= c && c <= 'Z' {
					c += 'a' - 'A'
				}
				part.WriteByte(c)
				i++
			}
			if part.Len() == 0 {
				return nil, fmt.Errorf("%q has an empty part", s)
			}
		}
		parts = append(parts, part.String())
		if i == len(s) {
			break
		}
		if s[i] != '.' {
			return nil, fmt.Errorf("%q: expected a dot after a quoted part", s)
		}
		i++
		if len(parts) == 2 {
			return nil, fmt.Errorf("%q has more than two parts; write schema.table", s)
		}
	}
	return parts, nil
}

// tablesPath is the YAML path of the entry for the old table key under tables.map, as problems name it.
func tablesPath(key string) string { return "tables.map[" + key + "]" }

// walkTables checks and decodes the tables section v found under key k.
func (w *walker) walkTables(k, v *yaml.Node) {
	w.cfg.setOrigin("tables", origin{line: k.Line, column: k.Column})
	w.mapping(k, v, "tables", tablesKeys, func(key, val *yaml.Node, field string) {
		switch key.Value {
		case "include":
			w.cfg.Tables.Include = w.strings(key, val, field)
		case "exclude":
			w.cfg.Tables.Exclude = w.strings(key, val, field)
		case "map":
			w.mapping(key, val, field, nil, func(tk, tv *yaml.Node, tfield string) {
				if w.cfg.Tables.Map == nil {
					w.cfg.Tables.Map = make(map[string]TableMap)
				}
				w.cfg.Tables.Map[tk.Value] = w.tableMap(tk, tv, tablesPath(tk.Value))
			})
		}
	})
}

// tableMap checks and decodes one entry of tables.map.
func (w *walker) tableMap(k, v *yaml.Node, field string) TableMap {
	var tm TableMap
	w.cfg.setOrigin(field, origin{line: k.Line, column: k.Column})
	w.mapping(k, v, field, tableMapKeys, func(key, val *yaml.Node, f string) {
		switch key.Value {
		case "to":
			tm.To = w.str(key, val, f)
		case "rename":
			tm.Rename = w.stringMap(key, val, f)
		case "drop":
			tm.Drop = w.strings(key, val, f)
		case "compute":
			tm.Compute = w.stringMap(key, val, f)
		case "reverse":
			tm.Reverse = w.stringMap(key, val, f)
		case "where":
			tm.Where = w.str(key, val, f)
		case "discriminator":
			tm.Discriminator = w.stringMap(key, val, f)
		case "split":
			tm.Split = w.splitParts(key, val, f)
		case "merge_into":
			tm.MergeInto = w.str(key, val, f)
		}
	})
	return tm
}

// splitParts decodes the parts of a split: a list of mappings, each an entry of its own at field[i].
func (w *walker) splitParts(k, v *yaml.Node, field string) []TableMap {
	v = resolveAlias(v)
	if v.ShortTag() == "!!null" {
		return nil
	}
	if v.Kind != yaml.SequenceNode {
		w.problem(k, field, "must be a list of parts (each with to, rename, drop, compute, reverse, where), not "+nodeKind(v))
		return nil
	}
	w.cfg.setOrigin(field, origin{line: k.Line, column: k.Column})
	out := make([]TableMap, 0, len(v.Content))
	for i, item := range v.Content {
		// The item is its own key node: problems with the part as a whole
		// point at its dash.
		out = append(out, w.tableMap(item, item, fmt.Sprintf("%s[%d]", field, i)))
	}
	return out
}

// mapping checks that v (the value of key k, at the YAML path field) is a mapping whose keys are all in valid (any
// key when valid is nil) and appear once, and calls each for every key with its value and path. Merge keys (<<)
// are applied first, so explicit keys override merged ones. A null value is an empty mapping.
func (w *walker) mapping(k, v *yaml.Node, field string, valid []string, each func(key, val *yaml.Node, field string)) {
	v = resolveAlias(v)
	if v.ShortTag() == "!!null" {
		return
	}
	if v.Kind != yaml.MappingNode {
		w.problem(k, field, "must be a mapping (key: value), not "+nodeKind(v))
		return
	}
	explicit := make(map[string]*yaml.Node)
	for i := 0; i+1 < len(v.Content); i += 2 {
		if key := v.Content[i]; key.ShortTag() != "!!merge" && key.Kind == yaml.ScalarNode {
			if _, dup := explicit[key.Value]; !dup {
				explicit[key.Value] = key
			}
		}
	}
	merged := make(map[string]bool)
	one := func(key, val *yaml.Node) {
		if valid != nil && !slices.Contains(valid, key.Value) {
			w.problem(key, "", unknownKey(key.Value, field, valid))
			return
		}
		each(key, val, field+"."+key.Value)
	}
	// Merge keys (<<) first, as in YAML: a key set explicitly overrides a merged one, and an earlier merged
	// mapping overrides a later one.
	var merge func(n *yaml.Node)
	merge = func(n *yaml.Node) {
		n = resolveAlias(n)
		switch n.Kind {
		case yaml.SequenceNode:
			for _, x := range n.Content {
				merge(x)
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				key, val := n.Content[i], n.Content[i+1]
				if key.ShortTag() == "!!merge" {
					merge(val)
					continue
				}
				if _, ok := explicit[key.Value]; ok || merged[key.Value] || key.Kind != yaml.ScalarNode {
					continue
				}
				merged[key.Value] = true
				one(key, val)
			}
		}
	}
	for i := 0; i+1 < len(v.Content); i += 2 {
		if key := v.Content[i]; key.ShortTag() == "!!merge" {
			merge(v.Content[i+1])
		}
	}
	for i := 0; i+1 < len(v.Content); i += 2 {
		key, val := v.Content[i], v.Content[i+1]
		if key.ShortTag() == "!!merge" {
			continue
		}
		if key.Kind != yaml.ScalarNode {
			w.problem(key, field, "a key must be a single value, not "+nodeKind(key))
			continue
		}
		if first := explicit[key.Value]; first != key {
			w.problem(key, "", fmt.Sprintf("key %q appears twice in %s (first on line %d)", key.Value, field, first.Line))
			continue
		}
		one(key, val)
	}
}

// unknownKey describes an unknown key in the section at field, suggesting the nearest valid one.
func unknownKey(key, field string, valid []string) string {
	msg := fmt.Sprintf("unknown field %q in %s", key, field)
	return withSuggestion(msg, key, valid)
}

// str decodes a single string value; null is "".
func (w *walker) str(k, v *yaml.Node, field string) string {
	v = resolveAlias(v)
	if v.ShortTag() == "!!null" {
		return ""
	}
	if v.Kind != yaml.ScalarNode {
		w.problem(k, field, "must be a single value, not "+nodeKind(v))
		return ""
	}
	w.cfg.setOrigin(field, origin{line: k.Line, column: k.Column})
	return v.Value
}

// strings decodes a list of strings; null is an empty list.
func (w *walker) strings(k, v *yaml.Node, field string) []string {
	v = resolveAlias(v)
	if v.ShortTag() == "!!null" {
		return nil
	}
	if v.Kind != yaml.SequenceNode {
		w.problem(k, field, "must be a list of strings, not "+nodeKind(v))
		return nil
	}
	w.cfg.setOrigin(field, origin{line: k.Line, column: k.Column})
	out := make([]string, 0, len(v.Content))
	for i, item := range v.Content {
		item = resolveAlias(item)
		f := fmt.Sprintf("%s[%d]", field, i)
		if item.Kind != yaml.ScalarNode || item.ShortTag() == "!!null" {
			what := nodeKind(item)
			if item.ShortTag() == "!!null" {
				what = "null"
			}
			w.problem(item, f, "must be a string, not "+what)
			continue
		}
		w.cfg.setOrigin(f, origin{line: item.Line, column: item.Column})
		out = append(out, item.Value)
	}
	return out
}

// stringMap decodes a mapping of strings to strings; null is an empty mapping.
func (w *walker) stringMap(k, v *yaml.Node, field string) map[string]string {
	var out map[string]string
	w.mapping(k, v, field, nil, func(key, val *yaml.Node, f string) {
		val = resolveAlias(val)
		if val.Kind != yaml.ScalarNode || val.ShortTag() == "!!null" {
			what := nodeKind(val)
			if val.ShortTag() == "!!null" {
				what = "empty"
			}
			w.problem(key, f, "must be a single value, not "+what)
			return
		}
		if out == nil {
			out = make(map[string]string)
		}
		w.cfg.setOrigin(f, origin{line: key.Line, column: key.Column})
		out[key.Value] = val.Value
	})
	if out != nil {
		w.cfg.setOrigin(field, origin{line: k.Line, column: k.Column})
	}
	return out
}

// validateTables checks the tables section: patterns and names parse, each old and new table is named once,
// and no column is given two fates.
func (v *validator) validateTables(t Tables) {
	for _, list := range []struct {
		field    string
		patterns []string
	}{{"tables.include", t.Include}, {"tables.exclude", t.Exclude}} {
		for i, p := range list.patterns {
			if _, _, err := ParseTablePattern(p); err != nil {
				v.add(fmt.Sprintf("%s[%d]", list.field, i), "bad pattern: "+err.Error())
			}
		}
	}
	keys := make([]string, 0, len(t.Map))
	for k := range t.Map {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		if d := v.line(tablesPath(a)) - v.line(tablesPath(b)); d != 0 {
			return d
		}
		return strings.Compare(a, b)
	})
	olds := make(map[[2]string]string) // parsed old name -> key
	news := make(map[[2]string]string) // parsed new name -> key (of the merge's owner, for a merge)
	byName := make(map[[2]string]string)
	owners := make(map[string]bool) // keys that a merge_into names
	for _, key := range keys {
		if s, n, err := ParseTableName(key); err == nil {
			byName[[2]string{s, n}] = key
		}
	}
	for _, key := range keys {
		if s, n, err := ParseTableName(t.Map[key].MergeInto); err == nil && t.Map[key].MergeInto != "" {
			if o, ok := byName[[2]string{s, n}]; ok && o != key {
				owners[o] = true
			}
		}
	}
	for _, key := range keys {
		tm := t.Map[key]
		field := tablesPath(key)
		s, n, err := ParseTableName(key)
		if err != nil {
			v.add(field, "bad table name: "+err.Error())
			continue
		}
		if other, dup := olds[[2]string{s, n}]; dup {
			v.add(field, fmt.Sprintf("names the same table as %q", other))
			continue
		}
		olds[[2]string{s, n}] = key
		if v.set(field + ".merge_into") {
			v.validateMember(field, key, tm, t.Map, byName, news)
			v.validateColumns(field, tm)
			continue
		}
		if len(tm.Split) > 0 || v.set(field+".split") {
			if owners[key] {
				v.add(field+".split", "a split table cannot own a merge (another entry's merge_into names it): merge into a table mapped to one new table")
			}
			v.validateSplit(field, key, [2]string{s, n}, tm, news)
			continue
		}
		if owners[key] {
			v.refuseInMerge(field, tm)
		}
		v.validateTarget(field, key, [2]string{s, n}, tm, news)
		v.validateColumns(field, tm)
	}
}

// refuseInMerge reports what a table of a merge (its owner, which another entry's merge_into names, or a member)
// cannot carry: a where, a discriminator (its new rows are every member's).
func (v *validator) refuseInMerge(field string, tm TableMap) {
	if v.set(field + ".where") {
		v.add(field+".where", "a table of a merge cannot carry a where: a member's row exists on old when one of the columns it writes is not NULL")
	}
	if len(tm.Discriminator) > 0 {
		v.add(field+".discriminator", "a table of a merge cannot carry a discriminator (a merge into a table other deployments share is not supported)")
	}
}

// validateMember checks the member of a merge at field (an entry with merge_into): merge_into names another
// entry of tables.map that is not a member or a split itself, and the member's to (when given) is the owner's
// new table, which it then shares with the owner.
func (v *validator) validateMember(field, key string, tm TableMap, all map[string]TableMap, byName map[[2]string]string, news map[[2]string]string) {
	f := field + ".merge_into"
	v.refuseInMerge(field, tm)
	if len(tm.Split) > 0 || v.set(field+".split") {
		v.add(field+".split", "split beside merge_into: a table of a merge maps to the merged table alone")
	}
	if strings.TrimSpace(tm.MergeInto) == "" {
		v.add(f, "empty: name the entry of tables.map whose old table owns the merged rows")
		return
	}
	os, on, err := ParseTableName(tm.MergeInto)
	if err != nil {
		v.add(f, "bad table name: "+err.Error())
		return
	}
	owner, ok := byName[[2]string{os, on}]
	switch {
	case !ok:
		v.add(f, fmt.Sprintf("names %s.%s, which has no entry in tables.map: declare the owner's mapping to the merged table (its to)", os, on))
		return
	case owner == key:
		v.add(f, "names this entry itself: name the entry of the table that owns the merged rows")
		return
	case all[owner].MergeInto != "":
		v.add(f, fmt.Sprintf("names %q, which is merged into %q itself: name the owner", owner, all[owner].MergeInto))
		return
	case len(all[owner].Split) > 0:
		return // reported at the owner
	}
	to := [2]string{os, on}
	if ot := all[owner].To; ot != "" {
		ts, tn, err := ParseTableName(ot)
		if err != nil {
			return // reported at the owner
		}
		to = [2]string{ts, tn}
	}
	if tm.To != "" {
		ts, tn, err := ParseTableName(tm.To)
		if err != nil {
			v.add(field+".to", "bad table name: "+err.Error())
			return
		}
		if [2]string{ts, tn} != to {
			v.add(field+".to", fmt.Sprintf("is %s.%s, but %q (merge_into) maps to %s.%s: a member writes the owner's new table (leave to out)", ts, tn, owner, to[0], to[1]))
			return
		}
	}
	if other, dup := news[to]; dup && other != owner {
		v.add(field+".merge_into", fmt.Sprintf("merges into %s.%s, which is already the new table of %q", to[0], to[1], other))
		return
	}
	news[to] = owner
}

// validateTarget checks the new table of the entry (or split part) at field of the old table key: a name, and
// one no other entry or part writes (several old tables into one new table, a merge, is not supported; a
// consolidation writes one new table from several deployments, each with a tables.map of its own).
func (v *validator) validateTarget(field, key string, old [2]string, tm TableMap, news map[[2]string]string) {
	to := old
	if tm.To != "" {
		ts, tn, err := ParseTableName(tm.To)
		if err != nil {
			v.add(field+".to", "bad table name: "+err.Error())
			return
		}
		to = [2]string{ts, tn}
	}
	if other, dup := news[to]; dup && (other != key || strings.Contains(field, ".split[")) /* a merge's member registered its owner's key */ {
		if other == key {
			v.add(field+".to", fmt.Sprintf("%s.%s is already the new table of another part of this split: each part writes a new table of its own", to[0], to[1]))
		} else {
			v.add(field+".to", fmt.Sprintf("%s.%s is already the new table of %q: one new table per old table, unless they are merged (merge_into names the owner's entry)", to[0], to[1], other))
		}
	}
	news[to] = key
}

// validateSplit checks the split declared at field (the old table key): two parts or more, nothing declared
// beside them, each part an ordinary mapping to a new table of its own, the owner (the first part) unfiltered.
func (v *validator) validateSplit(field, key string, old [2]string, tm TableMap, news map[[2]string]string) {
	for _, k := range []struct {
		name string
		set  bool
	}{{"to", tm.To != ""}, {"rename", len(tm.Rename) > 0}, {"drop", len(tm.Drop) > 0}, {"compute", len(tm.Compute) > 0},
		{"reverse", len(tm.Reverse) > 0}, {"where", v.set(field + ".where")}, {"discriminator", len(tm.Discriminator) > 0}} {
		if k.set {
			v.add(field+"."+k.name, k.name+" beside split: declare it in the part it belongs to")
		}
	}
	if len(tm.Split) < 2 {
		v.add(field+".split", fmt.Sprintf("a split needs two parts or more, not %d: one new table is an ordinary mapping (to, rename, ...)", len(tm.Split)))
	}
	for i, p := range tm.Split {
		f := fmt.Sprintf("%s.split[%d]", field, i)
		switch {
		case len(p.Split) > 0 || v.set(f+".split"):
			v.add(f+".split", "a part cannot be split again: list every new table in one split")
		case len(p.Discriminator) > 0:
			v.add(f+".discriminator", "a split part cannot carry a discriminator (a split into new tables others share is not supported)")
			continue
		case i == 0 && v.set(f+".where"):
			v.add(f+".where", "the first part is the owner, whose new table holds every row of the old table: put the where on a later part")
		}
		v.validateTarget(f, key, old, p, news)
		v.validateColumns(f, p)
	}
}

// set reports whether field is set in the file.
func (v *validator) set(field string) bool {
	_, ok := v.c.src.originOf(field)
	return ok
}

// validateColumns checks one table's column declarations for empty names and conflicting fates.
func (v *validator) validateColumns(field string, tm TableMap) {
	dropped := make(map[string]bool)
	for i, c := range tm.Drop {
		f := fmt.Sprintf("%s.drop[%d]", field, i)
		switch {
		case c == "":
			v.add(f, "empty column name")
		case dropped[c]:
			v.add(f, fmt.Sprintf("column %q is listed twice", c))
		case tm.Rename[c] != "":
			v.add(f, fmt.Sprintf("column %q is both renamed (to %q) and dropped", c, tm.Rename[c]))
		}
		dropped[c] = true
	}
	targets := make(map[string]string) // new column -> old column renamed to it
	for _, old := range sortedKeys(tm.Rename) {
		nw := tm.Rename[old]
		f := field + ".rename." + old
		switch {
		case old == "" || nw == "":
			v.add(f, "empty column name")
		case targets[nw] != "":
			v.add(f, fmt.Sprintf("%q and %q are both renamed to %q", targets[nw], old, nw))
		case tm.Compute[nw] != "":
			v.add(f, fmt.Sprintf("new column %q is both renamed to (from %q) and computed", nw, old))
		}
		if tm.Reverse[old] != "" {
			v.add(field+".reverse."+old, fmt.Sprintf("old column %q is renamed, which already mirrors it back from %q; remove its reverse expression", old, nw))
		}
		targets[nw] = old
	}
	if _, set := v.c.src.originOf(field + ".where"); set && strings.TrimSpace(tm.Where) == "" {
		v.add(field+".where", "empty predicate: remove where, or give SQL over the old row (e.g. region = 'eu')")
	}
	if len(tm.Discriminator) > 0 && v.c.Feed.Enabled && v.c.Feed.Name == "" {
		// Unnamed, the feed's slot (tandem_feed_new) and publication
		// (tandem_feed) would be one for every deployment sharing the new
		// store: they would read and confirm one slot.
		v.add(field+".discriminator", "with feed.enabled, a consolidation's deployments share the new store and need change feeds of their own: "+
			"set feed.name to this deployment's name (e.g. feed.name: "+feedNameHint(tm.Discriminator)+")")
	}
	for _, col := range sortedKeys(tm.Discriminator) {
		f := field + ".discriminator." + col
		switch {
		case col == "":
			v.add(f, "empty column name")
		case tm.Compute[col] != "":
			v.add(f, fmt.Sprintf("new column %q is both computed and a discriminator; a discriminator is a constant: remove one", col))
		case targets[col] != "":
			v.add(f, fmt.Sprintf("new column %q is both renamed to (from %q) and a discriminator: remove one", col, targets[col]))
		}
	}
	for _, m := range []struct {
		name  string
		exprs map[string]string
	}{{"compute", tm.Compute}, {"reverse", tm.Reverse}} {
		for _, col := range sortedKeys(m.exprs) {
			f := field + "." + m.name + "." + col
			switch {
			case col == "":
				v.add(f, "empty column name")
			case strings.TrimSpace(m.exprs[col]) == "":
				v.add(f, "empty expression")
			}
		}
	}
}

// line returns the line in the file where field was set, or 0.
func (v *validator) line(field string) int {
	if v.c.src == nil {
		return 0
	}
	return v.c.src.origins[field].line
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// feedNameHint suggests a feed.name from a discriminator's values: the
// first value, folded to what feed.name allows.
func feedNameHint(disc map[string]string) string {
	for _, col := range sortedKeys(disc) {
		var b strings.Builder
		for _, r := range strings.ToLower(disc[col]) {
			switch {
			case 'a' <= r && r <= 'z', '0' <= r && r <= '9':
				b.WriteRune(r)
			case b.Len() > 0:
				b.WriteByte('_')
			}
		}
		if h := strings.Trim(b.String(), "_"); h != "" && len(h) <= 40 {
			return h
		}
	}
	return "shop"
}
