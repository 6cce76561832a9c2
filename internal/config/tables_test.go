package config

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseTableName(t *testing.T) {
	tests := []struct {
		in, schema, table, err string
	}{
		{in: "users", schema: "public", table: "users"},
		{in: "Users", schema: "public", table: "users"},
		{in: "sales.Orders", schema: "sales", table: "orders"},
		{in: `"My Schema"."My Table"`, schema: "My Schema", table: "My Table"},
		{in: `"a""b".c`, schema: `a"b`, table: "c"},
		{in: `"x.y"`, schema: "public", table: "x.y"},
		{in: "", err: "empty table name"},
		{in: "a.b.c", err: "more than two parts"},
		{in: `"open`, err: "unterminated"},
		{in: `a"b`, err: "a double quote may only start a part"},
		{in: "my table", err: "white space"},
		{in: "a.", err: "empty part"},
		{in: `""`, err: "empty quoted identifier"},
		{in: `"a"b`, err: "expected a dot"},
		{in: "public.*", err: "looks like a pattern"},
	}
	for _, tt := range tests {
		s, n, err := ParseTableName(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ParseTableName(%q) error = %v, want %q", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil || s != tt.schema || n != tt.table {
			t.Errorf("ParseTableName(%q) = %q, %q, %v; want %q, %q", tt.in, s, n, err, tt.schema, tt.table)
		}
	}
	if s, n, err := ParseTablePattern(`"Big Schema".tmp_*`); err != nil || s != "Big Schema" || n != "tmp_*" {
		t.Errorf("ParseTablePattern = %q, %q, %v", s, n, err)
	}
	if s, n, err := ParseTablePattern("tmp_?"); err != nil || s != "public" || n != "tmp_?" {
		t.Errorf("ParseTablePattern = %q, %q, %v", s, n, err)
	}
	if _, _, err := ParseTablePattern("public.[a-"); err == nil || !strings.Contains(err.Error(), "not a valid glob pattern") {
		t.Errorf("bad glob: %v", err)
	}
}

func TestLoadTablesErrors(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    []string
	}{
		{"typo in a table entry", "tables:\n  map:\n    users:\n      renmae: {mail: email}\n",
			[]string{`t.yaml:4:7: unknown field "renmae" in tables.map[users] (did you mean "rename"?)`}},
		{"typo in the section", "tables:\n  inclde: [x]\n",
			[]string{`t.yaml:2:3: unknown field "inclde" in tables (did you mean "include"?)`}},
		{"unknown key lists the valid ones", "tables:\n  map:\n    users:\n      columns: {}\n",
			[]string{`t.yaml:4:7: unknown field "columns" in tables.map[users] (valid: to, rename, drop, compute, reverse, where, discriminator, split, merge_into)`}},
		{"discriminator is a list", "tables:\n  map:\n    orders:\n      discriminator: [tenant, shop]\n",
			[]string{`t.yaml:4:7: tables.map[orders].discriminator: must be a mapping (key: value), not a list`}},
		{"discriminator value is a mapping", "tables:\n  map:\n    orders:\n      discriminator:\n        tenant: {shop: 1}\n",
			[]string{`t.yaml:5:9: tables.map[orders].discriminator.tenant: must be a single value, not a mapping`}},
		{"where is a list", "tables:\n  map:\n    orders:\n      where: [a, b]\n",
			[]string{`t.yaml:4:7: tables.map[orders].where: must be a single value, not a list`}},
		{"section is a list", "tables: [users]\n",
			[]string{`t.yaml:1:1: tables: must be a mapping (key: value), not a list`}},
		{"include is a string", "tables:\n  include: public.*\n",
			[]string{`t.yaml:2:3: tables.include: must be a list of strings, not a single value`}},
		{"include item is a mapping", "tables:\n  include:\n    - public.*\n    - {a: b}\n",
			[]string{`t.yaml:4:7: tables.include[1]: must be a string, not a mapping`}},
		{"map is a list", "tables:\n  map: [users]\n",
			[]string{`t.yaml:2:3: tables.map: must be a mapping (key: value), not a list`}},
		{"entry is a list", "tables:\n  map:\n    users: [a]\n",
			[]string{`t.yaml:3:5: tables.map[users]: must be a mapping (key: value), not a list`}},
		{"rename is a list", "tables:\n  map:\n    users:\n      rename: [mail, email]\n",
			[]string{`t.yaml:4:7: tables.map[users].rename: must be a mapping (key: value), not a list`}},
		{"to is a mapping", "tables:\n  map:\n    users:\n      to: {a: b}\n",
			[]string{`t.yaml:4:7: tables.map[users].to: must be a single value, not a mapping`}},
		{"compute value is a list", "tables:\n  map:\n    users:\n      compute:\n        full_name: [a]\n",
			[]string{`t.yaml:5:9: tables.map[users].compute.full_name: must be a single value, not a list`}},
		{"compute value is empty", "tables:\n  map:\n    users:\n      compute:\n        full_name:\n",
			[]string{`t.yaml:5:9: tables.map[users].compute.full_name: must be a single value, not empty`}},
		{"duplicate table", "tables:\n  map:\n    users: {}\n    users: {to: x}\n",
			[]string{`t.yaml:4:5: key "users" appears twice in tables.map (first on line 3)`}},
		{"duplicate column", "tables:\n  map:\n    users:\n      rename:\n        mail: email\n        mail: e\n",
			[]string{`t.yaml:6:9: key "mail" appears twice in tables.map[users].rename (first on line 5)`}},
		{"duplicate section", "tables: {}\ntables: {}\n",
			[]string{`t.yaml:2:1: key "tables" appears twice in the top level of the file (first on line 1)`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, dir, "t.yaml", tt.content)
			t.Chdir(dir)
			_, err := Load("t.yaml", nil)
			got := problemStrings(problemsOf(t, err))
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

func TestLoadTablesMergeKeys(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "t.yaml", `
tables:
  map:
    public.base: &base
      drop: [legacy_flag]
      rename: {mail: email}
    users:
      <<: *base
      rename: {mail: e_mail}
`)
	cfg, err := Load(file, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := TableMap{Drop: []string{"legacy_flag"}, Rename: map[string]string{"mail": "e_mail"}}
	if got := cfg.Tables.Map["users"]; !reflect.DeepEqual(got, want) {
		t.Errorf("users = %+v, want %+v", got, want)
	}
}

func TestCheckTables(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "tandem.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
tables:
  include: ["public.*", "public.[a-"]
  exclude: ['"unterminated.*']
  map:
    users:
      to: accounts
      rename: {mail: email, other: email}
      drop: [mail, legacy_flag, legacy_flag]
      compute: {full_name: "", email: "lower(mail)"}
      reverse: {mail: "email"}
    public.users: {}
    orders: {to: accounts}
    "a.b.c": {}
`)
	got := problemStrings(Check(file, nil))
	want := []string{
		file + `:4:25: tables.include[1]: bad pattern: "[a-" is not a valid glob pattern (path.Match syntax: *, ?, [a-z], \ escapes)`,
		file + `:5:13: tables.exclude[0]: bad pattern: "\"unterminated.*" has an unterminated quoted identifier`,
		file + `:9:16: tables.map[users].rename.mail: new column "email" is both renamed to (from "mail") and computed`,
		file + `:9:29: tables.map[users].rename.other: "mail" and "other" are both renamed to "email"`,
		file + `:10:14: tables.map[users].drop[0]: column "mail" is both renamed (to "email") and dropped`,
		file + `:10:33: tables.map[users].drop[2]: column "legacy_flag" is listed twice`,
		file + `:11:17: tables.map[users].compute.full_name: empty expression`,
		file + `:12:17: tables.map[users].reverse.mail: old column "mail" is renamed, which already mirrors it back from "email"; remove its reverse expression`,
		file + `:13:5: tables.map[public.users]: names the same table as "users"`,
		file + `:14:14: tables.map[orders].to: public.accounts is already the new table of "users": one new table per old table, unless they are merged (merge_into names the owner's entry)`,
		file + `:15:5: tables.map[a.b.c]: bad table name: "a.b.c" has more than two parts; write schema.table`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

// TestCheckTableFilters: the static checks of where and discriminator,
// each reported at its key, and Position finding a declaration's key for
// the checks made against the stores.
func TestCheckTableFilters(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "tandem.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
tables:
  map:
    orders:
      where: ""
      discriminator: {tenant: shop, region: eu, "": x}
      compute: {region: "'eu'"}
    invoices:
      rename: {tenant_name: tenant}
      discriminator:
        tenant: billing
`)
	got := problemStrings(Check(file, nil))
	want := []string{
		file + `:6:7: tables.map[orders].where: empty predicate: remove where, or give SQL over the old row (e.g. region = 'eu')`,
		file + `:7:37: tables.map[orders].discriminator.region: new column "region" is both computed and a discriminator; a discriminator is a constant: remove one`,
		file + `:7:49: tables.map[orders].discriminator.: empty column name`,
		file + `:12:9: tables.map[invoices].discriminator.tenant: new column "tenant" is both renamed to (from "tenant_name") and a discriminator: remove one`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	cfg, _, _ := load(file, nil)
	for field, want := range map[string][2]int{
		"tables.map[orders].where":                {6, 7},
		"tables.map[orders].discriminator.tenant": {7, 23},
		"tables.map[invoices].discriminator.nope": {11, 7},
		"tables.map[invoices].where":              {9, 5},
	} {
		f, line, col, ok := cfg.Position(field)
		if !ok || f != file || line != want[0] || col != want[1] {
			t.Errorf("Position(%s) = %s:%d:%d %v, want %d:%d", field, f, line, col, ok, want[0], want[1])
		}
	}
	feedOn := writeFile(t, dir, "feed.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
feed:
  enabled: true
tables:
  map:
    orders:
      discriminator: {tenant: shop}
`)
	if got := problemStrings(Check(feedOn, nil)); len(got) != 1 || !strings.HasPrefix(got[0], feedOn+":8:7: tables.map[orders].discriminator: with feed.enabled") ||
		!strings.Contains(got[0], "feed.name: shop") {
		t.Errorf("feed with a discriminator and no feed.name: %v", got)
	}
	named := writeFile(t, dir, "named.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
feed:
  enabled: true
  name: shop
tables:
  map:
    orders:
      discriminator: {tenant: shop}
`)
	if got := problemStrings(Check(named, nil)); len(got) != 0 {
		t.Errorf("feed with a discriminator and feed.name: %v", got)
	}
	for _, name := range []string{"Shop", "shop-1", "a234567890123456789012345678901234567890x", "shop feed"} {
		bad := writeFile(t, dir, "bad.yaml", "old:\n  dsn: \"postgres://app@localhost/app?sslmode=disable\"\nfeed:\n  name: \""+name+"\"\n")
		if got := problemStrings(Check(bad, nil)); len(got) != 1 || !strings.Contains(got[0], "feed.name: ") {
			t.Errorf("feed.name %q: %v", name, got)
		}
	}
	if _, _, _, ok := cfg.Position("limits.nothing"); ok {
		t.Error("Position of a field not in the file: ok")
	}
}

// TestCheckSplit: the static checks of a split, each at its key: parts
// beside declarations, too few parts, two parts (or a part and another
// entry) writing one new table, a filtered owner and a nested split. The
// change feed (feed.enabled) is no problem: it checks a split's changes
// through every part.
func TestCheckSplit(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "tandem.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
feed:
  enabled: true
tables:
  map:
    users:
      to: people
      split:
        - to: accounts
          where: "name IS NOT NULL"
        - to: profiles
          rename: {id: user_id}
        - to: accounts
    orders:
      split:
        - to: orders_head
    items:
      to: profiles
    notes:
      split:
        - to: notes_a
        - to: notes_b
          split: [{to: x}]
        - to: notes_c
          discriminator: {tenant: a}
`)
	got := problemStrings(Check(file, nil))
	want := []string{
		file + `:8:7: tables.map[users].to: to beside split: declare it in the part it belongs to`,
		file + `:11:11: tables.map[users].split[0].where: the first part is the owner, whose new table holds every row of the old table: put the where on a later part`,
		file + `:14:11: tables.map[users].split[2].to: public.accounts is already the new table of another part of this split: each part writes a new table of its own`,
		file + `:16:7: tables.map[orders].split: a split needs two parts or more, not 1: one new table is an ordinary mapping (to, rename, ...)`,
		file + `:19:7: tables.map[items].to: public.profiles is already the new table of "users": one new table per old table, unless they are merged (merge_into names the owner's entry)`,
		file + `:24:11: tables.map[notes].split[1].split: a part cannot be split again: list every new table in one split`,
		file + `:26:11: tables.map[notes].split[2].discriminator: a split part cannot carry a discriminator (a split into new tables others share is not supported)`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	cfg, _, _ := load(file, nil)
	for field, want := range map[string][2]int{
		"tables.map[users].split[1].rename.id": {13, 20},
		"tables.map[users].split[1].to":        {12, 11},
		"tables.map[users].split[1]":           {12, 11},
		"tables.map[users].split[1].drop":      {12, 11},
	} {
		f, line, col, ok := cfg.Position(field)
		if !ok || f != file || line != want[0] || col != want[1] {
			t.Errorf("Position(%s) = %s:%d:%d %v, want %d:%d", field, f, line, col, ok, want[0], want[1])
		}
	}
}

func TestCheckMerge(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "tandem.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
tables:
  map:
    accounts:
      to: users
    profiles:
      merge_into: accounts
      rename: {user_id: id}
    avatars:
      merge_into: accounts
      to: people
      where: "url IS NOT NULL"
    notes:
      merge_into: profiles
    tags:
      merge_into: nobody
    self:
      merge_into: self
    parts:
      split:
        - to: parts_a
        - to: parts_b
    bits:
      merge_into: parts
    orders:
      to: users
`)
	got := problemStrings(Check(file, nil))
	want := []string{
		file + `:12:7: tables.map[avatars].to: is public.people, but "accounts" (merge_into) maps to public.users: a member writes the owner's new table (leave to out)`,
		file + `:13:7: tables.map[avatars].where: a table of a merge cannot carry a where: a member's row exists on old when one of the columns it writes is not NULL`,
		file + `:15:7: tables.map[notes].merge_into: names "profiles", which is merged into "accounts" itself: name the owner`,
		file + `:17:7: tables.map[tags].merge_into: names public.nobody, which has no entry in tables.map: declare the owner's mapping to the merged table (its to)`,
		file + `:19:7: tables.map[self].merge_into: names this entry itself: name the entry of the table that owns the merged rows`,
		file + `:21:7: tables.map[parts].split: a split table cannot own a merge (another entry's merge_into names it): merge into a table mapped to one new table`,
		file + `:27:7: tables.map[orders].to: public.users is already the new table of "accounts": one new table per old table, unless they are merged (merge_into names the owner's entry)`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	// The example's declaration is clean, with the change feed too (it checks a change of
	// the merged new table through every table of the merge).
	ok := writeFile(t, dir, "ok.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
feed:
  enabled: true
tables:
  map:
    accounts: {to: users}
    profiles: {merge_into: accounts, rename: {user_id: id}}
`)
	got = problemStrings(Check(ok, nil))
	if len(got) != 0 {
		t.Errorf("the example with the change feed: %v", got)
	}
}
