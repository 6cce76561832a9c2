package table

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
)

// goldenMeta is a hand-built Meta: "s x"."t""1" with key ("id", "Na me").
var goldenMeta = &Meta{
	Name: Name{Schema: "s x", Table: `t"1`},
	Columns: []Column{
		{Name: "id", Type: "integer", ParamType: "integer", Identity: 'a'},
		{Name: "v", Type: "character varying(5)", ParamType: "character varying"},
		{Name: "g", Type: "integer", ParamType: "integer", Generated: true},
		{Name: "Na me", Type: "text", ParamType: "text"},
		{Name: `q"`, Type: "app.mood", ParamType: "app.mood"},
	},
	Key: []int{0, 3},
}

func TestUpsertSQL(t *testing.T) {
	single := &Meta{
		Name:    Name{"public", "t"},
		Columns: []Column{{Name: "id", ParamType: "bigint"}, {Name: "v", ParamType: "text"}, {Name: "w", ParamType: "integer", Identity: 'a'}},
		Key:     []int{0},
	}
	cases := []struct {
		name string
		m    *Meta
		cols []string
		rows int
		want string // or the error's substring, after "ERR "
	}{
		{"composite key, identity always", goldenMeta, []string{"id", "Na me", "v", `q"`}, 2,
			`INSERT INTO "s x"."t""1" ("id","Na me","v","q""") OVERRIDING SYSTEM VALUE VALUES ` +
				`($1::integer,$2::text,$3::character varying,$4::app.mood),($5::integer,$6::text,$7::character varying,$8::app.mood) ` +
				`ON CONFLICT ("id","Na me") DO UPDATE SET "v" = EXCLUDED."v", "q""" = EXCLUDED."q"""`},
		{"only key columns", goldenMeta, []string{"Na me", "id"}, 1,
			`INSERT INTO "s x"."t""1" ("Na me","id") OVERRIDING SYSTEM VALUE VALUES ($1::text,$2::integer) ON CONFLICT ("id","Na me") DO NOTHING`},
		{"single key", single, []string{"id", "v"}, 3,
			`INSERT INTO "public"."t" ("id","v") VALUES ($1::bigint,$2::text),($3::bigint,$4::text),($5::bigint,$6::text) ` +
				`ON CONFLICT ("id") DO UPDATE SET "v" = EXCLUDED."v"`},
		{"identity always is never updated", single, []string{"id", "w"}, 1,
			`INSERT INTO "public"."t" ("id","w") OVERRIDING SYSTEM VALUE VALUES ($1::bigint,$2::integer) ON CONFLICT ("id") DO NOTHING`},
		{"generated", goldenMeta, []string{"id", "Na me", "g"}, 1, `ERR column "g" of s x.t"1 is generated`},
		{"missing key column", goldenMeta, []string{"id", "v"}, 1, `ERR key column "Na me" is missing`},
		{"unknown column", goldenMeta, []string{"id", "Na me", "nope"}, 1, `ERR has no column "nope"`},
		{"twice", goldenMeta, []string{"id", "Na me", "id"}, 1, `ERR listed twice`},
		{"no rows", goldenMeta, []string{"id", "Na me"}, 0, `ERR at least one row`},
		{"too many params", goldenMeta, []string{"id", "Na me"}, 40000, `ERR exceed 65535 parameters`},
		{"no key", &Meta{Name: Name{"public", "nk"}, Columns: []Column{{Name: "a"}}}, []string{"a"}, 1, `ERR has no primary key`},
	}
	for _, tc := range cases {
		got, err := UpsertSQL(tc.m, tc.cols, tc.rows)
		if want, ok := strings.CutPrefix(tc.want, "ERR "); ok {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: got %q, %v; want error %q", tc.name, got, err, want)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s:\n got %s (%v)\nwant %s", tc.name, got, err, tc.want)
		}
	}
}

func TestDeleteSQL(t *testing.T) {
	single := &Meta{Name: Name{"public", `T"`}, Columns: []Column{{Name: "Id", ParamType: "uuid"}}, Key: []int{0}}
	cases := []struct {
		m    *Meta
		rows int
		want string
	}{
		{goldenMeta, 2, `DELETE FROM "s x"."t""1" WHERE ("id","Na me") IN (($1::integer,$2::text),($3::integer,$4::text))`},
		{single, 1, `DELETE FROM "public"."T""" WHERE "Id" IN ($1::uuid)`},
		{single, 3, `DELETE FROM "public"."T""" WHERE "Id" IN ($1::uuid,$2::uuid,$3::uuid)`},
	}
	for _, tc := range cases {
		if got, err := DeleteSQL(tc.m, tc.rows); err != nil || got != tc.want {
			t.Errorf("\n got %s (%v)\nwant %s", got, err, tc.want)
		}
	}
	if _, err := DeleteSQL(&Meta{Name: Name{"public", "nk"}, Columns: []Column{{Name: "a"}}}, 1); err == nil {
		t.Error("DeleteSQL on a table without a key succeeded")
	}
	if _, err := DeleteSQL(single, 0); err == nil {
		t.Error("DeleteSQL of no rows succeeded")
	}
}

// TestUpsertExecuted applies rows of many types with UpsertSQL on a real
// store: applying them twice leaves identical rows, applying changed rows
// updates them, and DeleteSQL removes rows by key. Parameters are text, as
// row images arrive; the casts make Postgres parse them.
func TestUpsertExecuted(t *testing.T) {
	s := newStores(t)
	s.old(`
		CREATE SCHEMA "Sch ""1""";
		CREATE TYPE "Sch ""1""".mood AS ENUM ('sad', 'ok', 'happy');
		CREATE TABLE "Sch ""1"""."Tbl ""x"" y" (
			"Id" int GENERATED ALWAYS AS IDENTITY,
			"Na""me" text,
			big bigint,
			"my num" numeric(12,4),
			f float8,
			ts timestamptz,
			u uuid,
			doc jsonb,
			b bytea,
			m "Sch ""1""".mood,
			tags text[],
			short varchar(5),
			doubled float8 GENERATED ALWAYS AS (f * 2) STORED,
			PRIMARY KEY ("Id", "Na""me"))`)
	conn := s.primary()
	ctx := context.Background()
	m, err := LoadByName(ctx, conn, hostile)
	if err != nil {
		t.Fatal(err)
	}
	cols := []string{"Id", `Na"me`, "big", "my num", "f", "ts", "u", "doc", "b", "m", "tags", "short"}
	rows := [][]any{
		{"1", `a "quoted", name`, "9223372036854775807", "12345678.1234", "0.1", "2024-02-29 23:59:59.123456+00",
			"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", `{"k": [1, 2.5, "x"], "n": null}`, `\x00ff10`, "happy", `{a,"b c",NULL}`, "abc"},
		{"2", "second", "-1", "-0.0001", "1.0000000000000002", "infinity", "00000000-0000-0000-0000-000000000000", `[]`, `\x`, "sad", `{}`, ""},
		{"3", "", "0", "NaN", "-Infinity", "1999-12-31 23:00:00-05", "ffffffff-ffff-ffff-ffff-ffffffffffff", `"s"`, `\x5c`, "ok", `{"{"}`, "x"},
	}
	apply := func(rows [][]any) {
		t.Helper()
		sql, err := UpsertSQL(m, cols, len(rows))
		if err != nil {
			t.Fatal(err)
		}
		var args []any
		for _, r := range rows {
			args = append(args, r...)
		}
		if _, err := conn.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	order := `"Id", "Na""me"`
	apply(rows)
	first, n := hash(t, conn, hostile, order)
	if n != 3 {
		t.Fatalf("%d rows after the first apply", n)
	}
	apply(rows)
	if again, n := hash(t, conn, hostile, order); again != first || n != 3 {
		t.Fatalf("applying twice changed the table: %s (%d rows) vs %s", again, n, first)
	}
	var f, doubled float64
	var tags []*string
	if err := conn.QueryRow(ctx, `SELECT f, doubled, tags FROM `+hostile.Quoted()+` WHERE "Id" = 2`).Scan(&f, &doubled, &tags); err != nil {
		t.Fatal(err)
	}
	if f != 1.0000000000000002 || doubled != 2.0000000000000004 {
		t.Errorf("float8 not exact: %v %v", f, doubled)
	}

	changed := [][]any{{"2", "second", "7", "1.5", "2.5", "2000-01-01 00:00:00+00", "00000000-0000-0000-0000-000000000001", `{"v": 2}`, `\x01`, "ok", `{z}`, "yz"}}
	apply(changed)
	var big int64
	var short string
	if err := conn.QueryRow(ctx, `SELECT big, short FROM `+hostile.Quoted()+` WHERE "Id" = 2`).Scan(&big, &short); err != nil || big != 7 || short != "yz" {
		t.Fatalf("after update: big %d short %q (%v)", big, short, err)
	}

	// A value too long for varchar(5) is refused, not truncated.
	tooLong := [][]any{{"4", "x", "0", "0", "0", "2000-01-01Z", "00000000-0000-0000-0000-000000000004", `{}`, `\x`, "ok", `{}`, "abcdefgh"}}
	sql, _ := UpsertSQL(m, cols, 1)
	if _, err := conn.Exec(ctx, sql, tooLong[0]...); err == nil || !strings.Contains(err.Error(), "too long") {
		t.Errorf("over-long varchar: %v, want a refusal", err)
	}

	del, err := DeleteSQL(m, 2)
	if err != nil {
		t.Fatal(err)
	}
	tag, err := conn.Exec(ctx, del, "1", `a "quoted", name`, "3", "")
	if err != nil || tag.RowsAffected() != 2 {
		t.Fatalf("%s: %v, %v", del, tag, err)
	}
	if _, n := hash(t, conn, hostile, order); n != 1 {
		t.Fatalf("%d rows after deleting 2 of 3", n)
	}
}

func TestNameJSON(t *testing.T) {
	b, err := json.Marshal(Name{Schema: "public", Table: "Order Items"})
	if err != nil || string(b) != `{"schema":"public","table":"Order Items"}` {
		t.Fatalf("%s %v", b, err)
	}
	var n Name
	if err := json.Unmarshal(b, &n); err != nil || n != (Name{"public", "Order Items"}) {
		t.Fatalf("%+v %v", n, err)
	}
}
