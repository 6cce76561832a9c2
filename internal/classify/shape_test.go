package classify

import (
	"fmt"
	"reflect"
	"testing"
)

// TestShapeCache: a text planned from the cached plan of another text of
// the same shape gets exactly the plan a fresh classifier would give it.
func TestShapeCache(t *testing.T) {
	pairs := []struct{ primer, text string }{
		{`UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 2;`, `UPDATE pgbench_accounts SET abalance = abalance + -41234 WHERE aid = 987654;`},
		{`INSERT INTO t (a, b) VALUES (1, 'x') RETURNING id`, `INSERT INTO t (a, b) VALUES (123456, 'it''s longer') RETURNING id`},
		{`/* c */ DELETE FROM "My ""Tbl""" x WHERE x.k = 'a' -- bye`, `/* a longer comment */ DELETE FROM "My ""Tbl""" x WHERE x.k = 'abcdef' -- see you`},
		{`BEGIN; INSERT INTO t VALUES (1); UPDATE t SET v = 'a' WHERE k = 1; COMMIT`, `BEGIN; INSERT INTO t VALUES (22222); UPDATE t SET v = 'bbbbbb' WHERE k = 333; COMMIT`},
		{`SELECT * FROM t WHERE a = 1.5 AND b = E'x\n'`, `SELECT * FROM t WHERE a = 12345.678 AND b = E'yy\tz'`},
		{`SET search_path = 'a'`, `SET search_path = 'bbb'`},
		{`INSERT INTO t VALUES (1) ON CONFLICT (k) DO UPDATE SET v = 2`, `INSERT INTO t VALUES (1000) ON CONFLICT (k) DO UPDATE SET v = 20000`},
		{`PREPARE TRANSACTION 'a'`, `PREPARE TRANSACTION 'bbbb'`},
		{`UPDATE t SET v = $1 WHERE k = 5`, `UPDATE t SET v = $1 WHERE k = 55555`},
	}
	for i, p := range pairs {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			primed := New(64)
			primed.Plan(p.primer)
			got := primed.Plan(p.text)
			want := New(64).Plan(p.text)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("plan of %q from the shape of %q:\n got %+v\nwant %+v", p.text, p.primer, got, want)
			}
			for j := range got.Stmts {
				if (got.Stmts[j].Image == nil) != (want.Stmts[j].Image == nil) ||
					got.Stmts[j].Image != nil && !reflect.DeepEqual(*got.Stmts[j].Image, *want.Stmts[j].Image) {
					t.Fatalf("statement %d image differs", j)
				}
			}
		})
	}
	// Different shapes do not share a plan.
	c := New(64)
	a := c.Plan(`SELECT 1`)
	b := c.Plan(`SELECT a FROM t`)
	if a.Stmts[0].SQL == b.Stmts[0].SQL {
		t.Fatal("different shapes shared a plan")
	}
}

func BenchmarkPlanUniqueTexts(b *testing.B) {
	c := New(1024)
	for i := 0; b.Loop(); i++ {
		c.Plan(fmt.Sprintf("UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;", i%5000, i))
	}
}
