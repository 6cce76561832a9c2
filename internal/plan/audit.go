package plan

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/sync/errgroup"
)

// The data audit (tandem plan --audit, issue 17) counts, per table in
// scope, the old rows that new's schema will reject once the backfill or
// the mirror writes them, by reason, without copying anything: every check
// is SQL run on the old store over old's rows as the mapping turns them into
// new's columns (renamed, computed). One scan of the table computes every
// per-row reason (length, NULL, type cast, CHECK, and the foreign key
// orphans through a hash join with the parent's keys), with parallel
// workers where PostgreSQL plans them, grouping only the rows a sieve keeps
// (scanSQL); a unique key that old does not enforce takes one GROUP BY
// more, on a second connection beside the scan.

// Audit reasons.
const (
	RejectLength    = "length"           // too long for new's varchar(n)/char(n), or too many digits for numeric(p,s)
	RejectNull      = "null"             // NULL into a NOT NULL column of new
	RejectOrphan    = "fk_orphan"        // no parent row for a foreign key new declares
	RejectDuplicate = "unique_duplicate" // a duplicate for a unique key new declares and old does not enforce
	RejectCheck     = "check"            // fails a CHECK constraint new declares
	RejectCast      = "type_cast"        // cannot be converted to new's column type
)

// auditExamples is how many example keys a reject lists.
const auditExamples = 5

// Audit is the data audit of one table: what new's schema will reject of
// old's rows.
type Audit struct {
	Rows     int64            `json:"rows"`     // rows scanned on old: those the mapping carries (its where)
	Duration jsonout.Duration `json:"duration"` // the audit's queries, all together
	// Rejects are the reasons with at least one row, in a stable order
	// (by reason, then column or constraint); empty when the table is clean.
	Rejects []Reject `json:"rejects"`
	// Unchecked says what the audit could not check, and why.
	Unchecked []string `json:"unchecked"`
}

// Reject is one reason new rejects old rows for.
type Reject struct {
	Reason     string `json:"reason"`               // one of the Reject* constants
	Column     string `json:"column,omitempty"`     // new's column (columns, comma-separated, for a key)
	Constraint string `json:"constraint,omitempty"` // new's constraint or unique index
	Rows       int64  `json:"rows"`                 // rows rejected (for a duplicate: rows beyond the first of each value)
	// Keys are up to five examples: the rows' primary keys on old, as
	// text (ctid when old has no key); for unique_duplicate, the
	// duplicated values of the unique key.
	Keys []string `json:"keys"`
	Fix  string   `json:"fix"` // what to change, where Tandem can know it
}

// auditInput is what auditTable needs.
type auditInput struct {
	old, new *pgx.Conn
	side     *auditSide
	notes    []string                             // what building side could not check
	parents  func(table.Name) (*auditSide, error) // the side of the old table that maps to a new table, nil when none
	byteSort bool                                 // old's collations all compare equal values byte by byte (uniqueCheck)
}

// auditTable audits one table: one scan for the per-row reasons and the
// foreign keys, one GROUP BY per unique key that old does not enforce.
func auditTable(ctx context.Context, in auditInput) (*Audit, error) {
	began := time.Now()
	s := in.side
	a := &Audit{Rejects: []Reject{}, Unchecked: slices.Clone(in.notes)}
	if a.Unchecked == nil {
		a.Unchecked = []string{}
	}
	newCons, err := readConstraints(ctx, in.new, s.new)
	if err != nil {
		return nil, fmt.Errorf("new store: %w", err)
	}
	oldCons, err := readConstraints(ctx, in.old, s.old)
	if err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	restore, err := raiseWorkMem(ctx, in.old)
	if err != nil {
		return nil, err
	}
	defer restore()
	checks := s.columnChecks()
	checks = append(checks, s.constraintChecks(newCons.checks, a)...)
	fks, err := s.foreignKeyChecks(newCons.fks, in.parents, a)
	if err != nil {
		return nil, err
	}
	checks = append(checks, fks...)
	var uniques []uniqueCheck
	for _, u := range newCons.uniques {
		if uc, ok := s.uniqueCheck(u, oldCons.uniques, in.byteSort, a); ok {
			uniques = append(uniques, uc)
		}
	}
	// The unique keys' GROUP BYs run on a second connection to old, beside
	// the scan, when old accepts one; else after it, on the same.
	var side *pgx.Conn
	if len(uniques) > 0 {
		if side, err = pgx.ConnectConfig(ctx, in.old.Config()); err == nil {
			defer func() { _ = side.Close(context.WithoutCancel(ctx)) }()
			if _, err = raiseWorkMem(ctx, side); err != nil {
				return nil, err
			}
		} else {
			side = nil
		}
	}
	ua := &Audit{}
	g, gctx := errgroup.WithContext(ctx)
	runUniques := func(ctx context.Context, conn *pgx.Conn) error {
		if in.byteSort {
			restore, err := setting(ctx, conn, "enable_hashagg", "off")
			if err != nil {
				return err
			}
			defer restore()
		}
		for _, uc := range uniques {
			if err := s.unique(ctx, conn, uc, ua); err != nil {
				return err
			}
		}
		return nil
	}
	if side != nil {
		g.Go(func() error { return runUniques(gctx, side) })
	}
	g.Go(func() error {
		if err := s.scan(gctx, in.old, checks, a); err != nil {
			return err
		}
		if side == nil {
			return runUniques(gctx, in.old)
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	a.Rejects = append(a.Rejects, ua.Rejects...)
	a.Unchecked = append(a.Unchecked, ua.Unchecked...)
	slices.SortStableFunc(a.Rejects, func(x, y Reject) int {
		return strings.Compare(x.Reason+"\x00"+x.Column+"\x00"+x.Constraint, y.Reason+"\x00"+y.Column+"\x00"+y.Constraint)
	})
	a.Duration = jsonout.Duration(time.Since(began))
	return a, nil
}

// auditWorkMem is the work_mem the audit's queries run with on old, so
// that a unique key's GROUP BY over a large table sorts or hashes mostly in
// memory (at PostgreSQL's default 4MB, hashing 1M text keys spilled 17
// batches and took several times as long; sorting them spills about 17MB
// at 64MB, and 128MB was no faster).
const auditWorkMem = "64MB"

// raiseWorkMem sets work_mem for the session to auditWorkMem when it is
// lower, and returns what puts it back.
func raiseWorkMem(ctx context.Context, conn *pgx.Conn) (func(), error) {
	var was string
	var lower bool
	if err := conn.QueryRow(ctx, "SELECT current_setting('work_mem'), pg_size_bytes(current_setting('work_mem')) < pg_size_bytes($1)", auditWorkMem).Scan(&was, &lower); err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	if !lower {
		return func() {}, nil
	}
	if _, err := conn.Exec(ctx, "SELECT set_config('work_mem', $1, false)", auditWorkMem); err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	return func() { _, _ = conn.Exec(context.WithoutCancel(ctx), "SELECT set_config('work_mem', $1, false)", was) }, nil
}

// setting sets a setting of conn's session, and returns what puts it back.
func setting(ctx context.Context, conn *pgx.Conn, name, value string) (func(), error) {
	var was string
	if err := conn.QueryRow(ctx, "SELECT current_setting($1), set_config($1, $2, false)", name, value).Scan(&was, nil); err != nil {
		return nil, fmt.Errorf("old store: %w", err)
	}
	return func() { _, _ = conn.Exec(context.WithoutCancel(ctx), "SELECT set_config($1, $2, false)", name, was) }, nil
}

// oldWhere names the old rows with keys, for a fix: a WHERE condition on
// old's key when it has one column.
func (s *auditSide) oldWhere(keys []string) string {
	if len(s.old.key) != 1 || len(keys) == 0 {
		return ""
	}
	lits := make([]string, len(keys))
	for i, k := range keys {
		lits[i] = quoteLiteral(k)
	}
	return fmt.Sprintf(" WHERE %s IN (%s)", quoteIdent(s.old.key[0]), strings.Join(lits, ", "))
}

// audit runs the data audit of every table in scope that exists on new and
// that old lets Tandem read, and adds a blocking reason per reject.
func (r *Report) audit(ctx context.Context, o Options, rd *reading, scoped map[string]bool, mapOf func(table.Name) Mapping) error {
	// byteSort: no collation on old compares other than byte by byte for
	// equality (only CREATE COLLATION ... deterministic = false makes one),
	// so that a unique key's text groups are the same under COLLATE "C".
	var pg16, byteSort bool
	if err := o.Old.QueryRow(ctx, `SELECT current_setting('server_version_num')::int >= 160000,
		NOT EXISTS (SELECT FROM pg_collation c WHERE (to_jsonb(c)->>'collisdeterministic')::bool IS FALSE)`).Scan(&pg16, &byteSort); err != nil {
		return fmt.Errorf("old store: %w", err)
	}
	mapped := func(n table.Name) Mapping {
		m := mapOf(n)
		if m.New == (table.Name{}) {
			m.New = n
		}
		return m
	}
	byNew := map[table.Name]table.Name{}
	for _, n := range rd.oldCat.order {
		if scoped[n.String()] {
			byNew[mapped(n).New] = n
		}
	}
	sides := map[table.Name]*auditSide{}
	notes := map[table.Name][]string{}
	side := func(n table.Name) (*auditSide, error) {
		if s, ok := sides[n]; ok {
			return s, nil
		}
		m := mapped(n)
		old, new := rd.oldCat.tables[n], rd.newCat.tables[m.New]
		if old == nil || new == nil || !old.sel {
			sides[n] = nil
			return nil, nil
		}
		s, ns, err := newAuditSide(ctx, o.Old, old, new, m, pg16)
		if err != nil {
			return nil, err
		}
		sides[n], notes[n] = s, ns
		return s, nil
	}
	parents := func(newName table.Name) (*auditSide, error) {
		n, ok := byNew[newName]
		if !ok {
			return nil, nil
		}
		return side(n)
	}
	for i := range r.Tables {
		t := &r.Tables[i]
		n := rd.oldCat.order[slices.IndexFunc(rd.oldCat.order, func(n table.Name) bool { return n.String() == t.Name })]
		s, err := side(n)
		if err != nil {
			return err
		}
		if s == nil {
			continue
		}
		a, err := auditTable(ctx, auditInput{old: o.Old, new: o.New, side: s, notes: notes[n], parents: parents, byteSort: byteSort})
		if err != nil {
			return err
		}
		t.Audit = a
		for _, rej := range a.Rejects {
			t.reason(Blocked, "audit: %s", rej.describe())
		}
		for _, u := range a.Unchecked {
			t.reason(Attention, "audit: %s", u)
		}
	}
	return nil
}

// describe is the reject as one sentence, with its examples and fix.
func (rj Reject) describe() string {
	var what string
	switch rj.Reason {
	case RejectLength:
		what = fmt.Sprintf("too long for new's column %s", rj.Column)
	case RejectNull:
		what = fmt.Sprintf("NULL into new's NOT NULL column %s", rj.Column)
	case RejectCast:
		what = fmt.Sprintf("cannot be converted to the type of new's column %s", rj.Column)
	case RejectCheck:
		what = fmt.Sprintf("fail new's CHECK constraint %s", rj.Constraint)
	case RejectOrphan:
		what = fmt.Sprintf("have no parent for new's foreign key %s (%s)", rj.Constraint, rj.Column)
	case RejectDuplicate:
		return fmt.Sprintf("%d row(s) duplicate new's unique key %s (%s), which old does not enforce: %s", rj.Rows, rj.Constraint, rj.Column, rj.Fix)
	}
	return fmt.Sprintf("%d row(s) %s (keys %s): %s", rj.Rows, what, strings.Join(rj.Keys, "; "), rj.Fix)
}
