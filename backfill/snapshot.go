package backfill

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/table"
)

// Path is how the backfill copies the chunks of a table (see docs/backfill.md).
type Path string

const (
	// PathAuto takes the snapshot path where the old store allows it and
	// the locked path elsewhere, and says why.
	PathAuto Path = "auto"
	// PathSnapshot copies every chunk from one exported snapshot of old
	// with COPY, without row locks, and then reconciles every key that
	// changed on old after the snapshot with the locked-copy unit.
	PathSnapshot Path = "snapshot"
	// PathLocked copies every chunk with the locked-copy unit.
	PathLocked Path = "locked"
)

// ParsePath reads a --path value.
func ParsePath(s string) (Path, error) {
	switch p := Path(s); p {
	case "", PathAuto:
		return PathAuto, nil
	case PathSnapshot, PathLocked:
		return p, nil
	}
	return "", fmt.Errorf("unknown backfill path %q: auto, snapshot or locked", s)
}

// Publication is the publication the backfill's slot decodes: the tables
// of the snapshot backfill.
const Publication = "tandem_backfill"

// snapshotLock is the advisory lock the process that takes the snapshot
// holds for as long as it runs: one snapshot backfill at a time.
const snapshotLock = "tandem.backfill.snapshot"

// snapshotHooks are injection points for tests.
type snapshotHooks struct {
	// afterSnapshot runs once the snapshot is exported, before any chunk
	// is loaded from it.
	afterSnapshot func(ctx context.Context)
	// beforeReconcile runs once every chunk is loaded, before the
	// reconcile reads the slot.
	beforeReconcile func(ctx context.Context)
	// beforeStraight runs in a chunk's load, after its range was seen
	// empty on new and before the straight COPY into the table.
	beforeStraight func(ctx context.Context, t table.Name, lo, hi []string)
	skipReconcile  bool // leave the reconcile out: the hazard tests show what it repairs
	overwrite      bool // load with DO UPDATE instead of DO NOTHING (table.SnapshotCopy.Overwrite)
}

// snapshot is a running snapshot copy: the exported snapshot the workers
// import and the loaders of the tables copied from it.
type snapshot struct {
	name    string         // the exported snapshot
	repl    *pgconn.PgConn // the replication connection that exported it; open until every worker has imported it
	loaders map[table.Name]*table.SnapshotCopy
}

// slotState is the backfill's slot as the control schema records it: its
// changes from lsn on are reconciled for tables before they are finished.
type slotState struct {
	slot   string
	lsn    pglogrepl.LSN
	tables []table.Name
}

// Path returns the path the copy took (or will take) and why.
func (e *Engine) Path() (Path, string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.path, e.pathReason
}

func (e *Engine) usePath(p Path, reason string) {
	e.mu.Lock()
	e.path, e.pathReason = p, reason
	e.mu.Unlock()
	e.o.Logger.Info("backfill path", "path", string(p), "reason", reason)
}

// slotName is the backfill's slot on the old store: one per database
// (slot names are cluster-wide).
func slotName(ctx context.Context, primary *pgx.Conn) (string, error) {
	var db string
	if err := primary.QueryRow(ctx, "SELECT current_database()").Scan(&db); err != nil {
		return "", fmt.Errorf("reading the old store's database: %w", err)
	}
	h := fnv.New32a()
	h.Write([]byte(db)) //nolint:errcheck // hash writes cannot fail
	return fmt.Sprintf("tandem_backfill_%08x", h.Sum32()), nil
}

func readSlot(ctx context.Context, control *pgx.Conn, slot string) (*slotState, error) {
	var lsn string
	var schemas, names []string
	err := control.QueryRow(ctx, `SELECT consistent_lsn::text, schemas, tables FROM tandem.backfill_slots WHERE slot_name = $1`, slot).Scan(&lsn, &schemas, &names)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading tandem.backfill_slots: %w", err)
	}
	st := &slotState{slot: slot}
	if st.lsn, err = pglogrepl.ParseLSN(lsn); err != nil {
		return nil, err
	}
	for i := range schemas {
		st.tables = append(st.tables, table.Name{Schema: schemas[i], Table: names[i]})
	}
	return st, nil
}

func slotExists(ctx context.Context, primary *pgx.Conn, slot string) (bool, error) {
	var ok bool
	err := primary.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)", slot).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("reading the old store's replication slots: %w", err)
	}
	return ok, nil
}

// dropSlot drops slot on the old store, waiting (up to 10s) for a
// walsender that still holds it to go.
func dropSlot(ctx context.Context, primary *pgx.Conn, slot string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := primary.Exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot)
		var pe *pgconn.PgError
		if err == nil || !errors.As(err, &pe) || pe.Code != "55006" || time.Now().After(deadline) { // 55006: in use
			if err != nil {
				return fmt.Errorf("dropping the replication slot %s: %w", slot, err)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// prepareSnapshot chooses the copy path of the run's tables and, for the
// snapshot path, exports the snapshot. A slot recorded by an earlier run
// that died is kept: its changes are what the reconcile reads, from its
// consistent point, for every chunk loaded from any snapshot since. When
// that slot is gone, the chunks loaded from its snapshots cannot be
// reconciled: they are copied again under lock.
func (e *Engine) prepareSnapshot(ctx context.Context, control, primary, secondary *pgx.Conn, run []table.Name) error {
	o := &e.o
	slot, owner, err := e.takeSlot(ctx, control, primary, secondary)
	if err != nil || !owner {
		return err
	}
	refuse := func(reason string) error {
		if o.Path == PathSnapshot {
			return errors.New("backfill: --path snapshot: " + reason)
		}
		e.usePath(PathLocked, reason)
		return nil
	}
	if o.Path == PathLocked {
		e.usePath(PathLocked, "--path locked")
		return nil
	}
	loaders, reason, err := e.snapshotLoaders(ctx, primary, secondary, slot, run)
	if err != nil || reason != "" {
		return errors.Join(err, refuseIf(reason, refuse))
	}
	schemas, tnames := split(run)
	var pending int
	if err := control.QueryRow(ctx, `SELECT count(*) FROM tandem.backfill_chunks WHERE status <> 'done'
		AND (schema_name, table_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))`, schemas, tnames).Scan(&pending); err != nil {
		return fmt.Errorf("counting chunks: %w", err)
	}
	if pending == 0 {
		if e.slot != nil {
			e.usePath(PathSnapshot, "every chunk is loaded; the changes since the snapshot are reconciled")
		}
		return nil
	}
	reason, err = e.exportSnapshot(ctx, control, primary, slot, run, loaders)
	if err != nil || reason != "" {
		return errors.Join(err, refuseIf(reason, refuse))
	}
	if o.hooks.afterSnapshot != nil {
		o.hooks.afterSnapshot(ctx)
	}
	return nil
}

func refuseIf(reason string, refuse func(string) error) error {
	if reason == "" {
		return nil
	}
	return refuse(reason)
}

// takeSlot reads the backfill's slot as recorded and on old, and takes the
// snapshot lock: the process that holds it owns the slot (it alone creates,
// reconciles and drops it). Another one copies under lock and leaves the
// slot's tables unfinished for the owner's reconcile (owner false, the
// path chosen). A recorded slot that is gone resets its chunks and makes
// the path locked (owner false); a slot that was never recorded is
// dropped. e.slot is the recorded slot, if any.
func (e *Engine) takeSlot(ctx context.Context, control, primary, secondary *pgx.Conn) (slot string, owner bool, err error) {
	o := &e.o
	if slot, err = slotName(ctx, primary); err != nil {
		return "", false, err
	}
	rec, err := readSlot(ctx, control, slot)
	if err != nil {
		return "", false, err
	}
	if err := control.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtext($1))", snapshotLock).Scan(&owner); err != nil {
		return "", false, fmt.Errorf("taking the snapshot lock: %w", err)
	}
	if !owner {
		e.slot, e.slotForeign = rec, true
		if o.Path == PathSnapshot {
			return "", false, errors.New("backfill: --path snapshot: another tandem backfill process runs a snapshot backfill now")
		}
		e.usePath(PathLocked, "another tandem backfill process runs a snapshot backfill now")
		return slot, false, nil
	}
	exists, err := slotExists(ctx, primary, slot)
	if err != nil {
		return "", false, err
	}
	switch {
	case rec != nil && !exists:
		if err := e.forgetLostSlot(ctx, control, secondary, rec); err != nil {
			return "", false, err
		}
		reason := fmt.Sprintf("the slot %s of an earlier snapshot backfill is gone, so the chunks loaded from its snapshot cannot be reconciled: every unfinished chunk of %s is copied again under lock", slot, names(rec.tables))
		if o.Path == PathSnapshot {
			return "", false, errors.New("backfill: " + reason)
		}
		e.usePath(PathLocked, reason)
		return slot, false, nil
	case rec == nil && exists: // created by a run that died before recording it: nothing was loaded from it
		if err := dropSlot(ctx, primary, slot); err != nil {
			return "", false, err
		}
	}
	e.slot = rec
	return slot, true, nil
}

// snapshotLoaders checks that run can be copied from a snapshot (old's
// wal_level; an unfinished snapshot backfill's slot covers every table)
// and returns each table's loader. reason, when not empty, is why not.
func (e *Engine) snapshotLoaders(ctx context.Context, primary, secondary *pgx.Conn, slot string, run []table.Name) (map[table.Name]*table.SnapshotCopy, string, error) {
	var wal string
	if err := primary.QueryRow(ctx, "SHOW wal_level").Scan(&wal); err != nil {
		return nil, "", fmt.Errorf("reading the old store's wal_level: %w", err)
	}
	if wal != "logical" {
		return nil, "the old store's wal_level is " + wal + ", not logical: no slot can give the snapshot's changes", nil
	}
	if rec := e.slot; rec != nil {
		for _, n := range run {
			if !slices.Contains(rec.tables, n) {
				return nil, fmt.Sprintf("the unfinished snapshot backfill of %s (slot %s) does not cover %s", names(rec.tables), slot, n), nil
			}
		}
	}
	loaders := map[table.Name]*table.SnapshotCopy{}
	for _, n := range run {
		l, err := table.NewSnapshotCopy(e.progress[n].m)
		if err != nil {
			return nil, fmt.Sprintf("%s cannot be loaded from a snapshot: %v", n, err), nil
		}
		l.Overwrite = e.o.hooks.overwrite
		if err := l.CheckStraight(ctx, secondary); err != nil {
			return nil, "", err
		}
		loaders[n] = l
	}
	return loaders, "", nil
}

// exportSnapshot creates the publication (for a new slot), opens the
// replication connection and exports the snapshot from the slot it
// creates: the backfill's own slot, recorded in tandem.backfill_slots
// before any chunk is loaded, or, when an earlier run's slot is recorded,
// a temporary one (gone with the connection). reason, when not empty, is
// why the snapshot path cannot be taken.
func (e *Engine) exportSnapshot(ctx context.Context, control, primary *pgx.Conn, slot string, run []table.Name, loaders map[table.Name]*table.SnapshotCopy) (string, error) {
	rec := e.slot
	if rec == nil {
		if err := createPublication(ctx, primary, run); err != nil {
			return err.Error(), nil
		}
	}
	repl, err := pgconn.ConnectConfig(ctx, table.ReplicationConfig(e.o.Primary))
	if err != nil {
		return fmt.Sprintf("no replication connection to the old store: %v", err), nil
	}
	name, opts := slot, pglogrepl.CreateReplicationSlotOptions{SnapshotAction: "EXPORT_SNAPSHOT"}
	if rec != nil {
		// The recorded slot keeps the changes since the first snapshot;
		// this run's snapshot comes from a temporary slot.
		name, opts.Temporary = fmt.Sprintf("%s_t%d", slot, repl.PID()), true
	}
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, name, "pgoutput", opts)
	if err != nil {
		repl.Close(context.WithoutCancel(ctx))
		return fmt.Sprintf("cannot create a logical replication slot on the old store: %v", err), nil
	}
	if rec == nil {
		lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
		if err != nil {
			repl.Close(context.WithoutCancel(ctx))
			return "", err
		}
		schemas, tnames := split(run)
		if _, err := control.Exec(ctx, `INSERT INTO tandem.backfill_slots (slot_name, consistent_lsn, schemas, tables) VALUES ($1, $2::pg_lsn, $3, $4)`,
			slot, res.ConsistentPoint, schemas, tnames); err != nil {
			repl.Close(context.WithoutCancel(ctx))
			return "", fmt.Errorf("recording the backfill's slot: %w", err)
		}
		e.slot = &slotState{slot: slot, lsn: lsn, tables: run}
	}
	e.snap = &snapshot{name: res.SnapshotName, repl: repl, loaders: loaders}
	e.usePath(PathSnapshot, fmt.Sprintf("snapshot %s of the old store at %s (slot %s): chunks copied with COPY, then the keys changed since reconciled under lock",
		res.SnapshotName, e.slot.lsn, slot))
	return "", nil
}

// forgetLostSlot makes every unfinished chunk of the lost slot's tables
// pending again, with no checkpoint, and forgets the slot.
func (e *Engine) forgetLostSlot(ctx context.Context, control, secondary *pgx.Conn, rec *slotState) error {
	schemas, tnames := split(rec.tables)
	unfinished := `(schema_name, table_name) IN (SELECT t.schema_name, t.table_name FROM tandem.backfill_tables t
		JOIN unnest($1::text[], $2::text[]) AS x(s, n) ON t.schema_name = x.s AND t.table_name = x.n WHERE t.finished_at IS NULL)`
	rows, err := control.Query(ctx, `UPDATE tandem.backfill_chunks SET status = 'pending', attempts = 0, next_attempt_at = NULL, rows = 0 WHERE `+unfinished+
		` RETURNING schema_name, table_name, chunk`, schemas, tnames)
	if err != nil {
		return fmt.Errorf("resetting the chunks of a lost slot: %w", err)
	}
	type key struct {
		s, t string
		c    int
	}
	reset, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (key, error) {
		var k key
		return k, r.Scan(&k.s, &k.t, &k.c)
	})
	if err != nil {
		return fmt.Errorf("resetting the chunks of a lost slot: %w", err)
	}
	for _, k := range reset {
		ck := e.onNew(table.Name{Schema: k.s, Table: k.t})
		if _, err := secondary.Exec(ctx, `DELETE FROM tandem.backfill_checkpoints WHERE schema_name = $1 AND table_name = $2 AND chunk = $3`, ck.Schema, ck.Table, k.c); err != nil {
			return fmt.Errorf("resetting the checkpoints of a lost slot: %w", err)
		}
	}
	if _, err := control.Exec(ctx, `DELETE FROM tandem.backfill_slots WHERE slot_name = $1`, rec.slot); err != nil {
		return fmt.Errorf("forgetting a lost slot: %w", err)
	}
	return nil
}

func names(ns []table.Name) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = n.String()
	}
	return strings.Join(s, ", ")
}

// createPublication (re)creates the backfill's publication over tables.
func createPublication(ctx context.Context, primary *pgx.Conn, tables []table.Name) error {
	list := make([]string, len(tables))
	for i, n := range tables {
		list[i] = n.Quoted()
	}
	if _, err := primary.Exec(ctx, "DROP PUBLICATION IF EXISTS "+Publication); err != nil {
		return fmt.Errorf("dropping the publication %s: %w", Publication, err)
	}
	if _, err := primary.Exec(ctx, "CREATE PUBLICATION "+Publication+" FOR TABLE "+strings.Join(list, ", ")+" WITH (publish_via_partition_root = true)"); err != nil {
		return fmt.Errorf("cannot create the publication %s on the old store: %w", Publication, err)
	}
	return nil
}

// closeSnapshot ends the export: the replication connection closes (a
// temporary slot goes with it).
func (e *Engine) closeSnapshot(ctx context.Context) {
	if e.snap != nil && e.snap.repl != nil {
		e.snap.repl.Close(context.WithoutCancel(ctx))
		e.snap.repl = nil
	}
}

// importSnapshot opens the worker's snapshot transaction on the old store.
func (e *Engine) importSnapshot(ctx context.Context, c *conns) error {
	conn, err := pgx.ConnectConfig(ctx, e.o.Primary.Copy())
	if err != nil {
		return fmt.Errorf("connecting to the old store: %w", err)
	}
	c.snap = conn
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err == nil {
		_, err = tx.Exec(ctx, "SET TRANSACTION SNAPSHOT '"+strings.ReplaceAll(e.snap.name, "'", "''")+"'")
	}
	if err != nil {
		return fmt.Errorf("importing the snapshot %s: %w", e.snap.name, err)
	}
	c.snapTx = tx
	return nil
}

// How a chunk was loaded from the snapshot.
type loadHow int

const (
	loadStaged   loadHow = iota // through the staging table, ON CONFLICT DO NOTHING
	loadStraight                // COPY straight into the table: its range was empty on new
)

// runSnapshotChunk loads one claimed chunk from the snapshot, with its
// checkpoint in the same new-store transaction, and marks it done. A
// chunk is COPYed straight into the table, but for the few keys new holds
// in its range already; a mirrored write of another key that races in
// fails that COPY with a unique violation, and the chunk is loaded again
// through the staging table. A load that
// fails otherwise (a row new refuses, ...) is rolled back and the chunk is
// copied under lock instead, where a bad row is isolated.
func (e *Engine) runSnapshotChunk(ctx context.Context, c *conns, claim pgx.Tx, id string, ch *chunkRow) error {
	log := e.o.Logger.With("table", ch.table.String(), "chunk", ch.chunk, "worker", id, "attempt", ch.attempt)
	// A chunk is one unit: held before it is loaded (pause, latency
	// guard), charged to the rate after.
	if err := e.hold(ctx); err != nil {
		return err
	}
	start := time.Now()
	l := e.snap.loaders[ch.table]
	straight := l.Straight() && e.tryStraight(ch.table)
	read, how, err := e.loadSnapshotChunk(ctx, c, ch, straight)
	raced := false
	if ctx.Err() == nil && table.IsUniqueViolation(err) && straight {
		// A row that committed on new after the range was seen empty: the
		// straight COPY failed rather than overwrite it. Staged, the load
		// leaves it alone (and the reconcile re-checks its key).
		log.Info("a row was written on new in the chunk's range during its straight COPY; loading the chunk through the staging table", "err", err)
		raced = true
		read, how, err = e.loadSnapshotChunk(ctx, c, ch, false)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		// Not a failed unit: the locked copy that follows is the unit, and
		// is logged (a bad row, isolated, with its key).
		log.Warn("loading a chunk from the snapshot failed; copying it under lock", "err", err)
		if _, serr := c.snapTx.Exec(ctx, "SELECT 1"); serr != nil {
			c.snapTx = nil // the snapshot transaction is lost: this worker copies under lock from now on
		}
		if c.secondary.IsClosed() || c.primary.IsClosed() {
			if err := e.reconnect(ctx, c); err != nil {
				return err
			}
		}
		return e.runChunk(ctx, c, claim, id, ch)
	}
	return e.finishSnapshotChunk(ctx, c, claim, id, ch, read, time.Since(start), func(p *TableProgress) {
		if how == loadStraight {
			p.StraightChunks++
		} else {
			p.StagedChunks++
		}
		if raced {
			p.StraightRaced++
		}
	})
}

// tryStraight reports whether the next chunk of t should try the straight
// COPY: not once it has raced at least twice and more often than it
// succeeded. Under writes dense enough for that, most straight COPYs would
// be rolled back and loaded again staged, costing more than staging at once.
func (e *Engine) tryStraight(t table.Name) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := &e.progress[t].p
	return p.StraightRaced < 2 || p.StraightRaced <= p.StraightChunks
}

// loadSnapshotChunk loads ch from the snapshot in one new-store
// transaction: the keys new already holds in the chunk's range go to the
// recheck set, the rows are loaded (straight, when allowed and the range
// holds at most MaxExcept keys, which the COPY leaves out; else staged),
// and the chunk's checkpoint is written.
func (e *Engine) loadSnapshotChunk(ctx context.Context, c *conns, ch *chunkRow, straight bool) (read int64, how loadHow, err error) {
	l := e.snap.loaders[ch.table]
	ck := e.onNew(ch.table)
	err = pgx.BeginFunc(ctx, c.secondary, func(stx pgx.Tx) error {
		// The keys new holds in the range, all kept for the recheck; up
		// to MaxExcept+1 of them read back, for the straight COPY to
		// leave out.
		rows, err := stx.Query(ctx, `WITH k AS (`+l.PresentKeysSQL(ch.lo, ch.hi)+`),
			kept AS (INSERT INTO tandem.backfill_recheck (schema_name, table_name, key) SELECT $1, $2, k.* FROM k ON CONFLICT DO NOTHING)
			SELECT k.* FROM k LIMIT $3`, ck.Schema, ck.Table, table.MaxExcept+1)
		var present [][]string
		if err == nil {
			present, err = pgx.CollectRows(rows, pgx.RowTo[[]string])
		}
		if err != nil {
			return fmt.Errorf("keeping the keys new holds: %w", err)
		}
		if straight && len(present) <= table.MaxExcept {
			how = loadStraight
			if h := e.o.hooks.beforeStraight; h != nil {
				h(ctx, ch.table, ch.lo, ch.hi)
			}
			read, err = l.RangeStraight(ctx, c.snapTx, stx, ch.lo, ch.hi, present)
		} else {
			how = loadStaged
			read, _, err = l.Range(ctx, c.snapTx, stx, ch.lo, ch.hi)
		}
		if err != nil {
			return err
		}
		_, err = stx.Exec(ctx, `INSERT INTO tandem.backfill_checkpoints AS c (schema_name, table_name, chunk, cursor, rows) VALUES ($1, $2, $3, $4, $5)
			ON CONFLICT (schema_name, table_name, chunk) DO UPDATE SET cursor = excluded.cursor, rows = excluded.rows, updated_at = now()`,
			ck.Schema, ck.Table, ch.chunk, ch.hi, read)
		return err
	})
	return read, how, err
}

// finishSnapshotChunk logs a loaded chunk, marks it done in its claim
// transaction and commits that, counts it (count runs under the engine's
// lock) and charges its rows to the rate.
func (e *Engine) finishSnapshotChunk(ctx context.Context, c *conns, claim pgx.Tx, id string, ch *chunkRow, read int64, took time.Duration, count func(*TableProgress)) error {
	ts := e.progress[ch.table]
	ts.done.Add(read)
	if err := writeLog(ctx, c.log, unitLog{table: ch.table, lo: ch.lo, hi: ch.hi, rows: int(read), duration: took, attempt: ch.attempt, worker: id}); err != nil {
		return err
	}
	if _, err := claim.Exec(ctx, `UPDATE tandem.backfill_chunks SET status = 'done', last_error = NULL, failed_keys = '[]', rows = $4, updated_at = now(), next_attempt_at = NULL
		WHERE schema_name = $1 AND table_name = $2 AND chunk = $3`, ch.table.Schema, ch.table.Table, ch.chunk, read); err != nil {
		return fmt.Errorf("finishing %s chunk %d: %w", ch.table, ch.chunk, err)
	}
	if err := claim.Commit(ctx); err != nil {
		return fmt.Errorf("finishing %s chunk %d: %w", ch.table, ch.chunk, err)
	}
	e.mu.Lock()
	ts.p.ChunksDone++
	count(&ts.p)
	e.mu.Unlock()
	return e.pace(ctx, int(read))
}
