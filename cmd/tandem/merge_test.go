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

// Rendered independently of the mapping: each old table, and the new users
// as each old table holds them (a profile is a user with a bio or an
// avatar), hashed, with their counts.
const (
	mergeOldAccounts = `SELECT coalesce(md5(string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id)), ''), count(*) FROM accounts`
	mergeNewAccounts = `SELECT coalesce(md5(string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id)), ''), count(*) FROM users`
	mergeOldProfiles = `SELECT coalesce(md5(string_agg(user_id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY user_id)), ''), count(*)
		FROM profiles WHERE bio IS NOT NULL OR avatar IS NOT NULL`
	mergeNewProfiles = `SELECT coalesce(md5(string_agg(id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY id)), ''), count(*)
		FROM users WHERE bio IS NOT NULL OR avatar IS NOT NULL`
)

// mergeLoad is random writes to accounts and profiles through the proxy,
// in the old schema: new accounts with and without a profile, a profile
// written before its account (alone and in one transaction), renames,
// profiles set, cleared and deleted, accounts deleted with their profile
// (in either order), and transactions of several.
type mergeLoad struct{ writerLoad }

func (l *mergeLoad) run(dsn string, writers int) {
	l.start(writers, func(w int) (string, string) { return fmt.Sprintf("writer %d", w), dsn },
		func(ctx context.Context, c *pgx.Conn, rnd *rand.Rand, next *int64) error {
			id := 1 + rnd.Int64N(3000)
			switch op := rnd.IntN(14); {
			case op < 2:
				*next++
				_, err := c.Exec(ctx, `INSERT INTO accounts VALUES ($1, 'new ' || $1::bigint, NULL)`, *next)
				return err
			case op < 3:
				// A profile before its account, in two autocommit writes.
				*next++
				if _, err := c.Exec(ctx, `INSERT INTO profiles VALUES ($1, 'early ' || $1::bigint, NULL)`, *next); err != nil {
					return err
				}
				_, err := c.Exec(ctx, `INSERT INTO accounts VALUES ($1, 'late ' || $1::bigint, NULL)`, *next)
				return err
			case op < 5:
				_, err := c.Exec(ctx, `UPDATE accounts SET name = name || '+', email = coalesce(email, 'e@x') WHERE id = $1`, id)
				return err
			case op < 7:
				// The account locked, or a concurrent delete of it would
				// leave an orphan profile (no foreign key here), which the
				// merged table cannot hold: open drift, rightly.
				_, err := c.Exec(ctx, `INSERT INTO profiles SELECT id, 'set ' || id, NULL FROM accounts WHERE id = $1 FOR SHARE
					ON CONFLICT (user_id) DO UPDATE SET bio = CASE WHEN profiles.bio IS NULL THEN excluded.bio END`, id)
				return err
			case op < 8:
				_, err := c.Exec(ctx, `UPDATE profiles SET avatar = CASE WHEN avatar IS NULL THEN '\x0102'::bytea END, bio = NULL WHERE user_id = $1`, id)
				return err
			case op < 9:
				_, err := c.Exec(ctx, `DELETE FROM profiles WHERE user_id = $1`, id)
				return err
			case op < 10:
				// The account and its profile, in either order; the
				// account locked first either way, as the application's
				// transactions all lock accounts before profiles.
				first, second := "accounts WHERE id", "profiles WHERE user_id"
				if rnd.IntN(2) == 0 {
					first, second = second, first
				}
				return pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, `SELECT FROM accounts WHERE id = $1 FOR UPDATE`, id); err != nil {
						return err
					}
					if _, err := tx.Exec(ctx, `DELETE FROM `+first+` = $1`, id); err != nil {
						return err
					}
					_, err := tx.Exec(ctx, `DELETE FROM `+second+` = $1`, id)
					return err
				})
			}
			return pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				*next++
				if _, err := tx.Exec(ctx, `INSERT INTO profiles VALUES ($1, 'tx bio', NULL)`, *next); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, `INSERT INTO accounts VALUES ($1, 'tx', NULL)`, *next); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, `UPDATE accounts SET name = name || '!' WHERE id IN ($1, $2)`, *next, id); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, `UPDATE profiles SET bio = bio || '!' WHERE user_id IN ($1, $2)`, *next, id)
				return err
			})
		})
}

// TestMerge is the merge example (deploy/examples/merge) end to end: 8
// random writers through the proxy, to both old tables, while the backfill
// runs; then the verify of each old table is clean; shadow reads of the
// owner match and those of the member are skipped; after the flip, writes
// to users are composed back on both old tables (a profile appears and
// goes with its columns); after the rollback, writes in the old schema
// again; and after every step accounts and profiles equal users seen as
// each.
func TestMerge(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := context.Background()
	ex, rp := startExample(t, oldC, newC, "merge", "merge-users.yaml", `INSERT INTO accounts SELECT g, 'user ' || g, CASE WHEN g % 2 = 0 THEN g || '@example.com' END FROM generate_series(1, 3000) g;
		INSERT INTO profiles SELECT g, CASE WHEN g % 3 = 0 THEN 'bio ' || g END, CASE WHEN g % 7 = 0 THEN decode(lpad(to_hex(g), 8, '0'), 'hex') END
		FROM generate_series(1, 3000) g WHERE g % 3 = 0 OR g % 7 = 0`, "merge-1", "")
	defer stopProxy(t, rp)
	file, oldDSN, dsn, api := ex.file, ex.oldDSN, ex.dsn, ex.api
	equal := func(when string) {
		t.Helper()
		ex.sameRows(t, when, [3]string{"accounts", mergeOldAccounts, mergeNewAccounts}, [3]string{"profiles", mergeOldProfiles, mergeNewProfiles})
	}
	noDrift := func() { t.Helper(); waitNoDrift(t, oldDSN, "merge", 15*time.Second) }

	// The snapshot path does not take a merge, and says so; a member is
	// backfilled by its owner.
	if out, errOut, err := cli("backfill", "-c", file, "--path", "snapshot"); err == nil || !strings.Contains(err.Error()+out+errOut, "merged with 1 other old tables") {
		t.Fatalf("backfill --path snapshot of a merge: %v, want a refusal naming the merge\n%s%s", err, out, errOut)
	}
	if out, errOut, err := cli("backfill", "-c", file, "--table", "profiles"); err == nil || !strings.Contains(err.Error()+out+errOut, "backfill public.accounts") {
		t.Fatalf("backfill --table profiles: %v, want a refusal naming the owner\n%s%s", err, out, errOut)
	}

	// The backfill under 8 writers.
	var load mergeLoad
	load.run(dsn, 8)
	waitFor(t, func() bool { return load.done() >= 200 })
	// --path auto takes the locked path for a merge, and says why.
	if out, errOut, err := cli("backfill", "-c", file, "--chunk", "500", "--path", "auto"); err != nil {
		t.Fatalf("tandem backfill: %v\n%s%s", err, out, errOut)
	} else if !strings.Contains(out, "path: locked") || !strings.Contains(out, "merged with 1 other old tables") {
		t.Fatalf("tandem backfill --path auto of a merge: want the locked path with the reason\n%s", out)
	}
	load.finishAfter(t, 200, "the proxy")
	noDrift()
	equal("after the backfill")
	ex.verifyClean(t, "after the backfill", "accounts", "profiles")

	// Shadow reads: the owner's read from users and match; a profile's
	// read is skipped with its reason.
	ex.shadowReads(t, "merge-1", []string{"SELECT coalesce(max(name), '') || coalesce(max(email), '') FROM accounts WHERE id = $1"},
		[]string{"SELECT coalesce(max(bio), '') FROM profiles WHERE user_id = $1"})
	verifyAll(t, file) // the flip's gate wants a clean last run of each old table

	// The flip; then writes in the new schema, composed on both old tables.
	res := api.change("/api/v1/route", `{"primary": "new", "reads": 100, "reason": "cutover"}`, "merge-1")
	if res.State.Primary != route.New {
		t.Fatalf("flip: %+v", res)
	}
	equal("flipped")
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	var withProfile, withoutProfile int64
	if err := c.QueryRow(ctx, `SELECT (SELECT min(id) FROM users WHERE bio IS NOT NULL), (SELECT min(id) FROM users WHERE bio IS NULL AND avatar IS NULL)`).Scan(&withProfile, &withoutProfile); err != nil {
		t.Fatal(err)
	}
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`INSERT INTO users VALUES (9000001, 'only an account', 'a@new', NULL, NULL), (9000002, 'both', NULL, 'a bio', '\xff'), (9000003, 'gone', NULL, 'x', NULL)`, nil},
		{`UPDATE users SET bio = NULL, avatar = NULL, name = 'no profile any more' WHERE id = $1`, []any{withProfile}},
		{`UPDATE users SET avatar = '\x01' WHERE id = $1`, []any{withoutProfile}},
		{`UPDATE users SET email = 'changed@new' WHERE id = 9000002`, nil},
		{`DELETE FROM users WHERE id = 9000003`, nil},
	} {
		if _, err := c.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatalf("after the flip: %s: %v", q.sql, err)
		}
	}
	c.Close(ctx)
	noDrift()
	equal("after writes to the new table")
	oc := mustConnect(t, oldDSN)
	var accounts, profiles string
	if err := oc.QueryRow(ctx, `SELECT string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id) FROM accounts WHERE id IN ($1, 9000001, 9000002, 9000003)`,
		withProfile).Scan(&accounts); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("%d|no profile any more|", withProfile); !strings.HasPrefix(accounts, want) ||
		!strings.HasSuffix(accounts, ",9000001|only an account|a@new,9000002|both|changed@new") {
		t.Fatalf("old accounts composed from users: %s", accounts)
	}
	if err := oc.QueryRow(ctx, `SELECT string_agg(user_id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY user_id)
		FROM profiles WHERE user_id IN ($1, $2, 9000001, 9000002, 9000003)`, withProfile, withoutProfile).Scan(&profiles); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("%d|-|01,9000002|a bio|ff", withoutProfile); profiles != want {
		t.Fatalf("old profiles composed from users: %s, want %s", profiles, want)
	}

	// The rollback; writes in the old schema again.
	res = api.change("/api/v1/rollback", `{"reason": "drill"}`, "merge-1")
	if res.State.Primary != route.Old {
		t.Fatalf("rollback: %+v", res)
	}
	after := mergeLoad{writerLoad{base: 10000000}}
	after.run(dsn, 2)
	waitFor(t, func() bool { return after.done() >= 100 })
	after.finish(t)
	noDrift()
	equal("rolled back")
	ex.verifyClean(t, "after the rollback", "accounts", "profiles")
}

// TestPlanMergePositions: `tandem plan` checks each table of a merge
// against the catalogs and reports a wrong one with its file, line and
// column; `tandem config check` reports the static mistakes the same way.
func TestPlanMergePositions(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, exampleFile(t, "merge", "old.sql"))
	mustExec(t, newC, exampleFile(t, "merge", "new.sql"))
	file, head, base := positionsConfig(t, oldC, newC, "plan-merge") // base: the lines before tables:
	appendFile(t, file, `tables:
  map:
    accounts:
      to: users
    profiles:
      merge_into: accounts
      rename: {user_id: uid}
`)
	out, errOut, err := cli("plan", "-c", file)
	if ec, ok := err.(exitCode); !ok || ec != 2 {
		t.Fatalf("plan: %v, want exit status 2\n%s%s", err, out, errOut)
	}
	want := fmt.Sprintf("%s:%d:5: ", file, base+5) + `tables.map[profiles]: public.profiles: new column "uid": rename names a column that public.users does not have (did you mean "id"?)`
	if !strings.Contains(out, want) {
		t.Errorf("plan output lacks\n  %s\n%s", want, out)
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte(head+`tables:
  map:
    accounts:
      to: users
    profiles:
      merge_into: acounts
`), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, err = cli("config", "check", "-c", bad)
	want = fmt.Sprintf("%s:%d:7: ", bad, base+6) + "tables.map[profiles].merge_into: names public.acounts, which has no entry in tables.map"
	if ec, ok := err.(exitCode); !ok || ec != 1 || !strings.Contains(out, want) {
		t.Fatalf("config check: %v, want\n  %s\n%s%s", err, want, out, errOut)
	}
}
