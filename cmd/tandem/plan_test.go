package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/plan"
)

// runPlanCmd runs `tandem plan` with args and returns its exit status (as
// main would map it) and its standard output.
func runPlanCmd(t *testing.T, args ...string) (int, string) {
	t.Helper()
	out, errOut, err := execCommand(t, newPlanCmd(), args...)
	var ec exitCode
	switch {
	case err == nil:
		return 0, out
	case errors.As(err, &ec):
		return int(ec), out
	}
	t.Fatalf("tandem plan %v: %v\n%s", args, err, errOut)
	return 0, ""
}

// TestPlanSeeded seeds a pair with one of each problem and checks that the
// report names each one with the right verdict, and exits 2.
func TestPlanSeeded(t *testing.T) {
	old, new := pgtest.NewPair(t)
	both := `
		CREATE TABLE ready (id bigint PRIMARY KEY, name varchar(50), note text);
		CREATE TABLE nokey (line text, at timestamptz);
		CREATE TABLE narrow (id int PRIMARY KEY, qty bigint);
		CREATE TABLE incompatible (id int PRIMARY KEY);
		CREATE TABLE parent (id serial PRIMARY KEY);
		CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent ON DELETE CASCADE);
		CREATE TABLE "Odd ""Name""" ("Key" int PRIMARY KEY, v text);
		CREATE TABLE skipped (id int PRIMARY KEY);
		CREATE SEQUENCE counter;`
	mustExec(t, old, both+`
		ALTER TABLE ready ALTER name TYPE varchar(50);
		ALTER TABLE incompatible ADD token uuid;
		CREATE TABLE missing (id int PRIMARY KEY);
		CREATE EXTENSION hstore;
		CREATE EXTENSION citext;
		CREATE TABLE geo (id int PRIMARY KEY, attrs hstore);
		CREATE TABLE audit (at timestamptz DEFAULT now(), what text);
		CREATE FUNCTION audit_parent() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN INSERT INTO audit (what) VALUES (TG_OP); RETURN NEW; END $$;
		CREATE TRIGGER parent_audit AFTER INSERT ON parent FOR EACH ROW EXECUTE FUNCTION audit_parent();
		INSERT INTO ready SELECT g, 'n' || g, 'x' FROM generate_series(1, 3000) g;
		INSERT INTO narrow VALUES (1, 5);
		INSERT INTO parent DEFAULT VALUES; INSERT INTO parent DEFAULT VALUES;
		INSERT INTO "Odd ""Name""" VALUES (1, 'a');
		SELECT setval('counter', 77);`)
	mustExec(t, new, both+`
		ALTER TABLE ready ALTER name TYPE text;
		ALTER TABLE narrow ALTER qty TYPE int;
		ALTER TABLE incompatible ADD token int;
		CREATE TABLE geo (id int PRIMARY KEY, attrs jsonb);
		CREATE TABLE audit (at timestamptz DEFAULT now(), what text);
		SELECT setval('parent_id_seq', 1);`)

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "tandem.yaml")
	if err := os.WriteFile(cfgPath, []byte("old:\n  dsn: "+old.DSN("")+"\nnew:\n  dsn: "+new.DSN("")+
		"\ntables:\n  exclude: [skipped]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out := runPlanCmd(t, "-c", cfgPath, "--json", "--sample-rows", "500")
	if code != 2 {
		t.Errorf("exit status %d, want 2", code)
	}
	var rep plan.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	tables := map[string]plan.Table{}
	for _, tb := range rep.Tables {
		tables[tb.Name] = tb
	}
	reasons := func(tb plan.Table) string {
		var s []string
		for _, r := range tb.Reasons {
			s = append(s, r.Verdict.String()+": "+r.Text)
		}
		return strings.Join(s, "; ")
	}
	for name, want := range map[string]struct {
		verdict plan.Verdict
		reason  string
	}{
		"public.ready":        {plan.Ready, ""},
		"public.missing":      {plan.Blocked, "missing on new"},
		"public.nokey":        {plan.Attention, "no primary key on old"},
		"public.narrow":       {plan.Attention, "bigint -> integer narrows"},
		"public.incompatible": {plan.Blocked, "cannot convert uuid to integer"},
		"public.child":        {plan.Attention, "foreign key child_parent_id_fkey to public.parent (ON DELETE CASCADE"},
		"public.parent":       {plan.Attention, "trigger parent_audit"},
		"public.geo":          {plan.Blocked, "extension hstore"},
		`public.Odd "Name"`:   {plan.Ready, ""},
		"public.audit":        {plan.Attention, "no primary key on old"},
	} {
		tb, ok := tables[name]
		if !ok {
			t.Errorf("table %s is not in the report", name)
			continue
		}
		if tb.Verdict != want.verdict || !strings.Contains(reasons(tb), want.reason) {
			t.Errorf("%s: verdict %s %s; want %s with %q", name, tb.Verdict, reasons(tb), want.verdict, want.reason)
		}
	}
	if _, ok := tables["public.skipped"]; ok {
		t.Error("public.skipped is excluded by tables.exclude but was assessed")
	}
	if r := tables["public.ready"]; r.Sample == nil || r.Sample.Rows != 500 || r.Sample.Error != "" || r.Sample.Estimate <= 0 ||
		r.Rows != 3000 || len(r.Key) != 1 || r.Key[0] != "id" || len(r.Differences) != 1 || r.Differences[0].Change != plan.Widening {
		t.Errorf("public.ready: %+v sample %+v", r, r.Sample)
	}
	if len(rep.Triggers) != 1 || rep.Triggers[0].Name != "parent_audit" {
		t.Errorf("triggers: %+v", rep.Triggers)
	}
	if len(rep.ForeignKeys) != 1 || rep.ForeignKeys[0].OnDelete != "CASCADE" {
		t.Errorf("foreign keys: %+v", rep.ForeignKeys)
	}
	exts := map[string]plan.Extension{}
	for _, e := range rep.Extensions {
		exts[e.Name] = e
	}
	if e := exts["hstore"]; e.OnNew || len(e.UsedBy) != 1 || e.UsedBy[0] != "public.geo.attrs" {
		t.Errorf("hstore: %+v", e)
	}
	if e := exts["citext"]; e.OnNew || !strings.Contains(strings.Join(findings(rep), "\n"), "extension citext") {
		t.Errorf("citext: %+v, findings %q", e, findings(rep))
	}
	seqs := map[string]plan.Sequence{}
	for _, s := range rep.Sequences {
		seqs[s.Name] = s
	}
	if s := seqs["public.counter"]; s.Old == nil || *s.Old != 77 || !s.OnNew || s.New != nil {
		t.Errorf("public.counter: %+v", s)
	}
	if s := seqs["public.parent_id_seq"]; s.OwnedBy != "public.parent.id" || s.Old == nil || *s.Old != 2 || s.New == nil || *s.New != 1 {
		t.Errorf("public.parent_id_seq: %+v", s)
	}
	if len(rep.Stores) != 2 || !rep.Stores[0].ReplicationRole || rep.Stores[0].ControlSchema == nil || !*rep.Stores[0].ControlSchema ||
		rep.Stores[0].WALLevel != "logical" || rep.Stores[1].MaxPreparedTransactions != 64 {
		t.Errorf("stores: %+v", rep.Stores)
	}

	// Nothing was written on new: the sample went to a rolled-back temp table.
	conn, err := new.Connect(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	res, err := conn.Exec(context.Background(), "SELECT count(*) FROM ready").ReadAll()
	if err != nil || len(res) != 1 || string(res[0].Rows[0][0]) != "0" {
		t.Fatalf("new.ready was written: %v %v", res, err)
	}

	// The text form names the same problems.
	code, text := runPlanCmd(t, "-c", cfgPath, "--sample-rows", "0")
	if code != 2 {
		t.Errorf("text: exit status %d, want 2", code)
	}
	for _, want := range []string{"public.missing is missing on new", "TRIGGERS ON OLD", "child_parent_id_fkey", "hstore", "verdict: blocked (exit status 2)"} {
		if !strings.Contains(text, want) {
			t.Errorf("text report lacks %q:\n%s", want, text)
		}
	}
}

func findings(r plan.Report) []string {
	var out []string
	for _, f := range r.Findings {
		out = append(out, f.Text)
	}
	return out
}

// TestPlanClean: identical stores exit 0; a non-superuser without the
// privileges Tandem needs gets attention and blocks.
func TestPlanClean(t *testing.T) {
	old, new := pgtest.NewPair(t)
	schema := `CREATE TABLE orders (id bigserial PRIMARY KEY, total numeric(10,2), at timestamptz NOT NULL DEFAULT now());`
	mustExec(t, old, schema+`INSERT INTO orders (total) SELECT g FROM generate_series(1, 100) g;`)
	mustExec(t, new, schema)
	code, out := runPlanCmd(t, "--old", old.DSN(""), "--new", new.DSN(""))
	if code != 0 {
		t.Fatalf("exit status %d, want 0:\n%s", code, out)
	}
	if !strings.Contains(out, "verdict: ready (exit status 0)") || !strings.Contains(out, "public.orders_id_seq") {
		t.Errorf("report:\n%s", out)
	}

	// A plain user on new: no replica mode, no privileges on the table.
	mustExec(t, new, `CREATE ROLE app LOGIN`)
	newDSN := strings.Replace(new.DSN(""), "postgres@", "app@", 1)
	code, out = runPlanCmd(t, "--old", old.DSN(""), "--new", newDSN, "--json")
	var rep plan.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if code != 2 || rep.Stores[1].ReplicationRole || rep.Stores[1].Verdict != plan.Attention ||
		len(rep.Tables) != 1 || !strings.Contains(rep.Tables[0].Reasons[0].Text, "missing privileges on new") {
		t.Errorf("exit %d, report %s", code, out)
	}
	// Granted on PostgreSQL 15+: replica mode is allowed. The change
	// feed's prerequisites, though the feed is off, still need attention.
	mustExec(t, new, `GRANT SET ON PARAMETER session_replication_role TO app; GRANT ALL ON orders TO app`)
	code, out = runPlanCmd(t, "--old", old.DSN(""), "--new", newDSN)
	for _, want := range []string{`attention  store new      app has no REPLICATION privilege`, `ALTER ROLE "app" REPLICATION;`,
		`GRANT CREATE ON DATABASE "postgres" TO "app";`, `ALTER TABLE "public"."orders" OWNER TO "app";`} {
		if code != 1 || !strings.Contains(out, want) {
			t.Errorf("after the grants: exit status %d, want 1 and %q:\n%s", code, want, out)
		}
	}
	mustExec(t, new, `ALTER ROLE app REPLICATION; GRANT CREATE ON DATABASE postgres TO app; ALTER TABLE orders OWNER TO app`)
	code, out = runPlanCmd(t, "--old", old.DSN(""), "--new", newDSN)
	if code != 0 {
		t.Errorf("after the grants: exit status %d, want 0:\n%s", code, out)
	}
}

// TestPlanMapping: a declared mapping explains renames, dropped and
// computed columns and a new table name, and the sample copy goes through
// it; the data audit of the clean table reports nothing and exits 0.
func TestPlanMapping(t *testing.T) {
	old, new := pgtest.NewPair(t)
	mustExec(t, old, `CREATE TABLE users (id int PRIMARY KEY, first_name text, last_name text, email varchar(50), legacy_flag bool);
		INSERT INTO users SELECT g, 'a', 'b', g || '@x', false FROM generate_series(1, 50) g;`)
	mustExec(t, new, `CREATE TABLE accounts (id int PRIMARY KEY, full_name text NOT NULL, mail text, created_at timestamptz NOT NULL DEFAULT now());`)
	cfgPath := filepath.Join(t.TempDir(), "tandem.yaml")
	if err := os.WriteFile(cfgPath, []byte(`old:
  dsn: `+old.DSN("")+`
new:
  dsn: `+new.DSN("")+`
tables:
  map:
    users:
      to: accounts
      rename: {email: mail}
      drop: [legacy_flag]
      compute: {full_name: "first_name || ' ' || last_name"}
      reverse: {first_name: "split_part(full_name, ' ', 1)", last_name: "split_part(full_name, ' ', 2)"}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out := runPlanCmd(t, "-c", cfgPath, "--json")
	var rep plan.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if code != 0 || len(rep.Tables) != 1 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	tb := rep.Tables[0]
	if tb.NewName != "public.accounts" || tb.Mapping != "declared" || tb.Verdict != plan.Ready || tb.Sample == nil ||
		tb.Sample.Rows != 50 || tb.Sample.Error != "" || len(tb.Differences) != 2 {
		t.Errorf("users: %s", out)
	}

	// The data audit of the clean, mapped table finds nothing and the exit
	// status stays 0.
	code, out = runPlanCmd(t, "-c", cfgPath, "--json", "--audit")
	rep = plan.Report{}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if a := rep.Tables[0].Audit; code != 0 || a == nil || a.Rows != 50 || len(a.Rejects) != 0 || len(a.Unchecked) != 0 {
		t.Errorf("--audit: exit %d:\n%s", code, out)
	}
}

// TestPlanMappingTypo: a declared mapping that names an unknown column
// blocks its table, and the reason names the column.
func TestPlanMappingTypo(t *testing.T) {
	old, new := pgtest.NewPair(t)
	mustExec(t, old, `CREATE TABLE users (id int PRIMARY KEY, email text)`)
	mustExec(t, new, `CREATE TABLE users (id int PRIMARY KEY, mail text)`)
	cfgPath := filepath.Join(t.TempDir(), "tandem.yaml")
	if err := os.WriteFile(cfgPath, []byte("old:\n  dsn: "+old.DSN("")+"\nnew:\n  dsn: "+new.DSN("")+
		"\ntables:\n  map:\n    users:\n      rename: {emial: mail}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out := runPlanCmd(t, "-c", cfgPath)
	if code != 2 || !strings.Contains(out, "emial") {
		t.Errorf("exit %d:\n%s", code, out)
	}
}

// TestPlanFeedPrereqs: with feed.enabled, tandem plan blocks on each missing
// prerequisite of the change feed with the statement that fixes it:
// wal_level=replica, a table without a key (and one with REPLICA IDENTITY
// NOTHING, one with only a unique index), a user without REPLICATION or
// CREATE on the database. Without feed.enabled they need attention. The
// statements it gives, run as given, make the plan pass.
func TestPlanFeedPrereqs(t *testing.T) {
	old := pgtest.New(t, pgtest.Options{Settings: map[string]string{"wal_level": "replica"}})
	new := pgtest.New(t)
	schema := `CREATE TABLE keyed (id int PRIMARY KEY, v text);
		CREATE TABLE nokey (v text);
		CREATE TABLE uniq (id int NOT NULL UNIQUE, v text);
		CREATE TABLE nothing (id int PRIMARY KEY, v text);`
	mustExec(t, old, schema)
	mustExec(t, new, schema+`ALTER TABLE nothing REPLICA IDENTITY NOTHING;
		CREATE ROLE app LOGIN; GRANT SET ON PARAMETER session_replication_role TO app; GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
		ALTER TABLE keyed OWNER TO app; ALTER TABLE nokey OWNER TO app; ALTER TABLE uniq OWNER TO app; ALTER TABLE nothing OWNER TO app;`)
	newDSN := strings.Replace(new.DSN(""), "postgres@", "app@", 1)
	dir := t.TempDir()
	write := func(name string, feed bool) string {
		p := filepath.Join(dir, name)
		body := "old:\n  dsn: " + old.DSN("") + "\nnew:\n  dsn: " + newDSN + "\n"
		if feed {
			body += "feed:\n  enabled: true\n"
		}
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	on, off := write("on.yaml", true), write("off.yaml", false)

	fixes := []struct{ verdict, where, text string }{
		{"blocked", "store old", "wal_level is replica: the change feed needs logical decoding; run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"},
		{"blocked", "store new", `app has no REPLICATION privilege: the change feed streams the WAL through a replication connection; run ALTER ROLE "app" REPLICATION;`},
		{"blocked", "store new", `app cannot create the publication tandem_feed (CREATE on the database): the change feed needs it; run GRANT CREATE ON DATABASE "postgres" TO "app";`},
		{"blocked", "public.nokey", `replica identity default without a primary key on old: the change feed cannot tell which row an UPDATE or DELETE changed; add a primary key (ALTER TABLE "public"."nokey" ADD PRIMARY KEY (...);)`},
		{"blocked", "public.nokey", `replica identity default without a primary key on new`},
		{"blocked", "public.uniq", `replica identity default without a primary key on old: the change feed cannot tell which row an UPDATE or DELETE changed; run ALTER TABLE "public"."uniq" REPLICA IDENTITY USING INDEX "uniq_id_key";`},
		{"blocked", "public.nothing", `replica identity nothing on new: the change feed cannot tell which row an UPDATE or DELETE changed; run ALTER TABLE "public"."nothing" REPLICA IDENTITY DEFAULT;`},
	}
	code, out := runPlanCmd(t, "-c", on)
	if code != 2 {
		t.Errorf("feed on: exit status %d, want 2", code)
	}
	for _, f := range fixes {
		if line := f.verdict + "  " + f.where; !strings.Contains(out, f.text) || !containsLine(out, line, f.text) {
			t.Errorf("feed on: the report lacks %q for %q:\n%s", f.text, line, out)
		}
	}
	if strings.Contains(out, "public.keyed") && containsLine(out, "public.keyed", "replica identity") {
		t.Errorf("feed on: a keyed table is reported:\n%s", out)
	}
	// Off: the same reasons, needing attention only.
	code, out = runPlanCmd(t, "-c", off)
	if code != 1 || !containsLine(out, "attention  store old", "wal_level is replica: the change feed (feed.enabled, off now) needs logical decoding") {
		t.Errorf("feed off: exit status %d, want 1:\n%s", code, out)
	}

	// Run the statements the plan gave.
	mustExec(t, old, `ALTER SYSTEM SET wal_level = logical`)
	mustExec(t, old, `ALTER TABLE nokey ADD PRIMARY KEY (v); ALTER TABLE uniq REPLICA IDENTITY USING INDEX "uniq_id_key"`)
	if err := old.Restart(t.Context()); err != nil {
		t.Fatal(err)
	}
	mustExec(t, new, `ALTER ROLE app REPLICATION; GRANT CREATE ON DATABASE postgres TO app;
		ALTER TABLE nokey ADD PRIMARY KEY (v); ALTER TABLE uniq REPLICA IDENTITY USING INDEX "uniq_id_key"; ALTER TABLE nothing REPLICA IDENTITY DEFAULT`)
	code, out = runPlanCmd(t, "-c", on, "--json")
	var rep plan.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// public.uniq still has no primary key, which the backfill wants (attention), but nothing blocks.
	if code != 1 || rep.Stores[0].Feed == nil || rep.Stores[0].Feed.WALLevel != "logical" || !rep.Stores[1].Feed.Replication {
		t.Fatalf("after the fixes: exit status %d, want 1:\n%s", code, out)
	}
	for _, s := range rep.Stores {
		if s.Verdict != plan.Ready {
			t.Errorf("after the fixes: store %s: %+v", s.Name, s.Reasons)
		}
	}
	for _, tb := range rep.Tables {
		for _, r := range tb.Reasons {
			if strings.Contains(r.Text, "change feed") {
				t.Errorf("after the fixes: %s: %s", tb.Name, r.Text)
			}
		}
		if tb.Name == "public.uniq" && (tb.ReplicaIdentity != "index" || tb.NewReplicaIdentity != "index") {
			t.Errorf("public.uniq replica identity %q/%q, want index/index", tb.ReplicaIdentity, tb.NewReplicaIdentity)
		}
	}
}

// containsLine reports whether some line of out starts with prefix (after
// the column padding is squeezed) and contains text.
func containsLine(out, prefix, text string) bool {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(strings.Join(strings.Fields(l), " "), strings.Join(strings.Fields(prefix), " ")) && strings.Contains(l, text) {
			return true
		}
	}
	return false
}

// TestPlanSecurity: the plan says when the proxy's logins would fail
// because a store asks for MD5 without TLS (blocked), when require_auth
// lets the hash cross the network (attention), and when the application's
// role can write the control schema (attention with the REVOKE to run).
func TestPlanSecurity(t *testing.T) {
	old, new := pgtest.NewPair(t)
	mustExec(t, old, `SET password_encryption = 'md5';
		CREATE ROLE legacy LOGIN SUPERUSER PASSWORD 'old-md5';
		CREATE SCHEMA tandem; CREATE TABLE tandem.state (v int)`)
	hba := "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all legacy 127.0.0.1/32 md5\n"
	if err := os.WriteFile(filepath.Join(old.DataDir(), "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		t.Fatal(err)
	}
	mustExec(t, old, "SELECT pg_reload_conf()")
	oldDSN := "postgres://legacy:old-md5@127.0.0.1:" + itoa(old.Port()) + "/postgres?sslmode=disable"
	// The control schema is reached as postgres, a separate control role.
	args := []string{"--json", "--sample-rows", "0", "--old", oldDSN, "--new", new.DSN("postgres"), "--control", old.DSN("postgres")}
	reasons := func(out, store string) string {
		t.Helper()
		var rep plan.Report
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		var texts []string
		for _, s := range rep.Stores {
			if s.Name == store {
				for _, r := range s.Reasons {
					texts = append(texts, r.Verdict.String()+": "+r.Text)
				}
			}
		}
		return strings.Join(texts, "\n")
	}
	code, out := runPlanCmd(t, args...)
	if got := reasons(out, "old"); code != int(plan.Blocked) || !strings.Contains(got, "blocked: the old store asked for md5 authentication on a connection without TLS") {
		t.Fatalf("exit %d, old store reasons:\n%s", code, got)
	}
	if got := reasons(out, "control"); !strings.Contains(got, `attention: the application's role legacy can write the control schema "tandem"`) ||
		!strings.Contains(got, "REVOKE ALL ON ALL TABLES IN SCHEMA tandem FROM \"legacy\"") {
		t.Fatalf("control reasons:\n%s", got)
	}
	_, out = runPlanCmd(t, append(args, "--old-require-auth", "md5,scram-sha-256")...)
	if got := reasons(out, "old"); !strings.Contains(got, "attention: the store asks for md5 authentication without TLS and old.require_auth allows it") {
		t.Fatalf("old store reasons with require_auth md5:\n%s", got)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestPlanAudit plants exactly one row of each reason new's schema rejects
// (length, NULL, foreign key orphan, unique duplicate, CHECK, type cast)
// among 3000 good rows of a table that maps to new through a rename of the
// table and of a column, a dropped column and a computed column (the CHECK
// is on the computed column, the foreign key on the renamed one, its parent
// a renamed table). tandem plan --audit reports exactly those rows, with
// their keys and fixes, and exits 2; a composite key's examples are rows,
// a keyless table's ctids. Once the rows are fixed on old as the fixes
// say, the audit reports nothing and the exit status is the plan's without
// --audit.
func TestPlanAudit(t *testing.T) {
	old, new := pgtest.NewPair(t)
	// The fixture BenchmarkAudit (internal/plan) audits at 1M rows.
	fixture := func(name string) string {
		b, err := os.ReadFile(filepath.Join("..", "..", "internal", "plan", "testdata", name))
		if err != nil {
			t.Fatal(err)
		}
		return strings.NewReplacer("{{customers}}", "100", "{{rows}}", "3000").Replace(string(b))
	}
	mustExec(t, old, fixture("audit_old.sql")+`
		CREATE TABLE lines (order_id int, pos int, sku text, PRIMARY KEY (order_id, pos));
		INSERT INTO lines VALUES (1, 1, 'a'), (1, 2, NULL), (2, 1, 'b');
		CREATE TABLE log (line text);
		INSERT INTO log VALUES ('a'), (NULL);
		ANALYZE;`)
	mustExec(t, new, fixture("audit_new.sql")+`
		CREATE TABLE lines (order_id int, pos int, sku text NOT NULL, PRIMARY KEY (order_id, pos));
		CREATE TABLE log (line text NOT NULL);`)
	cfgPath := filepath.Join(t.TempDir(), "tandem.yaml")
	if err := os.WriteFile(cfgPath, []byte("old:\n  dsn: "+old.DSN("")+"\nnew:\n  dsn: "+new.DSN("")+"\n"+fixture("audit_map.yaml")), 0o600); err != nil {
		t.Fatal(err)
	}
	var lines, logT plan.Table
	audit := func() (int, plan.Table, plan.Table) {
		t.Helper()
		code, out := runPlanCmd(t, "-c", cfgPath, "--json", "--sample-rows", "0", "--audit")
		var rep plan.Report
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		var orders, customers plan.Table
		for _, tb := range rep.Tables {
			switch tb.Name {
			case "public.orders":
				orders = tb
			case "public.customers":
				customers = tb
			case "public.lines":
				lines = tb
			case "public.log":
				logT = tb
			}
		}
		if orders.Audit == nil || customers.Audit == nil {
			t.Fatalf("no audit in the report:\n%s", out)
		}
		return code, orders, customers
	}

	code, orders, customers := audit()
	if code != 2 {
		t.Errorf("exit status %d, want 2", code)
	}
	if a := customers.Audit; a.Rows != 100 || len(a.Rejects) != 0 || len(a.Unchecked) != 0 {
		t.Errorf("public.customers audit: %+v", a)
	}
	a := orders.Audit
	if a.Rows != 3000 || len(a.Unchecked) != 0 {
		t.Errorf("public.orders audit: %d rows scanned, unchecked %q", a.Rows, a.Unchecked)
	}
	want := []plan.Reject{
		{Reason: plan.RejectCheck, Constraint: "purchases_total_check", Rows: 1, Keys: []string{"505"}, Fix: "satisfy CHECK ((total >= (0)::numeric))"},
		{Reason: plan.RejectOrphan, Column: "customer_id", Constraint: "purchases_customer_id_fkey", Rows: 1, Keys: []string{"303"},
			Fix: `DELETE FROM "public"."orders" WHERE "id" IN ('303')), or add their parents to public.customers`},
		{Reason: plan.RejectLength, Column: "code", Rows: 1, Keys: []string{"101"}, Fix: "widen new's column code to varchar(16)"},
		{Reason: plan.RejectNull, Column: "note", Rows: 1, Keys: []string{"202"}, Fix: `UPDATE "public"."orders" SET "note" = ... WHERE "id" IN ('202')`},
		{Reason: plan.RejectCast, Column: "qty", Rows: 1, Keys: []string{"606"}, Fix: `UPDATE "public"."orders" SET "qty" = ... WHERE "id" IN ('606')`},
		{Reason: plan.RejectDuplicate, Column: "ref", Constraint: "purchases_ref_key", Rows: 1, Keys: []string{"dup"}, Fix: "drop or clean the duplicates on old: values dup of (ref)"},
	}
	if len(a.Rejects) != len(want) {
		t.Fatalf("public.orders rejects: got %d, want %d: %+v", len(a.Rejects), len(want), a.Rejects)
	}
	for i, w := range want {
		g := a.Rejects[i]
		if g.Reason != w.Reason || g.Column != w.Column || g.Constraint != w.Constraint || g.Rows != w.Rows ||
			strings.Join(g.Keys, ",") != strings.Join(w.Keys, ",") || !strings.Contains(g.Fix, w.Fix) {
			t.Errorf("reject %d: got %+v, want %+v", i, g, w)
		}
	}
	if orders.Verdict != plan.Blocked {
		t.Errorf("public.orders verdict %s, want blocked", orders.Verdict)
	}
	// Example keys of a composite key are rows; without a key, ctids.
	for _, c := range []struct {
		tb   plan.Table
		keys string
	}{{lines, "(1,2)"}, {logT, "(0,2)"}} {
		if a := c.tb.Audit; a == nil || len(a.Rejects) != 1 || a.Rejects[0].Reason != plan.RejectNull || strings.Join(a.Rejects[0].Keys, ";") != c.keys {
			t.Errorf("%s: audit %+v, want one null reject with keys %s", c.tb.Name, a, c.keys)
		}
	}

	// The text report has the section and the same fixes.
	code, text := runPlanCmd(t, "-c", cfgPath, "--sample-rows", "0", "--audit")
	for _, w := range []string{"DATA AUDIT", "widen new's column code to varchar(16)", "type_cast", "unique_duplicate", "fk_orphan",
		"blocked    public.orders", "verdict: blocked (exit status 2)"} {
		if code != 2 || !strings.Contains(text, w) {
			t.Errorf("text: exit status %d, want 2 and %q:\n%s", code, w, text)
		}
	}

	// Fixed on old as the fixes say: nothing to reject, and the exit status
	// is the plan's own (the narrowed types need attention).
	mustExec(t, old, `
		UPDATE orders SET code = 'short' WHERE id = 101;
		UPDATE orders SET note = 'n' WHERE id = 202;
		DELETE FROM orders WHERE id IN ('303');
		UPDATE orders SET ref = 'r405' WHERE id = 405;
		UPDATE orders SET price = 1 WHERE id = 505;
		UPDATE orders SET qty = '12' WHERE id = 606;
		UPDATE lines SET sku = 'c' WHERE (order_id, pos) = (1, 2);
		DELETE FROM log WHERE line IS NULL;`)
	code, orders, _ = audit()
	plain, _ := runPlanCmd(t, "-c", cfgPath, "--sample-rows", "0")
	if a := orders.Audit; code != plain || code != 1 || a.Rows != 2999 || len(a.Rejects) != 0 || len(a.Unchecked) != 0 {
		t.Errorf("after the fixes: exit status %d (without --audit %d), audit %+v", code, plain, a)
	}
	for _, tb := range []plan.Table{lines, logT} {
		if len(tb.Audit.Rejects) != 0 {
			t.Errorf("after the fixes: %s: %+v", tb.Name, tb.Audit.Rejects)
		}
	}
}
