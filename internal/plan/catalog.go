package plan

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/table"
)

// userRelations picks the tables a store's users own: not the system
// schemas, not Tandem's control schema, not partitions (their parent is
// the table) and not tables that belong to an extension.
const userRelations = `c.relkind IN ('r', 'p') AND NOT c.relispartition
	AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tandem')
	AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp\_%'
	AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')`

// tablesSQL lists the user tables with their size (a partitioned table's
// leaves summed), row estimate (-1 when a leaf was never analyzed), the
// privileges of the current user and the primary key in key order.
const tablesSQL = `
SELECT n.nspname, c.relname,
	CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pg_total_relation_size(p.relid)), 0) FROM pg_partition_tree(c.oid) p)
	     ELSE pg_total_relation_size(c.oid) END::int8,
	CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pg_relation_size(p.relid)), 0) FROM pg_partition_tree(c.oid) p)
	     ELSE pg_relation_size(c.oid) END::int8,
	CASE WHEN c.relkind = 'p' THEN (SELECT CASE WHEN bool_or(pc.reltuples < 0) THEN -1 ELSE coalesce(sum(pc.reltuples), 0) END
	       FROM pg_partition_tree(c.oid) p JOIN pg_class pc ON pc.oid = p.relid WHERE p.isleaf)
	     ELSE c.reltuples END::float8,
	has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),
	has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE'),
	ARRAY(SELECT a.attname::text FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, ord), pg_attribute a
	      WHERE i.indrelid = c.oid AND i.indisprimary AND a.attrelid = c.oid AND a.attnum = k.attnum ORDER BY k.ord)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE ` + userRelations + `
ORDER BY 1, 2`

// columnsSQL lists the user tables' columns. A type outside pg_catalog is
// schema-qualified whether or not it is on the search_path, so types
// compare by name across stores; ext is the extension that provides the
// type (for an array, its element type), if any.
const columnsSQL = `
SELECT n.nspname, c.relname, a.attname,
	CASE WHEN bn.nspname <> 'pg_catalog' AND pg_type_is_visible(bt.oid) THEN quote_ident(bn.nspname) || '.' ELSE '' END
	  || format_type(a.atttypid, a.atttypmod),
	a.attnotnull, a.atthasdef, a.attgenerated <> '', a.attidentity <> '',
	(SELECT e.extname::text FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
	  WHERE d.classid = 'pg_type'::regclass AND d.objid = bt.oid AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type bt ON bt.oid = CASE WHEN t.typelem <> 0 AND t.typlen = -1 AND t.typtype <> 'd' THEN t.typelem ELSE t.oid END
JOIN pg_namespace bn ON bn.oid = bt.typnamespace
WHERE ` + userRelations + `
ORDER BY 1, 2, a.attnum`

// column is one column on one store.
type column struct {
	name, typ  string
	notNull    bool
	hasDefault bool
	generated  bool
	identity   bool
	ext        string // extension providing the type, "" for none
}

// relation is one user table on one store.
type relation struct {
	name          table.Name
	bytes, heap   int64
	rows          float64 // -1: never analyzed
	sel, ins, upd bool
	del           bool
	key           []string
	cols          []column
}

func (r *relation) column(name string) *column {
	for i := range r.cols {
		if r.cols[i].name == name {
			return &r.cols[i]
		}
	}
	return nil
}

// catalog is what the plan reads from one store.
type catalog struct {
	tables     map[table.Name]*relation
	order      []table.Name
	sequences  map[string]seqInfo // by schema.name
	extensions map[string]string  // name -> version
}

type seqInfo struct {
	last    *int64
	ownedBy string
}

func readCatalog(ctx context.Context, q table.Querier) (*catalog, error) {
	cat := &catalog{tables: map[table.Name]*relation{}, sequences: map[string]seqInfo{}, extensions: map[string]string{}}
	rows, err := q.Query(ctx, tablesSQL)
	if err != nil {
		return nil, fmt.Errorf("listing tables: %w", err)
	}
	var r relation
	if _, err := pgx.ForEachRow(rows, []any{&r.name.Schema, &r.name.Table, &r.bytes, &r.heap, &r.rows, &r.sel, &r.ins, &r.upd, &r.del, &r.key}, func() error {
		rel := r
		rel.key = append([]string(nil), r.key...)
		cat.tables[rel.name] = &rel
		cat.order = append(cat.order, rel.name)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("listing tables: %w", err)
	}

	rows, err = q.Query(ctx, columnsSQL)
	if err != nil {
		return nil, fmt.Errorf("listing columns: %w", err)
	}
	var n table.Name
	var c column
	var ext *string
	if _, err := pgx.ForEachRow(rows, []any{&n.Schema, &n.Table, &c.name, &c.typ, &c.notNull, &c.hasDefault, &c.generated, &c.identity, &ext}, func() error {
		if rel := cat.tables[n]; rel != nil {
			col := c
			if ext != nil {
				col.ext = *ext
			}
			rel.cols = append(rel.cols, col)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("listing columns: %w", err)
	}

	rows, err = q.Query(ctx, `
		SELECT s.schemaname || '.' || s.sequencename, s.last_value,
			(SELECT tn.nspname || '.' || tc.relname || '.' || a.attname
			   FROM pg_depend d JOIN pg_class tc ON tc.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
			   JOIN pg_attribute a ON a.attrelid = tc.oid AND a.attnum = d.refobjsubid
			  WHERE d.classid = 'pg_class'::regclass AND d.objid = format('%I.%I', s.schemaname, s.sequencename)::regclass
			    AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i') LIMIT 1)
		FROM pg_sequences s
		WHERE s.schemaname <> 'tandem' AND s.schemaname NOT LIKE 'pg\_temp\_%'
		ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("listing sequences: %w", err)
	}
	var name string
	var si seqInfo
	var owned *string
	if _, err := pgx.ForEachRow(rows, []any{&name, &si.last, &owned}, func() error {
		s := seqInfo{}
		if si.last != nil {
			v := *si.last
			s.last = &v
		}
		if owned != nil {
			s.ownedBy = *owned
		}
		cat.sequences[name] = s
		return nil
	}); err != nil {
		return nil, fmt.Errorf("listing sequences: %w", err)
	}

	rows, err = q.Query(ctx, `SELECT extname::text, extversion FROM pg_extension ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("listing extensions: %w", err)
	}
	var ev string
	if _, err := pgx.ForEachRow(rows, []any{&name, &ev}, func() error {
		cat.extensions[name] = ev
		return nil
	}); err != nil {
		return nil, fmt.Errorf("listing extensions: %w", err)
	}
	return cat, nil
}

// readStore reads a store's settings and Tandem's privileges there.
func readStore(ctx context.Context, q table.Querier, name string) (Store, error) {
	s := Store{Name: name}
	var num int
	err := q.QueryRow(ctx, `SELECT current_setting('server_version'), current_setting('server_version_num')::int,
		current_user, current_setting('wal_level'), current_setting('max_prepared_transactions')::int,
		(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)`).
		Scan(&s.Version, &num, &s.User, &s.WALLevel, &s.MaxPreparedTransactions, &s.Superuser)
	if err != nil {
		return s, fmt.Errorf("reading the %s store's settings: %w", name, err)
	}
	s.ReplicationRole = s.Superuser
	if !s.Superuser && num >= 150000 {
		// PG15 lets a superuser GRANT SET ON PARAMETER session_replication_role.
		if err := q.QueryRow(ctx, `SELECT has_parameter_privilege(current_user, 'session_replication_role', 'SET')`).Scan(&s.ReplicationRole); err != nil {
			return s, fmt.Errorf("reading the %s store's privileges: %w", name, err)
		}
	}
	return s, nil
}

// controlReady reports whether Tandem can create the control schema on q,
// or already has what it needs in an existing one.
func controlReady(ctx context.Context, q table.Querier) (bool, error) {
	var ok bool
	err := q.QueryRow(ctx, `SELECT has_database_privilege(current_database(), 'CREATE')
		OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'tandem' AND has_schema_privilege(oid, 'USAGE, CREATE'))`).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("reading the privileges on the control database: %w", err)
	}
	return ok, nil
}

// controlWritable reports whether role (which may not exist on this
// server: false) can change the control schema "tandem": create objects in
// it, or insert, update, delete or truncate any of its tables. Superusers
// and owners can.
func controlWritable(ctx context.Context, q table.Querier, role string) (bool, error) {
	var ok bool
	err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AND EXISTS (
		SELECT 1 FROM pg_namespace n WHERE n.nspname = 'tandem' AND (
			has_schema_privilege($1, n.oid, 'CREATE')
			OR EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p')
				AND has_table_privilege($1, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE'))))`, role).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("reading the privileges on the control schema: %w", err)
	}
	return ok, nil
}

// readTriggers lists the user triggers on old.
func readTriggers(ctx context.Context, q table.Querier) ([]Trigger, error) {
	rows, err := q.Query(ctx, `
		SELECT n.nspname || '.' || c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled <> 'D'
		FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE NOT t.tgisinternal AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tandem')
		ORDER BY 1, 2`)
	if err != nil {
		return nil, fmt.Errorf("listing triggers: %w", err)
	}
	var out []Trigger
	var tr Trigger
	_, err = pgx.ForEachRow(rows, []any{&tr.Table, &tr.Name, &tr.Definition, &tr.Enabled}, func() error {
		out = append(out, tr)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing triggers: %w", err)
	}
	return out, nil
}

// readForeignKeys lists the foreign keys on old whose referential actions
// write to the referencing table.
func readForeignKeys(ctx context.Context, q table.Querier) ([]ForeignKey, error) {
	rows, err := q.Query(ctx, `
		SELECT cn.nspname || '.' || cc.relname, rn.nspname || '.' || rc.relname, con.conname::text,
			con.confdeltype::text, con.confupdtype::text
		FROM pg_constraint con
		JOIN pg_class cc ON cc.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
		JOIN pg_class rc ON rc.oid = con.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
		WHERE con.contype = 'f' AND (con.confdeltype IN ('c', 'n', 'd') OR con.confupdtype IN ('c', 'n', 'd'))
		ORDER BY 1, 3`)
	if err != nil {
		return nil, fmt.Errorf("listing foreign keys: %w", err)
	}
	var out []ForeignKey
	var fk ForeignKey
	_, err = pgx.ForEachRow(rows, []any{&fk.Table, &fk.References, &fk.Name, &fk.OnDelete, &fk.OnUpdate}, func() error {
		fk.OnDelete, fk.OnUpdate = fkAction(fk.OnDelete), fkAction(fk.OnUpdate)
		out = append(out, fk)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing foreign keys: %w", err)
	}
	return out, nil
}

// fkAction spells out a pg_constraint action code.
func fkAction(code string) string {
	switch code {
	case "c":
		return "CASCADE"
	case "n":
		return "SET NULL"
	case "d":
		return "SET DEFAULT"
	case "r":
		return "RESTRICT"
	}
	return "NO ACTION"
}

// writesChild reports whether a referential action writes the child table.
func writesChild(action string) bool {
	return action == "CASCADE" || action == "SET NULL" || action == "SET DEFAULT"
}

// quoteIdent quotes s as an SQL identifier.
func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
