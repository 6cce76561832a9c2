// Package plan assesses a migration before it starts: it reads both stores'
// catalogs and reports, per table in scope, how it maps, what differs, what
// the mirror and the backfill cannot handle, and an estimated backfill time
// from a short measured sample copy. It never writes to a real table: the
// sample lands in a temporary table on the new store and is rolled back.
//
// Every finding carries a Verdict; the report's verdict is the worst of
// them, and `tandem plan` turns it into its exit status.
package plan

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/tandemdb/tandem/internal/jsonout"
)

// Verdict is how ready something is for the migration.
type Verdict int

// Verdicts, from best to worst; a report's verdict is the worst it holds.
const (
	Ready     Verdict = iota // nothing to do
	Attention                // the migration can run, but an operator should read the reason
	Blocked                  // the migration cannot run until the reason is fixed
)

func (v Verdict) String() string {
	switch v {
	case Ready:
		return "ready"
	case Attention:
		return "attention"
	case Blocked:
		return "blocked"
	}
	return fmt.Sprintf("Verdict(%d)", int(v))
}

// MarshalText writes the verdict as its name.
func (v Verdict) MarshalText() ([]byte, error) { return []byte(v.String()), nil }

// UnmarshalText reads a verdict's name.
func (v *Verdict) UnmarshalText(b []byte) error {
	for _, c := range []Verdict{Ready, Attention, Blocked} {
		if string(b) == c.String() {
			*v = c
			return nil
		}
	}
	return fmt.Errorf("unknown verdict %q", b)
}

// Worst returns the worst of vs, Ready for none.
func Worst(vs ...Verdict) Verdict {
	w := Ready
	for _, v := range vs {
		w = max(w, v)
	}
	return w
}

// Reason is one finding with its verdict: why a table or a store is not
// simply ready. Ready reasons are notes (a widening type, an extra column).
type Reason struct {
	Verdict Verdict `json:"verdict"`
	Text    string  `json:"reason"`
}

// Report is everything `tandem plan` found. Its JSON form is the --json
// output; field names are part of the CLI's contract.
type Report struct {
	Verdict     Verdict      `json:"verdict"` // the worst verdict below
	Stores      []Store      `json:"stores"`
	Tables      []Table      `json:"tables"`
	Sequences   []Sequence   `json:"sequences"`
	Triggers    []Trigger    `json:"triggers"`
	ForeignKeys []ForeignKey `json:"foreign_keys"`
	Extensions  []Extension  `json:"extensions"`
	// Findings are the reasons that belong to no single table or store,
	// such as an extension missing on new that no column needs.
	Findings []Reason `json:"findings"`
}

// Store is one store's settings and Tandem's privileges there.
type Store struct {
	Name    string `json:"name"` // "old", "new" (or "control" when the control database is separate)
	Version string `json:"version"`
	User    string `json:"user"`
	// WALLevel: row-image mirroring does not need logical decoding; the
	// change feed does (see Feed).
	WALLevel                string `json:"wal_level"`
	MaxPreparedTransactions int    `json:"max_prepared_transactions"`
	Superuser               bool   `json:"superuser"`
	// ReplicationRole: Tandem can SET session_replication_role (superuser,
	// or the PG15+ SET privilege on the parameter), so row images apply in
	// replica mode without firing triggers or foreign keys a second time.
	ReplicationRole bool `json:"replication_role"`
	// ControlSchema: this store holds the control schema and Tandem can
	// create it (CREATE on the database) or already uses it. Nil when the
	// control schema lives elsewhere.
	ControlSchema *bool `json:"control_schema,omitempty"`
	// Feed is the change feed's prerequisites on the store: either store
	// can be the primary whose WAL it reads. Nil for the control database.
	Feed    *FeedPrereqs `json:"feed,omitempty"`
	Verdict Verdict      `json:"verdict"`
	Reasons []Reason     `json:"reasons"`
}

// Table is one table in scope, named as on the old store.
type Table struct {
	Name    string `json:"name"`     // schema.table on old
	NewName string `json:"new_name"` // schema.table on new
	Mapping string `json:"mapping"`  // "identity" or "declared"
	Bytes   int64  `json:"bytes"`    // pg_total_relation_size on old
	Size    string `json:"size"`     // Bytes, pretty
	// Rows is pg_class.reltuples, or an exact count when the table was
	// never analyzed and is small enough to count (RowsExact).
	Rows      int64    `json:"rows"`
	RowsExact bool     `json:"rows_exact,omitempty"`
	Key       []string `json:"key"`     // primary key on old
	NewKey    []string `json:"new_key"` // primary key on new
	// ReplicaIdentity and NewReplicaIdentity are the table's replica
	// identity on each store (default, index, full, nothing): the change
	// feed needs a key to name the row an UPDATE or DELETE changed.
	ReplicaIdentity    string       `json:"replica_identity,omitempty"`
	NewReplicaIdentity string       `json:"new_replica_identity,omitempty"`
	Differences        []Difference `json:"differences"`
	Sample             *Sample      `json:"sample,omitempty"`
	// Audit is the data audit (--audit): nil without it, or when the table
	// cannot be audited (it is missing on new, or old cannot be read).
	Audit   *Audit   `json:"audit,omitempty"`
	Verdict Verdict  `json:"verdict"`
	Reasons []Reason `json:"reasons"`
}

// Difference kinds.
const (
	MissingTable  = "missing_table"  // the (mapped) table does not exist on new
	MissingColumn = "missing_column" // an old column has no new column and the mapping does not drop it
	ExtraColumn   = "extra_column"   // a new column that no old column or expression fills
	TypeChange    = "type"           // the column's type differs
	KeyChange     = "key"            // the primary keys differ
)

// Difference is one schema difference between the stores that the mapping
// does not explain.
type Difference struct {
	Kind    string  `json:"kind"`
	Column  string  `json:"column,omitempty"` // the old column (the new one for an extra column)
	Old     string  `json:"old,omitempty"`    // the old type or key
	New     string  `json:"new,omitempty"`    // the new type or key
	Change  Change  `json:"change,omitempty"` // for a type change
	Verdict Verdict `json:"verdict"`
	Note    string  `json:"note"`
}

// Sample is the measured sample copy of a table.
type Sample struct {
	Rows     int64            `json:"rows"`
	Duration jsonout.Duration `json:"duration"` // as text ("1.5s")
	// Estimate is the extrapolated backfill time of the whole table at
	// the sampled rate. COPY is the backfill's fast path; the locked
	// upsert and throttling make a real backfill slower.
	Estimate jsonout.Duration `json:"estimate"`
	Error    string           `json:"error,omitempty"`
}

// Sequence is one sequence to sync at the write flip.
type Sequence struct {
	Name    string `json:"name"`
	OwnedBy string `json:"owned_by,omitempty"` // table.column, when owned
	Old     *int64 `json:"old"`                // last_value on old; nil when never used
	New     *int64 `json:"new"`                // last_value on new; nil when never used
	OnNew   bool   `json:"on_new"`
}

// Trigger is a user trigger on the old store.
type Trigger struct {
	Table      string `json:"table"`
	Name       string `json:"name"`
	Definition string `json:"definition"`
	Enabled    bool   `json:"enabled"`
}

// ForeignKey is a foreign key on old whose actions write to its table
// (ON DELETE/UPDATE CASCADE, SET NULL or SET DEFAULT).
type ForeignKey struct {
	Table      string `json:"table"`      // the referencing table, which the action writes
	References string `json:"references"` // the referenced table
	Name       string `json:"name"`
	OnDelete   string `json:"on_delete"`
	OnUpdate   string `json:"on_update"`
}

// Extension is an extension installed on old.
type Extension struct {
	Name    string   `json:"name"`
	Version string   `json:"version"`
	OnNew   bool     `json:"on_new"`
	UsedBy  []string `json:"used_by,omitempty"` // table.column whose type the extension provides
}

// reason appends a reason and raises the verdict.
func (t *Table) reason(v Verdict, format string, args ...any) {
	t.Reasons = append(t.Reasons, Reason{Verdict: v, Text: fmt.Sprintf(format, args...)})
	t.Verdict = max(t.Verdict, v)
}

func (s *Store) reason(v Verdict, format string, args ...any) {
	s.Reasons = append(s.Reasons, Reason{Verdict: v, Text: fmt.Sprintf(format, args...)})
	s.Verdict = max(s.Verdict, v)
}

// finish computes the report's verdict from everything it holds.
func (r *Report) finish() {
	r.Verdict = Ready
	for _, s := range r.Stores {
		r.Verdict = max(r.Verdict, s.Verdict)
	}
	for _, t := range r.Tables {
		r.Verdict = max(r.Verdict, t.Verdict)
	}
	for _, f := range r.Findings {
		r.Verdict = max(r.Verdict, f.Verdict)
	}
}

// JSON returns the report as indented JSON, with "->" and "<" left
// unescaped so the reasons read as they do in the text form.
func (r *Report) JSON() ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(jsonout.Normalize(r)); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}
