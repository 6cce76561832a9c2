package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"go.uber.org/goleak"
)

// splitTexts renders, independently of the mapping, the old users as each
// part holds them and the two new tables, hashed, with their counts.
const (
	splitOldAccounts = `SELECT coalesce(md5(string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id)), ''), count(*) FROM users`
	splitNewAccounts = `SELECT coalesce(md5(string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id)), ''), count(*) FROM accounts`
	splitOldProfiles = `SELECT coalesce(md5(string_agg(id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY id)), ''), count(*) FROM users WHERE bio IS NOT NULL OR avatar IS NOT NULL`
	splitNewProfiles = `SELECT coalesce(md5(string_agg(user_id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY user_id)), ''), count(*) FROM profiles`
)

func splitText(t *testing.T, dsn, sql string) string {
	t.Helper()
	ctx := context.Background()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var h string
	var n int
	if err := c.QueryRow(ctx, sql).Scan(&h, &n); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%d rows %s", n, h)
}

// splitLoad is random writes to users through the proxy, in the old
// schema: new users with and without a profile, renames, a bio set or
// cleared (a row moving in and out of profiles' where), deletes, and
// transactions of several.
type splitLoad struct{ writerLoad }

func (l *splitLoad) run(dsn string, writers int) {
	l.start(writers, func(w int) (string, string) { return fmt.Sprintf("writer %d", w), dsn },
		func(ctx context.Context, c *pgx.Conn, rnd *rand.Rand, next *int64) error {
			id := 1 + rnd.Int64N(3000)
			switch op := rnd.IntN(12); {
			case op < 2:
				*next++
				_, err := c.Exec(ctx, `INSERT INTO users VALUES ($1::bigint, 'new ' || $1::bigint, NULL, CASE WHEN $2::boolean THEN 'bio ' || $1::bigint END, NULL)`, *next, rnd.IntN(2) == 0)
				return err
			case op < 4:
				_, err := c.Exec(ctx, `UPDATE users SET name = name || '+', email = coalesce(email, 'e@x') WHERE id = $1`, id)
				return err
			case op < 6:
				_, err := c.Exec(ctx, `UPDATE users SET bio = CASE WHEN bio IS NULL THEN 'set ' || id END WHERE id = $1`, id)
				return err
			case op < 7:
				_, err := c.Exec(ctx, `UPDATE users SET avatar = CASE WHEN avatar IS NULL THEN '\x0102'::bytea END, bio = NULL WHERE id = $1`, id)
				return err
			case op < 8:
				_, err := c.Exec(ctx, `DELETE FROM users WHERE id = $1`, id)
				return err
			}
			return pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				*next++
				if _, err := tx.Exec(ctx, `INSERT INTO users VALUES ($1, 'tx', NULL, 'tx bio', NULL)`, *next); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, `UPDATE users SET bio = bio || '!', name = name || '!' WHERE id IN ($1, $2)`, *next, id); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, `INSERT INTO users VALUES ($1, 'upserted', NULL, NULL, NULL) ON CONFLICT (id) DO UPDATE SET bio = NULL, avatar = NULL`, id)
				return err
			})
		})
}

// TestSplit is the split example (deploy/examples/split) end to end, with
// each backfill path: 8 random writers through the proxy while the
// backfill runs (the snapshot path's loads and reconcile, or the locked
// path's units, write every part); then the
// verify of each part is clean; shadow reads of the owner's columns and of
// a dependent's match; after the flip, writes to one
// new table at a time are composed back on old (a profile written before
// its account is drift until the account comes, then repaired); after the
// rollback, writes in the old schema again; and after every step the old
// users, seen through each part, equal accounts and profiles.
func TestSplit(t *testing.T) {
	for _, path := range []string{"locked", "snapshot"} {
		t.Run(path, func(t *testing.T) { testSplit(t, path) })
	}
}

func testSplit(t *testing.T, path string) {
	oldC, newC := pgtest.NewPair(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := context.Background()
	ex, rp := startExample(t, oldC, newC, "split", "split-users.yaml", `INSERT INTO users SELECT g, 'user ' || g, CASE WHEN g % 2 = 0 THEN g || '@example.com' END,
		CASE WHEN g % 3 = 0 THEN 'bio ' || g END, CASE WHEN g % 7 = 0 THEN decode(lpad(to_hex(g), 8, '0'), 'hex') END FROM generate_series(1, 3000) g`, "split-1", "")
	defer stopProxy(t, rp)
	file, oldDSN, dsn, api := ex.file, ex.oldDSN, ex.dsn, ex.api
	equal := func(when string) {
		t.Helper()
		ex.sameRows(t, when, [3]string{"accounts", splitOldAccounts, splitNewAccounts}, [3]string{"profiles", splitOldProfiles, splitNewProfiles})
	}
	noDrift := func() { t.Helper(); waitNoDrift(t, oldDSN, "split", 15*time.Second) }

	// The backfill under 8 writers.
	var load splitLoad
	load.run(dsn, 8)
	waitFor(t, func() bool { return load.done() >= 200 })
	if out, errOut, err := cli("backfill", "-c", file, "--chunk", "500", "--path", path); err != nil || !strings.Contains(out, "path: "+path) {
		t.Fatalf("tandem backfill --path %s: %v\n%s%s", path, err, out, errOut)
	}
	load.finishAfter(t, 200, "the proxy")
	noDrift()
	equal("after the backfill")
	ex.verifyClean(t, "after the backfill", "accounts", "profiles")

	// Shadow reads: the owner's columns, and a profile's, read from the
	// old rows composed of accounts and profiles, match.
	ex.shadowReads(t, "split-1", []string{"SELECT coalesce(max(name), '') || coalesce(max(email), '') FROM users WHERE id = $1",
		"SELECT coalesce(max(bio), '') FROM users WHERE id = $1"}, nil)
	verifyAll(t, file) // the flip's gate wants a clean last run of each part

	// The flip; then writes in the new schema, to one new table at a time.
	res := api.change("/api/v1/route", `{"primary": "new", "reads": 100, "reason": "cutover"}`, "split-1")
	if res.State.Primary != route.New {
		t.Fatalf("flip: %+v", res)
	}
	equal("flipped")
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	var withProfile, withoutProfile, other int64
	if err := c.QueryRow(ctx, `SELECT (SELECT min(user_id) FROM profiles WHERE bio IS NOT NULL),
		(SELECT min(id) FROM accounts a WHERE NOT EXISTS (SELECT FROM profiles WHERE user_id = a.id)),
		(SELECT max(user_id) FROM profiles)`).Scan(&withProfile, &withoutProfile, &other); err != nil {
		t.Fatal(err)
	}
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`UPDATE profiles SET bio = 'rewritten' WHERE user_id = $1`, []any{withProfile}},
		{`INSERT INTO accounts VALUES (9000001, 'only an account', 'a@new')`, nil},
		{`UPDATE accounts SET email = 'changed@new' WHERE id = $1`, []any{withProfile}},
		{`INSERT INTO profiles VALUES ($1, 'a first profile', NULL)`, []any{withoutProfile}},
		{`DELETE FROM accounts WHERE id = (SELECT min(id) FROM accounts a WHERE id > $1 AND NOT EXISTS (SELECT FROM profiles WHERE user_id = a.id))`, []any{withoutProfile}},
		{`DELETE FROM profiles WHERE user_id = $1`, []any{other}},
		// A profile before its account: drift until the account comes.
		{`INSERT INTO profiles VALUES (9000002, 'early', '\xff')`, nil},
	} {
		if _, err := c.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatalf("after the flip: %s: %v", q.sql, err)
		}
	}
	ctl, err := pgx.Connect(ctx, oldDSN)
	if err != nil {
		t.Fatal(err)
	}
	var reason string
	if err := ctl.QueryRow(ctx, `SELECT reason FROM tandem.drift WHERE table_name = 'profiles' AND key = ARRAY['9000002'] ORDER BY id DESC LIMIT 1`).Scan(&reason); err != nil {
		t.Fatalf("no drift entry for the profile written before its account: %v", err)
	}
	if !strings.Contains(reason, "owner") {
		t.Errorf("drift reason %q", reason)
	}
	ctl.Close(ctx)
	if _, err := c.Exec(ctx, `INSERT INTO accounts VALUES (9000002, 'late account', NULL)`); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	noDrift()
	equal("after writes to the new tables")
	var composed string
	if err := pgx.BeginFunc(ctx, mustConnect(t, oldDSN), func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, `SELECT string_agg(id || '|' || name || '|' || coalesce(email, '-') || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY id)
			FROM users WHERE id IN (9000001, 9000002)`).Scan(&composed)
	}); err != nil {
		t.Fatal(err)
	}
	if composed != "9000001|only an account|a@new|-|-,9000002|late account|-|early|ff" {
		t.Fatalf("old rows composed from the new tables: %s", composed)
	}

	// The rollback; writes in the old schema again.
	res = api.change("/api/v1/rollback", `{"reason": "drill"}`, "split-1")
	if res.State.Primary != route.Old {
		t.Fatalf("rollback: %+v", res)
	}
	after := splitLoad{writerLoad{base: 10000000}}
	after.run(dsn, 2)
	waitFor(t, func() bool { return after.done() >= 100 })
	after.finish(t)
	noDrift()
	equal("rolled back")
	ex.verifyClean(t, "after the rollback", "accounts", "profiles")
}

func mustConnect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// TestPlanSplitPositions: `tandem plan` checks each part of a split
// against the catalogs and reports a wrong one with its file, line and
// column; `tandem config check` reports the static mistakes the same way.
func TestPlanSplitPositions(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, exampleFile(t, "split", "old.sql"))
	mustExec(t, newC, exampleFile(t, "split", "new.sql"))
	file, head, base := positionsConfig(t, oldC, newC, "plan-split") // base: the lines before tables:
	appendFile(t, file, `tables:
  map:
    users:
      split:
        - to: accounts
        - to: profiles
          rename: {id: userid}
`)
	out, errOut, err := cli("plan", "-c", file)
	if ec, ok := err.(exitCode); !ok || ec != 2 {
		t.Fatalf("plan: %v, want exit status 2\n%s%s", err, out, errOut)
	}
	want := fmt.Sprintf("%s:%d:11: ", file, base+6) + `tables.map[users].split[1]: public.users: new column "userid": rename names a column that public.profiles does not have (did you mean "user_id"?)`
	if !strings.Contains(out, want) {
		t.Errorf("plan output lacks\n  %s\n%s", want, out)
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte(head+`tables:
  map:
    users:
      split:
        - to: accounts
        - to: accounts
`), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, err = cli("config", "check", "-c", bad)
	want = fmt.Sprintf("%s:%d:11: ", bad, base+6) + "tables.map[users].split[1].to: public.accounts is already the new table of another part of this split"
	if ec, ok := err.(exitCode); !ok || ec != 1 || !strings.Contains(out, want) {
		t.Fatalf("config check: %v, want\n  %s\n%s%s", err, want, out, errOut)
	}
}
