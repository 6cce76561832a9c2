package plan

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// Mapping is how the plan sees one old table's declaration (design
// section 6): the new name and which columns the declaration explains. The
// zero value (with New set to the old name) is the identity mapping.
type Mapping struct {
	New      table.Name
	Declared bool              // from the config's tables: section, not the identity default
	Renames  map[string]string // old column -> new column
	Dropped  []string          // old columns with no new column
	Computed map[string]string // new column -> SQL expression over old columns
	Consumed map[string]bool   // old columns some computed expression reads
	// Discriminator are new columns set to one constant per deployment
	// (new column -> value); they are filled, and left out of the key
	// comparison (the rest of new's key must be old's).
	Discriminator map[string]string
	// Where is the mapping's row predicate over the old row ("" = every
	// row): the audit reads only the rows it carries.
	Where string
	// FilledElsewhere are the new columns another old table fills (a
	// merge: new column -> that old table); they are not this table's
	// to fill.
	FilledElsewhere map[string]table.Name
}

// newColumn returns the new column that old column c becomes, and false when
// the mapping drops it.
func (m Mapping) newColumn(c string) (string, bool) {
	if slices.Contains(m.Dropped, c) {
		return "", false
	}
	if n, ok := m.Renames[c]; ok {
		return n, true
	}
	return c, true
}

// Options say what to assess. Old and New are required; the plan only
// reads them, apart from a temporary table on New that it rolls back.
type Options struct {
	Old, New *pgx.Conn
	// Control is the database holding the control schema when it is not
	// the old store; nil means the old store.
	Control *pgx.Conn
	// SampleRows is how many rows per table the sample copy moves; 0 skips
	// it and leaves the estimates out.
	SampleRows int
	// InScope says whether an old table takes part in the migration (the
	// config's include/exclude patterns); nil means every user table.
	InScope func(table.Name) bool
	// Map returns a table's mapping; nil means every table maps to itself.
	Map func(table.Name) Mapping
	// Problems are reasons found elsewhere (the mapping's server-side
	// checks), by old table; they are added to the tables' verdicts.
	Problems map[table.Name][]Reason
	// Feed says the change feed is enabled (feed.enabled): its missing
	// prerequisites block; otherwise they need attention.
	Feed bool
	// FeedName is feed.name, which names the feed's publication and slots.
	FeedName string
	// CountBelow is the heap size in bytes under which a never-analyzed
	// table is counted exactly; 0 means 64 MiB.
	CountBelow int64
	// StoreReasons are reasons found elsewhere about a store (how it asks
	// the proxy to authenticate), by store name ("old", "new").
	StoreReasons map[string][]Reason
	// Audit runs the data audit (tandem plan --audit): it scans every
	// table in scope on old for the rows new's schema will reject.
	Audit bool
}

// Run assesses the migration from o.Old to o.New. An error means a store
// could not be read; everything the plan finds is in the report.
func Run(ctx context.Context, o Options) (*Report, error) {
	r := &Report{Sequences: []Sequence{}, Triggers: []Trigger{}, ForeignKeys: []ForeignKey{}, Extensions: []Extension{}, Findings: []Reason{}}
	rd, err := r.read(ctx, o)
	if err != nil {
		return nil, err
	}

	inScope := o.InScope
	if inScope == nil {
		inScope = func(table.Name) bool { return true }
	}
	mapOf := o.Map
	if mapOf == nil {
		mapOf = func(n table.Name) Mapping { return Mapping{New: n} }
	}
	scoped := map[string]bool{}
	for _, n := range rd.oldCat.order {
		if inScope(n) {
			scoped[n.String()] = true
		}
	}
	missingExt := r.scopeCatalog(rd, scoped)

	for _, n := range rd.oldCat.order {
		if !scoped[n.String()] {
			continue
		}
		t, err := r.assessScoped(ctx, o, rd, n, mapOf(n), missingExt)
		if err != nil {
			return nil, err
		}
		r.Tables = append(r.Tables, t)
	}
	if o.Audit {
		if err := r.audit(ctx, o, rd, scoped, mapOf); err != nil {
			return nil, err
		}
	}

	r.assessExtensions()
	r.assessSequences(rd, scoped, inScope)
	r.finish()
	return r, nil
}

// reading is what Run reads from the stores' catalogs.
type reading struct {
	oldCat, newCat *catalog
	oldIDs, newIDs map[table.Name]identity
	triggers       []Trigger
	fks            []ForeignKey
	feedVerdict    Verdict // of a missing change feed prerequisite: Blocked with o.Feed
	feedName       string  // o.FeedName
}

// read reads both catalogs, assesses the stores, and reads the tables'
// replica identities and old's triggers and foreign keys.
func (r *Report) read(ctx context.Context, o Options) (*reading, error) {
	oldCat, err := readCatalog(ctx, o.Old)
	if err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	newCat, err := readCatalog(ctx, o.New)
	if err != nil {
		return nil, fmt.Errorf("new store: %w", err)
	}
	if err := r.assessStores(ctx, o); err != nil {
		return nil, err
	}
	feedVerdict := Attention
	if o.Feed {
		feedVerdict = Blocked
	}
	oldIDs, err := readIdentities(ctx, o.Old, feedPublication(o.FeedName))
	if err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	newIDs, err := readIdentities(ctx, o.New, feedPublication(o.FeedName))
	if err != nil {
		return nil, fmt.Errorf("new store: %w", err)
	}
	triggers, err := readTriggers(ctx, o.Old)
	if err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	fks, err := readForeignKeys(ctx, o.Old)
	if err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	return &reading{oldCat: oldCat, newCat: newCat, oldIDs: oldIDs, newIDs: newIDs, triggers: triggers, fks: fks, feedVerdict: feedVerdict, feedName: o.FeedName}, nil
}

// scopeCatalog keeps the triggers and foreign keys of the tables in scope
// and lists old's extensions; missingExt are those missing on new, by name.
func (r *Report) scopeCatalog(rd *reading, scoped map[string]bool) (missingExt map[string]*Extension) {
	oldCat, newCat := rd.oldCat, rd.newCat
	for _, tr := range rd.triggers {
		if scoped[tr.Table] {
			r.Triggers = append(r.Triggers, tr)
		}
	}
	for _, fk := range rd.fks {
		if scoped[fk.Table] || scoped[fk.References] {
			r.ForeignKeys = append(r.ForeignKeys, fk)
		}
	}
	for _, name := range sortedKeys(oldCat.extensions) {
		_, on := newCat.extensions[name]
		r.Extensions = append(r.Extensions, Extension{Name: name, Version: oldCat.extensions[name], OnNew: on})
	}
	missingExt = map[string]*Extension{}
	for i := range r.Extensions {
		if !r.Extensions[i].OnNew {
			missingExt[r.Extensions[i].Name] = &r.Extensions[i]
		}
	}
	return missingExt
}

// assessScoped assesses the table n in scope, mapped by m: assessTable, then
// its replica identities and the change feed, the reasons found elsewhere,
// its triggers and foreign keys, its row count and the sample copy.
func (r *Report) assessScoped(ctx context.Context, o Options, rd *reading, n table.Name, m Mapping, missingExt map[string]*Extension) (Table, error) {
	oldCat, newCat := rd.oldCat, rd.newCat
	if m.New == (table.Name{}) {
		m.New = n
	}
	t := assessTable(oldCat.tables[n], newCat.tables[m.New], m, missingExt)
	oid, ook := rd.oldIDs[n]
	nid, nok := rd.newIDs[m.New]
	if ook {
		t.ReplicaIdentity = oid.String()
	}
	if nok {
		t.NewReplicaIdentity = nid.String()
	}
	assessFeedTable(&t, "old", r.Stores[0].User, feedPublication(rd.feedName), n, oid, ook, rd.feedVerdict)
	assessFeedTable(&t, "new", r.Stores[1].User, feedPublication(rd.feedName), m.New, nid, nok, rd.feedVerdict)
	for _, p := range o.Problems[n] {
		t.reason(p.Verdict, "%s", p.Text)
	}
	for _, tr := range r.Triggers {
		if tr.Table == t.Name && tr.Enabled {
			t.reason(Attention, "trigger %s runs on old: row images carry what it does to this table's rows, not the writes it makes to other tables (those tables rely on verify and repair)", tr.Name)
		}
	}
	for _, fk := range r.ForeignKeys {
		if fk.Table == t.Name {
			t.reason(Attention, "foreign key %s to %s (ON DELETE %s, ON UPDATE %s) writes this table when %s changes: those cascaded writes are not in the parent's row images (verify and repair catch them)",
				fk.Name, fk.References, fk.OnDelete, fk.OnUpdate, fk.References)
		}
	}
	if err := countRows(ctx, o, oldCat.tables[n], &t); err != nil {
		return Table{}, err
	}
	if o.SampleRows > 0 && t.Verdict < Blocked {
		s, err := sampleCopy(ctx, o.Old, o.New, oldCat.tables[n], newCat.tables[m.New], m, o.SampleRows, t.Rows)
		if err != nil {
			return Table{}, err
		}
		t.Sample = s
		if s.Error != "" {
			t.reason(Attention, "the sample copy failed on new: %s", s.Error)
		}
	}
	return t, nil
}

// assessExtensions finds the extensions missing on new that no column in
// scope uses (those that one uses are in its table's differences).
func (r *Report) assessExtensions() {
	for _, e := range r.Extensions {
		if !e.OnNew && len(e.UsedBy) == 0 && e.Name != "plpgsql" {
			r.Findings = append(r.Findings, Reason{Verdict: Attention, Text: fmt.Sprintf(
				"extension %s %s is installed on old but not on new: no column in scope uses its types, but functions, operators and defaults from it will be missing", e.Name, e.Version)})
		}
	}
}

// assessSequences lists old's sequences in scope (owned by a table in
// scope, or in a schema in scope) with their values on both stores.
func (r *Report) assessSequences(rd *reading, scoped map[string]bool, inScope func(table.Name) bool) {
	oldCat, newCat := rd.oldCat, rd.newCat
	for _, name := range sortedKeys(oldCat.sequences) {
		s := oldCat.sequences[name]
		owner := s.ownedBy
		if owner != "" {
			if i := strings.LastIndexByte(owner, '.'); i > 0 && !scoped[owner[:i]] {
				continue
			}
		} else if i := strings.IndexByte(name, '.'); i > 0 && !inScope(table.Name{Schema: name[:i], Table: name[i+1:]}) {
			continue
		}
		ns, on := newCat.sequences[name]
		r.Sequences = append(r.Sequences, Sequence{Name: name, OwnedBy: owner, Old: s.last, New: ns.last, OnNew: on})
		if !on {
			r.Findings = append(r.Findings, Reason{Verdict: Attention, Text: fmt.Sprintf(
				"sequence %s exists on old but not on new: the write flip cannot sync it", name)})
		}
	}
}

// assessStores checks each store's settings and Tandem's privileges.
func (r *Report) assessStores(ctx context.Context, o Options) error {
	for _, st := range []struct {
		name string
		conn *pgx.Conn
	}{{"old", o.Old}, {"new", o.New}} {
		s, err := readStore(ctx, st.conn, st.name)
		if err != nil {
			return err
		}
		if !s.ReplicationRole {
			s.reason(Attention, "%s cannot SET session_replication_role: row images would be applied with this store's triggers and foreign keys active (grant it: GRANT SET ON PARAMETER session_replication_role TO %s, on PostgreSQL 15+, or use a superuser)",
				s.User, quoteIdent(s.User))
		}
		f, err := readFeedPrereqs(ctx, st.conn, st.name, o.FeedName)
		if err != nil {
			return err
		}
		s.Feed = &f
		v := Attention
		if o.Feed {
			v = Blocked
		}
		assessFeedStore(&s, f, v)
		if st.name == "old" && o.Control == nil {
			ok, err := controlReady(ctx, st.conn)
			if err != nil {
				return err
			}
			s.ControlSchema = &ok
		}
		r.Stores = append(r.Stores, s)
	}
	if o.Control != nil {
		s, err := readStore(ctx, o.Control, "control")
		if err != nil {
			return err
		}
		ok, err := controlReady(ctx, o.Control)
		if err != nil {
			return err
		}
		s.ControlSchema = &ok
		r.Stores = append(r.Stores, s)
	}
	for i := range r.Stores {
		s := &r.Stores[i]
		if s.ControlSchema != nil && !*s.ControlSchema {
			s.reason(Blocked, "%s can neither create the control schema \"tandem\" (CREATE on the database) nor use an existing one", s.User)
		}
	}
	// The control schema is not the application's (issue 12): a role that
	// can write it can change the routing past every gate and the fence.
	// The application's role is the old store's DSN user.
	app := r.Stores[0].User
	control, cs := o.Old, &r.Stores[0]
	if o.Control != nil {
		control, cs = o.Control, &r.Stores[len(r.Stores)-1]
	}
	switch w, err := controlWritable(ctx, control, app); {
	case err != nil:
		return err
	case w && cs.User == app:
		cs.reason(Ready, "the application's role %s is also the control role: it can change tandem.state and tandem.drift directly, past the gates and the fence (the proxy refuses such statements from clients with 42501); use a dedicated control role in control.dsn (see README, Security)", app)
	case w:
		cs.reason(Attention, "the application's role %s can write the control schema \"tandem\": it could change the routing state past the gates and the fence; REVOKE ALL ON ALL TABLES IN SCHEMA tandem FROM %s; REVOKE CREATE ON SCHEMA tandem FROM %s, or for a superuser or the owner, log the application in as another role (see README, Security)",
			app, quoteIdent(app), quoteIdent(app))
	}
	for i := range r.Stores {
		s := &r.Stores[i]
		for _, reason := range o.StoreReasons[s.Name] {
			s.reason(reason.Verdict, "%s", reason.Text)
		}
	}
	if oldS, newS := r.Stores[0], &r.Stores[1]; oldS.MaxPreparedTransactions > newS.MaxPreparedTransactions {
		newS.reason(Attention, "max_prepared_transactions is %d on new but %d on old: clients that use PREPARE TRANSACTION will fail once new serves them",
			newS.MaxPreparedTransactions, oldS.MaxPreparedTransactions)
	}
	return nil
}

// assessTable compares one old table with its mapped table on new (nil when
// missing) and sets the verdict from what it finds. The caller adds the
// reasons that need other tables (triggers, foreign keys) and the sample.
func assessTable(old, new *relation, m Mapping, missingExt map[string]*Extension) Table {
	t := Table{
		Name: old.name.String(), NewName: m.New.String(), Mapping: "identity",
		Bytes: old.bytes, Size: prettyBytes(old.bytes), Rows: int64(max(old.rows, 0)),
		Key: nonNil(old.key), Differences: []Difference{}, Reasons: []Reason{},
	}
	if m.Declared {
		t.Mapping = "declared"
	}
	t.assessOld(old, missingExt)
	if new == nil {
		t.NewKey = []string{}
		t.diff(Difference{Kind: MissingTable, Verdict: Blocked, Note: fmt.Sprintf("table %s is missing on new", t.NewName)})
		return t
	}
	t.NewKey = nonNil(new.key)
	if !new.sel || !new.ins || !new.upd || !new.del {
		t.reason(Blocked, "missing privileges on new %s: the mirror and the backfill need SELECT, INSERT, UPDATE and DELETE", t.NewName)
	}

	filled := t.assessColumns(old, new, m, missingExt)
	t.assessNewColumns(new, m, filled)
	t.assessKey(old, new, m)
	return t
}

// assessOld checks the privileges and the key of the old table, and notes
// the columns whose type comes from an extension missing on new.
func (t *Table) assessOld(old *relation, missingExt map[string]*Extension) {
	if !old.sel {
		t.reason(Blocked, "no SELECT privilege on old: the backfill and verify cannot read it")
	}
	var missing []string
	for p, ok := range map[string]bool{"INSERT": old.ins, "UPDATE": old.upd, "DELETE": old.del} {
		if !ok {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		t.reason(Attention, "no %s privilege on old: writes cannot be mirrored back to old after the write flip", strings.Join(missing, ", "))
	}
	if !old.hasKey() {
		t.reason(Attention, "no primary key on old: writes are only statement-mirrored, and the table cannot be backfilled by key ranges")
	}
	for _, c := range old.cols {
		if e := missingExt[c.ext]; c.ext != "" && e != nil {
			e.UsedBy = append(e.UsedBy, t.Name+"."+c.name)
		}
	}
}

// assessColumns compares each old column the mapping keeps with its column
// on new; filled are the new columns that old's fill.
func (t *Table) assessColumns(old, new *relation, m Mapping, missingExt map[string]*Extension) (filled map[string]bool) {
	filled = map[string]bool{}
	for _, c := range old.cols {
		if c.generated {
			continue
		}
		nc, kept := m.newColumn(c.name)
		if !kept {
			continue
		}
		target := new.column(nc)
		if target == nil && m.Consumed[c.name] {
			continue // read by a computed column: the mapping explains it
		}
		filled[nc] = true
		if target == nil {
			t.diff(Difference{Kind: MissingColumn, Column: c.name, Old: c.typ, Verdict: Blocked,
				Note: fmt.Sprintf("column %s has no column %s on new, and the mapping does not drop it", c.name, nc)})
			continue
		}
		if target.generated {
			t.diff(Difference{Kind: TypeChange, Column: c.name, Old: c.typ, New: target.typ + " (generated)", Verdict: Blocked,
				Note: fmt.Sprintf("column %s is generated on new and cannot be written", nc)})
			continue
		}
		change, note := ClassifyType(c.typ, target.typ)
		if e := missingExt[c.ext]; c.ext != "" && e != nil && change != Same {
			v, why := Blocked, "its values have no type to go to"
			if stringLimit(parseType(target.typ)) < 0 && stringType[parseType(target.typ).base] {
				v, why = Attention, "its values go to new as text"
			}
			t.diff(Difference{Kind: TypeChange, Column: c.name, Old: c.typ, New: target.typ, Change: change, Verdict: v,
				Note: fmt.Sprintf("type %s comes from extension %s, which is missing on new: %s", c.typ, c.ext, why)})
			continue
		}
		if change != Same {
			t.diff(Difference{Kind: TypeChange, Column: c.name, Old: c.typ, New: target.typ, Change: change, Verdict: change.Verdict(), Note: note})
		}
	}
	return filled
}

// assessNewColumns checks the columns only new has (old fills none of them)
// and the columns the mapping computes.
func (t *Table) assessNewColumns(new *relation, m Mapping, filled map[string]bool) {
	for _, nc := range new.cols {
		if filled[nc.name] {
			continue
		}
		if _, computed := m.Computed[nc.name]; computed {
			continue
		}
		if _, disc := m.Discriminator[nc.name]; disc {
			continue
		}
		if _, other := m.FilledElsewhere[nc.name]; other {
			continue
		}
		switch {
		case nc.generated || nc.identity || nc.hasDefault || !nc.notNull:
			t.diff(Difference{Kind: ExtraColumn, Column: nc.name, New: nc.typ, Verdict: Ready,
				Note: fmt.Sprintf("column %s exists only on new; rows from old get its default", nc.name)})
		default:
			t.diff(Difference{Kind: ExtraColumn, Column: nc.name, New: nc.typ, Verdict: Blocked,
				Note: fmt.Sprintf("column %s exists only on new and is NOT NULL without a default: rows from old cannot be written", nc.name)})
		}
	}
	for _, nc := range sortedKeys(m.Computed) {
		if new.column(nc) == nil {
			t.reason(Blocked, "the mapping computes column %s, which does not exist on new", nc)
		}
	}
}

// assessKey compares old's primary key, mapped, with new's.
func (t *Table) assessKey(old, new *relation, m Mapping) {
	mappedKey := make([]string, 0, len(old.key))
	for _, k := range old.key {
		nk, _ := m.newColumn(k)
		mappedKey = append(mappedKey, nk)
	}
	newKey := slices.DeleteFunc(slices.Clone(new.key), func(k string) bool { _, disc := m.Discriminator[k]; return disc })
	switch {
	case old.hasKey() && !new.hasKey():
		t.diff(Difference{Kind: KeyChange, Old: strings.Join(old.key, ", "), Verdict: Blocked,
			Note: "no primary key on new: row images and the backfill apply rows by key"})
	case old.hasKey() && !slices.Equal(mappedKey, newKey):
		t.diff(Difference{Kind: KeyChange, Old: strings.Join(old.key, ", "), New: strings.Join(new.key, ", "), Verdict: Blocked,
			Note: "the primary keys differ: rows are applied on new by the old key"})
	case !old.hasKey() && new.hasKey():
		t.diff(Difference{Kind: KeyChange, New: strings.Join(new.key, ", "), Verdict: Attention,
			Note: "only new has a primary key: statement-mirrored writes must keep it unique"})
	}
}

func (r *relation) hasKey() bool { return len(r.key) > 0 }

// diff records a difference; one that is not Ready is also a reason.
func (t *Table) diff(d Difference) {
	t.Differences = append(t.Differences, d)
	if d.Verdict > Ready {
		t.reason(d.Verdict, "%s", d.Note)
	}
}

// countRows replaces a never-analyzed table's unknown estimate with an
// exact count when the table is small.
func countRows(ctx context.Context, o Options, rel *relation, t *Table) error {
	limit := o.CountBelow
	if limit == 0 {
		limit = 64 << 20
	}
	if rel.rows >= 0 || rel.heap >= limit || !rel.sel {
		return nil
	}
	if err := o.Old.QueryRow(ctx, "SELECT count(*) FROM "+rel.name.Quoted()).Scan(&t.Rows); err != nil {
		return fmt.Errorf("counting the rows of %s on old: %w", rel.name, err)
	}
	t.RowsExact = true
	return nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// prettyBytes writes n like pg_size_pretty: bytes, kB, MB, GB, TB (powers
// of 1024).
func prettyBytes(n int64) string {
	units := []string{"bytes", "kB", "MB", "GB", "TB", "PB"}
	v, i := n, 0
	for i < len(units)-1 && (v >= 10240 || v <= -10240) {
		v = (v + 512) / 1024
		i++
	}
	return fmt.Sprintf("%d %s", v, units[i])
}
