package backfill

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// changed is what the slot says changed in one table after the snapshot:
// keys, or the whole table (a TRUNCATE, a key that cannot be read).
type changed struct {
	keys  map[string][]string
	whole bool
}

// reconcile makes every key that changed on old after the recorded slot's
// consistent point equal on new, with the locked-copy unit, then drops the
// slot and finishes the slot's tables. It runs once every chunk of those
// tables is loaded.
//
// Its end: every old transaction open when the loads ended has ended, and
// the old store's WAL position then. A change that commits on old after
// that belongs to a transaction that began after the last load committed,
// so its mirrored write on new came after the load and is not undone by
// it; every earlier one is in the slot, and is copied again under lock.
func (e *Engine) reconcile(ctx context.Context, control, primary, secondary *pgx.Conn) error {
	o := &e.o
	st := e.slot
	schemas, tnames := split(st.tables)
	var pending int
	if err := control.QueryRow(ctx, `SELECT count(*) FROM tandem.backfill_chunks WHERE status <> 'done'
		AND (schema_name, table_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))`, schemas, tnames).Scan(&pending); err != nil {
		return fmt.Errorf("counting chunks: %w", err)
	}
	if pending > 0 {
		o.Logger.Warn("the snapshot backfill's reconcile waits for every chunk of its tables to be loaded; run tandem backfill again", "slot", st.slot, "chunks_left", pending)
		return nil
	}
	if o.hooks.beforeReconcile != nil {
		o.hooks.beforeReconcile(ctx)
	}
	if o.hooks.skipReconcile {
		return nil
	}
	start := time.Now()
	end, err := e.reconcileEnd(ctx, primary)
	if err != nil {
		return err
	}
	ch, err := readChanges(ctx, primary, st, end, o.Mappings)
	if err != nil {
		return err
	}
	if err := readRecheck(ctx, secondary, st.tables, e.onNew, ch); err != nil {
		return err
	}
	r := reconciler{e: e, control: control, primary: primary, secondary: secondary, id: o.WorkerID + ":reconcile"}
	for _, n := range st.tables {
		if c := ch[n]; c != nil {
			if err := r.table(ctx, n, c); err != nil {
				return err
			}
		}
	}
	o.Logger.Info("reconciled the changes made on old since the snapshot", "slot", st.slot, "from", st.lsn.String(), "to", end.String(),
		"keys", r.keys, "failed", r.failed, "duration", time.Since(start))
	if r.failed > 0 {
		return nil // the slot stays: a rerun reconciles again
	}
	return e.forgetSlot(ctx, control, primary, secondary)
}

// reconciler copies one table's changed keys under lock, counting them and
// the keys that fail.
type reconciler struct {
	e                           *Engine
	control, primary, secondary *pgx.Conn
	id                          string
	keys, failed                int
}

// table reconciles the changes c of the old table n: the whole table under
// lock when the slot could not name its keys, else its keys in batches of
// Chunk, a batch that fails one key at a time.
func (r *reconciler) table(ctx context.Context, n table.Name, c *changed) error {
	o := &r.e.o
	m := o.Mappings.ForOld(n)
	if m == nil {
		return fmt.Errorf("reconciling %s: the table has no usable mapping now (see tandem mappings check); the slot %s stays", n, r.e.slot.slot)
	}
	keyFailed := func(ctx context.Context, key []string, err error) error {
		r.failed++
		if ts := r.e.progress[n]; ts != nil {
			r.e.mu.Lock()
			ts.p.FailedKeys++
			r.e.mu.Unlock()
		}
		o.Logger.Warn("reconcile: key failed", "table", n.String(), "key", key, "err", err)
		return writeLog(ctx, r.control, unitLog{table: n, lo: key, loInclusive: true, hi: key, err: err, attempt: 1, worker: r.id})
	}
	if c.whole {
		o.Logger.Info("reconcile: the whole table changed after the snapshot (a truncate, or keys the slot cannot show); copying it under lock", "table", n.String())
		_, _, err := table.CopyRangeMapped(ctx, r.primary, r.secondary, m, true, table.RangeOptions{Chunk: o.Chunk,
			Done: func(ctx context.Context, u table.UnitReport) error {
				if err := writeLog(ctx, r.control, unitLog{table: n, lo: u.Lo, loInclusive: u.LoInclusive, hi: u.Hi, rows: u.Rows, duration: u.Duration, attempt: 1, worker: r.id}); err != nil {
					return err
				}
				return r.e.pace(ctx, u.Rows)
			},
			KeyFailed: keyFailed,
		})
		if err != nil {
			return fmt.Errorf("reconciling %s: %w", n, err)
		}
		return nil
	}
	ks := make([][]string, 0, len(c.keys))
	for _, k := range c.keys {
		ks = append(ks, k)
	}
	slices.SortFunc(ks, func(a, b []string) int { return strings.Compare(strings.Join(a, "\x00"), strings.Join(b, "\x00")) })
	r.keys += len(ks)
	for batch := range slices.Chunk(ks, o.Chunk) {
		if err := r.batch(ctx, n, m, batch, keyFailed); err != nil {
			return err
		}
	}
	return nil
}

// batch copies one batch of keys of n under lock and logs it; when it
// fails, each key is copied alone and the keys that still fail go to
// keyFailed.
func (r *reconciler) batch(ctx context.Context, n table.Name, m *table.Mapping, batch [][]string, keyFailed func(context.Context, []string, error) error) error {
	t0 := time.Now()
	res, err := table.CopyKeysMapped(ctx, r.primary, r.secondary, m, true, batch)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		for _, k := range batch {
			if _, kerr := table.CopyKeysMapped(ctx, r.primary, r.secondary, m, true, [][]string{k}); kerr != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if lerr := keyFailed(ctx, k, kerr); lerr != nil {
					return lerr
				}
			}
		}
		return nil
	}
	if err := writeLog(ctx, r.control, unitLog{table: n, lo: batch[0], loInclusive: true, hi: batch[len(batch)-1], rows: res.Upserted + res.Deleted,
		duration: time.Since(t0), attempt: 1, worker: r.id}); err != nil {
		return err
	}
	return r.e.pace(ctx, len(batch))
}

// forgetSlot ends a reconciled snapshot backfill: the slot, the
// publication, the recheck keys and the slot's row go.
func (e *Engine) forgetSlot(ctx context.Context, control, primary, secondary *pgx.Conn) error {
	st := e.slot
	if err := dropSlot(ctx, primary, st.slot); err != nil {
		return err
	}
	if _, err := primary.Exec(ctx, "DROP PUBLICATION IF EXISTS "+Publication); err != nil {
		return fmt.Errorf("dropping the publication %s: %w", Publication, err)
	}
	schemas, tnames := split(e.onNewAll(st.tables))
	if _, err := secondary.Exec(ctx, `DELETE FROM tandem.backfill_recheck WHERE (schema_name, table_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))`,
		schemas, tnames); err != nil {
		return fmt.Errorf("forgetting the keys to recheck: %w", err)
	}
	if _, err := control.Exec(ctx, `DELETE FROM tandem.backfill_slots WHERE slot_name = $1`, st.slot); err != nil {
		return fmt.Errorf("forgetting the backfill's slot: %w", err)
	}
	e.reconciled = true
	return nil
}

// reconcileEnd waits until every transaction open on old now has ended
// (bounded by SettleTimeout) and returns the WAL position after that.
func (e *Engine) reconcileEnd(ctx context.Context, primary *pgx.Conn) (pglogrepl.LSN, error) {
	var since time.Time
	if err := primary.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&since); err != nil {
		return 0, fmt.Errorf("reading the old store's clock: %w", err)
	}
	timeout := e.o.SettleTimeout
	if timeout <= 0 {
		timeout = 5 * time.Minute
	}
	deadline := time.Now().Add(timeout)
	for {
		var open []string
		rows, err := primary.Query(ctx, `SELECT pid::text FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
			AND backend_type = 'client backend' AND xact_start < $1`, since)
		if err == nil {
			open, err = pgx.CollectRows(rows, pgx.RowTo[string])
		}
		if err != nil {
			return 0, fmt.Errorf("reading the old store's open transactions: %w", err)
		}
		if len(open) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%w after %s: transactions on the old store that were open when the snapshot load ended are still open (backend %s); run tandem backfill again to reconcile",
				ErrNotSettled, timeout, strings.Join(open, ", "))
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return flushedInsertLSN(ctx, primary)
}

// flushedInsertLSN returns the old store's WAL insert position, once the
// WAL is flushed up to it. The insert position, not pg_current_wal_lsn
// (the write position): a transaction that committed with
// synchronous_commit = off may have its commit record after the write
// position, and decoding up to that would leave it out. And flushed:
// logical decoding reads only flushed WAL. The flush is the commit, under
// synchronous_commit = on, of a transaction that wrote WAL after the
// position read: a transactional logical message (a transaction that only
// takes an xid writes no WAL before its commit record, and then commits
// asynchronously whatever synchronous_commit says). pgoutput does not
// send messages unless asked.
func flushedInsertLSN(ctx context.Context, primary *pgx.Conn) (pglogrepl.LSN, error) {
	var lsn string
	err := pgx.BeginFunc(ctx, primary, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = on"); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&lsn); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "SELECT pg_logical_emit_message(true, 'tandem.backfill', 'reconcile end')")
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading the old store's WAL position: %w", err)
	}
	return pglogrepl.ParseLSN(lsn)
}

// readChanges decodes the slot, without consuming it, from its start to
// the transactions that committed before end, and returns the keys that
// changed per old table of the slot.
func readChanges(ctx context.Context, primary *pgx.Conn, st *slotState, end pglogrepl.LSN, ms *table.Mappings) (map[table.Name]*changed, error) {
	type rel struct {
		name   table.Name
		keyIdx []int
	}
	rels := map[uint32]*rel{}
	out := map[table.Name]*changed{}
	get := func(n table.Name) *changed {
		c := out[n]
		if c == nil {
			c = &changed{keys: map[string][]string{}}
			out[n] = c
		}
		return c
	}
	add := func(id uint32, t *pglogrepl.TupleData) {
		r := rels[id]
		if r == nil || t == nil {
			return
		}
		c := get(r.name)
		if r.keyIdx == nil {
			c.whole = true
			return
		}
		key := make([]string, len(r.keyIdx))
		for i, j := range r.keyIdx {
			if j >= len(t.Columns) || t.Columns[j].DataType != pglogrepl.TupleDataTypeText {
				c.whole = true
				return
			}
			key[i] = string(t.Columns[j].Data)
		}
		c.keys[strings.Join(key, "\x00")] = key
	}
	rows, err := primary.Query(ctx, `SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::pg_lsn, NULL,
		'proto_version', '1', 'publication_names', $3)`, st.slot, end.String(), Publication)
	if err != nil {
		return nil, fmt.Errorf("reading the slot %s: %w", st.slot, err)
	}
	defer rows.Close()
	for rows.Next() {
		var data []byte
		if err := rows.Scan(&data); err != nil {
			return nil, fmt.Errorf("reading the slot %s: %w", st.slot, err)
		}
		msg, err := pglogrepl.Parse(data)
		if err != nil {
			return nil, fmt.Errorf("decoding the slot %s: %w", st.slot, err)
		}
		switch m := msg.(type) {
		case *pglogrepl.RelationMessage:
			n := table.Name{Schema: m.Namespace, Table: m.RelationName}
			if !slices.Contains(st.tables, n) {
				rels[m.RelationID] = nil
				continue
			}
			r := &rel{name: n}
			if mp := ms.ForOld(n); mp != nil {
				for _, k := range mp.Old.KeyNames() {
					i := slices.IndexFunc(m.Columns, func(c *pglogrepl.RelationMessageColumn) bool { return c.Name == k })
					if i < 0 {
						r.keyIdx = nil
						break
					}
					r.keyIdx = append(r.keyIdx, i)
				}
			}
			rels[m.RelationID] = r
		case *pglogrepl.InsertMessage:
			add(m.RelationID, m.Tuple)
		case *pglogrepl.UpdateMessage:
			add(m.RelationID, m.OldTuple)
			add(m.RelationID, m.NewTuple)
		case *pglogrepl.DeleteMessage:
			add(m.RelationID, m.OldTuple)
		case *pglogrepl.TruncateMessage:
			for _, id := range m.RelationIDs {
				if r := rels[id]; r != nil {
					get(r.name).whole = true
				}
			}
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading the slot %s: %w", st.slot, err)
	}
	return out, nil
}

// readRecheck adds the keys the loads kept (tandem.backfill_recheck on
// new, under the names onNew gives the old tables) to ch.
func readRecheck(ctx context.Context, secondary *pgx.Conn, tables []table.Name, onNew func(table.Name) table.Name, ch map[table.Name]*changed) error {
	oldOf := make(map[table.Name]table.Name, len(tables))
	recorded := make([]table.Name, len(tables))
	for i, n := range tables {
		recorded[i] = onNew(n)
		oldOf[recorded[i]] = n
	}
	schemas, tnames := split(recorded)
	rows, err := secondary.Query(ctx, `SELECT schema_name, table_name, key FROM tandem.backfill_recheck
		WHERE (schema_name, table_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))`, schemas, tnames)
	if err != nil {
		return fmt.Errorf("reading the keys to recheck: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var n table.Name
		var k []string
		if err := rows.Scan(&n.Schema, &n.Table, &k); err != nil {
			return fmt.Errorf("reading the keys to recheck: %w", err)
		}
		n = oldOf[n]
		c := ch[n]
		if c == nil {
			c = &changed{keys: map[string][]string{}}
			ch[n] = c
		}
		c.keys[strings.Join(k, "\x00")] = k
	}
	return rows.Err()
}
