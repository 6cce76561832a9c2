package classify

import (
	"reflect"
	"strings"
	"sync"
	"testing"
)

// readShapeCases: want is the expected shape; a want with Reason set and
// Comparable false matches when the actual reason starts with want.Reason
// (parse errors carry the parser's message).
var readShapeCases = []struct {
	name string
	sql  string
	want ReadShape
}{
	// Accepted.
	{"plain", "SELECT id, name FROM users WHERE id = $1", ReadShape{Comparable: true}},
	{"join", "SELECT u.id, o.total FROM users u JOIN orders o ON o.user_id = u.id", ReadShape{Comparable: true}},
	{"group by", "SELECT status, count(*) FROM orders GROUP BY status HAVING count(*) > 1", ReadShape{Comparable: true}},
	{"agg inner order", "SELECT user_id, array_agg(id ORDER BY id), string_agg(name, ',' ORDER BY name) FROM t GROUP BY user_id", ReadShape{Comparable: true}},
	{"json agg inner order", "SELECT json_agg(x ORDER BY x), jsonb_object_agg(k, v ORDER BY k) FROM t", ReadShape{Comparable: true}},
	{"json_arrayagg inner order", "SELECT json_arrayagg(x ORDER BY x) FROM t", ReadShape{Comparable: true}},
	{"agg over ordered window", "SELECT array_agg(x) OVER (ORDER BY y) FROM t", ReadShape{Comparable: true}},
	{"row_number ordered", "SELECT id, row_number() OVER (PARTITION BY g ORDER BY id) FROM t", ReadShape{Comparable: true}},
	{"named ordered window", "SELECT id, rank() OVER w FROM t WINDOW w AS (ORDER BY id)", ReadShape{Comparable: true}},
	{"derived ordered window", "SELECT id, lag(id) OVER (w ROWS 1 PRECEDING) FROM t WINDOW w AS (PARTITION BY g ORDER BY id)", ReadShape{Comparable: true}},
	{"safe aggregates", "SELECT count(*), sum(x), min(x), max(x), avg(x) FROM t", ReadShape{Comparable: true}},
	{"age two args", "SELECT age(a, b) FROM t", ReadShape{Comparable: true}},
	{"subquery own limit", "SELECT * FROM (SELECT id FROM t ORDER BY id LIMIT 5) s", ReadShape{Comparable: true}},
	{"subquery limit no order", "SELECT count(*) FROM (SELECT id FROM t LIMIT 5) s", ReadShape{Reason: "LIMIT or OFFSET without ORDER BY in a subquery"}},
	{"exists", "SELECT id FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.t_id = t.id LIMIT 1)", ReadShape{Comparable: true}},
	{"nested limit in FROM", "SELECT * FROM (SELECT id FROM t LIMIT 5) s ORDER BY id", ReadShape{Reason: "LIMIT or OFFSET without ORDER BY in a subquery"}},
	{"nested limit scalar", "SELECT (SELECT name FROM u LIMIT 1) FROM t", ReadShape{Reason: "LIMIT or OFFSET without ORDER BY in a subquery"}},
	{"nested ordered limit", "SELECT * FROM (SELECT id FROM t ORDER BY id LIMIT 5) s", ReadShape{Comparable: true}},
	{"union", "SELECT id FROM a UNION SELECT id FROM b", ReadShape{Comparable: true}},
	{"union order 1", "SELECT id FROM a UNION ALL SELECT id FROM b ORDER BY 1", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Pos: 1}}}},
	{"intersect except", "SELECT id FROM a INTERSECT SELECT id FROM b EXCEPT SELECT id FROM c", ReadShape{Comparable: true}},
	{"with", "WITH x AS (SELECT id FROM t WHERE a > 1) SELECT id FROM x", ReadShape{Comparable: true}},
	{"with recursive", "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT n FROM r", ReadShape{Comparable: true}},
	{"values", "VALUES (1, 'a'), (2, 'b')", ReadShape{Comparable: true}},
	{"values order", "VALUES (1, 'a'), (2, 'b') ORDER BY column2", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "column2"}}}},
	{"plain distinct", "SELECT DISTINCT a FROM t", ReadShape{Comparable: true}},
	{"distinct on ordered", "SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "a"}, {Name: "b"}}}},
	{"current_user", "SELECT current_user, session_user", ReadShape{Comparable: true}},
	{"now as text", "SELECT 'now'::text", ReadShape{Comparable: true}},
	{"not a catalog", "SELECT * FROM public.pg_things", ReadShape{Comparable: true}},
	{"column named like system", "SELECT xmin_total FROM t", ReadShape{Comparable: true}},

	// Sort keys and the top-level clauses.
	{"order position", "SELECT a, b FROM t ORDER BY 2 DESC, 1", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Pos: 2}, {Pos: 1}}}},
	{"order alias", "SELECT a + b AS total FROM t ORDER BY total", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "total"}}}},
	{"order plain column", "SELECT id, name FROM t ORDER BY name", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "name"}}}},
	{"order qualified", "SELECT t.id, t.name FROM t ORDER BY t.id", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}}},
	{"order qualified vs bare", "SELECT id FROM t ORDER BY t.id", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}}},
	{"order other table", "SELECT u.id FROM t JOIN u ON true ORDER BY t.id", ReadShape{Comparable: true, Ordered: true}},
	{"order star", "SELECT * FROM t ORDER BY id", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}}},
	{"order qualified star", "SELECT t.* FROM t ORDER BY t.id", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}}},
	{"order other star", "SELECT u.* FROM t JOIN u ON true ORDER BY t.id", ReadShape{Comparable: true, Ordered: true}},
	{"order expression", "SELECT a, b FROM t ORDER BY a + b", ReadShape{Comparable: true, Ordered: true}},
	{"order not output", "SELECT a FROM t ORDER BY b", ReadShape{Comparable: true, Ordered: true}},
	{"order aliased away", "SELECT b AS a, a AS c FROM t ORDER BY t.a", ReadShape{Comparable: true, Ordered: true}},
	{"order ambiguous name", "SELECT a.id, b.id FROM a JOIN b ON true ORDER BY a.id", ReadShape{Comparable: true, Ordered: true}},
	{"order mixed", "SELECT id, name AS n, x FROM t ORDER BY 3, n, id", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Pos: 3}, {Name: "n"}, {Name: "id"}}}},
	{"order mixed expression", "SELECT id, name FROM t ORDER BY 1, lower(name)", ReadShape{Comparable: true, Ordered: true}},
	{"union order name", "SELECT id AS k FROM a UNION SELECT id FROM b ORDER BY k", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "k"}}}},
	{"order limit", "SELECT id FROM t ORDER BY id LIMIT 10", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}, Limited: true}},
	{"order limit offset", "SELECT id FROM t ORDER BY id LIMIT 10 OFFSET 20", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}, Limited: true, Offset: true}},
	{"order offset", "SELECT id FROM t ORDER BY id OFFSET 5", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}, Offset: true}},
	{"fetch first", "SELECT id FROM t ORDER BY id FETCH FIRST 3 ROWS ONLY", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}, Limited: true}},
	{"fetch first with ties", "SELECT id FROM t ORDER BY id FETCH FIRST 3 ROWS WITH TIES", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}, Limited: true}},
	{"limit all", "SELECT id FROM t LIMIT ALL", ReadShape{Comparable: true}},
	{"limit null", "SELECT id FROM t LIMIT NULL", ReadShape{Comparable: true}},
	{"limit param ordered", "SELECT id FROM t ORDER BY id LIMIT $1", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Name: "id"}}, Limited: true}},
	{"union limit ordered", "SELECT id FROM a UNION SELECT id FROM b ORDER BY 1 LIMIT 3", ReadShape{Comparable: true, Ordered: true, SortKeys: []SortKey{{Pos: 1}}, Limited: true}},

	// Refused: statement kind.
	{"empty", "", ReadShape{Reason: "not a single SELECT"}},
	{"two selects", "SELECT 1; SELECT 2", ReadShape{Reason: "not a single SELECT"}},
	{"insert", "INSERT INTO t VALUES (1)", ReadShape{Reason: "not a single SELECT"}},
	{"explain", "EXPLAIN SELECT 1", ReadShape{Reason: "not a single SELECT"}},
	{"show", "SHOW search_path", ReadShape{Reason: "not a single SELECT"}},
	{"parse error", "SELEC 1", ReadShape{Reason: "does not parse: "}},
	{"nul", "SELECT 1\x00", ReadShape{Reason: "query text contains a NUL byte"}},
	{"too deep", "SELECT " + strings.Repeat("(", 13000) + "1" + strings.Repeat(")", 13000), ReadShape{Reason: "nested too deeply"}},
	{"select into", "SELECT * INTO newt FROM t", ReadShape{Reason: "SELECT INTO"}},
	{"for update", "SELECT * FROM t WHERE id = 1 FOR UPDATE", ReadShape{Reason: "locking clause FOR UPDATE"}},
	{"for share", "SELECT * FROM t FOR SHARE", ReadShape{Reason: "locking clause FOR SHARE"}},
	{"for no key update", "SELECT * FROM t FOR NO KEY UPDATE", ReadShape{Reason: "locking clause FOR NO KEY UPDATE"}},
	{"for key share nested", "SELECT * FROM (SELECT * FROM t FOR KEY SHARE) s", ReadShape{Reason: "locking clause FOR KEY SHARE"}},
	{"dml cte", "WITH d AS (DELETE FROM t RETURNING id) SELECT id FROM d", ReadShape{Reason: "data-modifying CTE"}},
	{"dml cte nested", "WITH x AS (WITH y AS (UPDATE t SET a = 1 RETURNING a) SELECT a FROM y) SELECT a FROM x", ReadShape{Reason: "data-modifying CTE"}},

	// Refused: volatile functions and values.
	{"random", "SELECT random()", ReadShape{Reason: "volatile function random()"}},
	{"random in where", "SELECT id FROM t WHERE random() < 0.5", ReadShape{Reason: "volatile function random()"}},
	{"random in case", "SELECT CASE WHEN a THEN 1 ELSE floor(random() * 10) END FROM t", ReadShape{Reason: "volatile function random()"}},
	{"random order", "SELECT id FROM t ORDER BY random()", ReadShape{Reason: "volatile function random()"}},
	{"gen_random_uuid", "SELECT gen_random_uuid()", ReadShape{Reason: "volatile function gen_random_uuid()"}},
	{"uuid qualified upper", "SELECT public.UUID_GENERATE_V4()", ReadShape{Reason: "volatile function uuid_generate_v4()"}},
	{"now qualified", "SELECT pg_catalog.now()", ReadShape{Reason: "volatile function now()"}},
	{"now in subquery", "SELECT id FROM t WHERE ts < (SELECT now())", ReadShape{Reason: "volatile function now()"}},
	{"now in cte", "WITH x AS (SELECT now() AS n) SELECT 1 FROM x", ReadShape{Reason: "volatile function now()"}},
	{"clock_timestamp", "SELECT clock_timestamp()", ReadShape{Reason: "volatile function clock_timestamp()"}},
	{"statement_timestamp", "SELECT statement_timestamp()", ReadShape{Reason: "volatile function statement_timestamp()"}},
	{"transaction_timestamp", "SELECT transaction_timestamp()", ReadShape{Reason: "volatile function transaction_timestamp()"}},
	{"timeofday", "SELECT timeofday()", ReadShape{Reason: "volatile function timeofday()"}},
	{"pg_backend_pid", "SELECT pg_backend_pid()", ReadShape{Reason: "volatile function pg_backend_pid()"}},
	{"inet_server_addr", "SELECT inet_server_addr()", ReadShape{Reason: "volatile function inet_server_addr()"}},
	{"inet_server_port", "SELECT inet_server_port()", ReadShape{Reason: "volatile function inet_server_port()"}},
	{"inet_client_addr", "SELECT inet_client_addr()", ReadShape{Reason: "volatile function inet_client_addr()"}},
	{"inet_client_port", "SELECT inet_client_port()", ReadShape{Reason: "volatile function inet_client_port()"}},
	{"postmaster start", "SELECT pg_postmaster_start_time()", ReadShape{Reason: "volatile function pg_postmaster_start_time()"}},
	{"version", "SELECT version()", ReadShape{Reason: "volatile function version()"}},
	{"relation size", "SELECT pg_relation_size('t')", ReadShape{Reason: "volatile function pg_relation_size()"}},
	{"total relation size", "SELECT pg_total_relation_size('t')", ReadShape{Reason: "volatile function pg_total_relation_size()"}},
	{"table size", "SELECT pg_table_size('t')", ReadShape{Reason: "volatile function pg_table_size()"}},
	{"indexes size", "SELECT pg_indexes_size('t')", ReadShape{Reason: "volatile function pg_indexes_size()"}},
	{"database size", "SELECT pg_database_size('db')", ReadShape{Reason: "volatile function pg_database_size()"}},
	{"column size", "SELECT pg_column_size(a) FROM t", ReadShape{Reason: "volatile function pg_column_size()"}},
	{"txid_current", "SELECT txid_current()", ReadShape{Reason: "volatile function txid_current()"}},
	{"txid_current_snapshot", "SELECT txid_current_snapshot()", ReadShape{Reason: "volatile function txid_current_snapshot()"}},
	{"pg_current_xact_id", "SELECT pg_current_xact_id()", ReadShape{Reason: "volatile function pg_current_xact_id()"}},
	{"pg_current_snapshot", "SELECT pg_current_snapshot()", ReadShape{Reason: "volatile function pg_current_snapshot()"}},
	{"wal lsn", "SELECT pg_current_wal_lsn()", ReadShape{Reason: "volatile function pg_current_wal_lsn()"}},
	{"nextval", "SELECT nextval('s')", ReadShape{Reason: "volatile function nextval()"}},
	{"currval", "SELECT currval('s')", ReadShape{Reason: "volatile function currval()"}},
	{"lastval", "SELECT lastval()", ReadShape{Reason: "volatile function lastval()"}},
	{"setval", "SELECT setval('s', 1)", ReadShape{Reason: "volatile function setval()"}},
	{"pg_sleep", "SELECT pg_sleep(1)", ReadShape{Reason: "volatile function pg_sleep()"}},
	{"age one arg", "SELECT age(born) FROM people", ReadShape{Reason: "volatile function age() with one argument"}},
	{"random in from", "SELECT * FROM generate_series(1, (random() * 10)::int) g", ReadShape{Reason: "volatile function random()"}},
	{"current_timestamp", "SELECT CURRENT_TIMESTAMP", ReadShape{Reason: "volatile function CURRENT_TIMESTAMP"}},
	{"current_timestamp precision", "SELECT id FROM t WHERE ts > CURRENT_TIMESTAMP(3)", ReadShape{Reason: "volatile function CURRENT_TIMESTAMP"}},
	{"current_time", "SELECT CURRENT_TIME", ReadShape{Reason: "volatile function CURRENT_TIME"}},
	{"localtime", "SELECT LOCALTIME", ReadShape{Reason: "volatile function LOCALTIME"}},
	{"localtimestamp", "SELECT LOCALTIMESTAMP", ReadShape{Reason: "volatile function LOCALTIMESTAMP"}},
	{"current_date", "SELECT id FROM t WHERE d = CURRENT_DATE", ReadShape{Reason: "volatile function CURRENT_DATE"}},
	{"now literal", "SELECT id FROM t WHERE ts > 'now'::timestamptz", ReadShape{Reason: "volatile literal 'now'"}},
	{"today literal", "SELECT date 'Today'", ReadShape{Reason: "volatile literal 'Today'"}},

	// Refused: system columns and catalogs.
	{"ctid", "SELECT ctid, id FROM t", ReadShape{Reason: "system column ctid"}},
	{"xmin qualified", "SELECT t.xmin FROM t", ReadShape{Reason: "system column xmin"}},
	{"xmax in where", "SELECT id FROM t WHERE xmax = 0", ReadShape{Reason: "system column xmax"}},
	{"cmin", "SELECT cmin FROM t", ReadShape{Reason: "system column cmin"}},
	{"cmax", "SELECT cmax FROM t", ReadShape{Reason: "system column cmax"}},
	{"tableoid", "SELECT tableoid::regclass, id FROM parent", ReadShape{Reason: "system column tableoid"}},
	{"pg_catalog", "SELECT relname FROM pg_catalog.pg_class", ReadShape{Reason: "reads system catalog pg_catalog.pg_class"}},
	{"information_schema", "SELECT table_name FROM information_schema.tables", ReadShape{Reason: "reads system catalog information_schema.tables"}},
	{"pg_toast", "SELECT * FROM pg_toast.pg_toast_1234", ReadShape{Reason: "reads system catalog pg_toast.pg_toast_1234"}},
	{"unqualified pg_", "SELECT * FROM pg_stat_activity", ReadShape{Reason: "reads system catalog pg_stat_activity"}},
	{"catalog in subquery", "SELECT id FROM t WHERE oid IN (SELECT oid FROM pg_class)", ReadShape{Reason: "reads system catalog pg_class"}},
	{"tablesample", "SELECT * FROM t TABLESAMPLE SYSTEM (10)", ReadShape{Reason: "TABLESAMPLE"}},

	// Refused: order-sensitive aggregates and windows.
	{"array_agg", "SELECT array_agg(id) FROM t", ReadShape{Reason: "array_agg without ORDER BY"}},
	{"string_agg", "SELECT g, string_agg(name, ',') FROM t GROUP BY g ORDER BY g", ReadShape{Reason: "string_agg without ORDER BY"}},
	{"json_agg", "SELECT json_agg(t) FROM t", ReadShape{Reason: "json_agg without ORDER BY"}},
	{"jsonb_agg nested", "SELECT * FROM (SELECT jsonb_agg(x) AS j FROM t) s", ReadShape{Reason: "jsonb_agg without ORDER BY"}},
	{"json_object_agg", "SELECT json_object_agg(k, v) FROM t", ReadShape{Reason: "json_object_agg without ORDER BY"}},
	{"jsonb_object_agg", "SELECT jsonb_object_agg(k, v) FROM t", ReadShape{Reason: "jsonb_object_agg without ORDER BY"}},
	{"xmlagg", "SELECT xmlagg(x) FROM t", ReadShape{Reason: "xmlagg without ORDER BY"}},
	{"array_agg qualified", "SELECT pg_catalog.ARRAY_AGG(id) FROM t", ReadShape{Reason: "array_agg without ORDER BY"}},
	{"array_agg distinct", "SELECT array_agg(DISTINCT id) FROM t", ReadShape{Reason: "array_agg without ORDER BY"}},
	{"array_agg unordered window", "SELECT array_agg(x) OVER (PARTITION BY g) FROM t", ReadShape{Reason: "array_agg without ORDER BY"}},
	{"json_arrayagg", "SELECT json_arrayagg(x) FROM t", ReadShape{Reason: "json_arrayagg without ORDER BY"}},
	{"json_objectagg", "SELECT json_objectagg(k : v) FROM t", ReadShape{Reason: "json_objectagg without ORDER BY"}},
	{"row_number", "SELECT id, row_number() OVER () FROM t", ReadShape{Reason: "row_number() over an unordered window"}},
	{"rank partition only", "SELECT rank() OVER (PARTITION BY g) FROM t", ReadShape{Reason: "rank() over an unordered window"}},
	{"dense_rank", "SELECT dense_rank() OVER () FROM t", ReadShape{Reason: "dense_rank() over an unordered window"}},
	{"lag", "SELECT lag(x) OVER () FROM t", ReadShape{Reason: "lag() over an unordered window"}},
	{"lead", "SELECT lead(x) OVER () FROM t", ReadShape{Reason: "lead() over an unordered window"}},
	{"ntile", "SELECT ntile(4) OVER () FROM t", ReadShape{Reason: "ntile() over an unordered window"}},
	{"first_value", "SELECT first_value(x) OVER (PARTITION BY g) FROM t", ReadShape{Reason: "first_value() over an unordered window"}},
	{"last_value", "SELECT last_value(x) OVER () FROM t", ReadShape{Reason: "last_value() over an unordered window"}},
	{"nth_value", "SELECT nth_value(x, 2) OVER () FROM t", ReadShape{Reason: "nth_value() over an unordered window"}},
	{"named unordered window", "SELECT row_number() OVER w FROM t WINDOW w AS (PARTITION BY g)", ReadShape{Reason: "row_number() over an unordered window"}},
	{"unknown window", "SELECT row_number() OVER w FROM t", ReadShape{Reason: "row_number() over an unordered window"}},

	// Refused: top-level LIMIT, OFFSET, DISTINCT ON without ORDER BY.
	{"limit", "SELECT id FROM t LIMIT 10", ReadShape{Reason: "LIMIT without ORDER BY"}},
	{"fetch first unordered", "SELECT id FROM t FETCH FIRST 1 ROW ONLY", ReadShape{Reason: "LIMIT without ORDER BY"}},
	{"offset", "SELECT id FROM t OFFSET 10", ReadShape{Reason: "OFFSET without ORDER BY"}},
	{"limit all offset", "SELECT id FROM t LIMIT ALL OFFSET 1", ReadShape{Reason: "OFFSET without ORDER BY"}},
	{"union limit", "SELECT id FROM a UNION SELECT id FROM b LIMIT 1", ReadShape{Reason: "LIMIT without ORDER BY"}},
	{"order inside only", "SELECT * FROM (SELECT id FROM t ORDER BY id) s LIMIT 3", ReadShape{Reason: "LIMIT without ORDER BY"}},
	{"distinct on", "SELECT DISTINCT ON (a) a, b FROM t", ReadShape{Reason: "DISTINCT ON without ORDER BY"}},
	{"distinct on in union", "SELECT DISTINCT ON (a) a, b FROM t UNION ALL SELECT a, b FROM u", ReadShape{Reason: "DISTINCT ON without ORDER BY"}},
}

func TestReadShape(t *testing.T) {
	for _, tc := range readShapeCases {
		t.Run(tc.name, func(t *testing.T) {
			got := ShapeOf(tc.sql)
			if !tc.want.Comparable {
				if got.Comparable || !strings.HasPrefix(got.Reason, tc.want.Reason) || tc.want.Reason == "" {
					t.Fatalf("ShapeOf(%q) = %+v, want refusal %q", tc.sql, *got, tc.want.Reason)
				}
				return
			}
			if !reflect.DeepEqual(*got, tc.want) {
				t.Fatalf("ShapeOf(%q)\n got %+v\nwant %+v", tc.sql, *got, tc.want)
			}
		})
	}
}

func TestReadShapeRefusalFields(t *testing.T) {
	// A refusal at the top level still reports what it saw.
	got := ShapeOf("SELECT id FROM t LIMIT 5 OFFSET 2")
	want := ReadShape{Reason: "LIMIT without ORDER BY", Limited: true, Offset: true}
	if !reflect.DeepEqual(*got, want) {
		t.Fatalf("got %+v, want %+v", *got, want)
	}
}

func TestReadShapeCache(t *testing.T) {
	const q = "SELECT id FROM readshape_cache ORDER BY id"
	a := ShapeOf(q)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if b := ShapeOf(q); b != a {
				t.Errorf("ShapeOf returned a different pointer for the same text")
			}
		}()
	}
	wg.Wait()
	if b := ShapeOf(q + " "); b == a {
		t.Fatal("different texts share a cached shape")
	}
	// The cache stays bounded and keeps answering correctly past its limit.
	for i := range readShapeLimit + 10 {
		ShapeOf("SELECT " + strings.Repeat("1,", i%50) + "1 FROM readshape_evict_" + string(rune('a'+i%26)) + strings.Repeat("x", i/26))
	}
	readShapes.mu.RLock()
	n := len(readShapes.cur) + len(readShapes.old)
	readShapes.mu.RUnlock()
	if n > readShapeLimit {
		t.Fatalf("cache holds %d entries, limit %d", n, readShapeLimit)
	}
	if got := ShapeOf(q); !got.Comparable || !reflect.DeepEqual(got.SortKeys, []SortKey{{Name: "id"}}) {
		t.Fatalf("after eviction: %+v", *got)
	}
}

func FuzzShapeOf(f *testing.F) {
	for _, tc := range readShapeCases {
		if len(tc.sql) < 1000 {
			f.Add(tc.sql)
		}
	}
	f.Fuzz(func(t *testing.T, sql string) {
		s := ShapeOf(sql)
		if s == nil {
			t.Fatal("nil shape")
		}
		if s.Comparable == (s.Reason != "") {
			t.Fatalf("Comparable %v with reason %q", s.Comparable, s.Reason)
		}
		if s.SortKeys != nil && !s.Ordered {
			t.Fatal("sort keys without ORDER BY")
		}
		for _, k := range s.SortKeys {
			if (k.Pos > 0) == (k.Name != "") {
				t.Fatalf("bad sort key %+v", k)
			}
		}
		if ShapeOf(sql) != s {
			t.Fatal("cache returned a different shape")
		}
	})
}
