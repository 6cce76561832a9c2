package plan

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// The change feed (design section 10) reads the primary's WAL through a
// logical slot and a publication of the tables in scope. Either store can
// be the primary, so the plan checks both.

// feedPublication is the publication the feed uses under feed.name, and
// feedSlot its slot on store (as route.FeedNames names them; plan does not
// import route).
func feedPublication(name string) string {
	if name == "" {
		return "tandem_feed"
	}
	return "tandem_feed_" + name
}

func feedSlot(name, store string) string { return feedPublication(name) + "_" + store }

// managedReplicationRoles are the roles managed services grant instead of
// the REPLICATION attribute.
var managedReplicationRoles = []string{"rds_replication", "cloudsqlsuperuser", "azure_pg_admin"}

// FeedPrereqs are the change feed's prerequisites on one store.
type FeedPrereqs struct {
	WALLevel       string `json:"wal_level"`
	MaxSlots       int    `json:"max_replication_slots"`
	UsedSlots      int    `json:"used_replication_slots"` // not counting the feed's own slot, if it exists
	HasSlot        bool   `json:"has_slot"`               // the feed's slot exists already
	MaxWALSenders  int    `json:"max_wal_senders"`
	UsedWALSenders int    `json:"used_wal_senders"`
	// Replication: the user has the REPLICATION attribute, is a superuser,
	// or is a member of a managed service's replication role (named in
	// ReplicationVia).
	Replication    bool   `json:"replication"`
	ReplicationVia string `json:"replication_via,omitempty"`
	// CreatePublication: the user can create the publication (CREATE on
	// the database), or it exists already.
	CreatePublication bool `json:"create_publication"`
	HasPublication    bool `json:"has_publication"`
	database          string
	publication       string
}

// identity is what the plan knows about one table's replica identity and
// the feed's privileges on it.
type identity struct {
	kind      string // pg_class.relreplident: d, n, f, i
	hasIndex  bool   // kind i and the index exists
	hasKey    bool   // a primary key, which the default identity uses
	candidate string // a unique index on NOT NULL columns usable as the replica identity, "" for none
	owner     bool   // the user may add the table to a publication (owner or superuser)
	published bool   // already in the feed's publication
}

func (id identity) String() string {
	switch id.kind {
	case "d":
		return "default"
	case "n":
		return "nothing"
	case "f":
		return "full"
	case "i":
		return "index"
	}
	return id.kind
}

// readFeedPrereqs reads the feed's prerequisites on store (old or new),
// for the feed named name (feed.name).
func readFeedPrereqs(ctx context.Context, q table.Querier, store, name string) (FeedPrereqs, error) {
	f := FeedPrereqs{publication: feedPublication(name)}
	args := []any{feedSlot(name, store), managedReplicationRoles, f.publication}
	err := q.QueryRow(ctx, `SELECT current_setting('wal_level'),
			current_setting('max_replication_slots')::int,
			(SELECT count(*) FROM pg_replication_slots WHERE slot_name <> $1)::int,
			EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
			current_setting('max_wal_senders')::int,
			(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int,
			(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
			COALESCE((SELECT string_agg(rolname, ', ' ORDER BY rolname) FROM pg_roles
				WHERE rolname = ANY ($2::text[]) AND pg_has_role(current_user, oid, 'MEMBER')), ''),
			has_database_privilege(current_database(), 'CREATE'),
			EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $3), current_database()`, args...).
		Scan(&f.WALLevel, &f.MaxSlots, &f.UsedSlots, &f.HasSlot, &f.MaxWALSenders, &f.UsedWALSenders,
			&f.Replication, &f.ReplicationVia, &f.CreatePublication, &f.HasPublication, &f.database)
	if err != nil {
		return f, fmt.Errorf("reading the %s store's replication settings: %w", store, err)
	}
	if f.ReplicationVia != "" {
		f.Replication = true
	}
	return f, nil
}

// readIdentities reads the replica identity of every user table on q, and
// whether it is in the publication pub.
func readIdentities(ctx context.Context, q table.Querier, pub string) (map[table.Name]identity, error) {
	rows, err := q.Query(ctx, `
		SELECT n.nspname, c.relname, c.relreplident::text,
			EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
			EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
			COALESCE((SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
				WHERE i.indrelid = c.oid AND i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL
				  AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey) k JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k WHERE NOT a.attnotnull)
				ORDER BY ic.relname LIMIT 1), ''),
			pg_has_role(current_user, c.relowner, 'USAGE'),
			EXISTS (SELECT 1 FROM pg_publication_tables p WHERE p.pubname = $1 AND p.schemaname = n.nspname AND p.tablename = c.relname)
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tandem') AND n.nspname NOT LIKE 'pg\_%'`,
		pub)
	if err != nil {
		return nil, fmt.Errorf("reading replica identities: %w", err)
	}
	out := map[table.Name]identity{}
	var n table.Name
	var id identity
	if _, err := pgx.ForEachRow(rows, []any{&n.Schema, &n.Table, &id.kind, &id.hasIndex, &id.hasKey, &id.candidate, &id.owner, &id.published}, func() error {
		out[n] = id
		return nil
	}); err != nil {
		return nil, fmt.Errorf("reading replica identities: %w", err)
	}
	return out, nil
}

// assessFeedStore adds the feed's missing prerequisites on s to its
// reasons, each with the statement that fixes it, at verdict v.
func assessFeedStore(s *Store, f FeedPrereqs, v Verdict) {
	need := "the change feed"
	if v < Blocked {
		need = "the change feed (feed.enabled, off now)"
	}
	if f.WALLevel != "logical" {
		s.reason(v, "wal_level is %s: %s needs logical decoding; run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL (on RDS set rds.logical_replication = 1 in the parameter group, on Cloud SQL the flag cloudsql.logical_decoding = on, on Azure the server parameter wal_level = logical)",
			f.WALLevel, need)
	}
	if !f.HasSlot && f.MaxSlots-f.UsedSlots < 1 {
		s.reason(v, "no free replication slot (max_replication_slots %d, %d used): %s needs one; run ALTER SYSTEM SET max_replication_slots = %d; and restart PostgreSQL",
			f.MaxSlots, f.UsedSlots, need, f.UsedSlots+2)
	}
	if f.MaxWALSenders-f.UsedWALSenders < 1 {
		s.reason(v, "no free WAL sender (max_wal_senders %d, %d running): %s needs one; run ALTER SYSTEM SET max_wal_senders = %d; and restart PostgreSQL",
			f.MaxWALSenders, f.UsedWALSenders, need, f.UsedWALSenders+2)
	}
	if !f.Replication {
		s.reason(v, "%s has no REPLICATION privilege: %s streams the WAL through a replication connection; run ALTER ROLE %s REPLICATION; (on RDS: GRANT rds_replication TO %s; on Cloud SQL: ALTER USER %s WITH REPLICATION; on Azure: GRANT azure_pg_admin TO %s)",
			s.User, need, quoteIdent(s.User), quoteIdent(s.User), quoteIdent(s.User), quoteIdent(s.User))
	}
	if !f.HasPublication && !f.CreatePublication {
		s.reason(v, "%s cannot create the publication %s (CREATE on the database): %s needs it; run GRANT CREATE ON DATABASE %s TO %s;",
			s.User, f.publication, need, quoteIdent(f.database), quoteIdent(s.User))
	}
}

// assessFeedTable adds the feed's missing prerequisites for table t on
// store (its name there is n) to t's reasons, at verdict v; pub is the
// feed's publication.
func assessFeedTable(t *Table, store, user, pub string, n table.Name, id identity, ok bool, v Verdict) {
	if !ok {
		return // missing on that store: the table's own reasons say so
	}
	need := "the change feed"
	if v < Blocked {
		need = "the change feed (feed.enabled, off now)"
	}
	q := n.Quoted()
	if blocked := id.kind == "n" || (id.kind == "d" && !id.hasKey) || (id.kind == "i" && !id.hasIndex); blocked {
		var fix string
		switch {
		case id.hasKey:
			fix = fmt.Sprintf("run ALTER TABLE %s REPLICA IDENTITY DEFAULT;", q)
		case id.candidate != "":
			fix = fmt.Sprintf("run ALTER TABLE %s REPLICA IDENTITY USING INDEX %s;", q, quoteIdent(id.candidate))
		default:
			fix = fmt.Sprintf("add a primary key (ALTER TABLE %s ADD PRIMARY KEY (...);) or, failing that, run ALTER TABLE %s REPLICA IDENTITY FULL;", q, q)
		}
		what := "replica identity " + id.String()
		switch id.kind {
		case "d":
			what = "replica identity default without a primary key"
		case "i":
			what = "replica identity index, whose index is gone"
		}
		t.reason(v, "%s on %s: %s cannot tell which row an UPDATE or DELETE changed; %s", what, store, need, fix)
	}
	if !id.published && !id.owner {
		t.reason(v, "%s does not own %s on %s: it cannot add it to the publication %s that %s reads; run ALTER TABLE %s OWNER TO %s; or have its owner add it to the publication (CREATE PUBLICATION %s FOR TABLE ...)",
			user, n, store, pub, need, q, quoteIdent(user), pub)
	}
}
