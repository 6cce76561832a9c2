package main

import (
	"context"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"go.uber.org/goleak"
)

// TestMergeFeed runs the merge example with the change feed on. Writes
// made straight to the stores reach the other side only through the feed:
// before the flip, a change to accounts or to profiles on old is checked
// through its own table's mapping and repaired into users (a profile
// written with its account waits for the account's repair); after the
// flip, a change to users on new is checked through every table of the
// merge and composed back on accounts and profiles.
func TestMergeFeed(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := context.Background()
	ex, rp := startExample(t, oldC, newC, "merge", "merge-users.yaml", `INSERT INTO accounts SELECT g, 'user ' || g, NULL FROM generate_series(1, 300) g;
		INSERT INTO profiles SELECT g, 'bio ' || g, NULL FROM generate_series(1, 300) g WHERE g % 3 = 0`, "merge-feed", "feed:\n  enabled: true\n")
	defer stopProxy(t, rp)
	backfillAll(t, ex.file) // waits for the feed's slot on old
	pairs := [][3]string{{"accounts", mergeOldAccounts, mergeNewAccounts}, {"profiles", mergeOldProfiles, mergeNewProfiles}}
	equalSoon := func(when string) { t.Helper(); ex.sameRowsSoon(t, when, pairs...) }
	equalSoon("after the backfill")

	// Straight to old: an owner's column, a first profile, a profile's
	// columns changed, a profile deleted, an account with its profile, and
	// an account deleted with its profile.
	direct(t, ex.oldDSN,
		`UPDATE accounts SET name = 'renamed on old', email = 'direct@old' WHERE id = 2`,
		`INSERT INTO profiles VALUES (1, 'first profile', NULL)`,
		`UPDATE profiles SET bio = NULL, avatar = '\x0a0b' WHERE user_id = 3`,
		`DELETE FROM profiles WHERE user_id = 6`,
		`INSERT INTO accounts VALUES (5000, 'direct account', NULL); INSERT INTO profiles VALUES (5000, 'direct profile', NULL)`,
		`DELETE FROM profiles WHERE user_id = 9; DELETE FROM accounts WHERE id = 9`)
	equalSoon("after direct writes on old")
	verifyAll(t, ex.file)

	if res := ex.api.change("/api/v1/route", `{"primary": "new", "reads": 100, "reason": "cutover"}`, "merge-feed"); res.State.Primary != route.New {
		t.Fatalf("flip: %+v", res)
	}
	// Straight to new: a profile's column, a profile emptied (its old row
	// goes), an account's column, a new user with a profile, and a user
	// deleted.
	direct(t, ex.newDSN,
		`UPDATE users SET bio = 'rewritten on new' WHERE id = 12`,
		`UPDATE users SET bio = NULL, avatar = NULL WHERE id = 15`,
		`UPDATE users SET email = 'direct@new' WHERE id = 4`,
		`INSERT INTO users VALUES (6000, 'user on new', NULL, 'bio on new', '\xff')`,
		`DELETE FROM users WHERE id = 18`)
	equalSoon("after direct writes on new")
	c := mustConnect(t, ex.oldDSN)
	defer c.Close(ctx)
	var composed string
	if err := c.QueryRow(ctx, `SELECT (SELECT string_agg(id || '|' || name || '|' || coalesce(email, '-'), ',' ORDER BY id) FROM accounts WHERE id IN (4, 6000, 18)) || ' / ' ||
		(SELECT string_agg(user_id || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY user_id) FROM profiles WHERE user_id IN (12, 15, 18, 6000))`).Scan(&composed); err != nil {
		t.Fatal(err)
	}
	if want := "4|user 4|direct@new,6000|user on new|- / 12|rewritten on new|-,6000|bio on new|ff"; composed != want {
		t.Fatalf("old rows composed from direct writes on new:\n got %s\nwant %s", composed, want)
	}
}
