package table

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
)

// usersMappings loads the users -> accounts mapping of mapping_pg_test.go.
func usersMappings(t *testing.T, old, nw *pgx.Conn, decl config.TableMap) *Mappings {
	t.Helper()
	ms, probs, err := LoadMappings(context.Background(), config.Tables{Map: map[string]config.TableMap{"users": decl}}, old, nw)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range probs {
		if p.Table.Table == "users" && !p.FlipOnly {
			t.Fatalf("problem: %v", p)
		}
	}
	return ms
}

// usersText and accountsText render each side's rows as the new table
// holds them, so a mapped pair renders equal.
const (
	usersText    = `SELECT coalesce(string_agg(id || '|' || first_name || ' ' || last_name || '|' || email, ', ' ORDER BY id), '') FROM users`
	accountsText = `SELECT coalesce(string_agg(id || '|' || full_name || '|' || email, ', ' ORDER BY id), '') FROM accounts`
)

func queryText(t *testing.T, q *pgx.Conn, sql string) string {
	t.Helper()
	var s string
	if err := q.QueryRow(context.Background(), sql).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

// TestCopyMapped copies users on old into accounts on new through the
// mapping, by key and whole, and back through the reverse expressions.
func TestCopyMapped(t *testing.T) {
	for _, path := range copyPaths {
		t.Run(path.name, func(t *testing.T) { testCopyMapped(t, path.fastRows) })
	}
}

func testCopyMapped(t *testing.T, fast int) {
	s, old, nw := usersPair(t)
	ctx := context.Background()
	s.old(`INSERT INTO users VALUES (1, 'Ada', 'Lovelace', 'ada@example.com', true), (2, 'Alan', 'Mathison Turing', 'alan@example.com', false),
		(3, 'Grace', 'Hopper', 'grace@example.com', NULL), (4, 'Edsger', 'Dijkstra', 'ed@example.com', true), (5, 'Barbara', 'Liskov', 'bl@example.com', false)`)
	s.new(`INSERT INTO accounts VALUES (1, 'Ada Lovelace', 'ada@example.com', '2001-01-01 00:00:00+00'), (2, 'stale', 'stale@example.com', '2002-02-02 00:00:00+00'),
		(9, 'Extra Row', 'x@example.com', now())`)
	m := usersMappings(t, old, nw, usersDecl).ForOld(Name{"public", "users"})

	res, err := CopyKeysMapped(ctx, old, nw, m, true, [][]string{{"2"}, {"3"}, {"9"}, {"42"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Upserted != 2 || res.Deleted != 1 {
		t.Errorf("result %+v, want 2 upserted, 1 deleted", res)
	}
	if got, want := queryText(t, nw, accountsText), "1|Ada Lovelace|ada@example.com, 2|Alan Mathison Turing|alan@example.com, 3|Grace Hopper|grace@example.com"; got != want {
		t.Errorf("accounts = %s\nwant %s", got, want)
	}
	// created_at is not derived from old: kept on update, defaulted on insert.
	if got := queryText(t, nw, `SELECT string_agg(id || ':' || (created_at < '2003-01-01'), ' ' ORDER BY id) FROM accounts`); got != "1:true 2:true 3:false" {
		t.Errorf("created_at: %s", got)
	}

	// The whole table, in chunks of 2.
	s.new(`INSERT INTO accounts VALUES (0, 'Before', 'b@example.com'), (100, 'After', 'a@example.com'); UPDATE accounts SET email = 'changed' WHERE id = 1`)
	if res, err = copyTableMappedOn(ctx, fast, old, nw, m, true, 2); err != nil {
		t.Fatal(err)
	}
	if res.Upserted != 5 || res.Deleted != 2 {
		t.Errorf("result %+v, want 5 upserted, 2 deleted", res)
	}
	if got, want := queryText(t, nw, accountsText), queryText(t, old, usersText); got != want {
		t.Errorf("accounts = %s\nusers    = %s", got, want)
	}

	// Back: new is the source, old the target, through the reverse expressions.
	s.new(`UPDATE accounts SET full_name = 'Ada King Lovelace' WHERE id = 1; DELETE FROM accounts WHERE id = 2;
		INSERT INTO accounts VALUES (7, 'Frances Allen', 'fa@example.com')`)
	if res, err = CopyKeysMapped(ctx, nw, old, m, false, [][]string{{"1"}, {"2"}, {"7"}}); err != nil {
		t.Fatal(err)
	}
	if res.Upserted != 2 || res.Deleted != 1 {
		t.Errorf("result %+v, want 2 upserted, 1 deleted", res)
	}
	if got := queryText(t, old, `SELECT string_agg(concat_ws('|', id, first_name, last_name, email, legacy_flag), ', ' ORDER BY id) FROM users`); got !=
		"1|Ada|King Lovelace|ada@example.com|t, 3|Grace|Hopper|grace@example.com, 4|Edsger|Dijkstra|ed@example.com|t, 5|Barbara|Liskov|bl@example.com|f, 7|Frances|Allen|fa@example.com" {
		t.Errorf("users after the reverse copy: %s", got)
	}
	if res, err = copyTableMappedOn(ctx, fast, nw, old, m, false, 3); err != nil {
		t.Fatal(err)
	}
	if got, want := queryText(t, old, usersText), queryText(t, nw, accountsText); got != want {
		t.Errorf("users    = %s\naccounts = %s", got, want)
	}

	// Without reverse expressions, nothing is copied back.
	noReverse := usersDecl
	noReverse.Reverse = nil
	m2 := usersMappings(t, old, nw, noReverse).ForOld(Name{"public", "users"})
	if _, err := CopyKeysMapped(ctx, nw, old, m2, false, [][]string{{"1"}}); err == nil || !strings.Contains(err.Error(), "first_name") {
		t.Errorf("reverse copy without reverse expressions: %v", err)
	}
}

// TestRepairMapped repairs drift recorded against users (stale on new)
// into accounts, and drift recorded against accounts (stale on old, after
// a write flip) back into users; an in-scope table without a usable
// mapping fails alone, and an identity table still repairs.
func TestRepairMapped(t *testing.T) {
	s, old, nw := usersPair(t)
	ctx := context.Background()
	s.both(`CREATE TABLE plain (id int PRIMARY KEY, v text); CREATE TABLE broken (id int PRIMARY KEY, v text)`)
	s.new(`ALTER TABLE broken RENAME COLUMN v TO w`)
	s.old(`INSERT INTO users VALUES (1, 'Ada', 'Lovelace', 'ada@example.com', true), (2, 'Alan', 'Turing', 'alan@example.com', false),
		(3, 'Grace', 'Hopper', 'grace@example.com', NULL); INSERT INTO plain VALUES (1, 'good')`)
	s.new(`INSERT INTO accounts VALUES (1, 'Ada Lovelace', 'ada@example.com'), (2, 'Alan Turing', 'old@example.com'), (4, 'Deleted On Old', 'd@example.com');
		INSERT INTO plain VALUES (1, 'stale')`)
	ms := usersMappings(t, old, nw, usersDecl)
	control := s.primary()
	if err := EnsureSchema(ctx, control); err != nil {
		t.Fatal(err)
	}
	users, accounts := Name{"public", "users"}, Name{"public", "accounts"}
	if err := RecordDrift(ctx, control, []DriftEntry{
		{Table: users, Key: []string{"2"}, Stale: StaleNew},
		{Table: users, Key: []string{"3"}, Stale: StaleNew},
		{Table: users, Key: []string{"4"}, Stale: StaleNew}, // deleted on old
		{Table: Name{"public", "plain"}, Key: []string{"1"}, Stale: StaleNew},
		{Table: Name{"public", "broken"}, Key: []string{"1"}, Stale: StaleNew},
	}); err != nil {
		t.Fatal(err)
	}
	n, err := RepairWith(ctx, control, old, nw, RepairOptions{Target: StaleNew, Limit: 100, Mappings: ms})
	if n != 4 || err == nil || !strings.Contains(err.Error(), "public.broken is in the migration's scope but has no usable mapping") {
		t.Errorf("RepairWith = %d, %v; want 4 and the broken table's error", n, err)
	}
	if got, want := queryText(t, nw, accountsText), queryText(t, old, usersText); got != want {
		t.Errorf("accounts = %s\nusers    = %s", got, want)
	}
	sameTable(t, old, nw, Name{"public", "plain"}, "id")

	// After a write flip new is primary: writes old missed are recorded
	// against accounts, and repaired into users through the reverse
	// expressions, under RepairPrimary's lock order or the usual one.
	s.new(`UPDATE accounts SET full_name = 'Grace Brewster Hopper', email = 'gbh@example.com' WHERE id = 3; DELETE FROM accounts WHERE id = 1;
		INSERT INTO accounts VALUES (8, 'Frances Allen', 'fa@example.com')`)
	if err := RecordDrift(ctx, control, []DriftEntry{
		{Table: accounts, Key: []string{"3"}, Stale: StaleOld},
		{Table: accounts, Key: []string{"1"}, Stale: StaleOld},
		{Table: accounts, Key: []string{"8"}, Stale: StaleOld},
	}); err != nil {
		t.Fatal(err)
	}
	n, err = RepairWith(ctx, control, nw, old, RepairOptions{Target: StaleOld, Limit: 100, Mappings: ms, TargetIsPrimary: true})
	if n != 3 || err != nil {
		t.Fatalf("repairing old: %d, %v", n, err)
	}
	if got := queryText(t, old, `SELECT string_agg(concat_ws('|', id, first_name, last_name, email, legacy_flag), ', ' ORDER BY id) FROM users`); got !=
		"2|Alan|Turing|alan@example.com|f, 3|Grace|Brewster Hopper|gbh@example.com, 8|Frances|Allen|fa@example.com" {
		t.Errorf("users after the repair: %s", got)
	}
	// A whole-table entry against accounts.
	s.old(`UPDATE users SET email = 'drifted' WHERE id = 2`)
	if err := RecordDrift(ctx, control, []DriftEntry{{Table: accounts, Stale: StaleOld}}); err != nil {
		t.Fatal(err)
	}
	if n, err = RepairWith(ctx, control, nw, old, RepairOptions{Target: StaleOld, Limit: 100, Mappings: ms}); n != 1 || err != nil {
		t.Fatalf("repairing old whole: %d, %v", n, err)
	}
	if got, want := queryText(t, old, usersText), queryText(t, nw, accountsText); got != want {
		t.Errorf("users    = %s\naccounts = %s", got, want)
	}
}

// TestCopyMappedHostile copies between tables with hostile names through a
// mapping that renames, drops and computes, into a GENERATED ALWAYS
// identity key.
func TestCopyMappedHostile(t *testing.T) {
	for _, path := range copyPaths {
		t.Run(path.name, func(t *testing.T) { testCopyMappedHostile(t, path.fastRows) })
	}
}

func testCopyMappedHostile(t *testing.T, fast int) {
	s := newStores(t)
	ctx := context.Background()
	s.old(`CREATE SCHEMA "Sch ""1"""; CREATE TABLE "Sch ""1"""."Us""ers" ("Id" int PRIMARY KEY, "first name" text, "last""name" text, mail varchar(50), legacy bool);
		INSERT INTO "Sch ""1"""."Us""ers" SELECT i, 'F' || i, 'L "' || i, 'm' || i, i % 2 = 0 FROM generate_series(1, 25) i`)
	s.new(`CREATE SCHEMA "New S"; CREATE TABLE "New S"."Acc ounts" ("Id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "Full Name" text, "e""mail" text, created timestamptz);
		INSERT INTO "New S"."Acc ounts" OVERRIDING SYSTEM VALUE VALUES (3, 'x', 'y', NULL), (99, 'gone', 'gone', NULL)`)
	old, nw := s.primary(), s.secondary()
	ms, probs, err := LoadMappings(ctx, config.Tables{Map: map[string]config.TableMap{`"Sch ""1"""."Us""ers"`: hostileDecl}}, old, nw)
	if err != nil || len(probs) > 0 {
		t.Fatalf("%v %v", probs, err)
	}
	m := ms.ForOld(hostileOld.Name)
	res, err := copyTableMappedOn(ctx, fast, old, nw, m, true, 4)
	if err != nil || res.Upserted != 25 || res.Deleted != 1 {
		t.Fatalf("%+v, %v", res, err)
	}
	got := queryText(t, nw, `SELECT string_agg("Id" || '|' || "Full Name" || '|' || "e""mail", ',' ORDER BY "Id") FROM "New S"."Acc ounts"`)
	want := queryText(t, old, `SELECT string_agg("Id" || '|' || "first name" || ' ' || "last""name" || '|' || mail, ',' ORDER BY "Id") FROM "Sch ""1"""."Us""ers"`)
	if got != want {
		t.Errorf("new: %s\nold: %s", got, want)
	}
	s.old(`DELETE FROM "Sch ""1"""."Us""ers"`)
	if res, err := copyTableMappedOn(ctx, fast, nw, old, m, false, 10); err != nil || res.Upserted != 25 {
		t.Fatalf("%+v, %v", res, err)
	}
	if back := queryText(t, old, `SELECT string_agg("Id" || '|' || "first name" || ' ' || "last""name" || '|' || mail, ',' ORDER BY "Id") FROM "Sch ""1"""."Us""ers"`); back != want {
		t.Errorf("back on old: %s\nwant %s", back, want)
	}
}

// TestMappedPlanKey: a mapping whose new key is computed cannot be copied
// by key.
func TestMappedPlanKey(t *testing.T) {
	decl := hostileDecl
	decl.Compute = map[string]string{"Full Name": `"first name" || ' ' || "last""name"`, "Id": `"Id" + 1`}
	m, err := NewMapping(decl, hostileOld, hostileNew)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newMappedCopier(m, true); err == nil || !strings.Contains(err.Error(), "primary keys differ") {
		t.Errorf("computed key: %v", err)
	}
	m, err = NewMapping(hostileDecl, hostileOld, hostileNew)
	if err != nil {
		t.Fatal(err)
	}
	for _, fwd := range []bool{true, false} {
		p, err := newMappedCopier(m, fwd)
		if err != nil {
			t.Fatal(err)
		}
		if len(p.srcKey) != 1 || p.srcKey[0].Name != "Id" || p.dstKey[0].Name != "Id" || !strings.Contains(p.upsert, "json_to_recordset($1::json) AS src(") {
			t.Errorf("forward %v: plan %+v", fwd, p)
		}
	}
}
