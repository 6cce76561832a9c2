package shadow

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Field is one result column as the RowDescription described it.
type Field struct {
	Name   string
	OID    uint32 // type OID
	Format int16  // 0 text, 1 binary
}

// Result is one store's answer to a read.
type Result struct {
	Fields  []Field
	Rows    [][][]byte // each row's column values as sent on the wire; nil = NULL
	ErrCode string     // SQLSTATE when the statement failed (then Fields/Rows are whatever arrived before)
	ErrMsg  string
}

// SortKey names one ORDER BY key as an output column: Pos (1-based position)
// when > 0, else Name (output column name, matched case-sensitively to
// Field.Name; it must match exactly one field to be usable).
type SortKey struct {
	Name string
	Pos  int
}

// Shape is what the query's text says about how to compare its results.
type Shape struct {
	Ordered  bool      // the query has a top-level ORDER BY
	SortKeys []SortKey // the ORDER BY keys as output columns; nil/unresolvable => compare as multiset
	Limited  bool      // top-level LIMIT / FETCH present
	Offset   bool      // top-level OFFSET present
}

// Options tunes the comparison and the size of a [Diff]. The zero value
// gives the defaults.
type Options struct {
	// FloatTolerance is the relative tolerance for float4/float8 values
	// (also float elements of arrays): default 1e-9 when 0; a negative value
	// requires exact equality.
	FloatTolerance float64
	// MaxValue is the number of bytes after which a value shown in a Diff is
	// truncated (with "…" appended): default 64.
	MaxValue int
	// MaxRows is the number of rows listed per side (and of changed rows) in
	// a Diff: default 5.
	MaxRows int
}

// Diff kinds.
const (
	KindColumns = "columns" // the RowDescriptions differ
	KindError   = "error"   // one side failed, or the SQLSTATEs differ
	KindRows    = "rows"    // the row sets or their order differ
)

// Diff says how two results differ. It is stored as JSON in the control
// schema.
type Diff struct {
	// Kind is KindColumns, KindError or KindRows.
	Kind string `json:"kind"`
	// Summary is one line a human can read.
	Summary string `json:"summary"`
	// Columns lists both RowDescriptions for Kind "columns".
	Columns *ColumnDiff `json:"columns,omitempty"`
	// ServedError and ShadowError are "SQLSTATE: message" of a failed side
	// for Kind "error".
	ServedError string `json:"served_error,omitempty"`
	ShadowError string `json:"shadow_error,omitempty"`
	// ServedRows and ShadowRows are the row counts of both sides.
	ServedRows int `json:"served_rows"`
	ShadowRows int `json:"shadow_rows"`
	// OnlyServed and OnlyShadow are canonical values (nil element = NULL,
	// values truncated) of rows found on one side only, at most MaxRows each.
	OnlyServed [][]*string `json:"only_served,omitempty"`
	OnlyShadow [][]*string `json:"only_shadow,omitempty"`
	// OnlyServedCount and OnlyShadowCount are how many such rows there are
	// in all (the lists may be shorter).
	OnlyServedCount int `json:"only_served_count,omitempty"`
	OnlyShadowCount int `json:"only_shadow_count,omitempty"`
	// Changed lists rows paired by their first column (typically the key)
	// that differ in some columns, at most MaxRows.
	Changed []RowChange `json:"changed,omitempty"`
	// ChangedCount is how many rows were paired into changes in all.
	ChangedCount int `json:"changed_count,omitempty"`
	// OrderDiffers is set when both sides hold the same rows but the order
	// that the query's ORDER BY fixes differs.
	OrderDiffers bool `json:"order_differs,omitempty"`
	// Truncated is set when some rows were left out of the lists.
	Truncated bool `json:"truncated,omitempty"`
	// Redacted is set when the values were removed (see Redact).
	Redacted bool `json:"redacted,omitempty"`
}

// Redact removes every value from d: the rows found on one side only, the
// key and values of changed rows (their column names stay) and the stores'
// error messages (their SQLSTATEs stay). Counts, column descriptions and the
// summary, which name no values, are kept, so a redacted Diff still says
// what kind of difference it was and where. Redacted is set.
func (d *Diff) Redact() {
	if n := len(d.OnlyServed); n > 0 && d.OnlyServedCount == 0 {
		d.OnlyServedCount = n
	}
	if n := len(d.OnlyShadow); n > 0 && d.OnlyShadowCount == 0 {
		d.OnlyShadowCount = n
	}
	d.OnlyServed, d.OnlyShadow = nil, nil
	for i := range d.Changed {
		c := &d.Changed[i]
		c.Key = ""
		for name := range c.Columns {
			c.Columns[name] = [2]*string{}
		}
	}
	d.ServedError = sqlstateOnly(d.ServedError)
	d.ShadowError = sqlstateOnly(d.ShadowError)
	if d.Kind == KindError {
		d.Summary = "served " + outcome(d.ServedError, d.ServedRows) + "; shadow " + outcome(d.ShadowError, d.ShadowRows)
	}
	d.Redacted = true
}

// sqlstateOnly keeps the "SQLSTATE" of an "SQLSTATE: message" error text.
func sqlstateOnly(e string) string {
	code, _, _ := strings.Cut(e, ":")
	return code
}

// outcome describes one side of an error Diff as errorDiff does, from a
// SQLSTATE alone.
func outcome(code string, rows int) string {
	if code == "" {
		return "succeeded with " + plural(rows, "row")
	}
	return "failed with " + code
}

// ColumnDiff lists both RowDescriptions as "name:type" per column.
type ColumnDiff struct {
	Served []string `json:"served"`
	Shadow []string `json:"shadow"`
}

// RowChange is a served row and a shadow row with the same first column
// value (Key, canonical and truncated) that differ in other columns. Columns
// maps each differing column's name to its [served, shadow] canonical values
// (nil = NULL); a name that is empty or not unique in the RowDescription is
// suffixed with "#" and the column's 1-based position.
type RowChange struct {
	Key     string                `json:"key"`
	Columns map[string][2]*string `json:"columns"`
}

const (
	defaultFloatTolerance = 1e-9
	defaultMaxValue       = 64
	defaultMaxRows        = 5
	maxTolerantRows       = 1000 // leftovers per side above which the tolerant pass is skipped
	maxErrorText          = 256  // bytes of an error message kept in a Diff
)

// Compare returns nil when the results match after normalisation, otherwise
// a [Diff] describing the difference.
//
// Errors: both sides failing with the same SQLSTATE is a match; one side
// failing or different SQLSTATEs is a Diff of kind "error". Columns: both
// sides must have the same column names in order and the same type family per
// column (int2/int4/int8/oid; float4/float8; numeric;
// text/varchar/bpchar/name; json/jsonb; timestamptz; timestamp; date; arrays
// by element family; any other type only itself), else kind "columns". Rows
// are compared by their [Canonical] values (floats within
// Options.FloatTolerance): as multisets, or, when shape is ordered by
// resolvable sort keys, as the same sequence of sort-key tuples where rows
// tying on the keys compare as multisets (with LIMIT, the membership of the
// last tie group is not compared; with OFFSET, that of the first).
func Compare(served, shadow Result, shape Shape, opts Options) *Diff {
	opts = withDefaults(opts)
	if served.ErrCode != "" || shadow.ErrCode != "" {
		if served.ErrCode == shadow.ErrCode {
			return nil
		}
		return errorDiff(served, shadow)
	}
	if d := columnsDiff(served.Fields, shadow.Fields); d != nil {
		d.ServedRows, d.ShadowRows = len(served.Rows), len(shadow.Rows)
		return d
	}
	c := newComparer(served.Fields, opts)
	sv, sh := canonRows(served), canonRows(shadow)
	leftS, leftSh, orderAt := c.compareRows(sv, sh, shape)
	if len(leftS) == 0 && len(leftSh) == 0 && orderAt < 0 {
		return nil
	}
	d := &Diff{Kind: KindRows, ServedRows: len(sv), ShadowRows: len(sh)}
	if len(leftS) == 0 && len(leftSh) == 0 {
		d.OrderDiffers = true
		d.Summary = fmt.Sprintf("same %s in a different order: sort keys first differ at row %d", plural(len(sv), "row"), orderAt+1)
		return d
	}
	c.fillRows(d, leftS, leftSh)
	return d
}

func withDefaults(o Options) Options {
	switch {
	case o.FloatTolerance == 0:
		o.FloatTolerance = defaultFloatTolerance
	case o.FloatTolerance < 0:
		o.FloatTolerance = 0
	}
	if o.MaxValue <= 0 {
		o.MaxValue = defaultMaxValue
	}
	if o.MaxRows <= 0 {
		o.MaxRows = defaultMaxRows
	}
	return o
}

func errorDiff(served, shadow Result) *Diff {
	d := &Diff{Kind: KindError, ServedRows: len(served.Rows), ShadowRows: len(shadow.Rows)}
	describe := func(r Result) (string, string) {
		if r.ErrCode == "" {
			return "succeeded with " + plural(len(r.Rows), "row"), ""
		}
		e := r.ErrCode + ": " + truncate(r.ErrMsg, maxErrorText)
		return "failed with " + e, e
	}
	s, se := describe(served)
	h, he := describe(shadow)
	d.ServedError, d.ShadowError = se, he
	d.Summary = "served " + s + "; shadow " + h
	return d
}

// columnsDiff compares the RowDescriptions: names in order and type family.
func columnsDiff(served, shadow []Field) *Diff {
	describe := func(fs []Field) []string {
		out := make([]string, len(fs))
		for i, f := range fs {
			out[i] = f.Name + ":" + typeName(f.OID)
		}
		return out
	}
	summary := ""
	if len(served) != len(shadow) {
		summary = fmt.Sprintf("served has %s, shadow %d", plural(len(served), "column"), len(shadow))
	} else {
		for i := range served {
			a, b := served[i], shadow[i]
			if a.Name != b.Name {
				summary = fmt.Sprintf("column %d is %q on served, %q on shadow", i+1, a.Name, b.Name)
				break
			}
			if family(a.OID) != family(b.OID) {
				summary = fmt.Sprintf("column %s is %s on served, %s on shadow", a.Name, typeName(a.OID), typeName(b.OID))
				break
			}
		}
	}
	if summary == "" {
		return nil
	}
	return &Diff{Kind: KindColumns, Summary: summary, Columns: &ColumnDiff{Served: describe(served), Shadow: describe(shadow)}}
}

// cell is one canonical value.
type cell struct {
	null bool
	s    string
}

// crow is one canonical row; key identifies its exact canonical values.
type crow struct {
	pos   int
	cells []cell
	key   string
}

func canonRows(r Result) []crow {
	rows := make([]crow, len(r.Rows))
	for i, row := range r.Rows {
		cells := make([]cell, len(row))
		var key strings.Builder
		for j, v := range row {
			if v == nil {
				cells[j] = cell{null: true}
				key.WriteString("N;")
				continue
			}
			var (
				oid    uint32
				format int16
			)
			if j < len(r.Fields) {
				oid, format = r.Fields[j].OID, r.Fields[j].Format
			}
			s := Canonical(oid, format, v)
			cells[j] = cell{s: s}
			key.WriteString("V" + strconv.Itoa(len(s)) + ":" + s)
		}
		rows[i] = crow{pos: i, cells: cells, key: key.String()}
	}
	return rows
}

type colKind uint8

const (
	plainCol colKind = iota
	floatCol
	floatArrayCol
)

// comparer holds what the row comparison needs about the columns.
type comparer struct {
	fields   []Field
	names    []string // display name per column, unique
	kinds    []colKind
	hasFloat bool
	opts     Options
}

func newComparer(fields []Field, opts Options) *comparer {
	c := &comparer{fields: fields, opts: opts, kinds: make([]colKind, len(fields)), names: make([]string, len(fields))}
	seen := map[string]int{}
	for _, f := range fields {
		seen[f.Name]++
	}
	for i, f := range fields {
		switch family(f.OID) {
		case "float":
			c.kinds[i], c.hasFloat = floatCol, true
		case "array of float":
			c.kinds[i], c.hasFloat = floatArrayCol, true
		}
		c.names[i] = f.Name
		if seen[f.Name] > 1 || f.Name == "" {
			c.names[i] = f.Name + "#" + strconv.Itoa(i+1)
		}
	}
	return c
}

func (c *comparer) name(j int) string {
	if j < len(c.names) {
		return c.names[j]
	}
	return "#" + strconv.Itoa(j+1)
}

// cellEq compares two canonical values of column j, floats within tolerance.
func (c *comparer) cellEq(j int, a, b cell) bool {
	if a.null || b.null {
		return a.null == b.null
	}
	if a.s == b.s {
		return true
	}
	if j >= len(c.kinds) {
		return false
	}
	switch c.kinds[j] {
	case floatCol:
		return floatsEqual(a.s, b.s, c.opts.FloatTolerance)
	case floatArrayCol:
		return floatArraysEqual(a.s, b.s, c.opts.FloatTolerance)
	}
	return false
}

func (c *comparer) rowEq(a, b crow) bool {
	if len(a.cells) != len(b.cells) {
		return false
	}
	for j := range a.cells {
		if !c.cellEq(j, a.cells[j], b.cells[j]) {
			return false
		}
	}
	return true
}

// multiset matches rows of a and b as multisets: an exact pass on the
// canonical keys, then (when float columns exist and few rows are left) a
// tolerant greedy pairing. It returns the unmatched rows of each side.
func (c *comparer) multiset(a, b []crow) (leftA, leftB []crow) {
	countB := make(map[string]int, len(b))
	for _, r := range b {
		countB[r.key]++
	}
	for _, r := range a {
		if countB[r.key] > 0 {
			countB[r.key]--
		} else {
			leftA = append(leftA, r)
		}
	}
	countA := make(map[string]int, len(a))
	for _, r := range a {
		countA[r.key]++
	}
	for _, r := range b {
		if countA[r.key] > 0 {
			countA[r.key]--
		} else {
			leftB = append(leftB, r)
		}
	}
	if !c.hasFloat || len(leftA) == 0 || len(leftB) == 0 || len(leftA) > maxTolerantRows || len(leftB) > maxTolerantRows {
		return leftA, leftB
	}
	usedB := make([]bool, len(leftB))
	var restA []crow
	for _, ra := range leftA {
		matched := false
		for i, rb := range leftB {
			if !usedB[i] && c.rowEq(ra, rb) {
				usedB[i], matched = true, true
				break
			}
		}
		if !matched {
			restA = append(restA, ra)
		}
	}
	var restB []crow
	for i, rb := range leftB {
		if !usedB[i] {
			restB = append(restB, rb)
		}
	}
	return restA, restB
}

// resolveKeys maps sort keys to column indexes; nil when there are none or
// one cannot be resolved.
func resolveKeys(keys []SortKey, fields []Field) []int {
	if len(keys) == 0 {
		return nil
	}
	idx := make([]int, 0, len(keys))
	for _, k := range keys {
		if k.Pos > 0 {
			if k.Pos > len(fields) {
				return nil
			}
			idx = append(idx, k.Pos-1)
			continue
		}
		found := -1
		for i, f := range fields {
			if f.Name == k.Name {
				if found >= 0 {
					return nil // ambiguous
				}
				found = i
			}
		}
		if found < 0 {
			return nil
		}
		idx = append(idx, found)
	}
	return idx
}

func cellAt(r crow, j int) cell {
	if j < len(r.cells) {
		return r.cells[j]
	}
	return cell{null: true}
}

// run is a maximal stretch rows[start:end] of one side whose sort-key tuples
// are identical.
type run struct{ start, end int }

func runsOf(rows []crow, keys []int) []run {
	var runs []run
	for i := range rows {
		if i > 0 && sameKeys(rows[i-1], rows[i], keys) {
			runs[len(runs)-1].end = i + 1
			continue
		}
		runs = append(runs, run{i, i + 1})
	}
	return runs
}

func sameKeys(a, b crow, keys []int) bool {
	for _, j := range keys {
		if cellAt(a, j) != cellAt(b, j) {
			return false
		}
	}
	return true
}

// compareRows returns the unmatched rows of both sides and, when the rows
// match as a multiset but their ordered sort keys do not, the first row
// index whose sort keys differ (else -1).
func (c *comparer) compareRows(sv, sh []crow, shape Shape) (leftS, leftSh []crow, orderAt int) {
	keys := resolveKeys(shape.SortKeys, c.fields)
	if !shape.Ordered || keys == nil {
		leftS, leftSh = c.multiset(sv, sh)
		return leftS, leftSh, -1
	}
	keysEq := func(a, b crow) bool {
		for _, j := range keys {
			if !c.cellEq(j, cellAt(a, j), cellAt(b, j)) {
				return false
			}
		}
		return true
	}
	rs, rh := runsOf(sv, keys), runsOf(sh, keys)
	sequenceOK := len(sv) == len(sh) && len(rs) == len(rh)
	for i := 0; sequenceOK && i < len(rs); i++ {
		sequenceOK = rs[i] == rh[i] && keysEq(sv[rs[i].start], sh[rh[i].start])
	}
	if !sequenceOK {
		leftS, leftSh = c.multiset(sv, sh)
		if len(leftS) > 0 || len(leftSh) > 0 {
			return leftS, leftSh, -1
		}
		for i := range sv {
			if !keysEq(sv[i], sh[i]) {
				return nil, nil, i
			}
		}
		// Equal multisets with the same key sequence but different run
		// boundaries (keys equal only within float tolerance): a match.
		return nil, nil, -1
	}
	for i := range rs {
		if (shape.Limited && i == len(rs)-1) || (shape.Offset && i == 0) {
			continue // ties cut by LIMIT/OFFSET: only keys and length compared
		}
		a, b := c.multiset(sv[rs[i].start:rs[i].end], sh[rh[i].start:rh[i].end])
		leftS = append(leftS, a...)
		leftSh = append(leftSh, b...)
	}
	return leftS, leftSh, -1
}

// fillRows fills a rows Diff from the unmatched rows: rows pairing on their
// first column become Changed, the rest are listed per side.
func (c *comparer) fillRows(d *Diff, leftS, leftSh []crow) {
	firstKey := func(r crow) (string, bool) {
		if len(r.cells) == 0 {
			return "", false
		}
		if r.cells[0].null {
			return "N", true
		}
		return "V" + r.cells[0].s, true
	}
	byKey := map[string][]int{}
	for i, r := range leftSh {
		if k, ok := firstKey(r); ok {
			byKey[k] = append(byKey[k], i)
		}
	}
	pairedSh := make([]bool, len(leftSh))
	var onlyS []crow
	changedCols := map[int]int{} // column -> rows in which it differs
	for _, rs := range leftS {
		k, ok := firstKey(rs)
		if q := byKey[k]; ok && len(q) > 0 {
			byKey[k] = q[1:]
			pairedSh[q[0]] = true
			ch := c.change(rs, leftSh[q[0]], changedCols)
			d.ChangedCount++
			if len(d.Changed) < c.opts.MaxRows {
				d.Changed = append(d.Changed, ch)
			} else {
				d.Truncated = true
			}
			continue
		}
		onlyS = append(onlyS, rs)
	}
	var onlySh []crow
	for i, r := range leftSh {
		if !pairedSh[i] {
			onlySh = append(onlySh, r)
		}
	}
	d.OnlyServedCount, d.OnlyShadowCount = len(onlyS), len(onlySh)
	d.OnlyServed = c.list(d, onlyS)
	d.OnlyShadow = c.list(d, onlySh)

	var parts []string
	if d.ServedRows != d.ShadowRows {
		parts = append(parts, fmt.Sprintf("served %s, shadow %d", plural(d.ServedRows, "row"), d.ShadowRows))
	}
	switch {
	case len(onlyS) > 0 && len(onlySh) > 0:
		parts = append(parts, fmt.Sprintf("%s only on served, %d only on shadow", plural(len(onlyS), "row"), len(onlySh)))
	case len(onlyS) > 0:
		parts = append(parts, plural(len(onlyS), "row")+" only on served")
	case len(onlySh) > 0:
		parts = append(parts, plural(len(onlySh), "row")+" only on shadow")
	}
	cols := make([]int, 0, len(changedCols))
	for j := range changedCols {
		cols = append(cols, j)
	}
	slices.Sort(cols)
	const maxNamed = 3
	for i, j := range cols {
		if i == maxNamed {
			parts = append(parts, fmt.Sprintf("%d more columns differ", len(cols)-maxNamed))
			break
		}
		parts = append(parts, fmt.Sprintf("column %s differs in %s", c.name(j), plural(changedCols[j], "row")))
	}
	d.Summary = strings.Join(parts, "; ")
}

// change describes a paired row; it counts the differing columns in counts.
func (c *comparer) change(a, b crow, counts map[int]int) RowChange {
	ch := RowChange{Key: c.show(a.cells[0]), Columns: map[string][2]*string{}}
	n := max(len(a.cells), len(b.cells))
	differs := func(j int, tolerant bool) bool {
		x, y := cellAt(a, j), cellAt(b, j)
		if j >= len(a.cells) || j >= len(b.cells) {
			return true
		}
		if tolerant {
			return !c.cellEq(j, x, y)
		}
		return x != y
	}
	var diff []int
	for j := 1; j < n; j++ {
		if differs(j, true) {
			diff = append(diff, j)
		}
	}
	if len(diff) == 0 { // equal within tolerance but the tolerant pass was skipped
		for j := 1; j < n; j++ {
			if differs(j, false) {
				diff = append(diff, j)
			}
		}
	}
	for _, j := range diff {
		var pair [2]*string
		if j < len(a.cells) {
			pair[0] = c.showPtr(a.cells[j])
		}
		if j < len(b.cells) {
			pair[1] = c.showPtr(b.cells[j])
		}
		ch.Columns[c.name(j)] = pair
		counts[j]++
	}
	return ch
}

func (c *comparer) list(d *Diff, rows []crow) [][]*string {
	if len(rows) > c.opts.MaxRows {
		rows = rows[:c.opts.MaxRows]
		d.Truncated = true
	}
	var out [][]*string
	for _, r := range rows {
		vals := make([]*string, len(r.cells))
		for j, v := range r.cells {
			vals[j] = c.showPtr(v)
		}
		out = append(out, vals)
	}
	return out
}

func (c *comparer) show(v cell) string {
	if v.null {
		return "NULL"
	}
	return truncate(v.s, c.opts.MaxValue)
}

func (c *comparer) showPtr(v cell) *string {
	if v.null {
		return nil
	}
	s := truncate(v.s, c.opts.MaxValue)
	return &s
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return strconv.Itoa(n) + " " + noun + "s"
}
