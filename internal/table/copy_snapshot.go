package table

import (
	"context"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5"
)

// firstNormalOID is FirstNormalObjectId: types below it are built in and
// have the same OID (and binary format) on every cluster.
const firstNormalOID = 16384

// SnapshotCopy loads key ranges of a mapping's old table, read in a
// transaction that holds an exported snapshot of the old store, into its
// new table without ever overwriting a row the new table already has: the
// rows are streamed with COPY into a temporary staging table on the new
// store and written with the mapping's own INSERT ... SELECT and ON
// CONFLICT (key) DO NOTHING. A row already there was written by the mirror
// (or copied earlier); whatever changed on old after the snapshot is
// reconciled afterwards with the locked-copy unit (CopyKeysMapped).
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
}

// NewSnapshotCopy returns the loader of m's rows, old -> new. m's old
// table needs a key that the mapping carries column for column.
func NewSnapshotCopy(m *Mapping) (*SnapshotCopy, error) {
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
	return s, nil
}

// PresentKeysSQL returns the query of the keys (as text arrays) the new
// table holds now after lo (nil: from the start) up to hi inclusive (nil:
// to the end). A load does not overwrite them, so the caller keeps them to
// check under lock: rows the mirror wrote, but also rows that were on new
// before (stale, or absent on old).
func (s *SnapshotCopy) PresentKeysSQL(lo, hi []string) string {
	p := s.p
	return "SELECT " + keyText("d", p.dstKey) + " FROM " + p.dst.Name.Quoted() + " d" + literalRange("d", p.dstKey, lo, false, hi)
}

// Range reads the old table's rows with keys after lo (nil: from the
// start) up to hi inclusive (nil: to the end) in src, the snapshot's
// transaction on the old store, and loads them in dst, a transaction on
// the new store that the caller commits. It returns the rows read and the
// rows inserted (the others were on new already).
func (s *SnapshotCopy) Range(ctx context.Context, src, dst pgx.Tx, lo, hi []string) (read, inserted int64, err error) {
	p := s.p
	format := ""
	if s.Binary {
		format = " (FORMAT binary)"
	} else if _, err := src.Exec(ctx, copySettings); err != nil {
		return 0, 0, fmt.Errorf("reading the old store: %w", err)
	}
	setup := "SET LOCAL session_replication_role = replica; " + p.stage.create
	if !s.Binary {
		setup = copySettings + "; " + setup
	}
	if _, err := dst.Exec(ctx, setup); err != nil {
		return 0, 0, fmt.Errorf("staging on the new store: %w", err)
	}
	out := "COPY (SELECT " + prefixedList("r", p.cols) + " FROM " + p.src.Name.Quoted() + " r" +
		literalRange("r", p.srcKey, lo, false, hi) + ") TO STDOUT" + format
	in := "COPY " + p.stage.name + " (" + identList(p.cols) + ") FROM STDIN" + format

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
		return 0, 0, fmt.Errorf("reading the old store: %w", rerr)
	}
	if werr != nil {
		return 0, 0, fmt.Errorf("staging on the new store: %w", werr)
	}
	write := s.insert
	if s.Overwrite {
		write = p.stage.upsert
	}
	ins, err := dst.Exec(ctx, write)
	if err != nil {
		return 0, 0, fmt.Errorf("writing the new store: %w", err)
	}
	return tag.RowsAffected(), ins.RowsAffected(), nil
}
