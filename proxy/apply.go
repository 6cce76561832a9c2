package proxy

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// The apply step: how a write the primary ran is applied on the secondary.
// A statement whose row images came back is applied by key from the
// images (imageApplier); a table under a schema mapping gets the mapped
// statements (mappedApplier); a table without a key, DDL and what the proxy
// cannot rewrite replay the statement's text (or, with the change feed on,
// are left to the feed). writeApplier chooses; mirrorWrite (secondary.go)
// runs the result.

func overflowOf(ev *event) bool { return ev.image != nil && ev.image.overflow }

// writeApplier returns the drift entries a write stands for and the function
// that applies it to the secondary.
func (rs *routedSession) writeApplier(ev *event) ([]table.DriftEntry, func(*rstore) error, error) {
	ctx := rs.ss.ctx
	if ev.image != nil && len(ev.image.fields) > 0 && ev.image.fields[0].tableOID != 0 {
		pstore, sstore := rs.srv.old, rs.srv.new
		if rs.state.Primary == route.New {
			pstore, sstore = rs.srv.new, rs.srv.old
		}
		pc, err := rs.srv.catalogFor(ctx, pstore, rs.ss.database)
		if err != nil {
			return nil, nil, err
		}
		pm, err := pc.cache.ByOID(ctx, pc.pool, ev.image.fields[0].tableOID)
		if err != nil {
			return nil, nil, err
		}
		if privateSchema(pm.Name.Schema) {
			return nil, nil, errOutOfScope // a temporary table: the session's own
		}
		g, err := rs.srv.fkGraphOf(ctx, pc)
		if err != nil {
			return []table.DriftEntry{{Table: pm.Name, Reason: "mirror failed"}}, nil, err
		}
		if ms := rs.srv.mappings.Load(); ms != nil {
			var m *table.Mapping
			if rs.state.Primary == route.Old {
				if !ms.InScope(pm.Name) {
					return nil, nil, errOutOfScope
				}
				m = ms.ForOld(pm.Name)
			} else if m = ms.ForNew(pm.Name); m == nil {
				return nil, nil, errOutOfScope
			}
			if m == nil {
				entries := []table.DriftEntry{{Table: pm.Name, Reason: "the table's mapping has problems"}}
				return entries, nil, fmt.Errorf("table %s is in scope but its mapping has problems (see the proxy's log or tandem plan)", pm.Name)
			}
			if !m.Identity() && pm.HasKey() {
				return rs.mappedApplier(ev, pm, m, g)
			}
		}
		if pm.HasKey() {
			return rs.imageApplier(ev, pm, sstore, g)
		}
		rs.srv.metrics.R().Fallback(ctx, "no_key")
		entries := []table.DriftEntry{{Table: pm.Name, Reason: "no primary key"}}
		// A plain INSERT, UPDATE or DELETE of one table (it was rewritten
		// for a row image): the secondary's reply to its text is only its
		// outcome, so it can be sent ahead (mirrorWrite).
		rs.plainApply = true
		return entries, rs.statementApplier(ev), nil
	}
	reason := "not_rewritable"
	if ev.stmt != nil && ev.stmt.Kind == classify.DDL {
		reason = "ddl"
	} else if ev.stmt == nil || ev.stmt.Kind == classify.Unknown {
		reason = "unknown"
	}
	rs.srv.metrics.R().Fallback(ctx, reason)
	// With the change feed, a write whose effects the proxy cannot know
	// (DO, CALL, a function that writes, what does not parse) is not run
	// again on the secondary: run there, its defaults and sequences would
	// make rows of their own, which the feed never sees (they are not in
	// the primary's WAL). The feed checks what it did on the primary,
	// key by key, and the repairer copies it (design section 10).
	replay := reason == "ddl" || !rs.srv.config().Feed.Enabled
	if shared := rs.sharedTables(ev); len(shared) > 0 {
		// The statement names a table whose new side holds only some of
		// its rows (a where predicate, or a discriminator: other
		// deployments' rows share it). Its text, run there, would reach
		// rows that are not this mapping's (a TRUNCATE would empty the
		// other tenants'): it is not run; the tables are drift, which the
		// repairer copies through the mapping, its rows only.
		// A split table too: its text names one table where the other
		// store has several (or one of several).
		for _, n := range shared {
			rs.must = append(rs.must, table.DriftEntry{Table: n.name, Reason: n.reason})
		}
		rs.srv.metrics.R().Fallback(ctx, "filtered_mapping")
		return nil, func(*rstore) error { return nil }, nil
	}
	if reason != "ddl" {
		fp := ""
		if ev.stmt != nil {
			fp = ev.stmt.Fingerprint
		}
		if replay {
			rs.ss.log.Info("write mirrored as statement text", "reason", reason, "fingerprint", fp)
		} else {
			rs.ss.log.Debug("write left to the change feed", "reason", reason, "fingerprint", fp)
		}
	}
	var entries []table.DriftEntry
	if ev.stmt != nil {
		why := "statement mirrored"
		if reason == "ddl" {
			// Should the DDL fail on the secondary (a TRUNCATE, an ALTER
			// TABLE behind a lock held there), the tables it names are
			// drift, named by its tag.
			tag := ev.tag
			if tag == "" {
				tag = "DDL"
			}
			why = tag + " failed on the secondary"
		}
		for _, t := range ev.stmt.Tables {
			if rs.isTemp(t) {
				continue
			}
			entries = append(entries, table.DriftEntry{Table: writtenName(t), Reason: why})
		}
	}
	if !replay {
		return entries, func(*rstore) error { return nil }, nil
	}
	return entries, rs.statementApplier(ev), nil
}

// sharedTable is a table whose statement text is not run on the secondary,
// and why.
type sharedTable struct {
	name   table.Name
	reason string
}

// sharedTables returns the primary's names of the tables ev's statement
// names whose mapping is merged, filtered (table.Mapping.Filtered) or a split's
// part, each with the reason its text is not run on the secondary.
func (rs *routedSession) sharedTables(ev *event) []sharedTable {
	ms := rs.srv.mappings.Load()
	if ms == nil || ev.stmt == nil {
		return nil
	}
	var out []sharedTable
	for _, t := range ev.stmt.Tables {
		n := writtenName(t)
		m := ms.ForOld(n)
		if rs.state.Primary != route.Old {
			m = ms.ForNew(n)
		}
		switch {
		case m == nil:
		case m.Merged():
			out = append(out, sharedTable{n, "statement not run on a table merged with others into one new table"})
		case m.Filtered():
			out = append(out, sharedTable{n, "statement not run on a table whose new side other rows share"})
		case m.Split():
			out = append(out, sharedTable{n, "statement not run on a table split into several new tables"})
		}
	}
	return out
}

// privateSchema reports whether schema holds session-private or internal
// relations, which are never part of a migration.
func privateSchema(schema string) bool {
	return strings.HasPrefix(schema, "pg_temp") || strings.HasPrefix(schema, "pg_toast") || schema == "pg_catalog" || schema == "information_schema"
}

// writtenName turns a table name as written into a ledger name (public
// when unqualified).
func writtenName(t string) table.Name {
	t = strings.ReplaceAll(t, `"`, "")
	if i := strings.LastIndexByte(t, '.'); i >= 0 {
		return table.Name{Schema: t[:i], Table: t[i+1:]}
	}
	return table.Name{Schema: "public", Table: t}
}

// statementApplier mirrors a write by running its text (with its
// parameters) on the secondary; with rs.sendAhead it is only queued, for
// secSettle to send (see execQueued).
func (rs *routedSession) statementApplier(ev *event) func(*rstore) error {
	return func(sec *rstore) error {
		if ev.sql == "" {
			return errors.New("the statement's text is unknown to the proxy")
		}
		ahead := rs.sendAhead && rs.tx.open
		deadline := rs.budget()
		if ev.bind == nil {
			if ahead && !sec.skipping {
				sec.queueQuery(ev.sql)
				sec.queued++
				rs.wentAhead = true
				return nil
			}
			_, err := rs.internalQuery(sec, ev.sql, deadline)
			return err
		}
		b := *ev.bind
		b.portal, b.stmt, b.resultFormats = "", "", nil
		sec.out = encodeParse(sec.out, "", ev.sql, rs.storeOIDs(sec, rs.stmtOIDs(ev)))
		delete(sec.parsed, "") // the client's unnamed statement is not there any more
		sec.out = encodeBind(sec.out, b)
		sec.out = encodeExecute(sec.out, "", 0)
		sec.out = append(sec.out, syncMsg...)
		if ahead {
			sec.queued++
			rs.wentAhead = true
			return nil
		}
		if err := rs.send(sec, deadline); err != nil {
			return err
		}
		_, err := rs.drainInternal(sec, deadline)
		return err
	}
}

func (rs *routedSession) stmtOIDs(ev *event) []uint32 {
	if ev.bind != nil {
		if si := rs.stmts[ev.bind.stmt]; si != nil {
			return si.oids
		}
	}
	return nil
}

// imageKeys returns the image's column names, where pm's key columns sit
// among them, and one drift entry per row (by key), should the mirror fail.
func imageKeys(pm *table.Meta, img *imageSet) (names []string, keyPos []int, entries []table.DriftEntry, err error) {
	names = make([]string, len(img.fields))
	for i, f := range img.fields {
		names[i] = f.name
	}
	keyPos = make([]int, len(pm.Key))
	for i, k := range pm.KeyNames() {
		if keyPos[i] = slices.Index(names, k); keyPos[i] < 0 {
			return nil, nil, nil, fmt.Errorf("row image of %s lacks key column %q", pm.Name, k)
		}
	}
	entries = make([]table.DriftEntry, 0, len(img.rows))
	for _, row := range img.rows {
		key := make([]string, len(keyPos))
		for i, p := range keyPos {
			key[i] = string(row[p])
		}
		entries = append(entries, table.DriftEntry{Table: pm.Name, Key: key, Reason: "mirror failed"})
	}
	return names, keyPos, entries, nil
}

// overflowed is the plan of a statement whose images were not held: the
// table is drift, and nothing is applied.
func overflowed(pm *table.Meta, g *fkGraph) ([]table.DriftEntry, func(*rstore) error, error) {
	entries := []table.DriftEntry{{Table: pm.Name, Reason: "row images over the memory bound"}}
	all := make([]string, len(pm.Columns))
	for i, c := range pm.Columns {
		all[i] = c.Name
	}
	for _, e := range append(g.deleteDrift(pm.Name), g.updateDrift(pm.Name, all)...) {
		e.Reason = "row images over the memory bound"
		entries = append(entries, e)
	}
	return entries, func(*rstore) error { return nil }, nil
}

// batches calls fn with the rows of img in batches of at most 1000 rows
// and 60000 parameters of width columns each.
func batches(rows [][][]byte, width int, fn func(rows [][][]byte) error) error {
	per := max(1, min(1000, 60000/max(width, 1)))
	for start := 0; start < len(rows); start += per {
		if err := fn(rows[start:min(start+per, len(rows))]); err != nil {
			return err
		}
	}
	return nil
}

// rowParams flattens the columns at pos of rows, row-major (pos nil: all).
func rowParams(rows [][][]byte, pos []int) [][]byte {
	var out [][]byte
	for _, r := range rows {
		if pos == nil {
			out = append(out, r...)
			continue
		}
		for _, p := range pos {
			out = append(out, r[p])
		}
	}
	return out
}

// imageApplier builds the upserts (or deletes) that apply row images to a
// table that maps to itself.
func (rs *routedSession) imageApplier(ev *event, pm *table.Meta, sstore *store, g *fkGraph) ([]table.DriftEntry, func(*rstore) error, error) {
	img := ev.image
	if img.overflow {
		return overflowed(pm, g)
	}
	names, keyPos, entries, err := imageKeys(pm, img)
	if err != nil {
		return nil, nil, err
	}
	updActs := rs.mustForUpdate(ev, pm, g, true)
	if len(updActs) > 0 {
		// Should the mirror fail, so did the actions.
		entries = append(entries, g.updateDrift(pm.Name, ev.stmt.Image.SetColumns)...)
	}
	del := isDelete(ev)
	actions := del && len(img.rows) > 0 && len(g.deleteActions(pm.Name)) > 0
	if actions {
		// Should the mirror fail, the children the actions reach are drift
		// too.
		entries = append(entries, g.deleteDrift(pm.Name)...)
	}
	apply := func(sec *rstore) (err error) {
		if len(img.rows) == 0 {
			return nil
		}
		ctx := rs.ss.ctx
		sc, err := rs.srv.catalogFor(ctx, sstore, rs.ss.database)
		if err != nil {
			return err
		}
		sm, err := sc.cache.ByName(ctx, sc.pool, pm.Name)
		if err != nil {
			return err
		}
		var cols []string
		var pos []int
		for i, n := range names {
			if j, ok := sm.Column(n); ok && !sm.Columns[j].Generated {
				cols = append(cols, n)
				pos = append(pos, i)
			} else if !ok {
				return fmt.Errorf("column %q of %s is missing on the %s store", n, pm.Name, sec.name)
			}
		}
		// Every image is upserted, a deleted row's too: INSERT ... ON
		// CONFLICT waits for a transaction that is inserting the same key
		// on the secondary, where a DELETE would not see the uncommitted
		// row and so would miss it when that insert commits after.
		if actions {
			defer func() {
				if err != nil {
					return
				}
				// PostgreSQL's own actions do not fire in replica mode:
				// apply them here, after the parent's rows are gone.
				var drift []table.DriftEntry
				drift, err = rs.applyDeleteActions(sec, g, fkDeleted{table: pm.Name, cols: names, rows: img.rows})
				rs.must = append(rs.must, drift...)
				if err != nil {
					rs.ss.log.Warn("could not apply ON DELETE actions on the secondary", "table", pm.Name, "error", err)
				}
			}()
		}
		if len(updActs) > 0 {
			// Before the row images, while the secondary's rows still hold
			// the old referenced values the children match.
			if !rs.tx.open || sec.noRepl {
				// Outside replica mode PostgreSQL's own actions fire.
				updActs = nil
			} else if err := rs.queueUpdateActions(sec, pm, updActs, names, img.rows); err != nil {
				return err
			}
		}
		err = rs.applyRows(sec, img.rows, len(cols), del,
			func(n int) (string, error) { return table.UpsertSQL(sm, cols, n) }, pos,
			func(n int) (string, error) { return table.DeleteSQL(sm, n) }, keyPos)
		return err
	}
	// Only upserts and deletes by key, which return nothing the proxy
	// reads: the write can be sent ahead (mirrorWrite).
	rs.plainApply = !actions && len(updActs) == 0
	return entries, apply, nil
}

// mustForUpdate adds to rs.must what an update or upsert of pm causes that
// lockstep cannot follow: a changed key (the old keys are not in the row
// image, so the secondary would keep them: the repairer removes them), and
// changed referenced columns with ON UPDATE actions.
//
// With lockstep set, ON UPDATE actions of a write that keeps its keys are
// not recorded but returned, for the applier to run on the secondary
// before the row images (see queueUpdateActions).
func (rs *routedSession) mustForUpdate(ev *event, pm *table.Meta, g *fkGraph, lockstep bool) []fkAction {
	st := ev.stmt
	if st == nil || st.Image == nil || st.Image.Op == "delete" || len(st.Image.SetColumns) == 0 || ev.image == nil || len(ev.image.rows) == 0 {
		return nil
	}
	keyChange := false
	for _, c := range st.Image.SetColumns {
		if j, ok := pm.Column(c); ok && slices.Contains(pm.Key, j) {
			rs.must = append(rs.must, table.DriftEntry{Table: pm.Name, Reason: "key columns updated"})
			keyChange = true
			break
		}
	}
	if !lockstep || keyChange {
		rs.must = append(rs.must, g.updateDrift(pm.Name, st.Image.SetColumns)...)
		return nil
	}
	acts := g.updateActions(pm.Name, st.Image.SetColumns)
	for _, f := range acts {
		// The children's columns the action changes may be referenced
		// with ON UPDATE actions in turn (rare): the ledger.
		rs.must = append(rs.must, g.updateDrift(f.child, f.childCols)...)
	}
	return acts
}

func isDelete(ev *event) bool {
	return ev.stmt != nil && ev.stmt.Image != nil && ev.stmt.Image.Op == "delete"
}

// mappedApplier applies row images through a declared table mapping: forward
// (old -> new) while old is primary, reverse after the write flip. The
// server evaluates the mapping's expressions; a deleted row's image is
// upserted first, as in imageApplier.
func (rs *routedSession) mappedApplier(ev *event, pm *table.Meta, m *table.Mapping, g *fkGraph) ([]table.DriftEntry, func(*rstore) error, error) {
	img := ev.image
	if img.overflow {
		return overflowed(pm, g)
	}
	names, _, entries, err := imageKeys(pm, img)
	if err != nil {
		return nil, nil, err
	}
	rs.mustForUpdate(ev, pm, g, false)
	if isDelete(ev) && len(img.rows) > 0 {
		// The children of a mapped table live under their mapped names
		// on the secondary: their ON DELETE actions go to the ledger.
		for _, e := range g.deleteDrift(pm.Name) {
			e.Reason = "ON DELETE action through a table mapping"
			rs.must = append(rs.must, e)
		}
	}
	del := isDelete(ev)
	var steps []mappedStep
	switch {
	case rs.state.Primary == route.Old && m.MergeMember():
		// A member of a merge before the flip: its columns of the new
		// row, which the merge's owner holds.
		return entries, rs.keyedUpdateApplier(pm, m.ForwardUpdateSQL, m.ForwardClearSQL, names, img.rows, del,
			"no new row for a table merged into another (its owner's row is not there yet)",
			"no new row to clear for a table merged into another (its owner's row is not there, or not yet)"), nil
	case rs.state.Primary == route.Old:
		if del && m.Merged() {
			// The owner's delete deletes the new row, and with it the
			// members' columns: a member's old row of the key is drift
			// (repaired once it is gone, or its owner's row is back).
			for _, mm := range m.Members()[1:] {
				for _, e := range entries {
					rs.must = append(rs.must, table.DriftEntry{Table: mm.Old.Name, Key: mm.KeyFrom(m, e.Key), Reason: "the merge's owner row was deleted"})
				}
			}
		}
		// Forward, through every part of a split (one part otherwise).
		for _, p := range m.Parts() {
			st := mappedStep{upsert: p.ForwardUpsertSQL, remove: p.ForwardDeleteSQL, del: del, rows: img.rows}
			if !del && p.Where() != "" {
				// Forward through a row predicate: an image that no longer
				// satisfies it (an UPDATE moved the row out) is deleted on
				// new; one that does is upserted (an UPDATE may have moved
				// it in).
				st.del, st.remove = true, p.ForwardDeleteUnmatchedSQL
			}
			steps = append(steps, st)
		}
	case m.Owner():
		// After the flip only this deployment's rows of the new table
		// (its discriminator's values) go back to its old store: a row of
		// another deployment's is neither applied here nor drift (the
		// statements below filter the same way; design section 6). A
		// split's owner upserts its columns of the old row, or deletes it.
		var rows [][][]byte
		rows, entries = ownRows(m, names, img.rows, entries)
		steps = append(steps, mappedStep{upsert: m.ReverseUpsertSQL, remove: m.ReverseDeleteSQL, del: del, rows: rows})
		for _, mm := range m.Members()[1:] {
			// A merged row back to every member: its row upserted where
			// one of its columns is not NULL, deleted where none is.
			st := mappedStep{upsert: mm.ReverseUpsertSQL, remove: mm.ReverseDeleteSQL, del: true, rows: rows}
			if !del {
				st.remove = mm.ReverseDeleteUnmatchedSQL
			}
			steps = append(steps, st)
		}
	default:
		// A dependent part of a split after the flip: its columns of the
		// old row, which the owner holds.
		return entries, rs.keyedUpdateApplier(pm, m.ReverseUpdateSQL, m.ReverseClearSQL, names, img.rows, del,
			"no old row for a dependent part of a split (its owner's row is not there yet)",
			"no old row to clear for a dependent part of a split (its owner's row is not there, or not yet)"), nil
	}
	apply := func(sec *rstore) error {
		for _, st := range steps {
			if len(st.rows) == 0 {
				continue
			}
			if err := rs.queueRows(sec, st.rows, len(names), st.del,
				func(n int) (string, error) { return st.upsert(names, n) }, nil,
				func(n int) (string, error) { return st.remove(names, n) }, nil); err != nil {
				return err
			}
		}
		return rs.execQueued(sec)
	}
	rs.plainApply = true // upserts and deletes through the mapping only
	return entries, apply, nil
}

// mappedStep is one mapping's statements for a write's row images.
type mappedStep struct {
	upsert, remove func(cols []string, rows int) (string, error)
	del            bool
	rows           [][][]byte
}

// keyedUpdateApplier applies row images of pm (a dependent part's new
// table after the flip, see table.NewSplit; a merge member's old table
// before it, see table.NewMerge) to the table its owner's rows are in: an
// update of its columns of those rows by key (update), or for a DELETE
// their reset to the defaults (clear). An image whose key has no row there
// (the owner's row is not there: the application wrote this table first)
// is drift for pm with reason (clearReason for a DELETE), which the
// repairer copies once the owner's row is there.
func (rs *routedSession) keyedUpdateApplier(pm *table.Meta, update, clear func([]string, int) (string, error), names []string, rows [][][]byte, del bool,
	reason, clearReason string) func(*rstore) error {
	stmt := update
	if del {
		// Cleared, not deleted; a key without a row may be one whose
		// insert has not committed there yet: drift, which the repairer
		// clears once it has.
		stmt, reason = clear, clearReason
	}
	return func(sec *rstore) error {
		if len(rows) == 0 {
			return nil
		}
		err := batches(rows, len(names), func(rows [][][]byte) error {
			sql, err := stmt(names, len(rows))
			if err != nil {
				return err
			}
			rs.queueExec(sec, sql, rowParams(rows, nil))
			return nil
		})
		if err != nil {
			return err
		}
		missing, err := rs.execQueuedRows(sec)
		if err != nil {
			return err
		}
		for _, r := range missing {
			if len(r) != len(pm.Key) {
				return fmt.Errorf("updating the rows of %s: a reply of %d columns for a key of %d", pm.Name, len(r), len(pm.Key))
			}
			key := make([]string, len(r))
			for i, v := range r {
				if v == nil {
					return fmt.Errorf("updating the rows of %s: a NULL key in the reply", pm.Name)
				}
				key[i] = *v
			}
			rs.must = append(rs.must, table.DriftEntry{Table: pm.Name, Key: key, Reason: reason})
		}
		return nil
	}
}

// ownRows keeps the row images of the new table (and their drift entries,
// one per image, in the same order) that carry m's discriminator values.
func ownRows(m *table.Mapping, names []string, rows [][][]byte, entries []table.DriftEntry) ([][][]byte, []table.DriftEntry) {
	if !m.Filtered() {
		return rows, entries
	}
	var keep [][][]byte
	var keepEntries []table.DriftEntry
	for i, r := range rows {
		if m.OwnsNewRow(names, r) {
			keep = append(keep, r)
			keepEntries = append(keepEntries, entries[i])
		}
	}
	return keep, keepEntries
}

// applyRows applies row images on sec, batch by batch: the upsert of each
// batch (parameters: the images' columns at upsertPos, nil for all) and,
// for a DELETE, the delete by key (removePos); then runs what it queued.
func (rs *routedSession) applyRows(sec *rstore, rows [][][]byte, width int, del bool,
	upsert func(n int) (string, error), upsertPos []int, remove func(n int) (string, error), removePos []int) error {
	if err := rs.queueRows(sec, rows, width, del, upsert, upsertPos, remove, removePos); err != nil {
		return err
	}
	return rs.execQueued(sec)
}

// queueRows queues what applyRows runs.
func (rs *routedSession) queueRows(sec *rstore, rows [][][]byte, width int, del bool,
	upsert func(n int) (string, error), upsertPos []int, remove func(n int) (string, error), removePos []int) error {
	return batches(rows, width, func(rows [][][]byte) error {
		sql, err := upsert(len(rows))
		if err != nil {
			return err
		}
		rs.queueExec(sec, sql, rowParams(rows, upsertPos))
		if !del {
			return nil
		}
		if sql, err = remove(len(rows)); err != nil {
			return err
		}
		rs.queueExec(sec, sql, rowParams(rows, removePos))
		return nil
	})
}
