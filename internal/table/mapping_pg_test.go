package table

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
)

var usersDecl = config.TableMap{
	To:      "accounts",
	Drop:    []string{"legacy_flag"},
	Compute: map[string]string{"full_name": "first_name || ' ' || last_name"},
	Reverse: map[string]string{
		"first_name": "split_part(full_name, ' ', 1)",
		"last_name":  "substr(full_name, length(split_part(full_name, ' ', 1)) + 2)",
	},
}

func usersPair(t *testing.T) (*stores, *pgx.Conn, *pgx.Conn) {
	s := newStores(t)
	s.old(`CREATE TABLE users (id int PRIMARY KEY, first_name text, last_name text, email varchar(50), legacy_flag bool)`)
	s.new(`CREATE TABLE accounts (id int PRIMARY KEY, full_name text, email text, created_at timestamptz DEFAULT now())`)
	return s, s.primary(), s.secondary()
}

func exec(t *testing.T, q *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := q.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func TestMappingOnStores(t *testing.T) {
	ctx := context.Background()
	_, old, nw := usersPair(t)
	ms, probs, err := LoadMappings(ctx, config.Tables{Map: map[string]config.TableMap{"users": usersDecl}}, old, nw)
	if err != nil {
		t.Fatal(err)
	}
	if len(probs) != 0 {
		t.Fatalf("problems: %v", probs)
	}
	users := Name{"public", "users"}
	m := ms.ForOld(users)
	if m == nil || ms.ForNew(Name{"public", "accounts"}) != m || !ms.InScope(users) {
		t.Fatalf("mapping of users not found")
	}

	// Forward: two rows, as text parameters, then an update of one.
	cols := []string{"id", "first_name", "last_name", "email", "legacy_flag"}
	up, err := m.ForwardUpsertSQL(cols, 2)
	if err != nil {
		t.Fatal(err)
	}
	exec(t, nw, up, "1", "Ada", "Lovelace", "ada@example.com", "true", "2", "Alan", "Mathison Turing", "alan@example.com", nil)
	up1, _ := m.ForwardUpsertSQL(cols, 1)
	exec(t, nw, up1, "1", "Ada", "King", "ada@example.org", "false")
	rows, _ := nw.Query(ctx, `SELECT id::text || '|' || full_name || '|' || email || '|' || (created_at IS NOT NULL)::text FROM accounts ORDER BY id`)
	got, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"1|Ada King|ada@example.org|true", "2|Alan Mathison Turing|alan@example.com|true"}; !slices.Equal(got, want) {
		t.Errorf("accounts = %q, want %q", got, want)
	}
	del, _ := m.ForwardDeleteSQL(cols, 1)
	exec(t, nw, del, "2", "Alan", "Mathison Turing", "alan@example.com", nil)
	var n int
	if err := nw.QueryRow(ctx, "SELECT count(*) FROM accounts").Scan(&n); err != nil || n != 1 {
		t.Errorf("after the delete: %d rows, %v", n, err)
	}

	// Reverse: a row written on new comes back to old, split again.
	rup, err := m.ReverseUpsertSQL([]string{"id", "full_name", "email", "created_at"}, 1)
	if err != nil {
		t.Fatal(err)
	}
	exec(t, old, rup, "7", "Grace Brewster Hopper", "grace@example.com", "2024-01-02 03:04:05+00")
	var first, last, email string
	var flag *bool
	if err := old.QueryRow(ctx, "SELECT first_name, last_name, email, legacy_flag FROM users WHERE id = 7").Scan(&first, &last, &email, &flag); err != nil {
		t.Fatal(err)
	}
	if first != "Grace" || last != "Brewster Hopper" || email != "grace@example.com" || flag != nil {
		t.Errorf("old row = %q %q %q %v", first, last, email, flag)
	}
	rdel, _ := m.ReverseDeleteSQL([]string{"id"}, 1)
	exec(t, old, rdel, "7")

	// Verify hashes: equal for a mapped pair, different once a value differs.
	exec(t, old, "INSERT INTO users VALUES (1, 'Ada', 'King', 'ada@example.org', false)")
	hashOf := func(q *pgx.Conn, side, table string) string {
		h, err := m.HashSQL(side)
		if err != nil {
			t.Fatal(err)
		}
		var s string
		if err := q.QueryRow(ctx, "SELECT "+h+" FROM "+table+" t WHERE id = 1").Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	if ho, hn := hashOf(old, "old", "users"), hashOf(nw, "new", "accounts"); ho != hn {
		t.Errorf("hashes differ for a mapped pair: %s %s", ho, hn)
	}
	exec(t, nw, "UPDATE accounts SET email = 'other@example.org' WHERE id = 1")
	if ho, hn := hashOf(old, "old", "users"), hashOf(nw, "new", "accounts"); ho == hn {
		t.Errorf("hashes equal after a change: %s", ho)
	}
}

func TestLoadMappingsProblems(t *testing.T) {
	ctx := context.Background()
	s, old, nw := usersPair(t)
	s.old(`CREATE TYPE mood AS ENUM ('ok'); CREATE TABLE "Odd ""T""" (id int PRIMARY KEY, m mood, n int); CREATE TABLE nokey (id int PRIMARY KEY, v text)`)
	s.new(`CREATE TABLE "Odd ""T""" (id int PRIMARY KEY, m text, n date); CREATE TABLE nokey (id int, v text)`)
	s.old(`CREATE TABLE bad_expr (id int PRIMARY KEY, a text); CREATE TABLE tmp_x (id int)`)
	s.new(`CREATE TABLE bad_expr (id int PRIMARY KEY, b text)`)
	check := func(cfg config.Tables, want ...string) []Problem {
		t.Helper()
		_, probs, err := LoadMappings(ctx, cfg, old, nw)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, p := range probs {
			got = append(got, p.String())
		}
		if len(got) != len(want) {
			t.Fatalf("problems:\n  %s\nwant %d matching\n  %s", strings.Join(got, "\n  "), len(want), strings.Join(want, "\n  "))
		}
		for i := range want {
			if !strings.Contains(got[i], want[i]) {
				t.Errorf("problem %d = %s\nwant it to contain %s", i, got[i], want[i])
			}
		}
		return probs
	}
	typo := usersDecl
	typo.Rename = map[string]string{"emial": "email"}
	noReverse := usersDecl
	noReverse.Reverse = nil
	check(config.Tables{
		Exclude: []string{"tmp_*"},
		Map: map[string]config.TableMap{
			"users":    typo,
			"bad_expr": {Compute: map[string]string{"b": "upper(a) +"}, Drop: []string{"a"}},
		},
	},
		`public.Odd "T": new column "n": cannot take old column "n" (integer) as date`,
		`public.Odd "T": old column "n": cannot take new column "n" (date) as integer`,
		`public.bad_expr: new column "b": compute: expression "upper(a) +" does not parse`,
		`public.nokey (new): public.nokey has no primary key`,
		`public.users: old column "emial": rename names a column that public.users does not have (did you mean "email"?)`,
	)
	probs := check(config.Tables{
		Include: []string{"public.*"},
		Exclude: []string{"tmp_*", "nokey", `"Odd ""T"""`},
		Map: map[string]config.TableMap{
			"users":    noReverse,
			"bad_expr": {Compute: map[string]string{"b": "upper(a) + 1"}, Drop: []string{"a"}},
		},
	},
		`public.bad_expr: new column "b": expression "upper(a) + 1" does not compile on the new store: operator does not exist: text + integer`,
		`public.users: old column "first_name": cannot be derived from a new row`,
		`public.users: old column "last_name": cannot be derived from a new row`,
	)
	if probs[0].FlipOnly || !probs[1].FlipOnly || !probs[2].FlipOnly {
		t.Errorf("FlipOnly flags: %+v", probs)
	}
	// The uncastable type: old n int -> new n date; and a type that does not exist on new.
	check(config.Tables{Include: []string{`"Odd ""T"""`}},
		`public.Odd "T": new column "n": cannot take old column "n" (integer) as date`,
		`public.Odd "T": old column "n": cannot take new column "n" (date) as integer`)
}
