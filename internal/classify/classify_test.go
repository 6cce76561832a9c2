package classify

import (
	"fmt"
	"slices"
	"sync"
	"testing"
)

func TestClassify(t *testing.T) {
	c := New(1000, "app.pure_fn")
	cases := []struct {
		sql     string
		kind    Kind
		locking bool
		unsafe  []string
		writes  []string
	}{
		{sql: "SELECT 1", kind: Read},
		{sql: "select * from users where id = $1", kind: Read},
		{sql: "SELECT count(*), max(id), now() FROM orders o JOIN users u ON u.id = o.user_id", kind: Read},
		{sql: `SELECT "Weird ""Name""".col FROM "Weird ""Name""" WHERE "Weird ""Name""".col > 0`, kind: Read},
		{sql: "SELECT * FROM t FOR UPDATE", kind: Write, locking: true},
		{sql: "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", kind: Write, locking: true},
		{sql: "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)", kind: Write, locking: true},
		{sql: "SELECT * FROM t FOR KEY SHARE", kind: Write, locking: true},
		{sql: "SELECT substring('abc' FROM 1 FOR 2)", kind: Read},
		{sql: "SELECT nextval('users_id_seq')", kind: Write, unsafe: []string{"nextval"}},
		{sql: "SELECT pg_advisory_lock(42)", kind: Write, unsafe: []string{"pg_advisory_lock"}},
		{sql: "SELECT my_func(1)", kind: Write, unsafe: []string{"my_func"}},
		{sql: "SELECT app.pure_fn(1)", kind: Read},
		{sql: "SELECT other.pure_fn(1)", kind: Write, unsafe: []string{"other.pure_fn"}},
		{sql: "SELECT pg_catalog.lower('A')", kind: Read},
		{sql: "SELECT * INTO new_table FROM t", kind: DDL},
		{sql: "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d", kind: Write, writes: []string{"t"}},
		{sql: "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a", kind: Write, writes: []string{"t"}},
		{sql: "INSERT INTO t SELECT * FROM s", kind: Write, writes: []string{"t"}},
		{sql: "UPDATE accounts SET balance = balance - 1 WHERE id = 2", kind: Write, writes: []string{"accounts"}},
		{sql: "DELETE FROM public.t WHERE id = 3 RETURNING id", kind: Write, writes: []string{"public.t"}},
		{sql: "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v", kind: Write},
		{sql: "COPY t FROM STDIN", kind: Write},
		{sql: "COPY t TO STDOUT", kind: Read},
		{sql: "COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)", kind: Read},
		{sql: "CALL do_things()", kind: Write},
		{sql: "DO $$BEGIN PERFORM 1; END$$", kind: Write},
		{sql: "EXPLAIN SELECT * FROM t", kind: Read},
		{sql: "EXPLAIN ANALYZE DELETE FROM t", kind: Unknown},
		{sql: "EXPLAIN (ANALYZE, BUFFERS) SELECT 1", kind: Unknown},
		{sql: "EXPLAIN (ANALYZE false) SELECT 1", kind: Read},
		{sql: "BEGIN", kind: Transaction},
		{sql: "START TRANSACTION ISOLATION LEVEL SERIALIZABLE", kind: Transaction},
		{sql: "COMMIT", kind: Transaction},
		{sql: "SAVEPOINT s1", kind: Transaction},
		{sql: "ROLLBACK TO SAVEPOINT s1", kind: Transaction},
		{sql: "SET search_path = app, public", kind: Session},
		{sql: "RESET ALL", kind: Session},
		{sql: "SHOW TimeZone", kind: Session},
		{sql: "DISCARD ALL", kind: Session},
		{sql: "LISTEN ch", kind: Session},
		{sql: "PREPARE q AS SELECT 1", kind: Session},
		{sql: "EXECUTE q", kind: Unknown},
		{sql: "DEALLOCATE q", kind: Session},
		{sql: "LOCK TABLE t IN EXCLUSIVE MODE", kind: Write},
		{sql: "CREATE TABLE t (id int PRIMARY KEY)", kind: DDL},
		{sql: "ALTER TABLE t ADD COLUMN c text", kind: DDL},
		{sql: "DROP TABLE IF EXISTS t", kind: DDL},
		{sql: "TRUNCATE t", kind: DDL},
		{sql: "CREATE INDEX CONCURRENTLY i ON t (c)", kind: DDL},
		{sql: "GRANT SELECT ON t TO reader", kind: DDL},
		{sql: "VACUUM ANALYZE t", kind: DDL},
		{sql: "", kind: Session},
		{sql: "-- just a comment", kind: Session},
		{sql: "SELECT 1; UPDATE t SET a = 1", kind: Write, writes: []string{"t"}},
		{sql: "BEGIN; SELECT 1; COMMIT", kind: Transaction},
		{sql: "BEGIN; CREATE TABLE x (a int); COMMIT", kind: DDL},
		{sql: "SELEC 1", kind: Unknown},
		{sql: "SELECT 'unterminated", kind: Unknown},
	}
	for _, tc := range cases {
		t.Run(tc.sql, func(t *testing.T) {
			r := c.classify(tc.sql)
			if r.Kind != tc.kind {
				t.Fatalf("kind = %s, want %s (err %v, unsafe %v, writes %v)", r.Kind, tc.kind, r.Err, r.Unsafe, r.WriteTables)
			}
			if r.Locking != tc.locking {
				t.Errorf("locking = %v, want %v", r.Locking, tc.locking)
			}
			if tc.unsafe != nil && !slices.Equal(r.Unsafe, tc.unsafe) {
				t.Errorf("unsafe = %v, want %v", r.Unsafe, tc.unsafe)
			}
			if tc.writes != nil && !slices.Equal(r.WriteTables, tc.writes) {
				t.Errorf("write tables = %v, want %v", r.WriteTables, tc.writes)
			}
			if tc.kind == Unknown && tc.sql[0] == 'S' && r.Err == nil {
				t.Errorf("a parse failure must carry its error")
			}
		})
	}
}

// cachedAndBounded checks a classifier's cache of 100 texts: a second
// lookup of text returns the first one's plan, and 1000 more texts leave
// at most 100 cached. It returns the classifier.
func cachedAndBounded(t *testing.T, text string) *Classifier {
	t.Helper()
	c := New(100)
	a := c.Plan(text)
	if b := c.Plan(text); a != b {
		t.Fatal("the second lookup did not come from the cache")
	}
	for i := range 1000 {
		c.Plan(fmt.Sprintf("SELECT %d", i))
	}
	c.plans.mu.RLock()
	n := len(c.plans.cur) + len(c.plans.old)
	c.plans.mu.RUnlock()
	if n > 100 {
		t.Fatalf("cache holds %d texts, limit 100", n)
	}
	return c
}

// TestCache: results are cached by text, shared, and bounded.
func TestCache(t *testing.T) {
	c := cachedAndBounded(t, "SELECT 1")
	// Concurrent use is safe (run with -race).
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 200 {
				if r := c.Plan(fmt.Sprintf("UPDATE t SET a = %d WHERE id = %d", i, w)); r.Err != nil || len(r.Stmts) != 1 || r.Stmts[0].Kind != Write {
					t.Errorf("plan %+v", r)
				}
			}
		})
	}
	wg.Wait()
}

func BenchmarkClassifyCached(b *testing.B) { benchCached(b, "SELECT * FROM users WHERE id = $1") }

func BenchmarkClassifyUncached(b *testing.B) {
	benchUncached(b, "SELECT * FROM users WHERE id = %d")
}

// benchCached measures Plan of the one text sql, cached.
func benchCached(b *testing.B, sql string) {
	c := New(1000)
	c.Plan(sql)
	for b.Loop() {
		c.Plan(sql)
	}
}

// benchUncached measures Plan of texts never seen before: format with a
// new number each time, through a cache of 16.
func benchUncached(b *testing.B, format string) {
	c := New(16)
	i := 0
	for b.Loop() {
		i++
		c.Plan(fmt.Sprintf(format, i))
	}
}
