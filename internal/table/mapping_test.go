package table

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/tandemdb/tandem/internal/config"
)

// Hand-built hostile tables: old `Sch "1"`.`Us"ers` and new `New S`.`Acc ounts`.
var (
	hostileOld = &Meta{
		Name: Name{Schema: `Sch "1"`, Table: `Us"ers`},
		Columns: []Column{
			{Name: "Id", Type: "integer", ParamType: "integer"},
			{Name: "first name", Type: "text", ParamType: "text"},
			{Name: `last"name`, Type: "text", ParamType: "text"},
			{Name: "mail", Type: "character varying(50)", ParamType: "character varying"},
			{Name: "legacy", Type: "boolean", ParamType: "boolean"},
		},
		Key: []int{0},
	}
	hostileNew = &Meta{
		Name: Name{Schema: "New S", Table: "Acc ounts"},
		Columns: []Column{
			{Name: "Id", Type: "bigint", ParamType: "bigint", Identity: 'a'},
			{Name: "Full Name", Type: "text", ParamType: "text"},
			{Name: "e\"mail", Type: "text", ParamType: "text"},
			{Name: "created", Type: "timestamp with time zone", ParamType: "timestamp with time zone"},
		},
		Key: []int{0},
	}
	hostileDecl = config.TableMap{
		To:      `"New S"."Acc ounts"`,
		Rename:  map[string]string{"mail": `e"mail`},
		Drop:    []string{"legacy"},
		Compute: map[string]string{"Full Name": `"first name" || ' ' || "last""name"`},
		Reverse: map[string]string{
			"first name": `split_part("Full Name", ' ', 1)`,
			`last"name`:  `substr("Full Name", length(split_part("Full Name", ' ', 1)) + 2)`,
		},
	}
)

func TestMappingSQL(t *testing.T) {
	m, err := NewMapping(hostileDecl, hostileOld, hostileNew)
	if err != nil {
		t.Fatal(err)
	}
	if m.Identity() {
		t.Error("a declared mapping is not the identity")
	}
	if got := m.ReverseMissing(); len(got) != 0 {
		t.Errorf("ReverseMissing = %q", got)
	}
	oldCols := []string{"Id", "first name", `last"name`, "mail", "legacy"}
	cases := []struct {
		name string
		f    func() (string, error)
		want string
	}{
		{"forward upsert", func() (string, error) { return m.ForwardUpsertSQL(oldCols, 2) },
			`INSERT INTO "New S"."Acc ounts" ("Id","Full Name","e""mail") OVERRIDING SYSTEM VALUE SELECT src."Id", ("first name" || ' ' || "last""name"), src."mail" ` +
				`FROM (VALUES ($1::bigint,$2::text,$3::text,$4::text,$5::boolean),($6::bigint,$7::text,$8::text,$9::text,$10::boolean)) ` +
				`AS src("Id","first name","last""name","mail","legacy") ON CONFLICT ("Id") DO UPDATE SET "Full Name" = EXCLUDED."Full Name", "e""mail" = EXCLUDED."e""mail"`},
		{"forward delete", func() (string, error) { return m.ForwardDeleteSQL(oldCols, 1) },
			`DELETE FROM "New S"."Acc ounts" WHERE "Id" IN (SELECT src."Id"::bigint FROM (VALUES ($1::bigint,$2::text,$3::text,$4::text,$5::boolean)) ` +
				`AS src("Id","first name","last""name","mail","legacy"))`},
		{"forward delete by key only", func() (string, error) { return m.ForwardDeleteSQL([]string{"Id"}, 2) },
			`DELETE FROM "New S"."Acc ounts" WHERE "Id" IN (SELECT src."Id"::bigint FROM (VALUES ($1::bigint),($2::bigint)) AS src("Id"))`},
		{"reverse upsert", func() (string, error) { return m.ReverseUpsertSQL([]string{"Id", "Full Name", `e"mail`, "created"}, 1) },
			`INSERT INTO "Sch ""1"""."Us""ers" ("Id","first name","last""name","mail") SELECT src."Id", (split_part("Full Name", ' ', 1)), ` +
				`(substr("Full Name", length(split_part("Full Name", ' ', 1)) + 2)), src."e""mail" ` +
				`FROM (VALUES ($1::integer,$2::text,$3::character varying,$4::timestamp with time zone)) AS src("Id","Full Name","e""mail","created") ` +
				`ON CONFLICT ("Id") DO UPDATE SET "first name" = EXCLUDED."first name", "last""name" = EXCLUDED."last""name", "mail" = EXCLUDED."mail"`},
		{"reverse delete", func() (string, error) { return m.ReverseDeleteSQL([]string{"Id"}, 1) },
			`DELETE FROM "Sch ""1"""."Us""ers" WHERE "Id" IN (SELECT src."Id"::integer FROM (VALUES ($1::integer)) AS src("Id"))`},
		{"hash old", func() (string, error) { return m.HashSQL("old") },
			`md5(ROW((t."Id")::bigint, ((SELECT ("first name" || ' ' || "last""name") FROM (SELECT t.*) AS src))::text, (t."mail")::text)::text)`},
		{"hash new", func() (string, error) { return m.HashSQL("new") },
			`md5(ROW((t."Id")::bigint, (t."Full Name")::text, (t."e""mail")::text)::text)`},
		{"partial images need the computed inputs", func() (string, error) { return m.ForwardUpsertSQL([]string{"Id", "first name"}, 1) },
			`ERR column "Full Name" is computed from "last\"name"`},
		{"key needed", func() (string, error) { return m.ForwardDeleteSQL([]string{"mail"}, 1) }, `ERR key column "Id" cannot be derived`},
		{"unknown image column", func() (string, error) { return m.ForwardUpsertSQL([]string{"Id", "nope"}, 1) }, `ERR has no column "nope"`},
		{"too many", func() (string, error) { return m.ForwardUpsertSQL(oldCols, 20000) }, `ERR exceed 65535 parameters`},
		{"bad side", func() (string, error) { return m.HashSQL("both") }, `ERR side must be`},
	}
	for _, tc := range cases {
		got, err := tc.f()
		if want, ok := strings.CutPrefix(tc.want, "ERR "); ok {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: got %q, %v; want error %q", tc.name, got, err, want)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s:\n got  %s (%v)\n want %s", tc.name, got, err, tc.want)
		}
	}
	if cols, ok := m.KeyPreserving(); !ok || len(cols) != 1 || cols[0].Name != "Id" {
		t.Errorf("KeyPreserving = %v, %v", cols, ok)
	}
}

func TestMappingIdentity(t *testing.T) {
	m, err := NewMapping(config.TableMap{}, goldenMeta, goldenMeta)
	if err != nil {
		t.Fatal(err)
	}
	if !m.Identity() || len(m.ReverseMissing()) != 0 {
		t.Errorf("identity = %v, reverse missing %q", m.Identity(), m.ReverseMissing())
	}
	// The generated column is carried in the image but not written; the
	// params are cast to the target's types, as UpsertSQL does.
	got, err := m.ForwardUpsertSQL([]string{"id", "v", "g", "Na me", `q"`}, 1)
	want := `INSERT INTO "s x"."t""1" ("id","v","Na me","q""") OVERRIDING SYSTEM VALUE SELECT src."id", src."v", src."Na me", src."q""" ` +
		`FROM (VALUES ($1::integer,$2::character varying,$3::integer,$4::text,$5::app.mood)) AS src("id","v","g","Na me","q""") ` +
		`ON CONFLICT ("id","Na me") DO UPDATE SET "v" = EXCLUDED."v", "q""" = EXCLUDED."q"""`
	if err != nil || got != want {
		t.Errorf("got  %s (%v)\nwant %s", got, err, want)
	}
	got, err = m.ForwardDeleteSQL([]string{"id", "Na me"}, 1)
	want = `DELETE FROM "s x"."t""1" WHERE ("id","Na me") IN (SELECT src."id"::integer, src."Na me"::text FROM (VALUES ($1::integer,$2::text)) AS src("id","Na me"))`
	if err != nil || got != want {
		t.Errorf("got  %s (%v)\nwant %s", got, err, want)
	}
}

func TestNewMappingErrors(t *testing.T) {
	with := func(f func(d *config.TableMap)) config.TableMap {
		d := hostileDecl
		d.Rename = map[string]string{"mail": `e"mail`}
		d.Compute = map[string]string{"Full Name": hostileDecl.Compute["Full Name"]}
		d.Reverse = map[string]string{"first name": hostileDecl.Reverse["first name"], `last"name`: hostileDecl.Reverse[`last"name`]}
		f(&d)
		return d
	}
	cases := []struct {
		name       string
		decl       config.TableMap
		side, col  string
		msgContain string
	}{
		{"typo in rename", with(func(d *config.TableMap) { d.Rename = map[string]string{"mial": `e"mail`} }), "old", "mial", `did you mean "mail"?`},
		{"typo in rename target", with(func(d *config.TableMap) { d.Rename = map[string]string{"mail": "email"} }), "new", "email", `did you mean "e\"mail"?`},
		{"typo in compute", with(func(d *config.TableMap) { d.Compute = map[string]string{"Full Nmae": "1"} }), "new", "Full Nmae", "compute names a column"},
		{"expression reads an unknown column", with(func(d *config.TableMap) { d.Compute["Full Name"] = `"frist name"` }), "old", "frist name", `did you mean "first name"?`},
		{"expression is qualified", with(func(d *config.TableMap) { d.Compute["Full Name"] = `u."first name"` }), "new", "Full Name", "name columns alone"},
		{"expression escapes", with(func(d *config.TableMap) { d.Compute["Full Name"] = `1) FROM pg_class; --` }), "new", "Full Name", "comment"},
		{"expression is two", with(func(d *config.TableMap) { d.Compute["Full Name"] = `1), (2` }), "new", "Full Name", "not a single expression"},
		{"old column left over", with(func(d *config.TableMap) { d.Drop = nil }), "old", "legacy", "has no place"},
		{"reverse reads unknown", with(func(d *config.TableMap) { d.Reverse["first name"] = "fullname" }), "new", "fullname", `did you mean "Full Name"?`},
		{"key not derivable", with(func(d *config.TableMap) { d.Rename = map[string]string{"mail": `e"mail`, "Id": "created"} }), "new", "Id", "primary key"},
	}
	for _, tc := range cases {
		_, err := NewMapping(tc.decl, hostileOld, hostileNew)
		var me *MappingError
		if !errors.As(err, &me) {
			t.Errorf("%s: err = %v, want a *MappingError", tc.name, err)
			continue
		}
		if me.Side != tc.side || me.Column != tc.col || !strings.Contains(me.Msg, tc.msgContain) || me.Table != hostileOld.Name {
			t.Errorf("%s: got %+v (%v), want side %s column %q message containing %q", tc.name, me, err, tc.side, tc.col, tc.msgContain)
		}
	}

	// A computed column without its reverse is not an error: it blocks the flip.
	d := with(func(d *config.TableMap) { delete(d.Reverse, `last"name`) })
	m, err := NewMapping(d, hostileOld, hostileNew)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.ReverseMissing(); !slices.Equal(got, []string{`last"name`}) {
		t.Errorf("ReverseMissing = %q", got)
	}
}

func TestExprColumns(t *testing.T) {
	got, err := exprColumns(`coalesce("A b", a, lower(a)) || '--' || b::text /* c */`)
	if err != nil || !slices.Equal(got, []string{"A b", "a", "b"}) {
		t.Errorf("got %q, %v", got, err)
	}
	for _, bad := range []string{"", "1 +", "(SELECT 1) UNION SELECT (2", "a.b", "t.*", "1); DROP TABLE x; SELECT (1"} {
		if _, err := exprColumns(bad); err == nil {
			t.Errorf("exprColumns(%q) accepted", bad)
		}
	}
}

func TestHashable(t *testing.T) {
	for typ, want := range map[string]bool{
		"integer": true, "numeric(12,2)": true, "character varying(20)": true, "timestamp(3) with time zone": true,
		"text[]": true, "jsonb": true, "json": false, "xml": false, "point": false, "mood": false, "numeric(10,2)[]": true,
	} {
		if got := hashable(typ); got != want {
			t.Errorf("hashable(%q) = %v, want %v", typ, got, want)
		}
	}
}
