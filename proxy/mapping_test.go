package proxy

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
)

// TestMirrorThroughMapping: old users(id, first_name, last_name, email
// varchar(50), legacy_flag) maps to new accounts(id, full_name, email text,
// created_at). Writes through the proxy in dual-write mode produce the
// transformed rows on new; after a write flip, writes to accounts flow back
// into users through the reverse expressions.
func TestMirrorThroughMapping(t *testing.T) {
	e := newPairEnv(t, "")
	ctx := context.Background()
	if err := e.old.Exec(ctx, e.db, `CREATE TABLE users (id int PRIMARY KEY, first_name text, last_name text, email varchar(50), legacy_flag bool)`); err != nil {
		t.Fatal(err)
	}
	if err := e.new.Exec(ctx, e.db, `CREATE TABLE accounts (id int PRIMARY KEY, full_name text, email text, created_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		t.Fatal(err)
	}
	cfg := config.Tables{Map: map[string]config.TableMap{
		"public.users": {
			To:      "public.accounts",
			Drop:    []string{"legacy_flag"},
			Compute: map[string]string{"full_name": "first_name || ' ' || last_name"},
			Reverse: map[string]string{
				"first_name": "split_part(full_name, ' ', 1)",
				"last_name":  "substr(full_name, length(split_part(full_name, ' ', 1)) + 2)",
			},
		},
	}}
	ms, oc, nc := e.loadMappings(t, cfg)
	e.proxy.srv.SetMappings(ms)
	e.set(route.Settings{Primary: route.Old, Mirror: true})

	c := e.client()
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`INSERT INTO users VALUES ($1, $2, $3, $4, $5)`, []any{1, "Ada", "Lovelace", "ada@x", true}},
		{`INSERT INTO users VALUES ($1, $2, $3, $4, $5)`, []any{2, "Alan", "Turing", "alan@x", false}},
		{`UPDATE users SET email = 'ada@y', first_name = 'Augusta Ada' WHERE id = 1`, nil},
		{`DELETE FROM users WHERE id = 2`, nil},
	} {
		if _, err := c.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatalf("%s: %v", q.sql, err)
		}
	}
	// Reads of a reshaped table are never shifted to new, where it has
	// another name: with reads=100 they are still served by old.
	e.set(route.Settings{Primary: route.Old, Mirror: true, Reads: 100})
	var first string
	if err := c.QueryRow(ctx, `SELECT first_name FROM users WHERE id = 1`).Scan(&first); err != nil || first != "Augusta Ada" {
		t.Fatalf("read of users with reads=100: %q %v", first, err)
	}
	var full, email string
	var n int
	if err := nc.QueryRow(ctx, `SELECT count(*), min(full_name), min(email) FROM accounts`).Scan(&n, &full, &email); err != nil ||
		n != 1 || full != "Augusta Ada Lovelace" || email != "ada@y" {
		t.Fatalf("accounts on new: %d rows, %q %q (%v)", n, full, email, err)
	}

	// The write flip: the application now writes the new schema on new,
	// and old follows through the reverse expressions.
	e.set(route.Settings{Primary: route.New, Mirror: true, Reads: 100})
	if _, err := c.Exec(ctx, `INSERT INTO accounts (id, full_name, email) VALUES ($1, $2, $3)`, 3, "Grace Hopper", "grace@x"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, `UPDATE accounts SET full_name = 'Ada King Lovelace' WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	rows, err := oc.Query(ctx, `SELECT id, first_name, last_name, email FROM users ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[struct {
		ID                 int
		First, Last, Email string
	}])
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		ID                 int
		First, Last, Email string
	}{{1, "Ada", "King Lovelace", "ada@y"}, {3, "Grace", "Hopper", "grace@x"}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("users on old after the flip:\n got %+v\nwant %+v", got, want)
	}
	if d := e.openDrift(); d != 0 {
		t.Fatalf("open drift: %d", d)
	}
}

// TestMirrorThroughPredicate: old orders maps to new eu_orders through a
// where predicate. Through the proxy, a row inserted outside it is not
// carried, an UPDATE that moves a row into it inserts it on new, one that
// moves it out deletes it there, and a DELETE of either kind leaves new
// right. After the flip, writes to eu_orders reach old.
func TestMirrorThroughPredicate(t *testing.T) {
	e := newPairEnv(t, "")
	ctx := context.Background()
	if err := e.old.Exec(ctx, e.db, `CREATE TABLE orders (id int PRIMARY KEY, region text NOT NULL, total numeric)`); err != nil {
		t.Fatal(err)
	}
	if err := e.new.Exec(ctx, e.db, `CREATE TABLE eu_orders (id int PRIMARY KEY, region text NOT NULL, total numeric)`); err != nil {
		t.Fatal(err)
	}
	cfg := config.Tables{Map: map[string]config.TableMap{"orders": {To: "eu_orders", Where: "region = 'eu'"}}}
	ms, oc, nc := e.loadMappings(t, cfg)
	e.proxy.srv.SetMappings(ms)
	e.set(route.Settings{Primary: route.Old, Mirror: true})

	c := e.client()
	const oldEU = `SELECT coalesce(string_agg(id || ':' || total, ',' ORDER BY id), '') FROM orders WHERE region = 'eu'`
	const newAll = `SELECT coalesce(string_agg(id || ':' || total, ',' ORDER BY id), '') FROM eu_orders`
	for _, step := range []struct{ sql, want string }{
		{`INSERT INTO orders VALUES (1, 'eu', 10), (2, 'us', 20), (3, 'eu', 30), (4, 'us', 40)`, "1:10,3:30"},
		{`UPDATE orders SET region = 'eu', total = total + 1 WHERE id = 2`, "1:10,2:21,3:30"}, // in
		{`UPDATE orders SET region = 'us' WHERE id IN (1, 3)`, "2:21"},                        // out
		{`UPDATE orders SET total = total * 2`, "2:42"},                                       // both kinds at once
		{"tx", "2:42,4:1"}, // in, then changed, in one transaction
		{`DELETE FROM orders WHERE id IN (1, 4)`, "2:42"},
		{`INSERT INTO orders VALUES (5, 'eu', 5) ON CONFLICT (id) DO UPDATE SET region = excluded.region`, "2:42,5:5"},
		{`INSERT INTO orders VALUES (5, 'us', 5) ON CONFLICT (id) DO UPDATE SET region = excluded.region`, "2:42"},
	} {
		var err error
		if step.sql == "tx" {
			err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, `UPDATE orders SET region = 'eu' WHERE id = 4`); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, `UPDATE orders SET total = 1 WHERE id = 4`)
				return err
			})
		} else {
			_, err = c.Exec(ctx, step.sql)
		}
		if err != nil {
			t.Fatalf("%s: %v", step.sql, err)
		}
		if got := queryText(t, nc, newAll); got != step.want || got != queryText(t, oc, oldEU) {
			t.Fatalf("after %s: eu_orders on new = %q, want %q (old's eu rows: %q)", step.sql, got, step.want, queryText(t, oc, oldEU))
		}
	}
	if got := queryText(t, oc, `SELECT string_agg(id::text, ',' ORDER BY id) FROM orders`); got != "2,3,5" {
		t.Fatalf("old orders = %s", got)
	}

	// After the flip, writes to eu_orders go back to old, and old's rows
	// outside the predicate stay.
	e.set(route.Settings{Primary: route.New, Mirror: true, Reads: 100})
	for _, sql := range []string{`INSERT INTO eu_orders VALUES (6, 'eu', 6)`, `UPDATE eu_orders SET total = 43 WHERE id = 2`} {
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	if got := queryText(t, oc, `SELECT string_agg(id || ':' || region || ':' || total, ',' ORDER BY id) FROM orders`); got != "2:eu:43,3:us:60,5:us:5,6:eu:6" {
		t.Fatalf("old orders after the flip = %s", got)
	}
	if d := e.openDrift(); d != 0 {
		t.Fatalf("open drift: %d", d)
	}
}

// TestMirrorConsolidated: old orders maps to the new orders of tenant
// 'shop' (a discriminator in the new key). Writes through the proxy reach
// the shop's rows on new and never the billing rows with the same ids;
// after the flip, writes to billing rows through this deployment do not
// come back to the shop's old store.
func TestMirrorConsolidated(t *testing.T) {
	e := newPairEnv(t, "")
	ctx := context.Background()
	if err := e.old.Exec(ctx, e.db, `CREATE TABLE orders (id bigint PRIMARY KEY, total numeric(12,2), created_at timestamptz)`); err != nil {
		t.Fatal(err)
	}
	if err := e.new.Exec(ctx, e.db, `CREATE TABLE orders (tenant text, id bigint, total numeric(12,2), created_at timestamptz, PRIMARY KEY (tenant, id));
		INSERT INTO orders VALUES ('billing', 1, 100, now()), ('billing', 2, 200, now())`); err != nil {
		t.Fatal(err)
	}
	cfg := config.Tables{Map: map[string]config.TableMap{"orders": {Discriminator: map[string]string{"tenant": "shop"}}}}
	ms, oc, nc := e.loadMappings(t, cfg)
	e.proxy.srv.SetMappings(ms)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	const billing = `SELECT string_agg(id || ':' || total, ',' ORDER BY id) FROM orders WHERE tenant = 'billing'`
	const shopNew = `SELECT coalesce(string_agg(id || ':' || total, ',' ORDER BY id), '') FROM orders WHERE tenant = 'shop'`
	const shopOld = `SELECT coalesce(string_agg(id || ':' || total, ',' ORDER BY id), '') FROM orders`
	c := e.client()
	for _, sql := range []string{
		`INSERT INTO orders VALUES (1, 1, now()), (2, 2, now()), (3, 3, now())`,
		`UPDATE orders SET total = total + 10 WHERE id <= 2`,
		`DELETE FROM orders WHERE id = 1`,
	} {
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		if d := e.openDrift(); d != 0 {
			t.Fatalf("after %s: open drift %d", sql, d)
		}
		if got, want := queryText(t, nc, shopNew), queryText(t, oc, shopOld); got != want {
			t.Fatalf("after %s: shop on new %q, old %q", sql, got, want)
		}
	}
	if got := queryText(t, nc, billing); got != "1:100.00,2:200.00" {
		t.Fatalf("billing rows on new: %s", got)
	}

	e.set(route.Settings{Primary: route.New, Mirror: true, Reads: 100})
	for _, sql := range []string{
		`INSERT INTO orders VALUES ('shop', 4, 4, now()), ('billing', 4, 400, now())`,
		`UPDATE orders SET total = 0 WHERE id = 2`, // both tenants' row 2
		`DELETE FROM orders WHERE tenant = 'billing' AND id = 3`,
		`DELETE FROM orders WHERE tenant = 'billing' AND id = 1`,
	} {
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	if got := queryText(t, oc, shopOld); got != "2:0.00,3:3.00,4:4.00" {
		t.Fatalf("shop's old orders after the flip: %s", got)
	}
	if d := e.openDrift(); d != 0 {
		t.Fatalf("open drift: %d", d)
	}

	// A statement mirrored as text would reach other tenants' rows: a
	// TRUNCATE of the shop's orders is not run on the shared table, which
	// becomes drift for the repairer (its rows only).
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	if _, err := c.Exec(ctx, `TRUNCATE orders`); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, nc, billing); got != "2:0.00,4:400.00" {
		t.Fatalf("billing rows on new after the shop's TRUNCATE: %s", got)
	}
	if d := e.openDrift(); d != 1 {
		t.Fatalf("open drift after the TRUNCATE: %d, want the table", d)
	}
}

// TestMirrorSplit: old users is split into accounts (the owner) and
// profiles (a dependent with a where). Forward, each write reaches both
// parts in its transaction (a row moving out of the where loses its
// profile). After the flip, a write to accounts upserts only its columns
// on old, a write to profiles updates its columns, a DELETE on profiles
// resets them, one on accounts deletes the old row, and a profile whose
// old row is not there is drift by key, not an error and not lost; a
// TRUNCATE of a split table is drift, not run.
func TestMirrorSplit(t *testing.T) {
	e := newPairEnv(t, "")
	ctx := context.Background()
	if err := e.old.Exec(ctx, e.db, `CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, bio text, avatar bytea)`); err != nil {
		t.Fatal(err)
	}
	if err := e.new.Exec(ctx, e.db, `CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, email text);
		CREATE TABLE profiles (user_id bigint PRIMARY KEY, bio text, avatar bytea)`); err != nil {
		t.Fatal(err)
	}
	cfg := config.Tables{Map: map[string]config.TableMap{"users": {Split: []config.TableMap{
		{To: "accounts"},
		{To: "profiles", Rename: map[string]string{"id": "user_id"}, Where: "bio IS NOT NULL OR avatar IS NOT NULL"},
	}}}}
	ms, oc, nc := e.loadMappings(t, cfg)
	e.proxy.srv.SetMappings(ms)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	c := e.client()
	const (
		oldRows  = `SELECT coalesce(string_agg(id || ':' || name || ':' || coalesce(bio, '-'), ',' ORDER BY id), '') FROM users`
		accounts = `SELECT coalesce(string_agg(id || ':' || name, ',' ORDER BY id), '') FROM accounts`
		profiles = `SELECT coalesce(string_agg(user_id || ':' || coalesce(bio, '-'), ',' ORDER BY user_id), '') FROM profiles`
	)
	for _, step := range []struct{ sql, accounts, profiles string }{
		{`INSERT INTO users VALUES (1, 'a', NULL, 'bio a', NULL), (2, 'b', NULL, NULL, NULL), (3, 'c', NULL, NULL, '\x03')`, "1:a,2:b,3:c", "1:bio a,3:-"},
		{`UPDATE users SET bio = 'bio b', name = 'B' WHERE id = 2`, "1:a,2:B,3:c", "1:bio a,2:bio b,3:-"}, // into profiles
		{`UPDATE users SET bio = NULL WHERE id = 1`, "1:a,2:B,3:c", "2:bio b,3:-"},                        // out of it
		{`DELETE FROM users WHERE id = 3`, "1:a,2:B", "2:bio b"},
	} {
		if _, err := c.Exec(ctx, step.sql); err != nil {
			t.Fatalf("%s: %v", step.sql, err)
		}
		if got, got2 := queryText(t, nc, accounts), queryText(t, nc, profiles); got != step.accounts || got2 != step.profiles {
			t.Fatalf("after %s: accounts %q profiles %q, want %q and %q", step.sql, got, got2, step.accounts, step.profiles)
		}
	}
	if _, err := c.Exec(ctx, `TRUNCATE users`); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, nc, accounts); got != "1:a,2:B" {
		t.Fatalf("a TRUNCATE of a split table was run on new: accounts %q", got)
	}
	if got := queryText(t, oc, `SELECT string_agg(DISTINCT reason, ';') FROM tandem.drift WHERE table_name = 'users' AND repaired_at IS NULL`); !strings.Contains(got, "split") {
		t.Fatalf("drift for the TRUNCATE: %q", got)
	}
	if _, err := e.control.Exec(ctx, `UPDATE tandem.drift SET repaired_at = now() WHERE repaired_at IS NULL`); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Exec(ctx, `INSERT INTO users VALUES (1, 'a', NULL, NULL, NULL), (2, 'B', NULL, 'bio b', NULL)`); err != nil {
		t.Fatal(err)
	}

	e.set(route.Settings{Primary: route.New, Mirror: true, Reads: 100})
	for _, sql := range []string{
		`INSERT INTO accounts VALUES (4, 'd', 'd@x')`,
		`UPDATE accounts SET name = 'A' WHERE id = 1`,
		`INSERT INTO profiles VALUES (4, 'bio d', NULL)`,
		`UPDATE profiles SET bio = 'bio B' WHERE user_id = 2`,
		`INSERT INTO profiles VALUES (1, 'bio A', NULL) ON CONFLICT (user_id) DO UPDATE SET bio = excluded.bio`,
		`DELETE FROM profiles WHERE user_id = 2`,
	} {
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	if got := queryText(t, oc, oldRows); got != "1:A:bio A,2:B:-,4:d:bio d" {
		t.Fatalf("old after writes to one new table at a time = %s", got)
	}
	if d := e.openDrift(); d != 0 {
		t.Fatalf("open drift: %d", d)
	}
	// A profile before its account: drift for profiles by key.
	if _, err := c.Exec(ctx, `INSERT INTO profiles VALUES (9, 'early', NULL)`); err != nil {
		t.Fatalf("a profile without its old row failed the client: %v", err)
	}
	if got := queryText(t, oc, `SELECT count(*)::text FROM users WHERE id = 9`); got != "0" {
		t.Fatalf("old row 9 = %s", got)
	}
	if got := queryText(t, oc, `SELECT string_agg(table_name || ' ' || array_to_string(key, ','), ';') FROM tandem.drift WHERE repaired_at IS NULL`); got != "profiles 9" {
		t.Fatalf("drift = %q, want profiles 9", got)
	}
	if _, err := c.Exec(ctx, `DELETE FROM accounts WHERE id = 4`); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, oc, `SELECT string_agg(id::text, ',' ORDER BY id) FROM users`); got != "1,2" {
		t.Fatalf("old after the owner's delete = %s", got)
	}
}

// queryText runs sql on q and returns its one text value.
func queryText(t *testing.T, q *pgx.Conn, sql string) string {
	t.Helper()
	var s string
	if err := q.QueryRow(context.Background(), sql).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

// TestMirrorMerge: the merge of accounts (the owner) and profiles into
// users, mirrored both ways. Before the flip a write to accounts upserts
// its columns of the new row and its delete deletes the row (a profile of
// the key is then drift); a write to profiles updates its columns and its
// delete resets them; a profile before its account is drift by key, not an
// error and not lost; a TRUNCATE of a merged table is drift, not run.
// After the flip a write to users is composed on both old tables: a
// profile exists on old exactly when one of its columns is not NULL.
func TestMirrorMerge(t *testing.T) {
	e := newPairEnv(t, "")
	ctx := context.Background()
	if err := e.old.Exec(ctx, e.db, `CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, email text);
		CREATE TABLE profiles (user_id bigint PRIMARY KEY, bio text, avatar bytea)`); err != nil {
		t.Fatal(err)
	}
	if err := e.new.Exec(ctx, e.db, `CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, bio text, avatar bytea)`); err != nil {
		t.Fatal(err)
	}
	cfg := config.Tables{Map: map[string]config.TableMap{
		"accounts": {To: "users"},
		"profiles": {MergeInto: "accounts", Rename: map[string]string{"user_id": "id"}},
	}}
	ms, oc, nc := e.loadMappings(t, cfg)
	e.proxy.srv.SetMappings(ms)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	c := e.client()
	const (
		users     = `SELECT coalesce(string_agg(id || ':' || name || ':' || coalesce(bio, '-'), ',' ORDER BY id), '') FROM users`
		openDrift = `SELECT coalesce(string_agg(table_name || ' ' || array_to_string(key, ','), ';' ORDER BY table_name, key), '') FROM tandem.drift WHERE repaired_at IS NULL`
	)
	for _, step := range []struct{ sql, users, drift string }{
		{`INSERT INTO accounts VALUES (1, 'a', NULL), (2, 'b', NULL), (3, 'c', NULL)`, "1:a:-,2:b:-,3:c:-", ""},
		{`INSERT INTO profiles VALUES (1, 'bio a', NULL), (3, NULL, '\x03')`, "1:a:bio a,2:b:-,3:c:-", ""},
		{`UPDATE accounts SET name = 'A' WHERE id = 1`, "1:A:bio a,2:b:-,3:c:-", ""}, // the member's columns stay
		{`UPDATE profiles SET bio = 'bio c' WHERE user_id = 3`, "1:A:bio a,2:b:-,3:c:bio c", ""},
		{`DELETE FROM profiles WHERE user_id = 1`, "1:A:-,2:b:-,3:c:bio c", ""},
		{`INSERT INTO profiles VALUES (9, 'early', NULL)`, "1:A:-,2:b:-,3:c:bio c", "profiles 9"},
		{`DELETE FROM accounts WHERE id = 3`, "1:A:-,2:b:-", "profiles 3;profiles 9"},
	} {
		if _, err := c.Exec(ctx, step.sql); err != nil {
			t.Fatalf("%s: %v", step.sql, err)
		}
		if got, d := queryText(t, nc, users), queryText(t, oc, openDrift); got != step.users || d != step.drift {
			t.Fatalf("after %s: users %q, drift %q; want %q and %q", step.sql, got, d, step.users, step.drift)
		}
	}
	if _, err := c.Exec(ctx, `TRUNCATE profiles`); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, nc, users); got != "1:A:-,2:b:-" {
		t.Fatalf("a TRUNCATE of a merged table was run on new: users %q", got)
	}
	if got := queryText(t, oc, `SELECT string_agg(DISTINCT reason, ';') FROM tandem.drift WHERE table_name = 'profiles' AND key IS NULL AND repaired_at IS NULL`); !strings.Contains(got, "merged") {
		t.Fatalf("drift for the TRUNCATE: %q", got)
	}
	if _, err := e.control.Exec(ctx, `UPDATE tandem.drift SET repaired_at = now() WHERE repaired_at IS NULL`); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Exec(ctx, `INSERT INTO profiles VALUES (2, 'bio b', NULL)`); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.Exec(ctx, `UPDATE users SET bio = 'bio b' WHERE id = 2`); err != nil {
		t.Fatal(err)
	}

	e.set(route.Settings{Primary: route.New, Mirror: true, Reads: 100})
	for _, sql := range []string{
		`INSERT INTO users VALUES (4, 'd', 'd@x', NULL, NULL), (5, 'e', NULL, 'bio e', NULL)`,
		`UPDATE users SET name = 'B', bio = NULL WHERE id = 2`, // out of profiles
		`UPDATE users SET avatar = '\x04' WHERE id = 4`,        // into it
		`UPDATE users SET bio = 'bio a' WHERE id = 1`,
		`DELETE FROM users WHERE id = 5`,
	} {
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	if got := queryText(t, oc, `SELECT string_agg(id || ':' || name || ':' || coalesce(email, '-'), ',' ORDER BY id) FROM accounts`); got != "1:A:-,2:B:-,4:d:d@x" {
		t.Fatalf("old accounts after writes to users = %s", got)
	}
	if got := queryText(t, oc, `SELECT string_agg(user_id || ':' || coalesce(bio, '-') || ':' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY user_id) FROM profiles`); got != "1:bio a:-,4:-:04" {
		t.Fatalf("old profiles after writes to users = %s", got)
	}
	if d := queryText(t, oc, openDrift); d != "" {
		t.Fatalf("open drift: %s", d)
	}
	if _, err := c.Exec(ctx, `TRUNCATE users`); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, oc, `SELECT count(*)::text FROM accounts`); got != "3" {
		t.Fatalf("a TRUNCATE of a merged table was run on old: %s accounts", got)
	}
}
