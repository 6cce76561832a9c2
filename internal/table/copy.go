package table

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
)

// CopyResult counts what a locked copy changed on the secondary.
type CopyResult struct {
	Upserted int // rows copied from the primary (inserted or overwritten)
	Deleted  int // rows deleted because the primary has no such key
}

func (r *CopyResult) add(o CopyResult) {
	r.Upserted += o.Upserted
	r.Deleted += o.Deleted
}

// keysPerUnit bounds how many keys one CopyKeys unit locks at once.
const keysPerUnit = 1000

// CopyKeys makes the rows with these keys on the secondary equal to the
// primary's, with the locked-copy unit of design section 4:
//
//  1. in a primary transaction, read the rows with these keys FOR SHARE, so
//     no concurrent write can change them until the unit ends;
//  2. in a secondary transaction in replica mode (no trigger fires, no
//     foreign key checks), upsert the rows found and delete the keys the
//     primary does not have;
//  3. commit the secondary, then the primary;
//  4. re-read the keys just deleted on the primary FOR SHARE in a new unit,
//     and copy any row that a concurrent insert committed meanwhile.
//
// Each key holds the key's values as text, in src's key order; they are cast
// to the key columns' types in SQL. src names the table on the primary and
// dst on the secondary. Generated columns are not written (the secondary
// computes them); a GENERATED ALWAYS identity column is written on insert
// but not on update, which Postgres refuses. Keys are processed in units of
// at most 1000; on error the units already committed stay committed.
func CopyKeys(ctx context.Context, primary, secondary *pgx.Conn, src, dst Name, keys [][]string) (CopyResult, error) {
	p, err := loadCopier(ctx, primary, secondary, src, dst)
	if err != nil {
		return CopyResult{}, err
	}
	return p.copyKeys(ctx, primary, secondary, keys)
}

// CopyTable makes the whole of dst on the secondary equal to src on the
// primary. A table with a primary key is copied in chunks of chunk rows in
// key order (keyset pagination), each chunk one locked-copy unit: its rows
// are read FOR SHARE and upserted, and rows on the secondary whose keys fall
// in the chunk's key range (or after the last key) but are absent on the
// primary are deleted, with the same re-read as CopyKeys. Memory stays
// bounded by the chunk size.
//
// A table without a primary key is copied in one unit: the primary table is
// locked IN SHARE MODE (writers wait until the copy ends), the secondary's
// rows are all deleted and the primary's inserted (counted as Upserted),
// streamed in batches of chunk rows.
func CopyTable(ctx context.Context, primary, secondary *pgx.Conn, src, dst Name, chunk int) (CopyResult, error) {
	if chunk < 1 {
		return CopyResult{}, fmt.Errorf("copying %s: chunk must be at least 1, got %d", src, chunk)
	}
	p, err := loadCopier(ctx, primary, secondary, src, dst)
	if err != nil {
		return CopyResult{}, err
	}
	return p.copyAll(ctx, primary, secondary, chunk)
}

// CopyKeysMapped is CopyKeys through the mapping m: rows of one side of m,
// read on primary (the source), become rows of the other side on secondary
// (the target) as the mapping's SQL makes them, the computed columns
// evaluated by the target server. forward means the source is m's old
// table and the target its new one (old -> new, through the renames and
// compute expressions); otherwise the source is the new table and the
// target the old one (through the reverse expressions), as after a write
// flip.
//
// keys are the source table's key values as text, in its key order (as
// the drift ledger holds them for the store that had the write). The
// mapping must carry the key column for column (Mapping.KeyPreserving), so
// the same text names the row on the target, where absent keys are
// deleted. A reverse copy is refused while m has ReverseMissing columns.
func CopyKeysMapped(ctx context.Context, primary, secondary *pgx.Conn, m *Mapping, forward bool, keys [][]string) (CopyResult, error) {
	p, err := newMappedCopier(m, forward)
	if err != nil {
		return CopyResult{}, err
	}
	return p.copyKeys(ctx, primary, secondary, keys)
}

// CopyTableMapped is CopyTable through the mapping m, in the direction
// forward says (see CopyKeysMapped).
func CopyTableMapped(ctx context.Context, primary, secondary *pgx.Conn, m *Mapping, forward bool, chunk int) (CopyResult, error) {
	p, err := newMappedCopier(m, forward)
	if err != nil {
		return CopyResult{}, err
	}
	if chunk < 1 {
		return CopyResult{}, fmt.Errorf("copying %s: chunk must be at least 1, got %d", p.src.Name, chunk)
	}
	return p.copyAll(ctx, primary, secondary, chunk)
}

// copyAll copies the whole table, chunk rows at a time.
func (p *copier) copyAll(ctx context.Context, primary, secondary *pgx.Conn, chunk int) (CopyResult, error) {
	if !p.src.HasKey() {
		return p.copyWhole(ctx, primary, secondary, chunk)
	}
	return p.copyTable(ctx, primary, secondary, chunk)
}

// copier is how rows of src on the primary are written to dst on the
// secondary: column by column of the same name (newCopier), or through a
// table mapping (newMappedCopier).
type copier struct {
	src, dst *Meta
	srcKey   []Column // src's key columns, in key order
	dstKey   []Column // the dst columns they become, in the same order
	cols     []string // newCopier: the columns written on dst; newMappedCopier: the src columns the mapping reads

	upsert string // json array $1 -> upsert into dst
	insert string // json array $1 -> plain insert into dst (tables without a key)

	// lockTables makes each unit lock dst's table on the secondary IN SHARE
	// ROW EXCLUSIVE MODE and then src's on the primary IN SHARE MODE before
	// it reads: the order for copying to the store that writers lock first
	// (see RepairPrimary). The primary is then still, so no re-read is
	// needed.
	lockTables bool

	// replace makes each unit delete the secondary's rows of the keys it
	// writes, and the absent keys, before it writes the primary's rows:
	// then no row of the secondary that the copy replaces or removes can
	// hold a unique value one of the written rows takes (a key change or
	// a swap of a unique column's values that reached the secondary only
	// in part). The repairer sets it to retry a copy that met a
	// unique_violation.
	replace bool

	// stage is the fast path's staging table and upsert (plans with a
	// key only).
	stage stage

	// srcWhere and dstWhere are the mapping's predicates over a row of
	// src and of dst (unqualified column names; "" for every row): the
	// where predicate on the old table, the discriminator's on the new
	// one. Every read of either table sees only the rows they pass, and
	// every delete on dst is restricted to them, so a copy never reads,
	// deletes or overwrites rows of another deployment or outside the
	// predicate.
	srcWhere, dstWhere string
	// keyIn turns a key of src as the drift ledger holds it (src's whole
	// key, discriminator columns included) into the key the copier names
	// rows by; ok is false for a key of another deployment's row, which
	// is not this copy's to make. nil: keys are taken as they are.
	keyIn func(key []string) (k []string, ok bool)

	// deps are, for the owner of a split copied forward, the copiers of
	// the dependent parts: the same old rows, read and locked once, are
	// written to every part's new table in the unit's one secondary
	// transaction, and keys absent on old are deleted from each.
	deps []*copier
	// members are, for the owner of a merge copied forward, the copiers
	// of the other old tables of the merge: the unit reads their rows of
	// the keys it copies, under lock, and writes their columns of the new
	// rows it has just written, in its one secondary transaction.
	members []*copier
	// unmatched is, for a dependent part with a where copied forward,
	// the statement (json array $1 of old rows) that deletes the part's
	// rows of the old rows its predicate no longer passes.
	unmatched string
	// update is set for a dependent part of a split copied in reverse:
	// upsert is then an UPDATE of the part's columns of old rows by key
	// that returns the keys it found no old row for (an error: the
	// owner's row is not there yet), and a key absent on new clears the
	// part's columns (clear, keys $1 and found $2 as deleteAbsent gives
	// them) instead of deleting the old row.
	update bool
	clear  string
	// noFast keeps the copy off the COPY path (a split's composite and
	// reverse dependent copies write otherwise than the staged upsert).
	noFast bool

	knobs testingKnobs
}

// parts returns p and its dependent parts' copiers.
func (p *copier) parts() []*copier { return append([]*copier{p}, p.deps...) }

// testingKnobs are injection points for tests.
type testingKnobs struct {
	// afterRead runs after a unit has read rows by key on the primary and
	// before it deletes the absent ones on the secondary.
	afterRead func()
}

func loadCopier(ctx context.Context, primary, secondary Querier, src, dst Name) (*copier, error) {
	sm, err := LoadByName(ctx, primary, src)
	if err != nil {
		return nil, fmt.Errorf("on the primary: %w", err)
	}
	dm, err := LoadByName(ctx, secondary, dst)
	if err != nil {
		return nil, fmt.Errorf("on the secondary: %w", err)
	}
	return newCopier(sm, dm)
}

// newCopier checks that src's rows fit dst: every written column of src exists
// on dst, and both have the same primary key columns (or src has none).
func newCopier(src, dst *Meta) (*copier, error) {
	p := &copier{src: src, dst: dst}
	for _, c := range src.Columns {
		if c.Generated {
			continue
		}
		if _, ok := dst.Column(c.Name); !ok {
			return nil, fmt.Errorf("column %q of %s on the primary is missing from %s on the secondary", c.Name, src.Name, dst.Name)
		}
	}
	var idx []int
	for i, c := range dst.Columns {
		if _, ok := src.Column(c.Name); ok && !c.Generated {
			p.cols = append(p.cols, c.Name)
			idx = append(idx, i)
		}
	}
	if len(p.cols) == 0 {
		return nil, fmt.Errorf("%s has no column to copy to %s", src.Name, dst.Name)
	}
	if src.HasKey() {
		if len(dst.Key) != len(src.Key) {
			return nil, fmt.Errorf("primary keys differ: %s (%s) on the primary, %s (%s) on the secondary",
				src.Name, strings.Join(src.KeyNames(), ", "), dst.Name, strings.Join(dst.KeyNames(), ", "))
		}
		for _, k := range src.Key {
			i, ok := dst.Column(src.Columns[k].Name)
			if !ok || !slices.Contains(dst.Key, i) {
				return nil, fmt.Errorf("primary keys differ: %s (%s) on the primary, %s (%s) on the secondary",
					src.Name, strings.Join(src.KeyNames(), ", "), dst.Name, strings.Join(dst.KeyNames(), ", "))
			}
			p.srcKey = append(p.srcKey, src.Columns[k])
			p.dstKey = append(p.dstKey, dst.Columns[i])
		}
	}

	from := " SELECT " + prefixedList("p", p.cols) + " FROM json_populate_recordset(NULL::" + dst.Name.Quoted() + ", $1::json) AS p"
	head := "INSERT INTO " + dst.Name.Quoted() + " (" + identList(p.cols) + ")"
	if overriding(dst, idx) {
		head += " OVERRIDING SYSTEM VALUE"
	}
	p.insert = head + from
	if dst.HasKey() && src.HasKey() {
		p.upsert = head + from + onConflict(dst, idx)
		types := make([]string, len(p.cols))
		for i, c := range p.cols {
			j, _ := dst.Column(c)
			types[i] = dst.Columns[j].ParamType
		}
		if err := p.newStage(types, func(from string) (string, error) {
			return head + " SELECT " + prefixedList("src", p.cols) + " FROM " + from + onConflict(dst, idx), nil
		}); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// newMappedCopier is the copier that copies rows through m, old -> new when
// forward, else new -> old. The rows read from the source as JSON are
// typed with json_to_recordset as the mapping's source row (each column
// keeps the type the mapping's SQL gives it) and written with the
// mapping's own INSERT ... SELECT, so a copied row is transformed exactly
// as a mirrored one.
func newMappedCopier(m *Mapping, forward bool) (*copier, error) {
	p, err := newPartCopier(m, forward)
	if err != nil {
		return p, err
	}
	var others []*Mapping
	into := &p.deps
	switch {
	case forward && m.Split() && m.Owner():
		// The owner of a split, forward: every part in one unit.
		others = m.Parts()[1:]
	case m.Merged() && !m.MergeMember():
		// The owner of a merge: in reverse every member is written from
		// the same new rows (deps); forward each member's own rows of
		// the unit's keys are read and written (members).
		others = m.Members()[1:]
		if forward {
			into = &p.members
		}
	default:
		return p, nil
	}
	p.noFast = true
	for _, dm := range others {
		dp, err := newPartCopier(dm, forward)
		if err != nil {
			return nil, err
		}
		*into = append(*into, dp)
	}
	return p, nil
}

// newPartCopier is newMappedCopier of m alone (one part of a split).
func newPartCopier(m *Mapping, forward bool) (*copier, error) {
	d := &m.fwd
	if !forward {
		d = &m.rev
		if miss := m.ReverseMissing(); len(miss) > 0 {
			return nil, fmt.Errorf("copying %s to %s: old columns %q cannot be derived from a new row (declare reverse expressions for them)",
				m.New.Name, m.Old.Name, miss)
		}
	}
	p := &copier{src: d.from, dst: d.to}
	switch {
	case forward:
		p.srcWhere, p.dstWhere = m.where, m.NewWhere()
	case m.MergeMember():
		// Back to a merge member: the new rows its predicate passes are
		// upserted (the statement's filter) and the others' old rows
		// deleted (unmatched); a key absent on new is deleted on old
		// whatever the old row holds.
		p.srcWhere = m.NewWhere()
	default:
		p.srcWhere, p.dstWhere = m.NewWhere(), m.where
		if len(m.disc) > 0 {
			p.keyIn = m.ownKey
		}
	}
	var defs []string
	for _, c := range d.from.Columns {
		if d.exprRefs[c.Name] || d.passFrom(c.Name) != nil {
			p.cols = append(p.cols, c.Name)
			defs = append(defs, quoteIdent(c.Name)+" "+d.srcType(c.Name))
		}
	}
	if len(p.cols) == 0 {
		return nil, fmt.Errorf("%s has no column to copy to %s", d.from.Name, d.to.Name)
	}
	from := "json_to_recordset($1::json) AS src(" + strings.Join(defs, ", ") + ")"
	var err error
	if p.insert, err = d.upsert(from, p.cols, false); err != nil {
		return nil, fmt.Errorf("copying %s to %s: %w", d.from.Name, d.to.Name, err)
	}
	if d.from.HasKey() {
		var ok bool
		if p.srcKey, p.dstKey, ok = d.keyPairs(); !ok {
			return nil, fmt.Errorf("copying %s to %s: primary keys differ: %s (%s) does not become %s (%s) column for column, so a key cannot name the same row on both",
				d.from.Name, d.to.Name, d.from.Name, strings.Join(d.from.KeyNames(), ", "), d.to.Name, strings.Join(d.to.KeyNames(), ", "))
		}
		if (forward && m.Split() && m.where != "") || (!forward && m.MergeMember()) {
			keys, err := d.keyValues(p.cols)
			if err != nil {
				return nil, fmt.Errorf("copying %s to %s: %w", d.from.Name, d.to.Name, err)
			}
			p.unmatched = d.deleteWhere(from, keys, " WHERE NOT coalesce("+d.filter+", false)")
		}
		if (!forward && !m.Owner()) || (forward && m.MergeMember()) {
			// A dependent part back to old, or a merge member forward: its
			// columns of the owner's row.
			p.update, p.noFast = true, true
			if p.upsert, err = d.reverseUpdate(from, p.cols); err != nil {
				return nil, fmt.Errorf("copying %s to %s: %w", d.from.Name, d.to.Name, err)
			}
			var sets []string
			for _, c := range d.clearColumns() {
				sets = append(sets, quoteIdent(c)+" = DEFAULT")
			}
			w := len(p.dstKey)
			p.clear = "UPDATE " + d.to.Name.Quoted() + " d SET " + strings.Join(sets, ", ") + " WHERE " + keyTuple("d", p.dstKey) + " IN (" + keySet("x", 1, p.dstKey) + ") AND " +
				notIn("d", 1+w, p.dstKey) + p.dstAnd() + " RETURNING " + keyText("d", p.dstKey)
			return p, nil
		}
		if p.upsert, err = d.upsert(from, p.cols, true); err != nil {
			return nil, fmt.Errorf("copying %s to %s: %w", d.from.Name, d.to.Name, err)
		}
		types := make([]string, len(p.cols))
		for i, c := range p.cols {
			types[i] = d.srcType(c)
		}
		if err := p.newStage(types, func(from string) (string, error) {
			return d.upsert(from, p.cols, true)
		}); err != nil {
			return nil, fmt.Errorf("copying %s to %s: %w", d.from.Name, d.to.Name, err)
		}
	}
	return p, nil
}

// srcFrom is the FROM item of src's rows: the table, or the rows of it
// srcWhere passes. Unqualified names in srcWhere resolve to the table's
// columns inside the subquery; FOR SHARE OF the subquery's alias locks the
// table's rows.
func (p *copier) srcFrom() string { return filteredFrom(p.src, p.srcWhere) }

// dstFrom is srcFrom for dst's rows (reads only: a DELETE adds dstAnd).
func (p *copier) dstFrom() string { return filteredFrom(p.dst, p.dstWhere) }

// dstAnd is " AND (dstWhere)", or "" when every row of dst is the copy's.
func (p *copier) dstAnd() string {
	if p.dstWhere == "" {
		return ""
	}
	return " AND (" + p.dstWhere + ")"
}

func filteredFrom(m *Meta, where string) string {
	if where == "" {
		return m.Name.Quoted()
	}
	return "(SELECT * FROM " + m.Name.Quoted() + " WHERE " + where + ")"
}

// prefixedList returns alias."c1", alias."c2", ...
func prefixedList(alias string, names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = alias + "." + quoteIdent(n)
	}
	return strings.Join(q, ", ")
}

// keyList returns alias."k1", alias."k2".
func keyList(alias string, key []Column) string {
	names := make([]string, len(key))
	for i, c := range key {
		names[i] = c.Name
	}
	return prefixedList(alias, names)
}

// keyTuple returns (alias."k1", alias."k2").
func keyTuple(alias string, key []Column) string { return "(" + keyList(alias, key) + ")" }

// keyText returns ARRAY[alias."k1"::text, ...]: a row's key as text.
func keyText(alias string, key []Column) string {
	parts := make([]string, len(key))
	for i, c := range key {
		parts[i] = alias + "." + quoteIdent(c.Name) + "::text"
	}
	return "ARRAY[" + strings.Join(parts, ", ") + "]"
}

// paramTuple returns ($n::t1, $n+1::t2, ...) for one key given as scalar
// parameters starting at n.
func paramTuple(n int, key []Column) string {
	parts := make([]string, len(key))
	for i, c := range key {
		parts[i] = "$" + strconv.Itoa(n+i) + "::" + c.ParamType
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

// keySet returns a subquery over keys passed as one text[] parameter per
// key column starting at $n, each value cast to its column's type:
// SELECT x.c1::t1, x.c2::t2 FROM unnest($n::text[], $n+1::text[]) AS x(c1, c2).
func keySet(alias string, n int, key []Column) string {
	sel := make([]string, len(key))
	arrs := make([]string, len(key))
	names := make([]string, len(key))
	for i, c := range key {
		names[i] = "c" + strconv.Itoa(i+1)
		sel[i] = alias + "." + names[i] + "::" + c.ParamType
		arrs[i] = "$" + strconv.Itoa(n+i) + "::text[]"
	}
	return "SELECT " + strings.Join(sel, ", ") + " FROM unnest(" + strings.Join(arrs, ", ") + ") AS " + alias + "(" + strings.Join(names, ", ") + ")"
}

// notIn returns NOT EXISTS (...) that excludes rows of alias whose key is
// among the keys passed as text arrays starting at $n.
func notIn(alias string, n int, key []Column) string {
	arrs := make([]string, len(key))
	names := make([]string, len(key))
	conds := make([]string, len(key))
	for i, c := range key {
		names[i] = "c" + strconv.Itoa(i+1)
		arrs[i] = "$" + strconv.Itoa(n+i) + "::text[]"
		conds[i] = alias + "." + quoteIdent(c.Name) + " = y." + names[i] + "::" + c.ParamType
	}
	return "NOT EXISTS (SELECT 1 FROM unnest(" + strings.Join(arrs, ", ") + ") AS y(" + strings.Join(names, ", ") + ") WHERE " +
		strings.Join(conds, " AND ") + ")"
}

// columnsOf turns keys (row-major) into one []string per key column, the
// shape keySet and notIn take.
func columnsOf(keys [][]string, width int) []any {
	out := make([]any, width)
	for i := range width {
		col := make([]string, len(keys))
		for j, k := range keys {
			col[j] = k[i]
		}
		out[i] = col
	}
	return out
}

// rowSet is rows read from the primary: each row as JSON and its key as text.
type rowSet struct {
	json []string
	keys [][]string
}

func (r *rowSet) jsonArray() string {
	return "[" + strings.Join(r.json, ",") + "]"
}

// copyUnit is one locked copy in progress: a primary transaction that holds
// FOR SHARE locks on the rows read, and a secondary transaction in replica
// mode that writes them. Commit order is secondary, then primary.
type copyUnit struct {
	p        *copier
	ptx, stx pgx.Tx
	res      CopyResult
	deleted  [][]string // keys deleted on the secondary, re-read after commit
}

// runCopyUnit runs body as one unit and commits it, then re-reads the keys it
// deleted (design section 4, "Keys missing on the primary").
func (p *copier) runCopyUnit(ctx context.Context, primary, secondary *pgx.Conn, body func(*copyUnit) error) (CopyResult, error) {
	u, err := p.openCopyUnit(ctx, primary, secondary, body)
	res := u.res
	if err != nil || len(u.deleted) == 0 || p.lockTables {
		return res, err
	}
	// A key absent on the primary could not be locked, so an insert may have
	// committed there (and been mirrored) between the read and the delete.
	// Now that the delete is committed, read the deleted keys again under
	// lock and copy back any row that exists. An insert that commits after
	// this read is mirrored after the delete, so nothing is lost.
	deleted := u.deleted
	again, err := p.openCopyUnit(ctx, primary, secondary, func(v *copyUnit) error {
		return v.copyKeys(ctx, deleted, false)
	})
	res.Upserted += again.res.Upserted
	return res, err
}

func (p *copier) openCopyUnit(ctx context.Context, primary, secondary *pgx.Conn, body func(*copyUnit) error) (*copyUnit, error) {
	u := &copyUnit{p: p}
	var err error
	if u.ptx, err = primary.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}); err != nil {
		return u, fmt.Errorf("copying %s: primary: %w", p.src.Name, err)
	}
	defer u.ptx.Rollback(ctx) //nolint:errcheck // a no-op after commit
	if u.stx, err = secondary.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}); err != nil {
		return u, fmt.Errorf("copying %s: secondary: %w", p.src.Name, err)
	}
	defer u.stx.Rollback(ctx) //nolint:errcheck // a no-op after commit
	// Replica mode, as Postgres's logical replication applies changes: the
	// rows already carry the primary's trigger effects, and a child may
	// arrive before its parent.
	if _, err := u.stx.Exec(ctx, "SET LOCAL session_replication_role = replica"); err != nil {
		return u, fmt.Errorf("copying %s: secondary: %w", p.src.Name, err)
	}
	if p.lockTables {
		for _, q := range p.parts() { // a split's owner writes every part's table
			if _, err := u.stx.Exec(ctx, "LOCK TABLE "+q.dst.Name.Quoted()+" IN SHARE ROW EXCLUSIVE MODE"); err != nil {
				return u, fmt.Errorf("copying %s: locking the secondary: %w", p.src.Name, err)
			}
		}
		for _, q := range append([]*copier{p}, p.members...) { // a merge's owner reads every member's table
			if _, err := u.ptx.Exec(ctx, "LOCK TABLE "+q.src.Name.Quoted()+" IN SHARE MODE"); err != nil {
				return u, fmt.Errorf("copying %s: locking the primary: %w", p.src.Name, err)
			}
		}
	}
	if err := body(u); err != nil {
		u.res, u.deleted = CopyResult{}, nil // rolled back
		return u, fmt.Errorf("copying %s: %w", p.src.Name, err)
	}
	if err := u.stx.Commit(ctx); err != nil {
		u.res, u.deleted = CopyResult{}, nil
		return u, fmt.Errorf("copying %s: committing the secondary: %w", p.src.Name, err)
	}
	if err := u.ptx.Commit(ctx); err != nil {
		// The primary transaction only held locks: the copy itself is done.
		return u, fmt.Errorf("copying %s: committing the primary: %w", p.src.Name, err)
	}
	return u, nil
}

// copyKeys copies the rows with these keys: lock them on the primary,
// upsert those found and, if deleteAbsent, delete the others on the
// secondary.
func (u *copyUnit) copyKeys(ctx context.Context, keys [][]string, deleteAbsent bool) error {
	rows, err := u.lockKeys(ctx, keys)
	if err != nil {
		return err
	}
	if deleteAbsent && u.p.replace { // the absent rows first: they may hold a unique value a written row takes
		if err := u.deleteAbsent(ctx, keys, rows.keys); err != nil {
			return err
		}
	}
	if err := u.write(ctx, rows); err != nil {
		return err
	}
	if deleteAbsent && !u.p.replace {
		if u.p.knobs.afterRead != nil {
			u.p.knobs.afterRead()
		}
		return u.deleteAbsent(ctx, keys, rows.keys)
	}
	return nil
}

// lockKeys reads the rows with these keys on the primary FOR SHARE, in key
// order (the order writers are likeliest to lock in).
func (u *copyUnit) lockKeys(ctx context.Context, keys [][]string) (rowSet, error) {
	return u.readKeys(ctx, u.p, keys, " FOR SHARE OF r")
}

// readKeys reads the rows with these keys of q's source table on the
// primary, in key order, with lock (" FOR SHARE OF r", or "" for a plain
// read).
func (u *copyUnit) readKeys(ctx context.Context, q *copier, keys [][]string, lock string) (rowSet, error) {
	src := q.srcKey
	sql := "SELECT row_to_json(r.*)::text, " + keyText("r", src) + " FROM " + q.srcFrom() + " r WHERE " +
		keyTuple("r", src) + " IN (" + keySet("x", 1, src) + ") ORDER BY " + keyList("r", src) + lock
	return readRows(ctx, u.ptx, sql, columnsOf(keys, len(src))...)
}

// lockChunk reads the next chunk of at most limit rows after key after (nil:
// from the start; at or after it when incl), at most hi (nil: no end), on
// the primary FOR SHARE, in key order.
func (u *copyUnit) lockChunk(ctx context.Context, after []string, incl bool, hi []string, limit int) (rowSet, error) {
	src := u.p.srcKey
	sql := "SELECT row_to_json(r.*)::text, " + keyText("r", src) + " FROM " + u.p.srcFrom() + " r"
	where, args := rangeCond("r", src, after, incl, hi, nil)
	sql += where + " ORDER BY " + keyList("r", src) + " LIMIT " + strconv.Itoa(limit) + " FOR SHARE OF r"
	return readRows(ctx, u.ptx, sql, args...)
}

// rangeCond returns " WHERE ..." (or "") restricting alias's key to after
// lo (at or after it when incl; nil: no start) and at most hi (nil: no
// end), with the parameters appended to args.
func rangeCond(alias string, key []Column, lo []string, incl bool, hi []string, args []any) (string, []any) {
	var conds []string
	if lo != nil {
		op := " > "
		if incl {
			op = " >= "
		}
		conds = append(conds, keyTuple(alias, key)+op+paramTuple(len(args)+1, key))
		for _, v := range lo {
			args = append(args, v)
		}
	}
	if hi != nil {
		conds = append(conds, keyTuple(alias, key)+" <= "+paramTuple(len(args)+1, key))
		for _, v := range hi {
			args = append(args, v)
		}
	}
	if len(conds) == 0 {
		return "", args
	}
	return " WHERE " + strings.Join(conds, " AND "), args
}

func readRows(ctx context.Context, tx pgx.Tx, sql string, args ...any) (rowSet, error) {
	var rs rowSet
	rows, err := tx.Query(ctx, sql, args...)
	if err != nil {
		return rs, fmt.Errorf("reading the primary: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var j string
		var k []string
		if err := rows.Scan(&j, &k); err != nil {
			return rs, fmt.Errorf("reading the primary: %w", err)
		}
		rs.json = append(rs.json, j)
		rs.keys = append(rs.keys, k)
	}
	if err := rows.Err(); err != nil {
		return rs, fmt.Errorf("reading the primary: %w", err)
	}
	return rs, nil
}

// write upserts rows into the secondary (with replace, it deletes the
// secondary's rows of their keys first).
func (u *copyUnit) write(ctx context.Context, rows rowSet) error {
	if len(rows.json) == 0 {
		return nil
	}
	arr := rows.jsonArray()
	if u.p.update {
		if err := u.update(ctx, u.p, arr); err != nil {
			return err
		}
		u.res.Upserted += len(rows.json)
		return nil
	}
	for _, q := range u.p.parts() {
		if u.p.replace {
			// The secondary's rows of these keys first, in every part.
			dst := q.dstKey
			sql := "DELETE FROM " + q.dst.Name.Quoted() + " d WHERE " + keyTuple("d", dst) + " IN (" + keySet("x", 1, dst) + ")" + q.dstAnd()
			if _, err := u.stx.Exec(ctx, sql, columnsOf(rows.keys, len(dst))...); err != nil {
				return fmt.Errorf("deleting the rows to replace on the secondary: %w", err)
			}
		}
		if _, err := u.stx.Exec(ctx, q.upsert, arr); err != nil {
			return fmt.Errorf("writing the secondary: %w", err)
		}
		if q.unmatched != "" {
			// The old rows of the chunk the part's where no longer passes.
			tag, err := u.stx.Exec(ctx, q.unmatched, arr)
			if err != nil {
				return fmt.Errorf("writing the secondary: %w", err)
			}
			u.res.Deleted += int(tag.RowsAffected())
		}
	}
	u.res.Upserted += len(rows.json)
	return u.writeMembers(ctx, rows.keys)
}

// update runs q's keyed UPDATE (a dependent part's columns onto old rows,
// a merge member's onto new rows) of the rows arr: each row must be there.
func (u *copyUnit) update(ctx context.Context, q *copier, arr string) error {
	rs, err := u.stx.Query(ctx, q.upsert, arr)
	if err != nil {
		return fmt.Errorf("writing the secondary: %w", err)
	}
	missing, err := pgx.CollectRows(rs, func(r pgx.CollectableRow) ([]any, error) { return r.Values() })
	if err != nil {
		return fmt.Errorf("writing the secondary: %w", err)
	}
	if len(missing) > 0 {
		return fmt.Errorf("writing the secondary: %s has no row for key %v (of %d): the owner of the split or merge has not written it yet", q.dst.Name, missing[0], len(missing))
	}
	return nil
}

// writeMembers writes, for the owner of a merge copied forward, each
// member's columns of the new rows of keys (the owner's rows the unit has
// just written): the member's rows of these keys, or its columns' defaults
// for a key it has no row of.
//
// The member's rows are read without a lock, after the unit has written
// (and so locked) the new rows: a member's write W of one of them is then
// either committed on the primary before the read (its mirror on the
// secondary ran before the unit's write, which waited for it to commit,
// and the primary commits first), so the read sees it; or its mirror
// waits for the unit's lock and lands after the unit. Either way the new
// row ends with W's columns, with no re-read, and the unit never waits on
// the primary for a row lock a writer holds while its mirror waits for
// the unit on the secondary (the writers' order, primary first, is kept;
// a lock on a second old table would also deadlock with an application
// transaction that writes the two tables in the other order).
func (u *copyUnit) writeMembers(ctx context.Context, keys [][]string) error {
	for _, q := range u.p.members {
		rows, err := u.readKeys(ctx, q, keys, "")
		if err != nil {
			return err
		}
		if len(rows.json) > 0 {
			if err := u.update(ctx, q, rows.jsonArray()); err != nil {
				return err
			}
		}
		if len(rows.keys) == len(keys) {
			continue
		}
		w := len(q.dstKey)
		if _, err := u.stx.Exec(ctx, q.clear, append(columnsOf(keys, w), columnsOf(rows.keys, w)...)...); err != nil {
			return fmt.Errorf("clearing %s's columns on the secondary: %w", q.src.Name, err)
		}
	}
	return nil
}

// collectKeysTx runs sql in tx and returns its rows, each a key as text.
func collectKeysTx(ctx context.Context, tx pgx.Tx, sql string, args ...any) ([][]string, error) {
	rows, err := tx.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[[]string])
}

// deleteAbsent deletes on the secondary the rows with keys among keys but
// not among found (the keys the primary has), and remembers the keys it
// deleted for the re-read.
func (u *copyUnit) deleteAbsent(ctx context.Context, keys, found [][]string) error {
	for _, q := range u.p.parts() {
		dst := q.dstKey
		w := len(dst)
		sql := q.clear // a dependent part back to old: clear its columns
		if sql == "" {
			sql = "DELETE FROM " + q.dst.Name.Quoted() + " d WHERE " + keyTuple("d", dst) + " IN (" + keySet("x", 1, dst) + ") AND " +
				notIn("d", 1+w, dst) + q.dstAnd() + " RETURNING " + keyText("d", dst)
		}
		args := append(columnsOf(keys, w), columnsOf(found, w)...)
		deleted, err := collectKeysTx(ctx, u.stx, sql, args...)
		if err != nil {
			return fmt.Errorf("deleting on the secondary: %w", err)
		}
		u.res.Deleted += len(deleted)
		u.deleted = append(u.deleted, deleted...)
	}
	return nil
}

// candidates returns up to limit keys on the secondary, in key order, that
// are after lo (at or after it when incl; nil: from the start), at most hi
// (nil: no end) and not among exclude.
func (u *copyUnit) candidates(ctx context.Context, q *copier, lo []string, incl bool, hi []string, exclude [][]string, limit int) ([][]string, error) {
	dst := q.dstKey
	w := len(dst)
	args := columnsOf(exclude, w)
	sql := "SELECT " + keyText("d", dst) + " FROM " + q.dstFrom() + " d WHERE " + notIn("d", 1, dst)
	where, args := rangeCond("d", dst, lo, incl, hi, args)
	if where != "" {
		sql += " AND " + strings.TrimPrefix(where, " WHERE ")
	}
	sql += " ORDER BY " + keyList("d", dst) + " LIMIT " + strconv.Itoa(limit)
	rows, err := u.stx.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("reading the secondary: %w", err)
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[[]string])
	if err != nil {
		return nil, fmt.Errorf("reading the secondary: %w", err)
	}
	return keys, nil
}

func (p *copier) copyKeys(ctx context.Context, primary, secondary *pgx.Conn, keys [][]string) (CopyResult, error) {
	var res CopyResult
	if !p.src.HasKey() {
		return res, fmt.Errorf("copying %s by key: %w", p.src.Name, ErrNoKey)
	}
	if p.keyIn != nil {
		own := make([][]string, 0, len(keys))
		for _, k := range keys {
			if k, ok := p.keyIn(k); ok {
				own = append(own, k)
			}
		}
		keys = own
	}
	for i, k := range keys {
		if len(k) != len(p.srcKey) {
			return res, fmt.Errorf("copying %s: key %d has %d values, the primary key (%s) has %d",
				p.src.Name, i, len(k), strings.Join(p.src.KeyNames(), ", "), len(p.srcKey))
		}
	}
	for batch := range slices.Chunk(keys, keysPerUnit) {
		r, err := p.runCopyUnit(ctx, primary, secondary, func(u *copyUnit) error {
			return u.copyKeys(ctx, batch, true)
		})
		res.add(r)
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

// copyTable copies a table with a key chunk by chunk: copyRange over the
// whole key space.
func (p *copier) copyTable(ctx context.Context, primary, secondary *pgx.Conn, chunk int) (CopyResult, error) {
	res, _, err := p.copyRange(ctx, primary, secondary, RangeOptions{Chunk: chunk})
	return res, err
}

// deleteAbsentAll deletes the secondary's rows whose keys the primary does
// not have, over the whole table, chunk keys per locked unit, and copies
// nothing else: before a copy with replace, so that no row the primary has
// lost (a key that changed) still holds a unique value on the secondary.
func (p *copier) deleteAbsentAll(ctx context.Context, primary, secondary *pgx.Conn, chunk int) (CopyResult, error) {
	var res CopyResult
	for _, q := range p.parts() { // a split's owner: the keys of every part's table
		var lo []string
		for {
			var keys [][]string
			r, err := p.runCopyUnit(ctx, primary, secondary, func(u *copyUnit) error {
				var err error
				if keys, err = u.candidates(ctx, q, lo, false, nil, nil, chunk); err != nil || len(keys) == 0 {
					return err
				}
				found, err := u.lockKeys(ctx, keys)
				if err != nil {
					return err
				}
				return u.deleteAbsent(ctx, keys, found.keys)
			})
			res.add(r)
			if err != nil {
				return res, err
			}
			if len(keys) < chunk {
				break
			}
			lo = keys[len(keys)-1]
		}
	}
	return res, nil
}

// copyWhole copies a table without a primary key in one unit: lock the
// primary's table against writers, empty the secondary's and insert the
// primary's rows, batch rows at a time.
func (p *copier) copyWhole(ctx context.Context, primary, secondary *pgx.Conn, batch int) (CopyResult, error) {
	u, err := p.openCopyUnit(ctx, primary, secondary, func(u *copyUnit) error {
		if _, err := u.ptx.Exec(ctx, "LOCK TABLE "+p.src.Name.Quoted()+" IN SHARE MODE"); err != nil {
			return fmt.Errorf("locking the primary: %w", err)
		}
		tag, err := u.stx.Exec(ctx, "DELETE FROM "+p.dst.Name.Quoted()+strings.Replace(p.dstAnd(), " AND ", " WHERE ", 1))
		if err != nil {
			return fmt.Errorf("emptying the secondary: %w", err)
		}
		u.res.Deleted = int(tag.RowsAffected())
		rows, err := u.ptx.Query(ctx, "SELECT row_to_json(r.*)::text FROM "+p.srcFrom()+" r")
		if err != nil {
			return fmt.Errorf("reading the primary: %w", err)
		}
		defer rows.Close()
		var rs rowSet
		flush := func() error {
			if len(rs.json) == 0 {
				return nil
			}
			if _, err := u.stx.Exec(ctx, p.insert, rs.jsonArray()); err != nil {
				return fmt.Errorf("writing the secondary: %w", err)
			}
			u.res.Upserted += len(rs.json)
			rs.json = rs.json[:0]
			return nil
		}
		for rows.Next() {
			var j string
			if err := rows.Scan(&j); err != nil {
				return fmt.Errorf("reading the primary: %w", err)
			}
			rs.json = append(rs.json, j)
			if len(rs.json) == batch {
				if err := flush(); err != nil {
					return err
				}
			}
		}
		if err := rows.Err(); err != nil {
			return fmt.Errorf("reading the primary: %w", err)
		}
		return flush()
	})
	return u.res, err
}
