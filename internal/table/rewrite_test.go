package table

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/tandemdb/tandem/internal/config"
)

func meta(schema, table string, key []int, cols ...string) *Meta {
	m := &Meta{Name: Name{schema, table}, Key: key}
	for _, c := range cols {
		m.Columns = append(m.Columns, Column{Name: c, Type: "text", ParamType: "text"})
	}
	return m
}

// mappingsOf indexes hand-built mappings as LoadMappings would.
func mappingsOf(t *testing.T, list ...*Mapping) *Mappings {
	t.Helper()
	ms := &Mappings{byOld: map[Name]*Mapping{}, byNew: map[Name]*Mapping{}, inScope: map[Name]bool{}}
	for _, m := range list {
		ms.byOld[m.Old.Name] = m
		ms.byNew[m.New.Name] = m
		ms.inScope[m.Old.Name] = true
	}
	ms.exclude = []pattern{{"other", "*"}}
	return ms
}

func mustMapping(t *testing.T, decl config.TableMap, old, new *Meta) *Mapping {
	t.Helper()
	m, err := NewMapping(decl, old, new)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func rewriteMappings(t *testing.T) *Mappings {
	users := mustMapping(t, usersDecl,
		meta("public", "users", []int{0}, "id", "first_name", "last_name", "email", "legacy_flag"),
		meta("public", "accounts", []int{0}, "id", "full_name", "email", "created_at"))
	// Renames only, same column order: * is the same.
	orders := mustMapping(t, config.TableMap{To: `"Shop"."Or""ders"`, Rename: map[string]string{"cust": "Customer Id", "note": `me"mo`}},
		meta("public", "orders", []int{0}, "id", "cust", "total", "note"),
		meta("Shop", `Or"ders`, []int{0}, "id", "Customer Id", "total", `me"mo`))
	plain := mustMapping(t, config.TableMap{}, meta("public", "plain", []int{0}, "id", "v"), meta("public", "plain", []int{0}, "id", "v"))
	hostile := mustMapping(t, hostileDecl, hostileOld, hostileNew)
	return mappingsOf(t, users, orders, plain, hostile)
}

func TestRewriteRead(t *testing.T) {
	ms := rewriteMappings(t)
	cases := []struct {
		name, sql, want, reason string
	}{
		{"identity", "select  v from plain where id = $1", "select  v from plain where id = $1", ""},
		{"no table", "SELECT 1", "SELECT 1", ""},
		{"rename table and columns", "SELECT id, email FROM users WHERE id = $1",
			"SELECT id, email FROM accounts WHERE id = $1", ""},
		{"renamed column keeps its output name", "SELECT cust, o.note AS n FROM orders o WHERE o.cust > 3 ORDER BY cust",
			`SELECT "Customer Id" AS cust, o."me""mo" AS n FROM "Shop"."Or""ders" o WHERE o."Customer Id" > 3 ORDER BY "Customer Id"`, ""},
		{"qualified by table name", "SELECT orders.cust FROM orders",
			`SELECT "Or""ders"."Customer Id" AS cust FROM "Shop"."Or""ders"`, ""},
		{"qualified by schema and table", "SELECT public.orders.cust FROM public.orders",
			`SELECT "Shop"."Or""ders"."Customer Id" AS cust FROM "Shop"."Or""ders"`, ""},
		{"join and subquery", "SELECT u.email, o.total FROM users u JOIN orders o ON o.cust = u.id::text WHERE o.id IN (SELECT id FROM orders WHERE note IS NULL)",
			`SELECT u.email, o.total FROM accounts u JOIN "Shop"."Or""ders" o ON o."Customer Id" = u.id::text WHERE o.id IN (SELECT id FROM "Shop"."Or""ders" WHERE "me""mo" IS NULL)`, ""},
		{"order by output name", "SELECT total AS cust FROM orders ORDER BY cust",
			`SELECT total AS cust FROM "Shop"."Or""ders" ORDER BY cust`, ""},
		{"union order by", "SELECT cust FROM orders UNION SELECT note FROM orders ORDER BY cust",
			`SELECT "Customer Id" AS cust FROM "Shop"."Or""ders" UNION SELECT "me""mo" AS note FROM "Shop"."Or""ders" ORDER BY cust`, ""},
		{"star when only renamed", "SELECT * FROM orders", `SELECT * FROM "Shop"."Or""ders"`, ""},
		{"qualified star", "SELECT o.* FROM orders o", `SELECT o.* FROM "Shop"."Or""ders" o`, ""},
		{"count star", "SELECT count(*) FROM users", "SELECT count(*) FROM accounts", ""},
		{"using", "SELECT id FROM orders JOIN plain USING (id)", `SELECT id FROM "Shop"."Or""ders" JOIN plain USING (id)`, ""},
		{"hostile", `SELECT "Id", mail FROM "Sch ""1"""."Us""ers" x WHERE x.mail LIKE '%"%'`,
			`SELECT "Id", "e""mail" AS mail FROM "New S"."Acc ounts" x WHERE x."e""mail" LIKE '%"%'`, ""},

		{"computed", "SELECT first_name FROM users", "", "touches computed column full_name"},
		{"computed in where", "SELECT id FROM users u WHERE u.last_name = 'x'", "", "touches computed column full_name"},
		{"dropped", "SELECT id FROM users WHERE legacy_flag", "", "touches dropped column legacy_flag"},
		{"hostile computed", `SELECT "first name" FROM "Sch ""1"""."Us""ers"`, "", "touches computed column Full Name"},
		{"star with computes", "SELECT * FROM users", "", "* expands to other columns on public.accounts"},
		{"star with computes in join", "SELECT o.*, u.* FROM orders o, users u", "", "* expands to other columns on public.accounts"},
		{"new-only column", "SELECT full_name FROM users", "", `column "full_name" is not a column of public.users but is one of public.accounts`},
		{"whole row", "SELECT u FROM users u", "", "reads the whole row of public.users"},
		{"natural", "SELECT id FROM orders NATURAL JOIN plain", "", "has a NATURAL join"},
		{"out of scope", "SELECT * FROM other.t", "", "table other.t is not in the migration's scope"},
		{"unknown", "SELECT * FROM nope", "", "table public.nope has no usable mapping"},
		{"for update", "SELECT id FROM users FOR UPDATE", "", "locks rows (FOR UPDATE/SHARE)"},
		{"into", "SELECT id INTO x FROM users", "", "SELECT INTO writes"},
		{"with", "WITH x AS (SELECT id FROM users) SELECT * FROM x", "", "has a WITH clause"},
		{"not a select", "DELETE FROM users", "", "not a single SELECT"},
		{"two statements", "SELECT 1; SELECT 2", "", "not a single SELECT"},
		{"ambiguous alias", "SELECT x.id FROM users x, (SELECT 1 AS id) x", "", `qualifier "x" names more than one FROM item`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, ok, reason := ms.RewriteRead(c.sql)
			if c.reason != "" {
				if ok || reason != c.reason {
					t.Errorf("RewriteRead(%s) = %q, %v, %q; want not ok: %q", c.sql, got, ok, reason, c.reason)
				}
				return
			}
			if !ok || got != c.want {
				t.Errorf("RewriteRead(%s) = %q, %v, %q\nwant %q", c.sql, got, ok, reason, c.want)
			}
		})
	}
	if _, ok, reason := ms.RewriteRead("SELECT " + strings.Repeat("(", 20000) + "1"); ok || reason == "" {
		t.Errorf("deep nesting: %v %q", ok, reason)
	}
}

// TestRewriteReadOnStores: a rewritten query runs on new and returns the
// rows the original returns on old, for a pair copied through the mapping.
func TestRewriteReadOnStores(t *testing.T) {
	s, old, nw := usersPair(t)
	ctx := context.Background()
	s.old(`CREATE TABLE orders (id int PRIMARY KEY, cust int, total numeric, note text);
		INSERT INTO users SELECT i, 'F' || i, 'L' || i, 'u' || i || '@example.com', i % 2 = 0 FROM generate_series(1, 20) i;
		INSERT INTO orders SELECT i, i % 20 + 1, i * 1.5, CASE WHEN i % 3 = 0 THEN 'n' || i END FROM generate_series(1, 60) i`)
	s.new(`CREATE SCHEMA "Shop"; CREATE TABLE "Shop"."Or""ders" (id bigint PRIMARY KEY, "Customer Id" int, total numeric, "me""mo" text)`)
	ms, probs, err := LoadMappings(ctx, config.Tables{Map: map[string]config.TableMap{
		"users":  usersDecl,
		"orders": {To: `"Shop"."Or""ders"`, Rename: map[string]string{"cust": "Customer Id", "note": `me"mo`}},
	}}, old, nw)
	if err != nil || len(probs) > 0 {
		t.Fatalf("%v %v", probs, err)
	}
	for _, m := range ms.All() {
		if _, err := CopyTableMapped(ctx, old, nw, m, true, 100); err != nil {
			t.Fatal(err)
		}
	}
	sameReads(t, ms, old, nw,
		"SELECT id, email FROM users WHERE id > 5 ORDER BY id",
		"SELECT o.cust, sum(o.total) AS s FROM orders o JOIN users u ON u.id = o.cust WHERE u.email LIKE '%1%' GROUP BY o.cust ORDER BY 1",
		"SELECT * FROM orders WHERE note IS NOT NULL ORDER BY id",
		"SELECT cust FROM orders WHERE total > 50 UNION SELECT id FROM users WHERE id < 3 ORDER BY cust",
		"SELECT count(*), max(orders.note) FROM orders WHERE cust IN (SELECT id FROM users WHERE email <> '')",
	)
}

// sameReads wants each of sqls, rewritten by ms, to run on nw and return
// the rows (at least one) the original returns on old.
func sameReads(t *testing.T, ms *Mappings, old, nw *pgx.Conn, sqls ...string) {
	t.Helper()
	ctx := context.Background()
	rowsOf := func(q *pgx.Conn, sql string) []string {
		t.Helper()
		rows, err := q.Query(ctx, "SELECT x::text FROM ("+sql+") x")
		if err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		return got
	}
	for _, sql := range sqls {
		rw, ok, reason := ms.RewriteRead(sql)
		if !ok {
			t.Errorf("%s: not rewritten: %s", sql, reason)
			continue
		}
		want, got := rowsOf(old, sql), rowsOf(nw, rw)
		if len(want) == 0 || !slices.Equal(got, want) {
			t.Errorf("%s\n  on old: %q\n%s\n  on new: %q", sql, want, rw, got)
		}
	}
}

// TestRewriteReadFiltered: a read of a consolidated table is restricted to
// the deployment's rows on new; one of a table mapped through a where
// predicate is not shadowed.
func TestRewriteReadFiltered(t *testing.T) {
	orders := mustMapping(t, config.TableMap{Discriminator: map[string]string{"tenant": "shop"}},
		meta("public", "orders", []int{0}, "id", "total"),
		meta("public", "orders", []int{0, 1}, "tenant", "id", "total"))
	eu := mustMapping(t, config.TableMap{To: "eu_orders", Where: "region = 'eu'"},
		meta("public", "sales", []int{0}, "id", "region"),
		meta("public", "eu_orders", []int{0}, "id", "region"))
	ms := mappingsOf(t, orders, eu)
	for _, c := range []struct{ sql, want, reason string }{
		{`SELECT id, total FROM orders WHERE id = $1`,
			`SELECT id, total FROM (SELECT * FROM public.orders WHERE tenant = 'shop'::text) orders WHERE id = $1`, ""},
		{`SELECT o.total FROM orders o JOIN orders p ON p.id = o.id + 1 ORDER BY 1`,
			`SELECT o.total FROM (SELECT * FROM public.orders WHERE tenant = 'shop'::text) o JOIN (SELECT * FROM public.orders WHERE tenant = 'shop'::text) p ON p.id = (o.id + 1) ORDER BY 1`, ""},
		{`SELECT count(*) FROM sales`, "", "table public.sales maps only the rows of its where predicate to public.eu_orders"},
	} {
		got, ok, reason := ms.RewriteRead(c.sql)
		if got != c.want || ok != (c.reason == "") || reason != c.reason {
			t.Errorf("RewriteRead(%s)\n = %q, %v, %q\nwant %q, %q", c.sql, got, ok, reason, c.want, c.reason)
		}
	}
}

// TestFilteredSQL: the statements of a mapping with a discriminator and a
// predicate carry them: forward upserts only matching rows and deletes the
// others by key, the key names rows without the discriminator, and the
// reverse applies only the deployment's rows.
func TestFilteredSQL(t *testing.T) {
	m := mustMapping(t, config.TableMap{Where: "total <> ''", Discriminator: map[string]string{"tenant": "shop"}},
		meta("public", "orders", []int{0}, "id", "total"),
		meta("public", "orders", []int{0, 1}, "tenant", "id", "total"))
	for _, c := range []struct {
		name string
		fn   func([]string, int) (string, error)
		cols []string
		want string
	}{
		{"forward upsert", m.ForwardUpsertSQL, []string{"id", "total"},
			`INSERT INTO "public"."orders" ("tenant","id","total") SELECT ('shop'::text), src."id", src."total" FROM (VALUES ($1::text,$2::text)) AS src("id","total") WHERE (total <> '') ON CONFLICT ("tenant","id") DO UPDATE SET "total" = EXCLUDED."total"`},
		{"forward delete of rows moved out", m.ForwardDeleteUnmatchedSQL, []string{"id", "total"},
			`DELETE FROM "public"."orders" WHERE ("tenant","id") IN (SELECT ('shop'::text)::text, src."id"::text FROM (VALUES ($1::text,$2::text)) AS src("id","total") WHERE NOT coalesce((total <> ''), false))`},
		{"forward delete", m.ForwardDeleteSQL, []string{"id", "total"},
			`DELETE FROM "public"."orders" WHERE ("tenant","id") IN (SELECT ('shop'::text)::text, src."id"::text FROM (VALUES ($1::text,$2::text)) AS src("id","total"))`},
		{"reverse upsert", m.ReverseUpsertSQL, []string{"tenant", "id", "total"},
			`INSERT INTO "public"."orders" ("id","total") SELECT src."id", src."total" FROM (VALUES ($1::text,$2::text,$3::text)) AS src("tenant","id","total") WHERE "tenant" = 'shop'::text ON CONFLICT ("id") DO UPDATE SET "total" = EXCLUDED."total"`},
		{"reverse delete", m.ReverseDeleteSQL, []string{"tenant", "id"},
			`DELETE FROM "public"."orders" WHERE "id" IN (SELECT src."id"::text FROM (VALUES ($1::text,$2::text)) AS src("tenant","id") WHERE "tenant" = 'shop'::text)`},
	} {
		got, err := c.fn(c.cols, 1)
		if err != nil || got != c.want {
			t.Errorf("%s:\n got %s (%v)\nwant %s", c.name, got, err, c.want)
		}
	}
	if _, err := m.ForwardUpsertSQL([]string{"id"}, 1); err == nil {
		t.Error("forward upsert of images without the predicate's column: no error")
	}
	if _, err := m.ReverseUpsertSQL([]string{"id", "total"}, 1); err == nil {
		t.Error("reverse upsert of images without the discriminator: no error")
	}
	if cols, ok := m.KeyPreserving(); !ok || len(cols) != 1 || cols[0].Name != "id" {
		t.Errorf("KeyPreserving = %v, %v", cols, ok)
	}
	for _, c := range []struct {
		key  []string
		want []string
		ok   bool
	}{{[]string{"shop", "7"}, []string{"7"}, true}, {[]string{"billing", "7"}, nil, false}, {[]string{"7"}, []string{"7"}, true}} {
		if got, ok := m.ownKey(c.key); ok != c.ok || !slices.Equal(got, c.want) {
			t.Errorf("ownKey(%v) = %v %v, want %v %v", c.key, got, ok, c.want, c.ok)
		}
	}
	if !m.OwnsNewRow([]string{"tenant", "id"}, [][]byte{[]byte("shop"), []byte("1")}) ||
		m.OwnsNewRow([]string{"tenant", "id"}, [][]byte{[]byte("billing"), []byte("1")}) ||
		m.OwnsNewRow([]string{"id"}, [][]byte{[]byte("1")}) || m.OwnsNewRow([]string{"tenant"}, [][]byte{nil}) {
		t.Error("OwnsNewRow")
	}
	if got := m.CheckpointName(); got != (Name{"public", "orders[tenant=shop]"}) {
		t.Errorf("CheckpointName = %v", got)
	}
	if _, err := NewMapping(config.TableMap{Discriminator: map[string]string{"tenant": "shop"}},
		meta("public", "orders", []int{0}, "id", "total"), meta("public", "orders", []int{1}, "tenant", "id", "total")); err == nil ||
		!strings.Contains(err.Error(), "not in the primary key") {
		t.Errorf("discriminator outside the key: %v", err)
	}
}
