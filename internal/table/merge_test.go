package table

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
)

// The merge example (deploy/examples/merge): accounts (the owner) and
// profiles, whose rows exist only for some accounts, become users.
const (
	mergeOld = `CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, email text);
		CREATE TABLE profiles (user_id bigint PRIMARY KEY, bio text, avatar bytea)`
	mergeNew = `CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, bio text, avatar bytea)`
	// Each old table's rows, and the new table's rows as each holds them.
	mergeOldAccounts = `SELECT coalesce(string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id), '') FROM accounts`
	mergeNewAccounts = `SELECT coalesce(string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id), '') FROM users`
	mergeOldProfiles = `SELECT coalesce(string_agg(user_id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY user_id), '') FROM profiles
		WHERE bio IS NOT NULL OR avatar IS NOT NULL`
	mergeNewProfiles = `SELECT coalesce(string_agg(id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY id), '') FROM users
		WHERE bio IS NOT NULL OR avatar IS NOT NULL`
)

// mergeDecl is the example's declaration.
func mergeDecl() map[string]config.TableMap {
	return map[string]config.TableMap{
		"accounts": {To: "users"},
		"profiles": {MergeInto: "accounts", Rename: map[string]string{"user_id": "id"}},
	}
}

func mergeMappings(t *testing.T, old, nw *pgx.Conn, decl map[string]config.TableMap) *Mappings {
	t.Helper()
	ms, probs, err := LoadMappings(context.Background(), config.Tables{Map: decl}, old, nw)
	if err != nil {
		t.Fatal(err)
	}
	if len(probs) > 0 {
		t.Fatalf("problems: %v", probs)
	}
	return ms
}

var (
	accountsName = Name{"public", "accounts"}
	profilesName = Name{"public", "profiles"}
)

// TestMergeMappings: the members, how each is found, their predicates and
// verify names, and the shadow reads they allow.
func TestMergeMappings(t *testing.T) {
	s := newStores(t)
	s.old(mergeOld)
	s.new(mergeNew)
	old, nw := s.primary(), s.secondary()
	ms := mergeMappings(t, old, nw, mergeDecl())
	owner, member := ms.ForOld(accountsName), ms.ForOld(profilesName)
	if owner == nil || member == nil || !owner.Merged() || owner.MergeMember() || !member.MergeMember() {
		t.Fatalf("ForOld: owner %v, member %v", owner, member)
	}
	if ms.ForNew(Name{"public", "users"}) != owner || len(owner.Members()) != 2 || owner.Members()[1] != member {
		t.Fatal("ForNew is not the owner, or Members not owner then member")
	}
	if len(ms.All()) != 2 || owner.UnitName() != accountsName || member.UnitName() != profilesName {
		t.Fatalf("All = %v; unit names %s, %s", ms.All(), owner.UnitName(), member.UnitName())
	}
	if owner.Where() != "" || owner.NewWhere() != "" {
		t.Errorf("the owner is filtered: %q %q", owner.Where(), owner.NewWhere())
	}
	if got := member.Where(); got != `("bio" IS NOT NULL OR "avatar" IS NOT NULL)` {
		t.Errorf("member Where = %s", got)
	}
	if got := member.NewWhere(); got != `("bio" IS NOT NULL OR "avatar" IS NOT NULL)` {
		t.Errorf("member NewWhere = %s", got)
	}
	for _, m := range ms.All() {
		if miss := m.ReverseMissing(); len(miss) != 0 {
			t.Errorf("%s: ReverseMissing = %q", m.Old.Name, miss)
		}
	}
	if sql, ok, why := ms.RewriteRead(`SELECT name, email FROM accounts WHERE id = 1`); !ok || !strings.Contains(sql, "users") {
		t.Errorf("RewriteRead of the owner = %q %v %s", sql, ok, why)
	}
	if _, ok, why := ms.RewriteRead(`SELECT bio FROM profiles WHERE user_id = 1`); ok || !strings.Contains(why, "merged") {
		t.Errorf("RewriteRead of a member: ok=%v reason %q", ok, why)
	}
	if _, err := NewSnapshotCopy(owner); err == nil || !strings.Contains(err.Error(), "locked path") {
		t.Errorf("NewSnapshotCopy of a merge: %v, want a refusal naming the locked path", err)
	}
}

// TestMergeProblems: declarations of a merge the catalogs refuse, each
// named by the member and the key of its declaration.
func TestMergeProblems(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(mergeOld + `; CREATE TABLE notes (user_id bigint PRIMARY KEY, bio text)`)
	s.new(mergeNew + `; CREATE TABLE people (id bigint PRIMARY KEY, name text)`)
	old, nw := s.primary(), s.secondary()
	for _, c := range []struct {
		name              string
		decl              map[string]config.TableMap
		table, field, msg string
	}{
		{"a member without the key", map[string]config.TableMap{"accounts": {To: "users"}, "profiles": {MergeInto: "accounts"}},
			"public.profiles", "", `old column "user_id": has no place in public.users`},
		{"two members write one column", map[string]config.TableMap{"accounts": {To: "users"},
			"profiles": {MergeInto: "accounts", Rename: map[string]string{"user_id": "id"}},
			"notes":    {MergeInto: "accounts", Rename: map[string]string{"user_id": "id"}}},
			"public.profiles", "", `new column "bio": is written by public.notes too`},
		{"a member's to elsewhere", map[string]config.TableMap{"accounts": {To: "users"},
			"profiles": {MergeInto: "accounts", To: "people", Rename: map[string]string{"user_id": "id"}}},
			"public.profiles", "to", "its to must be that table"},
		{"no owner entry", map[string]config.TableMap{"profiles": {MergeInto: "accounts", To: "users"}},
			"public.profiles", "merge_into", "has no entry in tables.map"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, probs, err := LoadMappings(ctx, config.Tables{Map: c.decl}, old, nw)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range probs {
				if p.Table.String() == c.table && p.Field == c.field && strings.Contains(p.String(), c.msg) {
					return
				}
			}
			t.Errorf("problems %+v, want %s at %q: %s", probs, c.table, c.field, c.msg)
		})
	}
}

// TestMergeCopy: a forward copy through the owner writes every member's
// columns of the rows it copies in its units (a member's key absent on old
// clears its columns, an account absent on old deletes the new row); a
// member's copy alone writes its columns and fails for a key without a new
// row (the repairer keeps the drift) until the owner's row is there.
func TestMergeCopy(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(mergeOld + `; INSERT INTO accounts SELECT g, 'u' || g, CASE WHEN g % 2 = 0 THEN g || '@x' END FROM generate_series(1, 40) g;
		INSERT INTO profiles SELECT g, CASE WHEN g % 3 = 0 THEN 'bio ' || g END, CASE WHEN g % 5 = 0 THEN '\xbeef'::bytea END
		FROM generate_series(1, 40) g WHERE g % 3 = 0 OR g % 5 = 0`)
	s.new(mergeNew + `; INSERT INTO users VALUES (1000, 'stale', NULL, 'x', NULL), (1, 'u1', NULL, 'not any more', NULL)`)
	old, nw := s.primary(), s.secondary()
	ms := mergeMappings(t, old, nw, mergeDecl())
	owner, member := ms.ForOld(accountsName), ms.ForOld(profilesName)
	check := func(when string) {
		t.Helper()
		sameText(t, when, old, nw, [3]string{"users as accounts", mergeOldAccounts, mergeNewAccounts}, [3]string{"users as profiles", mergeOldProfiles, mergeNewProfiles})
	}
	copyOnEveryPath(t, old, nw, owner, check)
	s.old(`UPDATE profiles SET bio = NULL, avatar = NULL WHERE user_id = 3; UPDATE profiles SET bio = 'new' WHERE user_id = 10;
		DELETE FROM profiles WHERE user_id = 9; DELETE FROM accounts WHERE id = 6; DELETE FROM profiles WHERE user_id = 6; INSERT INTO profiles VALUES (4, 'four', NULL)`)
	if _, err := CopyKeysMapped(ctx, old, nw, owner, true, [][]string{{"3"}, {"4"}, {"6"}, {"9"}, {"10"}}); err != nil {
		t.Fatal(err)
	}
	check("after the owner's key copy")

	// The member alone: its columns, and a key it lacks cleared.
	s.new(`UPDATE users SET bio = 'wrong', name = 'left alone' WHERE id = 12; UPDATE users SET bio = 'gone' WHERE id = 2`)
	res, err := CopyKeysMapped(ctx, old, nw, member, true, [][]string{{"12"}, {"2"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Upserted != 1 || res.Deleted != 1 {
		t.Errorf("member copy = %+v, want 1 written and 1 cleared", res)
	}
	if got := queryText(t, nw, `SELECT string_agg(id || '|' || name || '|' || coalesce(bio, '-'), ',' ORDER BY id) FROM users WHERE id IN (2, 12)`); got != "2|u2|-,12|left alone|bio 12" {
		t.Errorf("the member's copy: %s", got)
	}
	// A profile before its account: the member's copy fails, the owner's
	// copies both.
	s.old(`INSERT INTO profiles VALUES (50, 'early', NULL)`)
	if _, err := CopyKeysMapped(ctx, old, nw, member, true, [][]string{{"50"}}); err == nil || !strings.Contains(err.Error(), "has not written it yet") {
		t.Fatalf("a member row without its new row: err %v", err)
	}
	s.old(`INSERT INTO accounts VALUES (50, 'late', NULL)`)
	if _, err := CopyKeysMapped(ctx, old, nw, member, true, [][]string{{"50"}}); err == nil {
		t.Fatal("the member's copy succeeded before the owner's row was copied")
	}
	if _, err := CopyKeysMapped(ctx, old, nw, owner, true, [][]string{{"50"}}); err != nil {
		t.Fatal(err)
	}
	s.new(`UPDATE users SET name = 'u12' WHERE id = 12`)
	check("after the profile before its account")
}

// TestMergeReverse: after the flip, a copy through the owner composes
// every old table from the new rows: the owner's columns upserted, a
// member's row upserted where its columns are not all NULL and deleted
// where they are, and keys absent on new deleted from every old table.
func TestMergeReverse(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(mergeOld + `; INSERT INTO accounts VALUES (1, 'a', NULL), (2, 'b', NULL), (3, 'c', NULL);
		INSERT INTO profiles VALUES (1, 'old', NULL), (2, 'bio b', NULL), (3, 'bio c', NULL), (7, 'orphan', NULL)`)
	s.new(mergeNew + `; INSERT INTO users VALUES (1, 'A', 'a@y', 'new', '\x01'), (2, 'b', NULL, NULL, NULL), (4, 'd', NULL, 'bio d', NULL), (5, 'e', NULL, NULL, NULL)`)
	old, nw := s.primary(), s.secondary()
	owner := mergeMappings(t, old, nw, mergeDecl()).ForOld(accountsName)
	if _, err := CopyKeysMapped(ctx, nw, old, owner, false, [][]string{{"1"}, {"2"}, {"3"}, {"4"}, {"5"}, {"7"}}); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, old, `SELECT string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id) FROM accounts`); got != "1|A|a@y,2|b|-,4|d|-,5|e|-" {
		t.Errorf("accounts = %s", got)
	}
	if got := queryText(t, old, `SELECT string_agg(user_id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY user_id) FROM profiles`); got != "1|new|01,4|bio d|-" {
		t.Errorf("profiles = %s (2 and 5 have no profile columns, 3 and 7 no new row)", got)
	}
	// Whole tables, in chunks.
	s.new(`UPDATE users SET bio = NULL WHERE id = 4; UPDATE users SET avatar = '\x05' WHERE id = 5; INSERT INTO users VALUES (6, 'f', NULL, 'bio f', NULL)`)
	if _, err := copyTableMappedOn(ctx, -1, nw, old, owner, false, 2); err != nil {
		t.Fatal(err)
	}
	if got, want := queryText(t, old, mergeOldAccounts), queryText(t, nw, mergeNewAccounts); got != want {
		t.Fatalf("accounts = %s, new %s", got, want)
	}
	if got, want := queryText(t, old, mergeOldProfiles), queryText(t, nw, mergeNewProfiles); got != want {
		t.Fatalf("profiles = %s, new %s", got, want)
	}
	if got := queryText(t, old, `SELECT count(*)::text FROM profiles`); got != "3" {
		t.Errorf("profiles has %s rows, want 3 (1, 5, 6): 4's went when its columns were NULLed", got)
	}
}

// TestMergeSQL: the statements the proxy applies row images with. Forward,
// a member's update reports the keys without a new row and its clear
// resets its columns only; in reverse, a member's unmatched delete removes
// the old rows of images whose member columns are all NULL.
func TestMergeSQL(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(mergeOld + `; INSERT INTO profiles VALUES (1, 'x', NULL), (2, 'y', NULL)`)
	s.new(mergeNew + `; INSERT INTO users VALUES (1, 'a', 'a@x', NULL, NULL), (2, 'b', 'b@x', 'bio', '\x02')`)
	old, nw := s.primary(), s.secondary()
	member := mergeMappings(t, old, nw, mergeDecl()).ForOld(profilesName)
	keys := func(c *pgx.Conn, sql string, args ...any) []string {
		t.Helper()
		rows, err := c.Query(ctx, sql, args...)
		if err != nil {
			t.Fatal(err)
		}
		out, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	sql, err := member.ForwardUpdateSQL([]string{"user_id", "bio", "avatar"}, 2)
	if err != nil {
		t.Fatal(err)
	}
	if got := keys(nw, sql, "1", "new bio", nil, "7", "x", nil); len(got) != 1 || got[0] != "7" {
		t.Fatalf("keys without a new row = %q, want [7]", got)
	}
	if got := queryText(t, nw, `SELECT name || '|' || email || '|' || bio FROM users WHERE id = 1`); got != "a|a@x|new bio" {
		t.Fatalf("updated row = %s", got)
	}
	if sql, err = member.ForwardClearSQL([]string{"user_id"}, 2); err != nil {
		t.Fatal(err)
	}
	if got := keys(nw, sql, "2", "8"); len(got) != 1 || got[0] != "8" {
		t.Fatalf("keys without a new row to clear = %q, want [8]", got)
	}
	if got := queryText(t, nw, `SELECT name || '|' || email || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-') FROM users WHERE id = 2`); got != "b|b@x|-|-" {
		t.Fatalf("cleared row = %s", got)
	}
	if _, err := member.Members()[0].ForwardUpdateSQL([]string{"id", "name"}, 1); err == nil {
		t.Error("ForwardUpdateSQL of the owner: no error")
	}
	// Reverse: image 1 has a bio (kept), 2 has none (its profile goes).
	cols := []string{"id", "name", "email", "bio", "avatar"}
	if sql, err = member.ReverseDeleteUnmatchedSQL(cols, 2); err != nil {
		t.Fatal(err)
	}
	tag, err := old.Exec(ctx, sql, "1", "a", nil, "kept", nil, "2", "b", nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tag.RowsAffected() != 1 || queryText(t, old, `SELECT string_agg(user_id::text, ',') FROM profiles`) != "1" {
		t.Errorf("unmatched delete: %d rows, profiles left %s", tag.RowsAffected(), queryText(t, old, `SELECT string_agg(user_id::text, ',') FROM profiles`))
	}
	if sql, err = member.ReverseUpsertSQL(cols, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Exec(ctx, sql, "1", "a", nil, "kept", nil, "2", "b", nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, old, `SELECT string_agg(user_id || '|' || bio, ',') FROM profiles`); got != "1|kept" {
		t.Errorf("reverse upsert: profiles = %s, want only 1 (2's columns are NULL)", got)
	}
}
