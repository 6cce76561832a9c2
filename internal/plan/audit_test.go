package plan

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/table"
)

// TestAuditCastRules checks that the audit's PostgreSQL 15 checks (a value
// too long, a value that cannot be cast) say exactly what the store does:
// for each value and type, the audit's predicate against the outcome of
// writing the value as the mirror and the backfill do (its text read as
// the type without modifier, then assigned to a column of the type; a
// computed value assigned as it is), caught in a PL/pgSQL block on a
// throwaway cluster.
func TestAuditCastRules(t *testing.T) {
	c := pgtest.New(t)
	conn := harness.Connect(t, c, "postgres")
	ctx := t.Context()
	if _, err := conn.Exec(ctx, `CREATE FUNCTION accepts(v text, src text, typ text, base text, computed bool) RETURNS bool LANGUAGE plpgsql AS $$
		BEGIN
			EXECUTE format('CREATE TEMP TABLE IF NOT EXISTS probe_%s (x %s)', md5(typ), typ);
			IF computed THEN
				EXECUTE format('INSERT INTO probe_%s SELECT (%L::%s)', md5(typ), v, src);
			ELSE
				EXECUTE format('INSERT INTO probe_%s SELECT (%L::%s)', md5(typ), v, base);
			END IF;
			RETURN true;
		EXCEPTION WHEN OTHERS THEN
			RETURN false;
		END $$`); err != nil {
		t.Fatal(err)
	}
	texts := []string{"0", "12", "-5", " 7 ", "+3", "12a", "", " ", "1.5", "2.00", "1e3", "99999", "32767", "32768", "-32768", "-32769",
		"2147483647", "2147483648", "-2147483649", "9223372036854775807", "9223372036854775808", "00000000000000000000012",
		"abc", "t", "TRUE", "yes", "ye", "of", "o", "on", "off", "offf", "n", "no", "f", "fals", "1", "0x1F", "1_000", "١",
		"NaN", "nan", "Infinity", "-inf", "inf", "+NaN", "+Infinity", ".5", "5.", ".", "123.456", "999.994", "999.995", "-999.995", "1e2", "1e-2", "5e",
		"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "{a0eebc999c0b4ef8bb6d6bb9bd380a11}", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
		"a0eebc99-9c0b4ef8-bb6d-6bb9bd380a1", "a0eebc999c0b4ef8bb6d6bb9bd380a11", "{a0eebc999c0b4ef8bb6d6bb9bd380a11", " a0eebc999c0b4ef8bb6d6bb9bd380a11",
		"ab ", "abcd", "ab  ", "abc    ", "é€ab", "é€abc", " 1 2"}
	numbers := []string{"0", "2.5", "-2.5", "2147483647.4", "2147483647.5", "-2147483648.5", "NaN", "999.994", "999.995", "-999.995", "1e30"}
	for _, tc := range []struct {
		src      string
		computed bool
		values   []string
		types    []string
	}{
		{"text", false, texts, []string{"smallint", "integer", "bigint", "numeric", "numeric(5,2)", "numeric(3,-1)", "boolean", "uuid", "character varying(3)", "character(3)"}},
		{"numeric", false, numbers, []string{"integer", "smallint", "numeric(5,2)", "character varying(3)"}},
		{"numeric", true, numbers, []string{"integer", "smallint", "numeric(5,2)", "character varying(3)"}},
		{"double precision", true, numbers, []string{"integer", "numeric(5,2)"}},
		{"bigint", false, []string{"0", "2147483647", "2147483648", "-2147483649", "32768"}, []string{"integer", "smallint", "numeric(5,2)"}},
	} {
		for _, typ := range tc.types {
			col := &auditCol{name: "x", newType: typ, srcType: tc.src, computed: tc.computed}
			col.fits(false)
			if col.unchecked != "" {
				t.Errorf("%s -> %s: unchecked: %s", tc.src, typ, col.unchecked)
				continue
			}
			var preds []string
			for _, p := range []string{col.cast, col.length} {
				if p != "" {
					preds = append(preds, "coalesce("+strings.ReplaceAll(p, "$v", "($1::text::"+tc.src+")")+", false)")
				}
			}
			if len(preds) == 0 {
				t.Errorf("%s -> %s: no check", tc.src, typ)
				continue
			}
			// ParamType: the type without its modifier, as format_type
			// (oid, NULL) names it.
			base := typ
			switch b := parseType(typ).base; b {
			case "character varying", "numeric":
				base = b
			case "character":
				base = "bpchar"
			}
			for _, v := range tc.values {
				var rejected, accepted bool
				if err := conn.QueryRow(ctx, "SELECT "+strings.Join(preds, " OR ")+", accepts($1, $2, $3, $4, $5)", v, tc.src, typ, base, tc.computed).Scan(&rejected, &accepted); err != nil {
					if tc.src != "text" {
						continue // not a value of the source type
					}
					t.Fatalf("%s -> %s %q: %v", tc.src, typ, v, err)
				}
				if rejected == accepted {
					t.Errorf("%s -> %s (computed %v) %q: the audit says rejected=%v, the store accepted=%v", tc.src, typ, tc.computed, v, rejected, accepted)
				}
			}
		}
	}
}

// TestAuditExamples checks the counts and the example keys when a check
// fails more rows than it lists, beside a check that fails other rows: each
// reject counts all of its rows and lists the first auditExamples of them
// in the table's order, only rows that fail it, including a row that an
// UPDATE moved to the table's end; an empty table has nothing to reject.
func TestAuditExamples(t *testing.T) {
	old, new := pgtest.NewPair(t)
	ctx := t.Context()
	if err := old.Exec(ctx, "postgres", `CREATE TABLE t (id int PRIMARY KEY, v text, w text);
		INSERT INTO t SELECT g, 'v', 'w' FROM generate_series(1, 5000) g;
		UPDATE t SET v = NULL WHERE id % 400 = 7;
		UPDATE t SET w = 'long' WHERE id IN (3, 4100);
		UPDATE t SET v = NULL WHERE id = 2;
		CREATE TABLE empty (id int PRIMARY KEY, v text);
		ANALYZE t;`); err != nil {
		t.Fatal(err)
	}
	if err := new.Exec(ctx, "postgres", `CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL, w varchar(3));
		CREATE TABLE empty (id int PRIMARY KEY, v text NOT NULL UNIQUE)`); err != nil {
		t.Fatal(err)
	}
	rep, err := Run(ctx, Options{Old: harness.Connect(t, old, "postgres"), New: harness.Connect(t, new, "postgres"), Audit: true,
		Map: func(n table.Name) Mapping { return Mapping{New: n} }})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Tables) != 2 || rep.Tables[0].Audit == nil || rep.Tables[1].Audit == nil || rep.Tables[1].Name != "public.t" {
		t.Fatalf("tables %+v", rep.Tables)
	}
	if e := rep.Tables[0].Audit; e.Rows != 0 || len(e.Rejects) != 0 || len(e.Unchecked) != 0 {
		t.Errorf("audit of the empty table: %+v", e)
	}
	a := rep.Tables[1].Audit
	var got []string
	for _, r := range a.Rejects {
		got = append(got, fmt.Sprintf("%s %s %d [%s]", r.Reason, r.Column, r.Rows, strings.Join(r.Keys, " ")))
	}
	// The UPDATEs moved the ids 7 mod 400, then 3 and 4100, then 2 after
	// the rest, in the order they ran.
	want := []string{"length w 2 [3 4100]", "null v 14 [7 407 807 1207 1607]"}
	if a.Rows != 5000 || strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Errorf("audit of %d rows: %q, want %q", a.Rows, got, want)
	}
}

// TestAuditComputedFunctions checks the scan and the examples when a
// computed column's expression is volatile (the planner does not flatten
// its subquery, and the examples' ctid range must still reach the table) or
// calls a PARALLEL UNSAFE function: the CHECK on it finds exactly the
// planted rows, with their keys. (The table is too small for parallel
// workers either way: this checks the SQL, not the plan.)
func TestAuditComputedFunctions(t *testing.T) {
	old, new := pgtest.NewPair(t)
	ctx := t.Context()
	if err := old.Exec(ctx, "postgres", `CREATE TABLE t (id int PRIMARY KEY, price numeric, amount int);
		INSERT INTO t SELECT g, 1, 2 FROM generate_series(1, 5000) g;
		UPDATE t SET price = -1 WHERE id IN (10, 20, 4000);
		CREATE FUNCTION unsafe_id(numeric) RETURNS numeric LANGUAGE sql PARALLEL UNSAFE AS 'SELECT $1';
		ANALYZE t;`); err != nil {
		t.Fatal(err)
	}
	if err := new.Exec(ctx, "postgres", `CREATE TABLE t (id int PRIMARY KEY, total numeric(12,2) CHECK (total >= 0), amount int)`); err != nil {
		t.Fatal(err)
	}
	oldConn, newConn := harness.Connect(t, old, "postgres"), harness.Connect(t, new, "postgres")
	for _, expr := range []string{"price * amount + 0 * random()", "unsafe_id(price * amount)"} {
		rep, err := Run(ctx, Options{Old: oldConn, New: newConn, Audit: true, Map: func(n table.Name) Mapping {
			return Mapping{New: n, Declared: true, Computed: map[string]string{"total": expr}, Consumed: map[string]bool{"price": true}}
		}})
		if err != nil {
			t.Fatal(err)
		}
		a := rep.Tables[0].Audit
		if a == nil || a.Rows != 5000 || len(a.Unchecked) != 0 || len(a.Rejects) != 1 ||
			a.Rejects[0].Reason != RejectCheck || a.Rejects[0].Rows != 3 || strings.Join(a.Rejects[0].Keys, " ") != "10 20 4000" {
			t.Errorf("%s: audit %+v", expr, a)
		}
	}
}

// TestAuditWhere: a mapping with a where predicate carries only some old
// rows to new, and the audit counts rejects among those alone: the rows
// outside it (here the other region's) never reach new, whatever they
// hold, for the row checks, the unique key and the foreign key alike.
func TestAuditWhere(t *testing.T) {
	old, new := pgtest.NewPair(t)
	ctx := t.Context()
	if err := old.Exec(ctx, "postgres", `CREATE TABLE p (id int PRIMARY KEY);
		INSERT INTO p SELECT g FROM generate_series(1, 10) g;
		CREATE TABLE t (id int PRIMARY KEY, region text, v text, code text, p int);
		INSERT INTO t SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v', 'c' || g, 1 FROM generate_series(1, 100) g;
		-- outside the predicate (us): a NULL, a duplicate code and an orphan, none of which new sees
		UPDATE t SET v = NULL WHERE id = 1;
		UPDATE t SET code = 'c2' WHERE id = 3;
		UPDATE t SET p = 99 WHERE id = 5;
		-- inside it (eu): one of each
		UPDATE t SET v = NULL WHERE id = 10;
		UPDATE t SET code = 'c20' WHERE id = 12;
		UPDATE t SET p = 98 WHERE id = 14;`); err != nil {
		t.Fatal(err)
	}
	if err := new.Exec(ctx, "postgres", `CREATE TABLE p (id int PRIMARY KEY);
		CREATE TABLE t (id int PRIMARY KEY, region text, v text NOT NULL, code text UNIQUE, p int REFERENCES p)`); err != nil {
		t.Fatal(err)
	}
	rep, err := Run(ctx, Options{Old: harness.Connect(t, old, "postgres"), New: harness.Connect(t, new, "postgres"), Audit: true,
		Map: func(n table.Name) Mapping {
			if n.Table == "t" {
				return Mapping{New: n, Declared: true, Where: "region = 'eu'"}
			}
			return Mapping{New: n}
		}})
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(rep.Tables, func(t Table) bool { return t.Name == "public.t" })
	if i < 0 || rep.Tables[i].Audit == nil {
		t.Fatalf("tables %+v", rep.Tables)
	}
	a := rep.Tables[i].Audit
	var got []string
	for _, r := range a.Rejects {
		got = append(got, fmt.Sprintf("%s %d [%s]", r.Reason, r.Rows, strings.Join(r.Keys, " ")))
	}
	want := []string{"fk_orphan 1 [14]", "null 1 [10]", "unique_duplicate 1 [c20]"}
	if a.Rows != 50 || strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Errorf("audit of %d rows: %q, want 50 rows and %q", a.Rows, got, want)
	}
}

// TestAuditSieve checks the scan's sieve where new's CHECKs read columns
// whose cast or length rejects some values: a row the flags reject is a
// cast or length reject alone (its typed value is NULL, so the CHECK
// passes), and the CHECK over the unguarded values never converts it (which
// would raise an error: '12a' is no integer, 1e12 no numeric(5,2)); a row
// that converts and fails the CHECK is a CHECK reject. The unique key on a
// text column counts the same duplicates with or without a nondeterministic
// collation on old (which turns the GROUP BY's byte sort off).
func TestAuditSieve(t *testing.T) {
	old, new := pgtest.NewPair(t)
	ctx := t.Context()
	if err := old.Exec(ctx, "postgres", `CREATE TABLE t (id int PRIMARY KEY, qty text, total numeric, code text);
		INSERT INTO t SELECT g, g::text, 1, 'c' || g FROM generate_series(1, 3000) g;
		UPDATE t SET qty = '12a' WHERE id = 11;
		UPDATE t SET qty = '-5' WHERE id = 22;
		UPDATE t SET total = 1e12 WHERE id = 33;
		UPDATE t SET total = 150 WHERE id = 44;
		UPDATE t SET qty = '-7', total = 1e13 WHERE id = 55;
		UPDATE t SET qty = '-1', total = -1 WHERE id = 88;
		UPDATE t SET code = 'c1' WHERE id IN (66, 77);
		ANALYZE t;`); err != nil {
		t.Fatal(err)
	}
	if err := new.Exec(ctx, "postgres", `CREATE TABLE t (id int PRIMARY KEY, qty integer CHECK (qty > 0),
		total numeric(5,2) CHECK (total < 100), code text UNIQUE, CHECK (qty > 0 OR total > 0))`); err != nil {
		t.Fatal(err)
	}
	oldConn, newConn := harness.Connect(t, old, "postgres"), harness.Connect(t, new, "postgres")
	// 55: qty fails its CHECK; total is too long, so NULL, and t_check
	// (qty > 0 OR total > 0) is NULL: it passes.
	want := "check t_check 1 [88]; check t_qty_check 3 [22 55 88]; check t_total_check 1 [44]; length  2 [33 55]; type_cast  1 [11]; unique_duplicate t_code_key 2 [c1]"
	for _, collation := range []string{"", "CREATE COLLATION und_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"} {
		if collation != "" {
			if err := old.Exec(ctx, "postgres", collation); err != nil {
				t.Skipf("no ICU on old: %v", err)
			}
		}
		rep, err := Run(ctx, Options{Old: oldConn, New: newConn, Audit: true, Map: func(n table.Name) Mapping { return Mapping{New: n} }})
		if err != nil {
			t.Fatal(err)
		}
		a := rep.Tables[0].Audit
		var got []string
		for _, r := range a.Rejects {
			got = append(got, fmt.Sprintf("%s %s %d [%s]", r.Reason, r.Constraint, r.Rows, strings.Join(r.Keys, " ")))
		}
		if a.Rows != 3000 || strings.Join(got, "; ") != want {
			t.Errorf("%q: audit of %d rows: %q, want %q (unchecked %q)", collation, a.Rows, got, want, a.Unchecked)
		}
	}
}
