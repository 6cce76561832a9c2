package main

import (
	"context"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"go.uber.org/goleak"
)

// TestSplitFeed runs the split example with the change feed on. Writes
// made straight to the stores, which the proxy never sees, reach the other
// side only through the feed: before the flip, a change to users on old is
// checked through every part (a bio set moves a user into profiles, a bio
// cleared moves one out, a rename is the owner's) and repaired into
// accounts and profiles; after the flip, a change to either new table on
// new is checked through its part and composed back into users on old.
func TestSplitFeed(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := context.Background()
	ex, rp := startExample(t, oldC, newC, "split", "split-users.yaml", `INSERT INTO users SELECT g, 'user ' || g, NULL,
		CASE WHEN g % 3 = 0 THEN 'bio ' || g END, NULL FROM generate_series(1, 300) g`, "split-feed", "feed:\n  enabled: true\n")
	defer stopProxy(t, rp)
	file, oldDSN, newDSN, api := ex.file, ex.oldDSN, ex.newDSN, ex.api
	backfillAll(t, file) // waits for the feed's slot on old

	pairs := [][3]string{{"accounts", splitOldAccounts, splitNewAccounts}, {"profiles", splitOldProfiles, splitNewProfiles}}
	equalSoon := func(when string) { t.Helper(); ex.sameRowsSoon(t, when, pairs...) }
	equalSoon("after the backfill")

	// Straight to old: into profiles (user 1 had no bio), out of it (user
	// 3 had one), a dependent's column changed (6), an owner's column (2),
	// a new user with a profile, and a delete of a user with a profile.
	direct(t, oldDSN,
		`UPDATE users SET bio = 'direct' WHERE id = 1`,
		`UPDATE users SET bio = NULL WHERE id = 3`,
		`UPDATE users SET avatar = '\x0a0b' WHERE id = 6`,
		`UPDATE users SET name = 'renamed on old', email = 'direct@old' WHERE id = 2`,
		`INSERT INTO users VALUES (5000, 'direct user', NULL, 'direct bio', NULL)`,
		`DELETE FROM users WHERE id = 9`)
	equalSoon("after direct writes on old")
	verifyAll(t, file)

	if res := api.change("/api/v1/route", `{"primary": "new", "reads": 100, "reason": "cutover"}`, "split-feed"); res.State.Primary != route.New {
		t.Fatalf("flip: %+v", res)
	}
	// Straight to new, one new table at a time.
	direct(t, newDSN,
		`UPDATE profiles SET bio = 'rewritten on new' WHERE user_id = 12`,
		`DELETE FROM profiles WHERE user_id = 15`,
		`UPDATE accounts SET email = 'direct@new' WHERE id = 4`,
		`INSERT INTO accounts VALUES (6000, 'account on new', NULL)`,
		`INSERT INTO profiles VALUES (6000, 'profile on new', '\xff')`,
		`DELETE FROM accounts WHERE id = 7`)
	equalSoon("after direct writes on new")
	var composed string
	c := mustConnect(t, oldDSN)
	defer c.Close(ctx)
	if err := c.QueryRow(ctx, `SELECT string_agg(id || '|' || name || '|' || coalesce(email, '-') || '|' || coalesce(bio, '-') || '|' || coalesce(encode(avatar, 'hex'), '-'), ',' ORDER BY id)
		FROM users WHERE id IN (4, 6000)`).Scan(&composed); err != nil {
		t.Fatal(err)
	}
	if composed != "4|user 4|direct@new|-|-,6000|account on new|-|profile on new|ff" {
		t.Fatalf("old rows composed from direct writes on new: %s", composed)
	}
}
