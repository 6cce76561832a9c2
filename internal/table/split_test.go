package table

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
)

// The split example (deploy/examples/split): users becomes accounts (the
// owner) and profiles, whose rows exist only for users with a bio or an
// avatar.
const (
	splitOld = `CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text, bio text, avatar bytea)`
	splitNew = `CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL, email text);
		CREATE TABLE profiles (user_id bigint PRIMARY KEY, bio text, avatar bytea)`
	// The old rows as each part holds them, and the new tables' rows.
	oldAccounts = `SELECT coalesce(string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id), '') FROM users`
	newAccounts = `SELECT coalesce(string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id), '') FROM accounts`
	oldProfiles = `SELECT coalesce(string_agg(id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY id), '') FROM users WHERE bio IS NOT NULL OR avatar IS NOT NULL`
	newProfiles = `SELECT coalesce(string_agg(user_id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY user_id), '') FROM profiles`
)

// splitDecl is the example's declaration.
func splitDecl() config.TableMap {
	return config.TableMap{Split: []config.TableMap{
		{To: "accounts"},
		{To: "profiles", Rename: map[string]string{"id": "user_id"}, Where: "bio IS NOT NULL OR avatar IS NOT NULL"},
	}}
}

func splitMappings(t *testing.T, old, nw *pgx.Conn, decl config.TableMap) *Mappings {
	t.Helper()
	ms, probs, err := LoadMappings(context.Background(), config.Tables{Map: map[string]config.TableMap{"users": decl}}, old, nw)
	if err != nil {
		t.Fatal(err)
	}
	if len(probs) > 0 {
		t.Fatalf("problems: %v", probs)
	}
	return ms
}

// TestSplitMappings: the parts, how each is found, and the reverse
// columns over the union of the parts.
func TestSplitMappings(t *testing.T) {
	s := newStores(t)
	s.old(splitOld)
	s.new(splitNew)
	old, nw := s.primary(), s.secondary()
	ms := splitMappings(t, old, nw, splitDecl())
	users := Name{"public", "users"}
	parts := ms.PartsOf(users)
	if len(parts) != 2 || parts[0].New.Name.Table != "accounts" || parts[1].New.Name.Table != "profiles" {
		t.Fatalf("PartsOf = %v", parts)
	}
	if ms.ForOld(users) != parts[0] || !parts[0].Owner() || parts[1].Owner() || ms.ForNew(Name{"public", "profiles"}) != parts[1] {
		t.Fatal("ForOld is not the owner, or ForNew not the part")
	}
	if len(ms.All()) != 2 || parts[0].Identity() || parts[1].Identity() {
		t.Fatalf("All = %v", ms.All())
	}
	if got := parts[1].UnitName().String(); got != "public.users[profiles]" {
		t.Errorf("UnitName = %s", got)
	}
	if got := parts[0].UnitName().String(); got != "public.users" {
		t.Errorf("owner UnitName = %s", got)
	}
	for _, p := range parts {
		if miss := p.ReverseMissing(); len(miss) != 0 {
			t.Errorf("%s: ReverseMissing = %q, want none: the parts give every column back between them", p.New.Name, miss)
		}
	}
	// A column only computed forward comes back from no part.
	d := splitDecl()
	d.Split[1].Compute = map[string]string{"bio": "upper(bio)"}
	_, probs, err := LoadMappings(context.Background(), config.Tables{Map: map[string]config.TableMap{"users": d}}, old, nw)
	if err != nil {
		t.Fatal(err)
	}
	if len(probs) != 1 || !probs[0].FlipOnly || probs[0].Column != "bio" || probs[0].Field != "split" {
		t.Fatalf("problems %+v, want bio flip-only: no part gives it back", probs)
	}
	// A read of a split table reads the old rows composed from the parts;
	// a column a part computes is not among them, and says so.
	ms2, _, err := LoadMappings(context.Background(), config.Tables{Map: map[string]config.TableMap{"users": d}}, old, nw)
	if err != nil {
		t.Fatal(err)
	}
	if sql, ok, why := ms.RewriteRead(`SELECT name, bio FROM users WHERE id = 1`); !ok || !strings.Contains(sql, "LEFT JOIN public.profiles") {
		t.Errorf("RewriteRead of a dependent's column = %q %v %s", sql, ok, why)
	}
	if _, ok, why := ms2.RewriteRead(`SELECT name, bio FROM users WHERE id = 1`); ok || !strings.Contains(why, "computes in public.profiles") {
		t.Errorf("RewriteRead of a computed dependent's column: ok=%v reason %q", ok, why)
	}
	if sql, ok, why := ms2.RewriteRead(`SELECT name, avatar FROM users WHERE id = 1`); !ok || !strings.Contains(sql, "profiles") {
		t.Errorf("RewriteRead of a passed dependent's column beside a computed one = %q %v %s", sql, ok, why)
	}
	for _, sql := range []string{`SELECT * FROM users`, `SELECT public.users.name FROM users`, `SELECT a FROM users u(a, b)`} {
		if _, ok, _ := ms2.RewriteRead(sql); ok {
			t.Errorf("RewriteRead(%s) of a split with a computed column: ok", sql)
		}
	}
}

// TestSplitRewriteReadOnStores: a read of the split table, rewritten, runs
// on new and returns what the original returns on old, for users with and
// without a profile, through aliases, joins, * and aggregates.
func TestSplitRewriteReadOnStores(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.both(`CREATE TABLE orders (id int PRIMARY KEY, user_id bigint, total int)`)
	s.old(splitOld + `; INSERT INTO users SELECT g, 'u' || g, CASE WHEN g % 2 = 0 THEN g || '@x' END,
		CASE WHEN g % 3 = 0 THEN 'bio ' || g END, CASE WHEN g % 5 = 0 THEN '\xbeef'::bytea END FROM generate_series(1, 40) g;
		INSERT INTO orders SELECT g, g % 40 + 1, g FROM generate_series(1, 100) g`)
	s.new(splitNew)
	old, nw := s.primary(), s.secondary()
	ms, probs, err := LoadMappings(ctx, config.Tables{Map: map[string]config.TableMap{"users": splitDecl(), "orders": {}}}, old, nw)
	if err != nil || len(probs) > 0 {
		t.Fatalf("%v %v", probs, err)
	}
	for _, m := range []*Mapping{ms.ForOld(Name{"public", "users"}), ms.ForOld(Name{"public", "orders"})} {
		if _, err := CopyTableMapped(ctx, old, nw, m, true, 7); err != nil {
			t.Fatal(err)
		}
	}
	sameReads(t, ms, old, nw,
		"SELECT * FROM users ORDER BY id",
		"SELECT id, bio, encode(avatar, 'hex') FROM users WHERE id IN (3, 4, 5, 15) ORDER BY id",
		"SELECT u.name, count(o.id) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.bio IS NULL GROUP BY u.name ORDER BY 1",
		"SELECT users.email, users.bio FROM users WHERE users.id = 6",
		"SELECT count(*), count(bio), count(avatar) FROM users",
		"SELECT id FROM users WHERE avatar IS NOT NULL UNION SELECT user_id FROM orders WHERE total > 95 ORDER BY 1",
	)
}

// TestSplitProblems: declarations of a split the catalogs refuse, each
// named with the key of the declaration it is about.
func TestSplitProblems(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(splitOld)
	s.new(splitNew + `; CREATE TABLE profiles_nokey (user_id bigint, bio text, avatar bytea);
		CREATE TABLE profiles_other (pid bigint PRIMARY KEY, user_id bigint, bio text, avatar bytea);
		CREATE TABLE profiles_nobio (user_id bigint PRIMARY KEY, avatar bytea)`)
	old, nw := s.primary(), s.secondary()
	part := func(to string, rename map[string]string, drop ...string) config.TableMap {
		return config.TableMap{To: to, Rename: rename, Drop: drop}
	}
	acc := part("accounts", nil)
	for _, c := range []struct {
		name        string
		parts       []config.TableMap
		field, want string
	}{
		{"missing key in a part", []config.TableMap{acc, part("profiles", nil, "name", "email")},
			"split[1]", `new column "user_id": is in the primary key of public.profiles but is not derived`},
		{"a part's key not derived", []config.TableMap{acc, part("profiles_other", map[string]string{"id": "user_id"})},
			"split[1]", `new column "pid": is in the primary key of public.profiles_other but is not derived from public.users`},
		{"a computed key", []config.TableMap{acc, {To: "profiles", Compute: map[string]string{"user_id": "id + 0"}}},
			"split[1]", "does not carry the key of public.users (id) as the primary key of public.profiles (user_id), column for column"},
		{"old column in no part", []config.TableMap{acc, part("profiles_nobio", map[string]string{"id": "user_id"})},
			"split", `old column "bio": is carried by no part of the split`},
		{"two parts write one table", []config.TableMap{acc, part("accounts", nil)},
			"split[1]", "writes public.accounts, as part 0 does"},
		{"a part without a key", []config.TableMap{acc, part("profiles_nokey", map[string]string{"id": "user_id"})},
			"split[1].to", "has no primary key"},
		{"no such new table", []config.TableMap{acc, part("profile", map[string]string{"id": "user_id"})},
			"split[1].to", "the new store has no table public.profile"},
		{"a rename to a column the part lacks", []config.TableMap{acc, part("profiles", map[string]string{"id": "userid"})},
			"split[1]", `rename names a column that public.profiles does not have (did you mean "user_id"?)`},
		{"a filtered owner", []config.TableMap{{To: "accounts", Where: "id > 0"}, part("profiles", map[string]string{"id": "user_id"})},
			"split[0]", "the first part is the owner"},
		{"a bad where in a part", []config.TableMap{acc, {To: "profiles", Rename: map[string]string{"id": "user_id"}, Where: "bioo IS NOT NULL"}},
			"split[1].where", `read by the where predicate but public.users has no such column (did you mean "bio"?)`},
	} {
		_, probs, err := LoadMappings(ctx, config.Tables{Map: map[string]config.TableMap{"users": {Split: c.parts}}}, old, nw)
		if err != nil {
			t.Fatal(err)
		}
		if len(probs) != 1 || probs[0].Field != c.field || !strings.Contains(probs[0].String(), c.want) {
			t.Errorf("%s: problems %+v, want one about %s saying %q", c.name, probs, c.field, c.want)
		}
	}
	// Another entry mapping to a part's new table: a merge, refused.
	s.old(`CREATE TABLE people (id bigint PRIMARY KEY, bio text, avatar bytea)`)
	_, probs, err := LoadMappings(ctx, config.Tables{Map: map[string]config.TableMap{"users": splitDecl(),
		"people": {To: "profiles", Rename: map[string]string{"id": "user_id"}}}}, old, nw)
	if err != nil {
		t.Fatal(err)
	}
	if len(probs) != 1 || !strings.Contains(probs[0].String(), "merging several old tables into one new table is not supported") {
		t.Errorf("a merge: problems %+v", probs)
	}
}

// TestSplitCopy: a forward copy through the owner writes every part in
// its units (a dependent row of an old row its where no longer passes is
// deleted, a key absent on old goes from every part); a verify's repair
// through one part copies that part.
func TestSplitCopy(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(splitOld + `; INSERT INTO users SELECT g, 'u' || g, CASE WHEN g % 2 = 0 THEN g || '@x' END,
		CASE WHEN g % 3 = 0 THEN 'bio ' || g END, CASE WHEN g % 5 = 0 THEN '\xbeef'::bytea END FROM generate_series(1, 40) g`)
	s.new(splitNew + `; INSERT INTO accounts VALUES (1000, 'stale', NULL); INSERT INTO profiles VALUES (1000, 'stale', NULL), (1, 'not any more', NULL)`)
	old, nw := s.primary(), s.secondary()
	owner := splitMappings(t, old, nw, splitDecl()).ForOld(Name{"public", "users"})
	check := func(when string) {
		t.Helper()
		sameText(t, when, old, nw, [3]string{"accounts", oldAccounts, newAccounts}, [3]string{"profiles", oldProfiles, newProfiles})
	}
	// The fast path is not taken for a split: both settings copy alike.
	copyOnEveryPath(t, old, nw, owner, check)
	s.old(`UPDATE users SET bio = NULL, avatar = NULL WHERE id = 3; UPDATE users SET bio = 'new' WHERE id = 4; DELETE FROM users WHERE id = 6`)
	res, err := CopyKeysMapped(ctx, old, nw, owner, true, [][]string{{"3"}, {"4"}, {"6"}})
	if err != nil {
		t.Fatal(err)
	}
	check("after the key copy")
	if res.Deleted != 3 { // profile 3 (out of the where), account 6 and profile 6
		t.Errorf("CopyKeysMapped = %+v, want 3 deleted", res)
	}
	// Through the dependent alone (a verify of profiles repairing a key).
	s.new(`UPDATE profiles SET bio = 'wrong' WHERE user_id = 9; UPDATE accounts SET name = 'left alone' WHERE id = 9`)
	if _, err := CopyKeysMapped(ctx, old, nw, owner.Parts()[1], true, [][]string{{"9"}}); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, nw, `SELECT bio || '/' || (SELECT name FROM accounts WHERE id = 9) FROM profiles WHERE user_id = 9`); got != "bio 9/left alone" {
		t.Errorf("a dependent's copy: %s, want bio 9/left alone", got)
	}
}

// TestSplitSnapshotCopy: the snapshot loader of a split stages the old rows
// once and writes every part, a dependent only the rows its where passes,
// never overwriting a row a part's new table already holds (the mirror's);
// the keys any part holds are the range's present keys. A dependent part
// has no loader of its own.
func TestSplitSnapshotCopy(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(splitOld + `; INSERT INTO users SELECT g, 'u' || g, CASE WHEN g % 2 = 0 THEN g || '@x' END,
		CASE WHEN g % 3 = 0 THEN 'bio ' || g END, CASE WHEN g % 5 = 0 THEN '\xbeef'::bytea END FROM generate_series(1, 40) g`)
	// What the mirror wrote after the snapshot: account 2 renamed, profile
	// 4 (a user without one in the snapshot) given a bio.
	s.new(splitNew + `; INSERT INTO accounts VALUES (2, 'mirrored', NULL); INSERT INTO profiles VALUES (4, 'mirrored', NULL)`)
	old, nw := s.primary(), s.secondary()
	owner := splitMappings(t, old, nw, splitDecl()).ForOld(Name{"public", "users"})
	if _, err := NewSnapshotCopy(owner.Parts()[1]); err == nil || !strings.Contains(err.Error(), "dependent part") {
		t.Errorf("NewSnapshotCopy of a dependent part: %v, want a refusal", err)
	}
	l, err := NewSnapshotCopy(owner)
	if err != nil {
		t.Fatal(err)
	}
	if l.Straight() {
		t.Error("a split's loader offers the straight COPY")
	}
	present := func() string {
		t.Helper()
		return queryText(t, nw, `SELECT coalesce(string_agg(k[1], ',' ORDER BY k[1]::int), '') FROM (`+l.PresentKeysSQL([]string{"1"}, []string{"30"})+`) AS p(k)`)
	}
	if got := present(); got != "2,4" {
		t.Errorf("present keys in (1, 30]: %s, want 2,4", got)
	}
	for _, binary := range []bool{true, false} {
		l.Binary = binary
		src, err := old.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
		if err != nil {
			t.Fatal(err)
		}
		dst, err := nw.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		read, inserted, err := l.Range(ctx, src, dst, nil, nil)
		if err != nil {
			t.Fatalf("binary %v: %v", binary, err)
		}
		// 40 accounts less the mirrored one, and the 19 old users with a
		// bio or an avatar (13 multiples of 3, 8 of 5, 2 of both; not 4).
		if read != 40 || inserted != 39+19 {
			t.Errorf("binary %v: read %d, inserted %d; want 40 and %d", binary, read, inserted, 39+19)
		}
		_ = src.Rollback(ctx)
		_ = dst.Rollback(ctx)
	}
	src, _ := old.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	dst, _ := nw.Begin(ctx)
	if _, _, err := l.Range(ctx, src, dst, nil, nil); err != nil {
		t.Fatal(err)
	}
	_ = src.Rollback(ctx)
	if err := dst.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, nw, `SELECT name FROM accounts WHERE id = 2`) + "/" + queryText(t, nw, `SELECT bio FROM profiles WHERE user_id = 4`); got != "mirrored/mirrored" {
		t.Errorf("the mirrored rows after the load: %s, want mirrored/mirrored", got)
	}
	// Every other row is the old row through its part.
	s.new(`UPDATE accounts SET name = 'u2', email = '2@x' WHERE id = 2; DELETE FROM profiles WHERE user_id = 4`)
	if got, want := queryText(t, nw, newAccounts), queryText(t, old, oldAccounts); got != want {
		t.Errorf("accounts = %s\nold = %s", got, want)
	}
	if got, want := queryText(t, nw, newProfiles), queryText(t, old, oldProfiles); got != want {
		t.Errorf("profiles = %s\nold = %s", got, want)
	}
}

// TestSplitReverse: after the flip, through the owner, old rows are
// upserted (only the owner's columns) and deleted; through a dependent,
// the part's columns are updated, and cleared for a key the part lacks; a
// dependent row whose old row is not there fails its copy (the repairer
// keeps the drift) until the owner's row is copied, then succeeds.
func TestSplitReverse(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(splitOld + `; INSERT INTO users VALUES (1, 'a', 'a@x', 'bio a', NULL), (2, 'b', NULL, 'bio b', '\x01'), (3, 'c', NULL, NULL, NULL)`)
	s.new(splitNew + `; INSERT INTO accounts VALUES (1, 'A', 'a@y'), (2, 'b', NULL), (4, 'd', NULL);
		INSERT INTO profiles VALUES (1, 'bio a', NULL), (3, 'bio c', NULL), (4, 'bio d', '\x04')`)
	old, nw := s.primary(), s.secondary()
	parts := splitMappings(t, old, nw, splitDecl()).PartsOf(Name{"public", "users"})
	owner, dep := parts[0], parts[1]

	// The dependent first: 4 has no old row yet.
	if _, err := CopyKeysMapped(ctx, nw, old, dep, false, [][]string{{"4"}}); err == nil || !strings.Contains(err.Error(), "owner of the split or merge has not written it yet") {
		t.Fatalf("a dependent row without its old row: err %v", err)
	}
	if got := queryText(t, old, `SELECT count(*)::text FROM users WHERE id = 4`); got != "0" {
		t.Fatalf("the failed copy left a row: %s", got)
	}
	// The owner: 1 updated (its columns only), 3 deleted (absent from
	// accounts), 4 inserted (the other columns their defaults).
	if _, err := CopyKeysMapped(ctx, nw, old, owner, false, [][]string{{"1"}, {"3"}, {"4"}}); err != nil {
		t.Fatal(err)
	}
	if got := queryText(t, old, `SELECT string_agg(id || '|' || name || '|' || coalesce(email, '-') || '|' || coalesce(bio, '-'), ',' ORDER BY id) FROM users`); got != "1|A|a@y|bio a,2|b|-|bio b,4|d|-|-" {
		t.Fatalf("old after the owner's copy = %s", got)
	}
	// Now the dependent: 4 gets its columns, 2 (no profile) is cleared.
	res, err := CopyKeysMapped(ctx, nw, old, dep, false, [][]string{{"4"}, {"2"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Upserted != 1 || res.Deleted != 1 {
		t.Errorf("dependent copy = %+v, want 1 upserted and 1 cleared", res)
	}
	if got := queryText(t, old, `SELECT string_agg(id || '|' || name || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY id) FROM users`); got != "1|A|bio a|-,2|b|-|-,4|d|bio d|04" {
		t.Fatalf("old after the dependent's copy = %s", got)
	}
	// Whole tables: old is both parts composed (profile 3 went with its
	// account: an orphan would fail its copy, as 4's did).
	s.new(`UPDATE profiles SET bio = 'changed' WHERE user_id = 1; INSERT INTO accounts VALUES (5, 'e', NULL); DELETE FROM profiles WHERE user_id = 3`)
	for _, m := range parts {
		if _, err := copyTableMappedOn(ctx, -1, nw, old, m, false, 2); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := queryText(t, old, oldAccounts), queryText(t, nw, newAccounts); got != want {
		t.Fatalf("old accounts = %s, new %s", got, want)
	}
	if got, want := queryText(t, old, oldProfiles), queryText(t, nw, newProfiles); got != want {
		t.Fatalf("old profiles = %s, new %s", got, want)
	}
}

// TestSplitReverseSQL: the statements the proxy applies a dependent's row
// images with after the flip, run: the update reports the keys without an
// old row, the clear resets the part's columns only.
func TestSplitReverseSQL(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(splitOld + `; INSERT INTO users VALUES (1, 'a', 'a@x', NULL, NULL), (2, 'b', 'b@x', 'bio', '\x02')`)
	s.new(splitNew)
	old, nw := s.primary(), s.secondary()
	dep := splitMappings(t, old, nw, splitDecl()).PartsOf(Name{"public", "users"})[1]
	sql, err := dep.ReverseUpdateSQL([]string{"user_id", "bio", "avatar"}, 2)
	if err != nil {
		t.Fatal(err)
	}
	rows, err := old.Query(ctx, sql, "1", "new bio", nil, "7", "x", nil)
	if err != nil {
		t.Fatal(err)
	}
	missing, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) != 1 || missing[0] != "7" {
		t.Fatalf("keys without an old row = %q, want [7]", missing)
	}
	if got := queryText(t, old, `SELECT name || '|' || email || '|' || bio FROM users WHERE id = 1`); got != "a|a@x|new bio" {
		t.Fatalf("updated row = %s", got)
	}
	if sql, err = dep.ReverseClearSQL([]string{"user_id"}, 2); err != nil {
		t.Fatal(err)
	}
	if rows, err = old.Query(ctx, sql, "2", "8"); err != nil {
		t.Fatal(err)
	}
	if missing, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		t.Fatal(err)
	}
	if len(missing) != 1 || missing[0] != "8" {
		t.Fatalf("keys without an old row to clear = %q, want [8]", missing)
	}
	if got := queryText(t, old, `SELECT name || '|' || email || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-') FROM users WHERE id = 2`); got != "b|b@x|-|-" {
		t.Fatalf("cleared row = %s", got)
	}
	if _, err := splitMappings(t, old, nw, splitDecl()).ForOld(Name{"public", "users"}).ReverseUpdateSQL([]string{"id", "name"}, 1); err == nil {
		t.Error("ReverseUpdateSQL of the owner: no error")
	}
}

// sameText fails the test unless each pair of queries (what, one over
// old, one over nw) gives the same text.
func sameText(t *testing.T, when string, old, nw *pgx.Conn, pairs ...[3]string) {
	t.Helper()
	for _, p := range pairs {
		if got, want := queryText(t, nw, p[2]), queryText(t, old, p[1]); got != want {
			t.Fatalf("%s: %s = %s\nold = %s", when, p[0], got, want)
		}
	}
}

// copyOnEveryPath copies m's old table whole, forward, in chunks of 7, on
// each copy path setting, and runs check after each.
func copyOnEveryPath(t *testing.T, old, nw *pgx.Conn, m *Mapping, check func(when string)) {
	t.Helper()
	for _, path := range copyPaths {
		if _, err := copyTableMappedOn(context.Background(), path.fastRows, old, nw, m, true, 7); err != nil {
			t.Fatal(err)
		}
		check("after the " + path.name + " copy")
	}
}
