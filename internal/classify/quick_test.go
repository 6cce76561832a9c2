package classify

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
)

// TestQuickShape: a text planned through its quick key (no scan) gets
// exactly the plan a fresh classifier gives it the slow way.
func TestQuickShape(t *testing.T) {
	pairs := []struct{ primer, text string }{
		{`UPDATE pgbench_accounts SET abalance = abalance + -1 WHERE aid = 2;`, `UPDATE pgbench_accounts SET abalance = abalance + -41234 WHERE aid = 987654;`},
		{`SELECT abalance FROM pgbench_accounts WHERE aid = 7;`, `SELECT abalance FROM pgbench_accounts WHERE aid = 999999999;`},
		{`INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, -4, CURRENT_TIMESTAMP);`,
			`INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (100, 20, 300000, -4999, CURRENT_TIMESTAMP);`},
		{`INSERT INTO t (a, b) VALUES (1, 'x') RETURNING id`, `INSERT INTO t (a, b) VALUES (123456, 'a longer one, é') RETURNING id`},
		{`DELETE FROM "My Tbl" x WHERE x.k = 'a'`, `DELETE FROM "My Tbl" x WHERE x.k = 'abcdef'`},
		{`BEGIN; INSERT INTO t VALUES (1); UPDATE t SET v = 'a' WHERE k = 1; COMMIT`, `BEGIN; INSERT INTO t VALUES (22222); UPDATE t SET v = 'bbbbbb' WHERE k = 333; COMMIT`},
		{`INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)`, `INSERT INTO t VALUES (1000); INSERT INTO t VALUES (2)`},
		{`SET search_path = 'a'`, `SET search_path = 'bbb'`},
		{`INSERT INTO t VALUES (1) ON CONFLICT (k) DO UPDATE SET v = 2`, `INSERT INTO t VALUES (1000) ON CONFLICT (k) DO UPDATE SET v = 20000`},
		{`UPDATE t SET v = $1 WHERE k = 5`, `UPDATE t SET v = $1 WHERE k = 55555`},
		{`SELECT 1`, `SELECT 22`},
		{`select x::int from t1 where a = '' and b in (1,2)`, `select x::int from t1 where a = 'q' and b in (10,200)`},
	}
	for i, p := range pairs {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			k1, _, ok1 := quickShape(p.primer)
			k2, _, ok2 := quickShape(p.text)
			if !ok1 || !ok2 || k1 != k2 {
				t.Fatalf("quick keys: %v %v, equal %v", ok1, ok2, k1 == k2)
			}
			primed := New(64)
			primed.Plan(p.primer)
			if _, _, ok := primed.quick.get(k1); !ok {
				t.Fatalf("the primer %q bound no quick plan", p.primer)
			}
			comparePlans(t, primed.Plan(p.text), New(64).Plan(p.text))
		})
	}
}

func comparePlans(t *testing.T, got, want *TextPlan) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("quick plan differs:\n got %+v\nwant %+v", got, want)
	}
	for j := range got.Stmts {
		if (got.Stmts[j].Image == nil) != (want.Stmts[j].Image == nil) ||
			got.Stmts[j].Image != nil && !reflect.DeepEqual(*got.Stmts[j].Image, *want.Stmts[j].Image) {
			t.Fatalf("statement %d image differs", j)
		}
	}
}

// TestQuickShapeRefuses: texts whose lexing depends on more than plain
// constants are left to the scanner.
func TestQuickShapeRefuses(t *testing.T) {
	for _, sql := range []string{
		`SELECT 1.5`, `SELECT .5`, `SELECT 1.`, `SELECT 1e5`, `SELECT 0x1F`, `SELECT 1_000`, `SELECT 1234567890`,
		`SELECT E'a'`, `SELECT B'01'`, `SELECT X'0F'`, `SELECT N'a'`, `SELECT U&'a'`, `SELECT U&"a"`,
		`SELECT 'a\'`, `SELECT 'it''s'`, `SELECT 'open`, `SELECT "open`,
		`SELECT $$a$$`, `SELECT $tag$a$tag$`, `SELECT $1x`,
		`SELECT 1 -- c`, `SELECT /* c */ 1`, "SELECT 1\x00", "SELECT \x7f", "SELECT `a`", `SELECT a & b`, `SELECT {1}`,
		"SELECT '\xff'",
	} {
		if _, _, ok := quickShape(sql); ok {
			t.Errorf("quickShape accepted %q", sql)
		}
	}
	// Different texts around the constants have different keys.
	a, _, _ := quickShape(`SELECT a FROM t WHERE k = 1`)
	b, _, _ := quickShape(`SELECT a FROM t WHERE k = '1'`)
	c, _, _ := quickShape(`SELECT a FROM t WHERE k  = 1`)
	if a == b || a == c {
		t.Fatal("different texts share a quick key")
	}
}

// TestQuickShapeRandom: pgbench-like texts with random constants, planned
// by one classifier (quick hits after the first) and by fresh ones.
func TestQuickShapeRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	str := func() string {
		const chars = "abc xyz;-/*$\"é()"
		n := r.IntN(8)
		b := make([]rune, 0, n)
		for range n {
			b = append(b, []rune(chars)[r.IntN(len([]rune(chars)))])
		}
		return string(b)
	}
	shapes := []func() string{
		func() string {
			return fmt.Sprintf("UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;", r.IntN(10000)-5000, r.IntN(1e9))
		},
		func() string {
			return fmt.Sprintf("INSERT INTO h (a, note) VALUES (%d, '%s'); UPDATE h SET note = '%s' WHERE a = %d", r.IntN(99), str(), str(), r.IntN(1e6))
		},
		func() string {
			return fmt.Sprintf("DELETE FROM t WHERE k IN (%d, %d) AND s = '%s'", r.IntN(10), r.IntN(1e8), str())
		},
	}
	shared := New(1024)
	quickHits := 0
	for i := range 300 {
		sql := shapes[i%len(shapes)]()
		key, _, ok := quickShape(sql)
		if !ok {
			t.Fatalf("quickShape refused %q", sql)
		}
		if _, _, hit := shared.quick.get(key); hit {
			quickHits++
		}
		comparePlans(t, shared.Plan(sql), New(64).Plan(sql))
	}
	if quickHits < 290 {
		t.Fatalf("only %d of 300 texts were quick hits", quickHits)
	}
}

func BenchmarkPlanUniqueTextsQuick(b *testing.B) {
	c := New(1024)
	for i := 0; b.Loop(); i++ {
		c.Plan(fmt.Sprintf("UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;", i%5000, i))
	}
}
