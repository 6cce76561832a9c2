package table

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// firstNormalOID is FirstNormalObjectId: types below it are built in and
// have the same OID (and binary format) on every cluster.
const firstNormalOID = 16384

// SnapshotCopy loads key ranges of a mapping's old table, read in a
// transaction that holds an exported snapshot of the old store, into its
// new table without ever overwriting a row the new table already has. Two
// ways:
//
//   - staged (Range): the rows are streamed with COPY into a temporary
//     staging table on the new store and written with the mapping's own
//     INSERT ... SELECT and ON CONFLICT (key) DO NOTHING;
//   - straight (RangeStraight), when the mapping passes columns through
//     unchanged (Straight): COPY into the new table itself, leaving out the
//     few keys the caller has just seen new hold in the range. COPY never
//     overwrites: another key the table holds by then (a mirrored write
//     that raced in) fails it with a unique violation (IsUniqueViolation),
//     and the caller rolls back and loads the range staged.
//
// A row already there was written by the mirror (or copied earlier);
// whatever changed on old after the snapshot is reconciled afterwards with
// the locked-copy unit (CopyKeysMapped).
type SnapshotCopy struct {
	p      *copier
	insert string
	// Binary is true when every staged column is of a built-in type that
	// the staging table declares exactly as old does: COPY then moves the
	// rows in binary format, else as text.
	Binary bool
	// Overwrite makes the load DO UPDATE instead of DO NOTHING. It exists
	// for the tests that show what the reconcile repairs; never set it.
	Overwrite bool

	straight *straightCopy // nil: the mapping needs the staging table

	// split is set for a split old table (its owner's mapping): the rows
	// are staged once, with every column any part reads, and written to
	// each part's new table.
	split *splitLoad
}

// splitLoad is how a split old table's staged rows reach its parts.
type splitLoad struct {
	cols    []string // the staged old columns, in the old table's order
	stage   stage    // the staging table of cols
	inserts []string // per part, owner first: its INSERT ... SELECT from the stage, DO NOTHING
	parts   []*copier
}

// straightCopy is a COPY of the old table's pass-through columns straight
// into the new table's columns they become.
type straightCopy struct {
	src, dst []string // column names, pairwise
	binary   bool     // every pair has the same built-in type on both sides
}

// NewSnapshotCopy returns the loader of m's rows, old -> new. m's old
// table needs a key that the mapping carries column for column.
func NewSnapshotCopy(m *Mapping) (*SnapshotCopy, error) {
	if m.Split() {
		if !m.Owner() {
			return nil, fmt.Errorf("copying %s from a snapshot: %s is a dependent part of its split: the owner's loader writes it", m.Old.Name, m.New.Name)
		}
		return newSplitSnapshotCopy(m)
	}
	if m.Merged() {
		// A merge's member writes its columns of the owner's rows, which
		// a snapshot of its table alone cannot order after them; the
		// locked path copies every member in the owner's units.
		return nil, fmt.Errorf("%s is merged with %d other old tables into %s, which the snapshot loader does not write: it is copied by the locked path", m.Old.Name, len(m.Members())-1, m.New.Name)
	}
	p, err := newMappedCopier(m, true)
	if err != nil {
		return nil, err
	}
	if !p.src.HasKey() || p.stage.upsert == "" {
		return nil, fmt.Errorf("copying %s from a snapshot: %w", p.src.Name, ErrNoKey)
	}
	d := &m.fwd
	ins, err := d.upsert("(SELECT "+identList(p.cols)+" FROM "+p.stage.name+") AS src", p.cols, false)
	if err != nil {
		return nil, fmt.Errorf("copying %s to %s: %w", d.from.Name, d.to.Name, err)
	}
	s := &SnapshotCopy{p: p, insert: ins + " ON CONFLICT (" + identList(d.to.KeyNames()) + ") DO NOTHING", Binary: true}
	for _, c := range p.cols {
		i, _ := d.from.Column(c)
		col := d.from.Columns[i]
		if col.TypeOID >= firstNormalOID || col.TypeOID == 0 || d.srcType(c) != col.ParamType {
			s.Binary = false
		}
	}
	s.straight = newStraightCopy(d, p.cols)
	return s, nil
}

// newSplitSnapshotCopy is NewSnapshotCopy of a split's owner m: one staging
// table of the old columns any part reads, then each part's own INSERT ...
// SELECT from it (a dependent's where keeps only its rows), DO NOTHING on
// its key. The reconcile copies a changed key through every part
// (CopyKeysMapped of the owner), as the locked path does.
func newSplitSnapshotCopy(m *Mapping) (*SnapshotCopy, error) {
	p, err := newMappedCopier(m, true)
	if err != nil {
		return nil, err
	}
	parts := p.parts()
	if !p.src.HasKey() {
		return nil, fmt.Errorf("copying %s from a snapshot: %w", p.src.Name, ErrNoKey)
	}
	sl := &splitLoad{parts: parts}
	var types []string
	s := &SnapshotCopy{p: p, split: sl, Binary: true}
	pms := m.Parts()
	for _, c := range m.Old.Columns {
		for i, q := range parts {
			if slices.Contains(q.cols, c.Name) {
				d := &pms[i].fwd
				sl.cols = append(sl.cols, c.Name)
				types = append(types, d.srcType(c.Name))
				if c.TypeOID >= firstNormalOID || c.TypeOID == 0 || d.srcType(c.Name) != c.ParamType {
					s.Binary = false
				}
				break
			}
		}
	}
	scratch := &copier{cols: sl.cols}
	if err := scratch.newStage(types, func(from string) (string, error) { return m.fwd.upsert(from, sl.cols, true) }); err != nil {
		return nil, fmt.Errorf("copying %s from a snapshot: %w", m.Old.Name, err)
	}
	sl.stage = scratch.stage
	from := "(SELECT " + identList(sl.cols) + " FROM " + sl.stage.name + ") AS src"
	for _, pm := range pms {
		d := &pm.fwd
		ins, err := d.upsert(from, sl.cols, false)
		if err != nil {
			return nil, fmt.Errorf("copying %s to %s: %w", d.from.Name, d.to.Name, err)
		}
		sl.inserts = append(sl.inserts, ins+" ON CONFLICT ("+identList(d.to.KeyNames())+") DO NOTHING")
	}
	return s, nil
}

// newStraightCopy returns the straight COPY of the columns cols of d.from,
// or nil when the mapping does more than pass columns through (a computed
// column: its expression must be evaluated by the INSERT) or passes none.
func newStraightCopy(d *direction, cols []string) *straightCopy {
	if len(d.exprRefs) > 0 || d.filter != "" || slices.ContainsFunc(d.targets, func(t target) bool { return t.expr != "" }) {
		return nil // an expression (a constant too: a discriminator) or a predicate to evaluate
	}
	sc := &straightCopy{binary: true}
	for _, c := range cols {
		t := d.passFrom(c)
		if t == nil || t.expr != "" {
			return nil
		}
		i, _ := d.from.Column(c)
		from, to := d.from.Columns[i], d.to.Columns[t.col]
		sc.src = append(sc.src, c)
		sc.dst = append(sc.dst, to.Name)
		if from.TypeOID == 0 || from.TypeOID >= firstNormalOID || from.TypeOID != to.TypeOID || from.Type != to.Type {
			sc.binary = false
		}
	}
	if len(sc.src) == 0 {
		return nil
	}
	return sc
}

// Straight reports whether the mapping allows RangeStraight: every column
// copied passes through to a column of the new table, none is computed.
func (s *SnapshotCopy) Straight() bool { return s.straight != nil && !s.Overwrite }

// CheckStraight turns the straight COPY off when the new table is not a
// plain or partitioned table, or has rules: COPY FROM applies no rule
// where the staged INSERT would.
func (s *SnapshotCopy) CheckStraight(ctx context.Context, q Querier) error {
	if s.straight == nil {
		return nil
	}
	var kind string
	var rules bool
	if err := q.QueryRow(ctx, "SELECT relkind::text, relhasrules FROM pg_class WHERE oid = $1::regclass", s.p.dst.Name.Quoted()).Scan(&kind, &rules); err != nil {
		return fmt.Errorf("reading %s on the new store: %w", s.p.dst.Name, err)
	}
	if (kind != "r" && kind != "p") || rules {
		s.straight = nil
	}
	return nil
}

// PresentKeysSQL returns the query of the keys (as text arrays) the new
// table holds now after lo (nil: from the start) up to hi inclusive (nil:
// to the end). A load does not overwrite them, so the caller keeps them to
// check under lock: rows the mirror wrote, but also rows that were on new
// before (stale, or absent on old). RangeStraight leaves them out of its
// COPY.
//
// For a split, they are the keys any part's new table holds: a part's
// row the mirror wrote is left as it is too.
func (s *SnapshotCopy) PresentKeysSQL(lo, hi []string) string {
	if s.split == nil {
		return presentKeysSQL(s.p, lo, hi)
	}
	sqls := make([]string, len(s.split.parts))
	for i, q := range s.split.parts {
		sqls[i] = presentKeysSQL(q, lo, hi)
	}
	return strings.Join(sqls, " UNION ")
}

func presentKeysSQL(p *copier, lo, hi []string) string {
	return "SELECT " + keyText("d", p.dstKey) + " FROM " + p.dstFrom() + " d" + literalRange("d", p.dstKey, lo, false, hi)
}

// IsUniqueViolation reports whether err is a unique violation (23505):
// what RangeStraight fails with when the new table holds one of the keys.
func IsUniqueViolation(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505"
}

// Range reads the old table's rows with keys after lo (nil: from the
// start) up to hi inclusive (nil: to the end) in src, the snapshot's
// transaction on the old store, and loads them in dst, a transaction on
// the new store that the caller commits, through the staging table. It
// returns the rows read and the rows inserted (the others were on new
// already).
func (s *SnapshotCopy) Range(ctx context.Context, src, dst pgx.Tx, lo, hi []string) (read, inserted int64, err error) {
	if s.split != nil {
		return s.rangeSplit(ctx, src, dst, lo, hi)
	}
	p := s.p
	setup := "SET LOCAL session_replication_role = replica; " + p.stage.create
	if err := copySetup(ctx, src, dst, s.Binary, setup); err != nil {
		return 0, 0, err
	}
	out := "COPY (SELECT " + prefixedList("r", p.cols) + " FROM " + p.srcFrom() + " r" +
		literalRange("r", p.srcKey, lo, false, hi) + ") TO STDOUT" + copyFormat(s.Binary)
	in := "COPY " + p.stage.name + " (" + identList(p.cols) + ") FROM STDIN" + copyFormat(s.Binary)
	if read, err = pipeCopy(ctx, src, dst, out, in, "staging on the new store"); err != nil {
		return 0, 0, err
	}
	write := s.insert
	if s.Overwrite {
		write = p.stage.upsert
	}
	ins, err := dst.Exec(ctx, write)
	if err != nil {
		return 0, 0, fmt.Errorf("writing the new store: %w", err)
	}
	return read, ins.RowsAffected(), nil
}

// rangeSplit is Range of a split old table: the rows staged once, then
// written to every part. inserted counts the rows written over all parts.
func (s *SnapshotCopy) rangeSplit(ctx context.Context, src, dst pgx.Tx, lo, hi []string) (read, inserted int64, err error) {
	p, sl := s.p, s.split
	if s.Overwrite {
		return 0, 0, fmt.Errorf("copying %s: overwriting loads are not made for a split", p.src.Name)
	}
	if err := copySetup(ctx, src, dst, s.Binary, "SET LOCAL session_replication_role = replica; "+sl.stage.create); err != nil {
		return 0, 0, err
	}
	out := "COPY (SELECT " + prefixedList("r", sl.cols) + " FROM " + p.srcFrom() + " r" +
		literalRange("r", p.srcKey, lo, false, hi) + ") TO STDOUT" + copyFormat(s.Binary)
	in := "COPY " + sl.stage.name + " (" + identList(sl.cols) + ") FROM STDIN" + copyFormat(s.Binary)
	if read, err = pipeCopy(ctx, src, dst, out, in, "staging on the new store"); err != nil {
		return 0, 0, err
	}
	for _, ins := range sl.inserts {
		tag, err := dst.Exec(ctx, ins)
		if err != nil {
			return 0, 0, fmt.Errorf("writing the new store: %w", err)
		}
		inserted += tag.RowsAffected()
	}
	return read, inserted, nil
}

// MaxExcept is the most keys new may already hold in a range for
// RangeStraight to leave them out of its COPY; with more, the range is
// loaded staged.
const MaxExcept = 1000

// RangeStraight is Range with COPY straight into the new table, for a
// mapping that allows it (Straight). except are the keys (as text, at most
// MaxExcept) the caller has just seen the new table hold in the range
// (PresentKeysSQL): their rows are left out of the COPY, so the rows new
// has are left as they are, as the staged load's DO NOTHING leaves them.
// It never overwrites: a row with any other key of the range that
// committed on new since fails it with a unique violation
// (IsUniqueViolation), and dst must then be rolled back.
func (s *SnapshotCopy) RangeStraight(ctx context.Context, src, dst pgx.Tx, lo, hi []string, except [][]string) (int64, error) {
	sc := s.straight
	if sc == nil || s.Overwrite {
		return 0, fmt.Errorf("copying %s: the mapping needs the staging table", s.p.src.Name)
	}
	p := s.p
	if err := copySetup(ctx, src, dst, sc.binary, "SET LOCAL session_replication_role = replica"); err != nil {
		return 0, err
	}
	if len(except) > MaxExcept {
		return 0, fmt.Errorf("copying %s: %d keys to leave out, more than %d", p.src.Name, len(except), MaxExcept)
	}
	where := literalRange("r", p.srcKey, lo, false, hi)
	var left int64 // rows of the range on old left out: read, not copied
	if len(except) > 0 {
		tuples := make([]string, len(except))
		for i, k := range except {
			if len(k) != len(p.srcKey) {
				return 0, fmt.Errorf("copying %s: a key to leave out has %d values, the key %d", p.src.Name, len(k), len(p.srcKey))
			}
			tuples[i] = literalTuple(k, p.srcKey)
		}
		in := keyTuple("r", p.srcKey) + " IN (" + strings.Join(tuples, ", ") + ")"
		if where == "" {
			where = " WHERE "
		} else {
			where += " AND "
		}
		if err := src.QueryRow(ctx, "SELECT count(*) FROM "+p.srcFrom()+" r"+where+in).Scan(&left); err != nil {
			return 0, fmt.Errorf("reading the old store: %w", err)
		}
		where += "NOT " + in
	}
	out := "COPY (SELECT " + prefixedList("r", sc.src) + " FROM " + p.srcFrom() + " r" +
		where + ") TO STDOUT" + copyFormat(sc.binary)
	in := "COPY " + p.dst.Name.Quoted() + " (" + identList(sc.dst) + ") FROM STDIN" + copyFormat(sc.binary)
	n, err := pipeCopy(ctx, src, dst, out, in, "writing the new store")
	return n + left, err
}

func copyFormat(binary bool) string {
	if binary {
		return " (FORMAT binary)"
	}
	return ""
}

// copySetup runs setup in dst, and in text format the settings that make
// a value's text the same on both sides.
func copySetup(ctx context.Context, src, dst pgx.Tx, binary bool, setup string) error {
	if !binary {
		if _, err := src.Exec(ctx, copySettings); err != nil {
			return fmt.Errorf("reading the old store: %w", err)
		}
		setup = copySettings + "; " + setup
	}
	if _, err := dst.Exec(ctx, setup); err != nil {
		return fmt.Errorf("preparing the new store: %w", err)
	}
	return nil
}

// pipeCopy streams COPY out on src into COPY in on dst through a pipe and
// returns the rows written; what names dst's side in its error. When dst
// fails, the rest of src's COPY is read and discarded, so src's
// transaction stays usable.
func pipeCopy(ctx context.Context, src, dst pgx.Tx, out, in, what string) (int64, error) {
	pr, pw := io.Pipe()
	readErr := make(chan error, 1)
	go func() {
		_, err := src.Conn().PgConn().CopyTo(ctx, pw, out)
		pw.CloseWithError(err)
		readErr <- err
	}()
	tag, werr := dst.Conn().PgConn().CopyFrom(ctx, pr, in)
	if werr != nil {
		_, _ = io.Copy(io.Discard, pr)
	}
	if rerr := <-readErr; rerr != nil {
		return 0, fmt.Errorf("reading the old store: %w", rerr)
	}
	if werr != nil {
		return 0, fmt.Errorf("%s: %w", what, werr)
	}
	return tag.RowsAffected(), nil
}

// ReplicationConfig is cc for a logical replication connection
// (replication=database): the backfill's exported snapshot and slot, and
// the change feed's stream.
func ReplicationConfig(cc *pgx.ConnConfig) *pgconn.Config {
	pc := cc.Config.Copy()
	if pc.RuntimeParams == nil {
		pc.RuntimeParams = map[string]string{}
	}
	pc.RuntimeParams["replication"] = "database"
	return pc
}
