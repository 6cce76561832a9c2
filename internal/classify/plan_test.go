package classify

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// TestPlanStatements: kind, transaction op, savepoint and replay flags of
// single statements.
func TestPlanStatements(t *testing.T) {
	c := New(1000)
	cases := []struct {
		sql       string
		kind      Kind
		tx        TxOp
		chain     bool
		savepoint string
		gid       string
		replay    bool
		local     bool
		noImage   string
	}{
		{sql: "SELECT * FROM t", kind: Read},
		{sql: "SELECT nextval('s')", kind: Write, noImage: "unsafe function nextval"},
		{sql: "SELECT * FROM t FOR UPDATE", kind: Write, noImage: "locking SELECT"},
		{sql: "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", kind: Write, noImage: "writes in a CTE"},
		{sql: "CREATE TABLE t (id int)", kind: DDL},
		{sql: "EXECUTE q(1)", kind: Unknown},
		{sql: "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", kind: Write, noImage: "MERGE"},
		{sql: "CALL p(1)", kind: Write, noImage: "CALL"},
		{sql: "DO $$BEGIN NULL; END$$", kind: Write, noImage: "DO"},
		{sql: "LOCK TABLE t", kind: Write, noImage: "LOCK"},
		{sql: "COPY t FROM STDIN", kind: Write, noImage: "COPY FROM"},
		{sql: "COPY t TO STDOUT", kind: Read},

		{sql: "BEGIN", kind: Transaction, tx: TxBegin},
		{sql: "BEGIN ISOLATION LEVEL REPEATABLE READ", kind: Transaction, tx: TxBegin},
		{sql: "START TRANSACTION READ ONLY", kind: Transaction, tx: TxBegin},
		{sql: "COMMIT", kind: Transaction, tx: TxCommit},
		{sql: "END", kind: Transaction, tx: TxCommit},
		{sql: "COMMIT AND CHAIN", kind: Transaction, tx: TxCommit, chain: true},
		{sql: "ROLLBACK", kind: Transaction, tx: TxRollback},
		{sql: "ABORT", kind: Transaction, tx: TxRollback},
		{sql: "ROLLBACK AND CHAIN", kind: Transaction, tx: TxRollback, chain: true},
		{sql: "SAVEPOINT s1", kind: Transaction, tx: TxSavepoint, savepoint: "s1"},
		{sql: "SAVEPOINT S1", kind: Transaction, tx: TxSavepoint, savepoint: "s1"},
		{sql: `SAVEPOINT "My ""Sp"""`, kind: Transaction, tx: TxSavepoint, savepoint: `My "Sp"`},
		{sql: "RELEASE s1", kind: Transaction, tx: TxRelease, savepoint: "s1"},
		{sql: `RELEASE SAVEPOINT "a b"`, kind: Transaction, tx: TxRelease, savepoint: "a b"},
		{sql: "ROLLBACK TO s1", kind: Transaction, tx: TxRollbackTo, savepoint: "s1"},
		{sql: `ROLLBACK TO SAVEPOINT "X"`, kind: Transaction, tx: TxRollbackTo, savepoint: "X"},
		{sql: "PREPARE TRANSACTION 'g1'", kind: Transaction, tx: TxPrepare, gid: "g1"},
		{sql: "COMMIT PREPARED 'g1'", kind: Transaction, tx: TxCommitPrepared, gid: "g1"},
		{sql: "ROLLBACK PREPARED 'g1'", kind: Transaction, tx: TxRollbackPrepared, gid: "g1"},

		{sql: "SET search_path = app, public", kind: Session, replay: true},
		{sql: "SET SESSION statement_timeout TO 5000", kind: Session, replay: true},
		{sql: "SET LOCAL lock_timeout = '1s'", kind: Session, replay: true, local: true},
		{sql: "SET TIME ZONE 'UTC'", kind: Session, replay: true},
		{sql: "SET x.y TO DEFAULT", kind: Session, replay: true},
		{sql: "SET search_path FROM CURRENT", kind: Session, replay: true},
		{sql: "SET ROLE app", kind: Session, replay: true},
		{sql: "SET SESSION AUTHORIZATION bob", kind: Session, replay: true},
		{sql: "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", kind: Session, replay: true, local: true},
		{sql: "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", kind: Session, replay: true},
		{sql: "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", kind: Session},
		{sql: "SET CONSTRAINTS ALL DEFERRED", kind: Session, replay: true, local: true},
		{sql: "RESET search_path", kind: Session, replay: true},
		{sql: "RESET ALL", kind: Session, replay: true},
		{sql: "DISCARD ALL", kind: Session, replay: true},
		{sql: "DISCARD PLANS", kind: Session, replay: true},
		{sql: "PREPARE q (int) AS SELECT $1", kind: Session, replay: true},
		{sql: "PREPARE w AS INSERT INTO t VALUES ($1)", kind: Session, replay: true},
		{sql: "DEALLOCATE q", kind: Session, replay: true},
		{sql: "DEALLOCATE ALL", kind: Session, replay: true},
		{sql: "SHOW TimeZone", kind: Session},
		{sql: "LISTEN ch", kind: Session},
		{sql: "UNLISTEN *", kind: Session},
		{sql: "NOTIFY ch, 'x'", kind: Session},
		{sql: "DECLARE c CURSOR FOR SELECT 1", kind: Session},
		{sql: "FETCH 10 FROM c", kind: Session},
		{sql: "CLOSE c", kind: Session},
		{sql: "LOAD 'auto_explain'", kind: Session},
		{sql: "CHECKPOINT", kind: Session},
	}
	for _, tc := range cases {
		t.Run(tc.sql, func(t *testing.T) {
			p := c.Plan(tc.sql)
			if p.Err != nil || len(p.Stmts) != 1 {
				t.Fatalf("err %v, %d statements", p.Err, len(p.Stmts))
			}
			s := p.Stmts[0]
			if s.Kind != tc.kind {
				t.Errorf("kind = %s, want %s", s.Kind, tc.kind)
			}
			if s.Tx != tc.tx || s.Chain != tc.chain || s.Savepoint != tc.savepoint || s.GID != tc.gid {
				t.Errorf("tx = %s chain %v savepoint %q gid %q, want %s %v %q %q",
					s.Tx, s.Chain, s.Savepoint, s.GID, tc.tx, tc.chain, tc.savepoint, tc.gid)
			}
			if s.Replay != tc.replay || s.Local != tc.local {
				t.Errorf("replay %v local %v, want %v %v", s.Replay, s.Local, tc.replay, tc.local)
			}
			if s.Image != nil || s.NoImage != tc.noImage {
				t.Errorf("image %v, no image %q; want none, %q", s.Image, s.NoImage, tc.noImage)
			}
			if s.SQL != tc.sql || p.SQL != tc.sql {
				t.Errorf("statement text %q, plan text %q", s.SQL, p.SQL)
			}
			if want, _ := pg_query.Fingerprint(tc.sql); s.Fingerprint != want || want == "" {
				t.Errorf("fingerprint %q, want %q", s.Fingerprint, want)
			}
		})
	}
}

// TestPlanRewrite: DML statements get a RETURNING list that ends with the
// marker and the target's row image, and otherwise mean what they meant.
func TestPlanRewrite(t *testing.T) {
	c := New(1000)
	const mark = `NULL AS "?tandem_image?", `
	cases := []struct {
		sql        string
		tail       string // what the rewrite appends
		op         string
		schema     string
		table      string
		alias      string
		clientRet  bool
		setColumns []string
		onConflict string
		ref        []string // the row image's qualifier
	}{
		{
			sql:  "INSERT INTO t (a, b) VALUES (1, 'x')",
			tail: " RETURNING " + mark + "t.*",
			op:   "insert", table: "t", ref: []string{"t"},
		},
		{
			sql:  "insert into T values ($1, $2), ($3, DEFAULT)",
			tail: " RETURNING " + mark + "t.*",
			op:   "insert", table: "t", ref: []string{"t"},
		},
		{
			sql:  "INSERT INTO t DEFAULT VALUES",
			tail: " RETURNING " + mark + "t.*",
			op:   "insert", table: "t", ref: []string{"t"},
		},
		{
			sql:  "INSERT INTO t DEFAULT VALUES RETURNING *",
			tail: ", " + mark + "t.*",
			op:   "insert", table: "t", clientRet: true, ref: []string{"t"},
		},
		{
			sql:  "INSERT INTO app.orders AS o (id, total) VALUES ($1, $2) RETURNING o.id, total * 2 AS double, now()",
			tail: ", " + mark + "o.*",
			op:   "insert", schema: "app", table: "orders", alias: "o", clientRet: true, ref: []string{"o"},
		},
		{
			sql:  "INSERT INTO t SELECT * FROM s WHERE s.x::int > $1 ORDER BY 1 LIMIT 5",
			tail: " RETURNING " + mark + "t.*",
			op:   "insert", table: "t", ref: []string{"t"},
		},
		{
			sql:  `INSERT INTO t (id, n) VALUES ($1, 1) ON CONFLICT (id) DO UPDATE SET n = t.n + excluded.n, "Upd At" = now()`,
			tail: " RETURNING " + mark + "t.*",
			op:   "insert", table: "t", setColumns: []string{"n", "Upd At"}, onConflict: "update", ref: []string{"t"},
		},
		{
			sql:  "INSERT INTO t AS x VALUES (1) ON CONFLICT ON CONSTRAINT t_pkey DO UPDATE SET n = x.n + 1 WHERE x.n < 10 RETURNING x.n",
			tail: ", " + mark + "x.*",
			op:   "insert", table: "t", alias: "x", clientRet: true, setColumns: []string{"n"}, onConflict: "update", ref: []string{"x"},
		},
		{
			sql:  "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
			tail: " RETURNING " + mark + "t.*",
			op:   "insert", table: "t", onConflict: "nothing", ref: []string{"t"},
		},
		{
			sql:  "UPDATE accounts SET balance = balance - $1 WHERE id = $2",
			tail: " RETURNING " + mark + "accounts.*",
			op:   "update", table: "accounts", setColumns: []string{"balance"}, ref: []string{"accounts"},
		},
		{
			sql:  "UPDATE ONLY public.t x SET (a, b) = (1, 2), c[1] = 3, c[2] = 4 RETURNING a b",
			tail: ", " + mark + "x.*",
			op:   "update", schema: "public", table: "t", alias: "x", clientRet: true, setColumns: []string{"a", "b", "c"}, ref: []string{"x"},
		},
		{
			sql:  "UPDATE t SET v = s.v FROM s WHERE s.id = t.id",
			tail: " RETURNING " + mark + "t.*",
			op:   "update", table: "t", setColumns: []string{"v"}, ref: []string{"t"},
		},
		{
			sql:  `UPDATE "My ""Tbl""" SET "Col A" = 1`,
			tail: " RETURNING " + mark + `"My ""Tbl""".*`,
			op:   "update", table: `My "Tbl"`, setColumns: []string{"Col A"}, ref: []string{`My "Tbl"`},
		},
		{
			sql:  `UPDATE "Sch ema"."My ""Tbl""" SET a = 1 RETURNING *`,
			tail: ", " + mark + `"Sch ema"."My ""Tbl""".*`,
			op:   "update", schema: "Sch ema", table: `My "Tbl"`, clientRet: true, setColumns: []string{"a"}, ref: []string{"Sch ema", `My "Tbl"`},
		},
		{
			sql:  `UPDATE "user" AS "Select" SET "order" = 1, name = 'x' /* inside */ WHERE id = 1`,
			tail: " RETURNING " + mark + `"Select".*`,
			op:   "update", table: "user", alias: "Select", setColumns: []string{"order", "name"}, ref: []string{"Select"},
		},
		{
			sql:  "DELETE FROM t WHERE id = $1",
			tail: " RETURNING " + mark + "t.*",
			op:   "delete", table: "t", ref: []string{"t"},
		},
		{
			sql:  "DELETE FROM public.t RETURNING id, 'gone' AS what",
			tail: ", " + mark + "public.t.*",
			op:   "delete", schema: "public", table: "t", clientRet: true, ref: []string{"public", "t"},
		},
		{
			sql:  `DELETE FROM "order" WHERE true`,
			tail: " RETURNING " + mark + `"order".*`,
			op:   "delete", table: "order", ref: []string{"order"},
		},
		{
			sql:  "DELETE FROM t AS d USING u WHERE u.id = d.id AND u.flag",
			tail: " RETURNING " + mark + "d.*",
			op:   "delete", table: "t", alias: "d", ref: []string{"d"},
		},
		{
			sql:  "WITH old AS (SELECT id FROM t WHERE ts < now() - interval '1 day') DELETE FROM t WHERE id IN (SELECT id FROM old)",
			tail: " RETURNING " + mark + "t.*",
			op:   "delete", table: "t", ref: []string{"t"},
		},
		{
			sql:  "INSERT INTO t VALUES (nextval('t_id_seq'), gen_random_uuid(), 'it''s', E'a\\nb', $$x$$)",
			tail: " RETURNING " + mark + "t.*",
			op:   "insert", table: "t", ref: []string{"t"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.sql, func(t *testing.T) {
			p := c.Plan(tc.sql)
			if p.Err != nil || len(p.Stmts) != 1 {
				t.Fatalf("err %v, %d statements", p.Err, len(p.Stmts))
			}
			s := p.Stmts[0]
			if s.Kind != Write || s.Image == nil {
				t.Fatalf("kind %s, no image: %q", s.Kind, s.NoImage)
			}
			rw := s.Image
			if want := tc.sql + tc.tail; rw.SQL != want {
				t.Errorf("rewrite\n got %s\nwant %s", rw.SQL, want)
			}
			if p.SQL != rw.SQL {
				t.Errorf("plan text %q, want the rewrite", p.SQL)
			}
			if rw.Op != tc.op || rw.Schema != tc.schema || rw.Table != tc.table || rw.Alias != tc.alias ||
				rw.ClientReturning != tc.clientRet || rw.OnConflict != tc.onConflict || !slices.Equal(rw.SetColumns, tc.setColumns) {
				t.Errorf("rewrite = %+v", *rw)
			}
			checkRewrite(t, tc.sql, rw.SQL, tc.ref)

			// The fallback, deparsing the tree, means the same.
			tree, err := pg_query.Parse(tc.sql)
			if err != nil {
				t.Fatal(err)
			}
			out, why := deparseWithImage(tree.Version, tree.Stmts[0].Stmt, tc.ref)
			if out == "" {
				t.Fatalf("deparse fallback: %s", why)
			}
			checkRewrite(t, tc.sql, out, tc.ref)
		})
	}
}

// checkRewrite proves that rewritten is valid SQL, ends its RETURNING list
// with the marker and ref.*, and is otherwise the same statement as orig
// (same tree, same parameters).
func checkRewrite(t *testing.T, orig, rewritten string, ref []string) {
	t.Helper()
	before, err := pg_query.Parse(orig)
	if err != nil {
		t.Fatal(err)
	}
	after, err := pg_query.Parse(rewritten)
	if err != nil {
		t.Fatalf("the rewrite does not parse: %v\n%s", err, rewritten)
	}
	if len(after.Stmts) != 1 {
		t.Fatalf("the rewrite has %d statements", len(after.Stmts))
	}
	stmt := after.Stmts[0].Stmt
	var ret *[]*pg_query.Node
	switch {
	case stmt.GetInsertStmt() != nil:
		ret = &stmt.GetInsertStmt().ReturningList
	case stmt.GetUpdateStmt() != nil:
		ret = &stmt.GetUpdateStmt().ReturningList
	case stmt.GetDeleteStmt() != nil:
		ret = &stmt.GetDeleteStmt().ReturningList
	default:
		t.Fatalf("the rewrite is not a DML statement: %s", rewritten)
	}
	list := *ret
	if len(list) < 2 {
		t.Fatalf("RETURNING has %d targets", len(list))
	}
	marker, star := list[len(list)-2].GetResTarget(), list[len(list)-1].GetResTarget()
	if marker.GetName() != ImageMarker || !marker.GetVal().GetAConst().GetIsnull() {
		t.Errorf("next to last target is %v, want NULL AS %q", marker, ImageMarker)
	}
	fields := star.GetVal().GetColumnRef().GetFields()
	if star.GetName() != "" || len(fields) == 0 || fields[len(fields)-1].GetAStar() == nil {
		t.Fatalf("last target is %v, want %v.*", star, ref)
	}
	var got []string
	for _, f := range fields[:len(fields)-1] {
		got = append(got, f.GetString_().GetSval())
	}
	if !slices.Equal(got, ref) {
		t.Errorf("row image of %q, want %q", got, ref)
	}
	// Without the two added targets it is the client's statement.
	*ret = list[:len(list)-2]
	if len(*ret) == 0 {
		*ret = nil
	}
	a, b := before.Stmts[0].Stmt, stmt
	clearLocations(a.ProtoReflect())
	clearLocations(b.ProtoReflect())
	if !proto.Equal(a, b) {
		t.Errorf("the rewrite changed the statement:\n%s\n%s", orig, rewritten)
	}
	if pa, pb := params(a.ProtoReflect()), params(b.ProtoReflect()); !slices.Equal(pa, pb) {
		t.Errorf("parameters %v, want %v", pb, pa)
	}
}

// params lists the $n parameter numbers in a tree, in tree order.
func params(m protoreflect.Message) []int32 {
	var out []int32
	if p, ok := m.Interface().(*pg_query.ParamRef); ok {
		out = append(out, p.Number)
	}
	eachChild(m, func(child protoreflect.Message) bool {
		out = append(out, params(child)...)
		return true
	})
	return out
}

// TestPlanNoImage: writes that cannot be row-image mirrored say why.
func TestPlanNoImage(t *testing.T) {
	c := New(1000)
	cases := []struct{ sql, why string }{
		{"WITH d AS (DELETE FROM t RETURNING *) INSERT INTO u SELECT * FROM d", "writes in a CTE"},
		{"WITH i AS (INSERT INTO log VALUES (1)) UPDATE t SET a = 1", "writes in a CTE"},
		{"WITH a AS (WITH b AS (UPDATE t SET a = 1 RETURNING a) SELECT * FROM b) DELETE FROM u", "writes in a CTE"},
		{"UPDATE t SET a = 1 WHERE CURRENT OF c", "WHERE CURRENT OF"},
		{"DELETE FROM t WHERE CURRENT OF c", "WHERE CURRENT OF"},
		{"MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id)", "MERGE"},
		{"CALL app.apply($1)", "CALL"},
		{`UPDATE t SET a = 1 RETURNING a AS "?tandem_image?"`, "uses the image marker name"},
		{"SELECT * FROM t WHERE id = 1 FOR NO KEY UPDATE", "locking SELECT"},
		{"SELECT app.bump(1), pg_advisory_lock(2)", "unsafe function app.bump, pg_advisory_lock"},
	}
	for _, tc := range cases {
		t.Run(tc.sql, func(t *testing.T) {
			p := c.Plan(tc.sql)
			if p.Err != nil || len(p.Stmts) != 1 {
				t.Fatalf("err %v, %d statements", p.Err, len(p.Stmts))
			}
			s := p.Stmts[0]
			if s.Kind != Write || s.Image != nil || s.NoImage != tc.why {
				t.Errorf("kind %s image %v reason %q, want write, none, %q", s.Kind, s.Image, s.NoImage, tc.why)
			}
			if p.SQL != tc.sql {
				t.Errorf("plan text %q changed", p.SQL)
			}
		})
	}
}

// TestPlanText: multi-statement texts keep everything outside rewritten
// statements byte for byte.
func TestPlanText(t *testing.T) {
	c := New(1000)
	const img = ` RETURNING NULL AS "?tandem_image?", t.*`
	cases := []struct {
		sql   string
		want  string
		kinds []Kind
		stmts []string
	}{
		{
			sql:   "BEGIN; INSERT INTO t VALUES (1); COMMIT",
			want:  "BEGIN; INSERT INTO t VALUES (1)" + img + "; COMMIT",
			kinds: []Kind{Transaction, Write, Transaction},
			stmts: []string{"BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"},
		},
		{
			sql:   "BEGIN;\n  insert into t values (1) ;\n\tCOMMIT;\n",
			want:  "BEGIN;\n  insert into t values (1)" + img + " ;\n\tCOMMIT;\n",
			kinds: []Kind{Transaction, Write, Transaction},
			stmts: []string{"BEGIN", "insert into t values (1)", "COMMIT"},
		},
		{
			sql:   "/* lead */ SELECT 'héllo ü'; -- note\nDELETE FROM t WHERE a = 'ß' /* tail */;SELECT 2 -- end",
			want:  "/* lead */ SELECT 'héllo ü'; -- note\nDELETE FROM t WHERE a = 'ß'" + img + " /* tail */;SELECT 2 -- end",
			kinds: []Kind{Read, Write, Read},
			stmts: []string{"SELECT 'héllo ü'", "DELETE FROM t WHERE a = 'ß'", "SELECT 2"},
		},
		{
			sql:   "UPDATE t SET a = 1;;UPDATE t SET a = 2--x",
			want:  "UPDATE t SET a = 1" + img + ";;UPDATE t SET a = 2" + img + "--x",
			kinds: []Kind{Write, Write},
			stmts: []string{"UPDATE t SET a = 1", "UPDATE t SET a = 2"},
		},
		{
			sql:   "SET search_path = app; SHOW search_path; SELECT 1",
			want:  "SET search_path = app; SHOW search_path; SELECT 1",
			kinds: []Kind{Session, Session, Read},
			stmts: []string{"SET search_path = app", "SHOW search_path", "SELECT 1"},
		},
		{sql: "", want: ""},
		{sql: "  -- only a comment\n", want: "  -- only a comment\n"},
		{sql: ";", want: ";"},
	}
	for _, tc := range cases {
		t.Run(tc.sql, func(t *testing.T) {
			p := c.Plan(tc.sql)
			if p.Err != nil {
				t.Fatal(p.Err)
			}
			if p.SQL != tc.want {
				t.Errorf("plan text\n got %q\nwant %q", p.SQL, tc.want)
			}
			var kinds []Kind
			var stmts []string
			for _, s := range p.Stmts {
				kinds = append(kinds, s.Kind)
				stmts = append(stmts, s.SQL)
				if tc.sql[s.Start:s.End] != s.SQL {
					t.Errorf("range [%d,%d) is %q, not %q", s.Start, s.End, tc.sql[s.Start:s.End], s.SQL)
				}
			}
			if !slices.Equal(kinds, tc.kinds) || !slices.Equal(stmts, tc.stmts) {
				t.Errorf("statements %v %q, want %v %q", kinds, stmts, tc.kinds, tc.stmts)
			}
			if again, err := pg_query.Parse(p.SQL); err != nil || len(again.Stmts) != len(p.Stmts) {
				t.Errorf("the plan text does not parse into %d statements: %v", len(p.Stmts), err)
			}
		})
	}
}

// TestPlanTables: tables are the statement's own.
func TestPlanTables(t *testing.T) {
	p := New(100).Plan(`SELECT * FROM a JOIN s.b ON true; UPDATE "C d" SET x = 1 FROM e`)
	if len(p.Stmts) != 2 {
		t.Fatalf("%d statements", len(p.Stmts))
	}
	if got := p.Stmts[0].Tables; !slices.Equal(got, []string{"a", "s.b"}) {
		t.Errorf("first statement's tables %q", got)
	}
	if got := p.Stmts[1].Tables; !slices.Equal(got, []string{`"C d"`, "e"}) {
		t.Errorf("second statement's tables %q", got)
	}
}

func TestPlanParseError(t *testing.T) {
	c := New(100)
	for _, sql := range []string{"SELEC 1", "SELECT 'unterminated", "INSERT INTO t VALUES (1); BOGUS", "SELECT 1\x00; DELETE FROM t"} {
		p := c.Plan(sql)
		if p.Err == nil || p.Stmts != nil || p.SQL != sql {
			t.Errorf("%q: err %v, %d statements, text %q", sql, p.Err, len(p.Stmts), p.SQL)
		}
	}
}

// TestPlanDepth: texts deep enough to crash pg_query are refused before it
// sees them; long but flat texts are planned.
func TestPlanDepth(t *testing.T) {
	c := New(100)
	for _, sql := range []string{
		"UPDATE t SET a = " + strings.Repeat("1+", 30000) + "1",
		"UPDATE t SET a = 1" + strings.Repeat(" IS NULL", 30000),
		"SELECT now()" + strings.Repeat(" AT TIME ZONE 'UTC'", 100000),
		"INSERT INTO t VALUES (" + strings.Repeat("'x'||", 30000) + "'y')",
		"SELECT 1; DELETE FROM t WHERE a = 1" + strings.Repeat("::int", 30000),
	} {
		if p := c.Plan(sql); !errors.Is(p.Err, errTooDeep) || p.SQL != sql || p.Stmts != nil {
			t.Errorf("%.40q...: err %v", sql, p.Err)
		}
	}
	var rows, ors, arms []string
	for i := range 2000 { // each list is longer than maxPathTokens in all
		rows = append(rows, fmt.Sprintf("($%d::int, 'x%d', now())", i%65535+1, i))
		ors = append(ors, fmt.Sprintf("(a = %d AND b = 'k%d')", i, i))
		arms = append(arms, fmt.Sprintf("WHEN %d THEN %d", i, i))
	}
	for _, sql := range []string{
		"INSERT INTO t VALUES " + strings.Join(rows, ", "),
		"DELETE FROM t WHERE " + strings.Join(ors, " OR "),
		"UPDATE t SET a = CASE id " + strings.Join(arms[:2000], " ") + " END",
	} {
		p := c.Plan(sql)
		if p.Err != nil || len(p.Stmts) != 1 || p.Stmts[0].Image == nil {
			t.Errorf("%.40q...: err %v, no image %q", sql, p.Err, p.Stmts[0].NoImage)
		}
	}
}

// TestPlanCache: plans are cached by text, shared, bounded and safe for
// concurrent use (run with -race).
func TestPlanCache(t *testing.T) {
	c := cachedAndBounded(t, "INSERT INTO t VALUES (1)")
	// Concurrent callers agree on one plan per text while it stays cached.
	c = New(1000)
	var wg sync.WaitGroup
	seen := make([][]*TextPlan, 8)
	for w := range 8 {
		wg.Go(func() {
			for i := range 50 {
				p := c.Plan(fmt.Sprintf("UPDATE t SET a = %d WHERE id = $1", i))
				if len(p.Stmts) != 1 || p.Stmts[0].Image == nil {
					t.Errorf("no image for statement %d", i)
				}
				seen[w] = append(seen[w], p)
			}
		})
	}
	wg.Wait()
	for w := 1; w < 8; w++ {
		for i := range seen[w] {
			if seen[w][i] != seen[0][i] {
				t.Fatalf("goroutines %d and 0 got different plans for text %d", w, i)
			}
		}
	}
}

func FuzzPlan(f *testing.F) {
	for _, s := range []string{
		"SELECT 1",
		"BEGIN; INSERT INTO t VALUES ($1) RETURNING *; COMMIT",
		"UPDATE t x SET a = 1 FROM u WHERE u.id = x.id/*c*/;DELETE FROM t--x",
		`INSERT INTO "My ""Tbl""" AS w VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 2`,
		"WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
		"SET LOCAL x = 1; SAVEPOINT a; ROLLBACK TO a",
		"SELECT 'é'; DELETE FROM t WHERE a = 'ß'",
		"SELEC 1",
		"",
	} {
		f.Add(s)
	}
	c := New(64)
	f.Fuzz(func(t *testing.T, sql string) {
		p := c.Plan(sql)
		if p.Err != nil {
			if p.Stmts != nil || p.SQL != sql {
				t.Fatalf("a failed plan must carry the input unchanged")
			}
			return
		}
		images := 0
		for _, s := range p.Stmts {
			if s.Start < 0 || s.End > len(sql) || s.Start > s.End || sql[s.Start:s.End] != s.SQL {
				t.Fatalf("statement range [%d,%d) does not hold %q", s.Start, s.End, s.SQL)
			}
			if s.Image != nil {
				images++
			}
		}
		if images == 0 {
			if p.SQL != sql {
				t.Fatalf("no image, yet the text changed: %q -> %q", sql, p.SQL)
			}
			return
		}
		again, err := pg_query.Parse(p.SQL)
		if err != nil || len(again.Stmts) != len(p.Stmts) {
			t.Fatalf("the rewritten text %q does not parse into %d statements: %v", p.SQL, len(p.Stmts), err)
		}
		if !strings.Contains(p.SQL, ImageMarker) {
			t.Fatalf("the rewritten text lacks the marker")
		}
	})
}

func BenchmarkPlanCached(b *testing.B) { benchCached(b, "UPDATE users SET name = $1 WHERE id = $2") }

func BenchmarkPlanUncached(b *testing.B) {
	benchUncached(b, "UPDATE users SET name = $1 WHERE id = %d")
}

// TestClassifyTooDeep: hostile nesting that would crash pg_query's parser is
// refused by the per-statement classification too, not only by Plan.
func TestClassifyTooDeep(t *testing.T) {
	c := New(16)
	sql := "SELECT " + strings.Repeat("1+", 30000) + "1"
	if r := c.classify(sql); r.Kind != Unknown || !errors.Is(r.Err, errTooDeep) {
		t.Fatalf("classify of a 30000-deep expression: kind %v, err %v", r.Kind, r.Err)
	}
}
