package proxy

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
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
	oc, err := pgx.Connect(ctx, e.old.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer oc.Close(ctx)
	nc, err := pgx.Connect(ctx, e.new.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close(ctx)
	ms, probs, err := table.LoadMappings(ctx, cfg, oc, nc)
	if err != nil || len(probs) > 0 {
		t.Fatalf("LoadMappings: %v %v", probs, err)
	}
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
