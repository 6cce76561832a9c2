package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
	"github.com/tandemdb/tandem/internal/shadowpool"
)

// shadowEnv is a pairEnv whose shadow workers report to the test.
type shadowEnv struct {
	*pairEnv
	mu      sync.Mutex
	records []mismatch.Record
	total   mismatch.Counts
}

func newShadowEnv(t *testing.T, setup string, mutate ...func(*config.Config)) *shadowEnv {
	t.Helper()
	muts := append([]func(*config.Config){func(c *config.Config) {
		c.Shadow.Settle = config.Duration(50 * time.Millisecond)
	}}, mutate...)
	se := &shadowEnv{pairEnv: newPairEnv(t, setup, muts...)}
	// Set before any read is sampled: the queue orders it before the workers' reads.
	se.proxy.srv.recordMismatch = func(_ context.Context, r mismatch.Record) error {
		se.mu.Lock()
		defer se.mu.Unlock()
		se.records = append(se.records, r)
		return nil
	}
	return se
}

// counts adds up the outcomes so far.
func (se *shadowEnv) counts() mismatch.Counts {
	se.mu.Lock()
	defer se.mu.Unlock()
	for _, c := range se.proxy.srv.TakeShadowCounts() {
		se.total.Add(c)
	}
	return se.total
}

// waitCompared waits until n reads have finished comparing (or were skipped).
func (se *shadowEnv) waitCompared(n int64) mismatch.Counts {
	se.t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		c := se.counts()
		if c.Compared()+c.Skipped+c.Dropped >= n {
			return c
		}
		if time.Now().After(deadline) {
			se.t.Fatalf("only %d of %d shadow reads finished: %+v", c.Compared()+c.Skipped+c.Dropped, n, c)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (se *shadowEnv) mismatches() []mismatch.Record {
	se.mu.Lock()
	defer se.mu.Unlock()
	return append([]mismatch.Record(nil), se.records...)
}

// A difference planted on new shows up as a mismatch of every read that
// touches it, with a diff naming the row and column, and not for the
// reads that do not; on either protocol.
func TestShadowTruePositive(t *testing.T) {
	se := newShadowEnv(t, `CREATE TABLE t (id int PRIMARY KEY, v text, n numeric(10,2));
		INSERT INTO t SELECT g, 'v' || g, g * 1.5 FROM generate_series(1, 50) g;`,
		func(c *config.Config) { c.Shadow.RecordValues = true })
	ctx := context.Background()
	if err := se.new.Exec(ctx, se.db, `UPDATE t SET v = 'planted' WHERE id = 7; DELETE FROM t WHERE id = 9`); err != nil {
		t.Fatal(err)
	}
	se.set(route.Settings{Primary: route.Old, Mirror: true, Shadow: 100})
	c := se.client()
	var v string
	// Extended protocol, a touched row: the client gets old's answer.
	if err := c.QueryRow(ctx, `SELECT v FROM t WHERE id = $1`, 7).Scan(&v); err != nil || v != "v7" {
		t.Fatalf("served %q, %v", v, err)
	}
	// Untouched rows: no mismatch.
	for _, id := range []int{1, 2, 3} {
		if err := c.QueryRow(ctx, `SELECT v FROM t WHERE id = $1`, id).Scan(&v); err != nil {
			t.Fatal(err)
		}
	}
	// Simple protocol, an unordered range over both planted rows.
	if _, err := c.Exec(ctx, `SELECT id, v, n FROM t WHERE id BETWEEN 5 AND 10`, pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	cnt := se.waitCompared(5)
	if cnt.Mismatched != 2 || cnt.Matched != 3 {
		t.Fatalf("outcomes %+v, want 2 mismatched and 3 matched", cnt)
	}
	recs := se.mismatches()
	if len(recs) != 2 {
		t.Fatalf("%d records", len(recs))
	}
	byStmt := map[string]mismatch.Record{}
	for _, r := range recs {
		byStmt[r.Statement] = r
		if r.ServedBy != "old" || r.ShadowOn != "new" || r.AA || r.Kind != "rows" || r.Fingerprint == "" {
			t.Errorf("record %+v", r)
		}
	}
	point, ok := byStmt[`SELECT v FROM t WHERE id = $1`]
	if !ok {
		t.Fatalf("no record for the point read: %+v", recs)
	}
	if len(point.Params) != 1 || point.Params[0] == nil {
		t.Errorf("params %v", point.Params)
	}
	var d shadow.Diff
	if err := json.Unmarshal(point.Diff, &d); err != nil {
		t.Fatal(err)
	}
	// One column, no key to pair by: the row is on one side only.
	if len(d.OnlyServed) != 1 || len(d.OnlyShadow) != 1 || *d.OnlyServed[0][0] != "v7" || *d.OnlyShadow[0][0] != "planted" {
		t.Errorf("point diff %s", point.Diff)
	}
	rng, ok := byStmt[`SELECT id, v, n FROM t WHERE id BETWEEN 5 AND 10`]
	if !ok {
		t.Fatalf("no record for the range read: %+v", recs)
	}
	if err := json.Unmarshal(rng.Diff, &d); err != nil {
		t.Fatal(err)
	}
	if d.ServedRows != 6 || d.ShadowRows != 5 || len(d.Changed) != 1 || d.Changed[0].Key != "7" ||
		len(d.OnlyServed) != 1 || *d.OnlyServed[0][0] != "9" {
		t.Errorf("range diff %s", rng.Diff)
	}
	if ch := d.Changed[0].Columns["v"]; *ch[0] != "v7" || *ch[1] != "planted" {
		t.Errorf("changed column %v", d.Changed[0].Columns)
	}

	// With the reads shifted to new, the shadow runs on old and the
	// record says so.
	se.set(route.Settings{Primary: route.Old, Mirror: true, Reads: 100, Shadow: 100})
	c2 := se.client()
	if err := c2.QueryRow(ctx, `SELECT v FROM t WHERE id = $1`, 7).Scan(&v); err != nil || v != "planted" {
		t.Fatalf("shifted read served %q, %v", v, err)
	}
	se.waitCompared(6)
	recs = se.mismatches()
	if last := recs[len(recs)-1]; len(recs) != 3 || last.ServedBy != "new" || last.ShadowOn != "old" {
		t.Fatalf("shifted read's record: %+v", recs)
	}
}

// Results that differ only in what normalisation removes are equal: the
// order of an unordered result, ties under ORDER BY, numeric scale, json
// key order and whitespace against jsonb, time zones of timestamptz,
// floats within the tolerance, NULLs, bpchar padding.
func TestShadowNormalisation(t *testing.T) {
	se := newShadowEnv(t, "")
	ctx := context.Background()
	if err := se.old.Exec(ctx, se.db, `CREATE TABLE t (id int PRIMARY KEY, grp int, n numeric(10,2), j json, ts timestamptz, f float8, c char(6), arr float8[]);
		INSERT INTO t SELECT g, g % 3, g * 0.5, ('{"b": ' || g || ', "a": [1, 2]}')::json, '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 hour',
			g / 3.0, 'c' || g, ARRAY[g / 7.0, NULL]
		FROM generate_series(1, 40) g;
		INSERT INTO t VALUES (100, NULL, NULL, NULL, NULL, NULL, NULL, NULL);`); err != nil {
		t.Fatal(err)
	}
	// New: another physical order, jsonb, unconstrained numeric, text for
	// char, a session time zone far from UTC.
	if err := se.new.Exec(ctx, se.db, fmt.Sprintf(`CREATE TABLE t (id int PRIMARY KEY, grp int, n numeric, j jsonb, ts timestamptz, f float8, c text, arr float8[]);
		INSERT INTO t SELECT g, g %% 3, (g * 0.5)::numeric(10,3), ('{"a": [1,2], "b": ' || g || '}')::jsonb, '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 hour',
			g / 3.0 + (g / 3.0) * 1e-12, 'c' || g, ARRAY[g / 7.0, NULL]
		FROM generate_series(40, 1, -1) g;
		INSERT INTO t VALUES (100, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
		ALTER DATABASE %s SET timezone = 'Asia/Kolkata';`, pgx.Identifier{se.db}.Sanitize())); err != nil {
		t.Fatal(err)
	}
	se.set(route.Settings{Primary: route.Old, Mirror: true, Shadow: 100})
	c := se.client()
	reads := []string{
		`SELECT * FROM t`,
		`SELECT * FROM t WHERE id > 10`,
		`SELECT grp, id, n FROM t ORDER BY grp`, // ties within each group
		`SELECT grp, count(*), sum(n), max(ts) FROM t GROUP BY grp`,
		`SELECT id, j, ts FROM t ORDER BY ts DESC, id LIMIT 7`,
		`SELECT id, arr FROM t ORDER BY 1`,
	}
	for _, q := range reads {
		for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeCacheStatement} {
			rows, err := c.Query(ctx, q, mode)
			if err != nil {
				t.Fatal(err)
			}
			rows.Close()
			if rows.Err() != nil {
				t.Fatalf("%s: %v", q, rows.Err())
			}
		}
	}
	cnt := se.waitCompared(int64(2 * len(reads)))
	if cnt.Matched != int64(2*len(reads)) {
		for _, r := range se.mismatches() {
			t.Logf("mismatch %s: %s %s", r.Statement, r.Summary, r.Diff)
		}
		t.Fatalf("outcomes %+v: want all %d matched", cnt, 2*len(reads))
	}
	// And a real difference in a float beyond the tolerance is still one.
	if err := se.new.Exec(ctx, se.db, `UPDATE t SET f = f * 1.001 WHERE id = 4`); err != nil {
		t.Fatal(err)
	}
	rows, err := c.Query(ctx, `SELECT id, f FROM t WHERE id < 10`)
	if err != nil {
		t.Fatal(err)
	}
	rows.Close()
	if cnt := se.waitCompared(int64(2*len(reads)) + 1); cnt.Mismatched != 1 {
		t.Fatalf("float beyond tolerance: %+v", cnt)
	}
}

// Reads the comparer cannot judge are skipped, not compared: volatile
// functions, LIMIT without ORDER BY; and a full queue drops, never waits.
func TestShadowSkipsAndDrops(t *testing.T) {
	se := newShadowEnv(t, `CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 20) g;`,
		func(c *config.Config) { c.Shadow.Queue, c.Shadow.Workers = 1, 1 })
	ctx := context.Background()
	se.set(route.Settings{Primary: route.Old, Mirror: true, Shadow: 100})
	c := se.client()
	for _, q := range []string{`SELECT now(), id FROM t`, `SELECT id FROM t LIMIT 3`, `SELECT random()`} {
		rows, err := c.Query(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		rows.Close()
	}
	cnt := se.waitCompared(3)
	if cnt.Skipped != 3 || cnt.Compared() != 0 {
		t.Fatalf("outcomes %+v: want 3 skipped", cnt)
	}
	// Hold the only worker, fill the queue (one slot), and the next
	// samples are dropped: the client never waits for the shadow.
	held, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	se.proxy.srv.knobs.BeforeShadow = func() {
		once.Do(func() { close(held); <-release })
	}
	start := time.Now()
	for range 50 {
		var id int
		if err := c.QueryRow(ctx, `SELECT id FROM t WHERE id = 1`).Scan(&id); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("50 reads with the shadow worker held took %v", time.Since(start))
	<-held
	close(release)
	cnt = se.waitCompared(3 + 50)
	// The held worker took one or a few samples before it stopped, the
	// queue holds one more: the rest (nearly all) were dropped.
	if cnt.Dropped < 40 || cnt.Matched < 1 || cnt.Dropped+cnt.Matched != 50 {
		t.Fatalf("with the only worker held: %+v, want nearly all 50 dropped and the rest matched", cnt)
	}
	if len(se.mismatches()) != 0 {
		t.Fatalf("mismatches: %+v", se.mismatches())
	}
}

// No false mismatch over many shadowed reads while 16 writers change the
// same rows through the proxy: in dual-write mode (half the reads served
// by each store, each shadowed on the other) and in A/A mode.
func TestShadowNoFalsePositives(t *testing.T) {
	reads := 10000
	if testing.Short() || os.Getenv("TANDEM_TEST_RELAY") != "" {
		reads = 1500 // the shadow path does not depend on the relay engine: the default run does the 10k
	}
	for _, aa := range []bool{false, true} {
		t.Run(fmt.Sprintf("aa=%v", aa), func(t *testing.T) {
			se := newShadowEnv(t, `CREATE TABLE acct (id serial PRIMARY KEY, owner text NOT NULL, balance numeric(12,2) NOT NULL,
					score float8, seen timestamptz NOT NULL DEFAULT now(), tags jsonb);
				INSERT INTO acct (owner, balance, score, seen, tags)
					SELECT 'o' || (g % 50), g, g / 7.0, '2026-01-01 00:00:00+00', jsonb_build_object('g', g) FROM generate_series(1, 2000) g;`,
				func(c *config.Config) {
					c.Shadow.AA = aa
					c.Shadow.Queue = reads + 100 // every read is compared, none dropped
					c.Shadow.Workers = 6
					// A machine loaded by other test packages can hold a
					// mirrored write past the default 500ms budget: its table
					// then has open drift and its reads are skipped, not
					// compared. The budget is not what this test is about.
					c.Routing.MirrorBudget = config.Duration(5 * time.Second)
				})
			ctx := context.Background()
			var stop atomic.Bool // writers stop between statements, never mid-flight
			se.set(route.Settings{Primary: route.Old, Mirror: true, Reads: 50, Shadow: 100})

			var writes atomic.Int64
			var wg sync.WaitGroup
			for w := range 16 {
				wg.Go(func() {
					c := se.client()
					r := rand.New(rand.NewPCG(uint64(w), 7))
					for !stop.Load() {
						id := 1 + r.IntN(2000)
						var err error
						switch r.IntN(4) {
						case 0:
							_, err = c.Exec(ctx, `UPDATE acct SET balance = balance + 1, seen = now(), score = score * 1.01 WHERE id = $1`, id)
						case 1:
							_, err = c.Exec(ctx, `UPDATE acct SET tags = tags || jsonb_build_object('w', $2::int), owner = 'o' || ($2::int % 50) WHERE id = $1`, id, w)
						case 2:
							_, err = c.Exec(ctx, `INSERT INTO acct (owner, balance, score) VALUES ($1, 0, 0.5)`, fmt.Sprintf("o%d", r.IntN(50)))
						case 3:
							_, err = c.Exec(ctx, `DELETE FROM acct WHERE id = (SELECT max(id) FROM acct WHERE id > 2000)`)
						}
						if err != nil {
							t.Errorf("writer: %v", err)
							return
						}
						writes.Add(1)
					}
				})
			}
			queries := []func(r *rand.Rand) (string, []any){
				func(r *rand.Rand) (string, []any) { return `SELECT * FROM acct WHERE id = $1`, []any{1 + r.IntN(2000)} },
				func(r *rand.Rand) (string, []any) {
					lo := 1 + r.IntN(1990)
					return `SELECT id, balance, score FROM acct WHERE id BETWEEN $1 AND $2`, []any{lo, lo + 10}
				},
				func(r *rand.Rand) (string, []any) {
					return `SELECT owner, count(*), sum(balance) FROM acct WHERE owner = $1 GROUP BY owner`, []any{fmt.Sprintf("o%d", r.IntN(50))}
				},
				func(r *rand.Rand) (string, []any) {
					return `SELECT id, owner, seen FROM acct WHERE id > $1 ORDER BY owner, id LIMIT 15`, []any{r.IntN(2000)}
				},
				func(r *rand.Rand) (string, []any) {
					return fmt.Sprintf(`SELECT id, tags FROM acct WHERE id = %d`, 1+r.IntN(2000)), nil // simple-protocol text
				},
			}
			var issued atomic.Int64
			var rg sync.WaitGroup
			for g := range 4 {
				rg.Go(func() {
					c := se.client()
					r := rand.New(rand.NewPCG(uint64(100+g), 11))
					for issued.Add(1) <= int64(reads) {
						q, args := queries[r.IntN(len(queries))](r)
						var rows pgx.Rows
						var err error
						if args == nil {
							rows, err = c.Query(ctx, q, pgx.QueryExecModeSimpleProtocol)
						} else {
							rows, err = c.Query(ctx, q, args...)
						}
						if err != nil {
							t.Errorf("read: %v", err)
							return
						}
						rows.Close()
						if rows.Err() != nil {
							t.Errorf("read %s: %v", q, rows.Err())
							return
						}
					}
				})
			}
			rg.Wait()
			cnt := se.waitCompared(int64(reads))
			stop.Store(true)
			wg.Wait()
			t.Logf("aa=%v: %d reads shadowed while %d writes ran: %+v", aa, reads, writes.Load(), cnt)
			if cnt.Mismatched != 0 {
				for _, r := range se.mismatches() {
					t.Logf("false mismatch: %s %v: %s %s", r.Statement, r.Params, r.Summary, r.Diff)
				}
				t.Fatalf("%d false mismatches", cnt.Mismatched)
			}
			if cnt.Compared() < int64(reads)*9/10 || cnt.Dropped != 0 {
				t.Fatalf("only %d of %d reads compared: %+v", cnt.Compared(), reads, cnt)
			}
			if writes.Load() < 100 {
				t.Fatalf("only %d writes ran alongside", writes.Load())
			}
			// The stores still agree: nothing the shadow did wrote anything.
			if n := se.openDrift(); n != 0 {
				t.Fatalf("%d drift entries", n)
			}
			se.assertEqual("acct", "id")
		})
	}
}

func TestShadowFieldsFromRowDescription(t *testing.T) {
	// name "id", table 0, attnum 0, int8 (20), len 8, typmod -1, binary.
	raw := append([]byte("id\x00"), 0, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 8, 0xff, 0xff, 0xff, 0xff, 0, 1)
	fs := shadowFields([]field{{name: "id", raw: raw}})
	if len(fs) != 1 || fs[0].OID != 20 || fs[0].Format != 1 || fs[0].Name != "id" {
		t.Fatalf("%+v", fs)
	}
	if got := shadowpool.SkipReason("volatile function random()"); got != "volatile_function" {
		t.Fatalf("skipReason: %q", got)
	}
}

// A read of a renamed table is rewritten through the mapping for new
// (table and column names; the renamed column keeps its old output name),
// so equal rows match and a planted change on new is a mismatch. A read
// that touches a computed column cannot be rewritten and is skipped.
func TestShadowThroughMapping(t *testing.T) {
	se := newShadowEnv(t, "", func(c *config.Config) { c.Shadow.RecordValues = true })
	ctx := context.Background()
	if err := se.old.Exec(ctx, se.db, `CREATE TABLE users (id int PRIMARY KEY, mail text, first_name text, last_name text);
		INSERT INTO users SELECT g, 'u' || g || '@x', 'F' || g, 'L' || g FROM generate_series(1, 30) g;`); err != nil {
		t.Fatal(err)
	}
	if err := se.new.Exec(ctx, se.db, `CREATE TABLE accounts (id int PRIMARY KEY, email text, full_name text);
		INSERT INTO accounts SELECT g, 'u' || g || '@x', 'F' || g || ' L' || g FROM generate_series(1, 30) g;`); err != nil {
		t.Fatal(err)
	}
	ms, _, _ := se.loadMappings(t, config.Tables{Map: map[string]config.TableMap{"public.users": {
		To: "public.accounts", Rename: map[string]string{"mail": "email"},
		Compute: map[string]string{"full_name": "first_name || ' ' || last_name"},
		Reverse: map[string]string{"first_name": "split_part(full_name, ' ', 1)", "last_name": "split_part(full_name, ' ', 2)"},
	}}})
	se.proxy.srv.SetMappings(ms)
	se.set(route.Settings{Primary: route.Old, Mirror: true, Shadow: 100})
	c := se.client()
	read := func(q string, args ...any) {
		t.Helper()
		rows, err := c.Query(ctx, q, args...)
		if err != nil {
			t.Fatal(err)
		}
		rows.Close()
		if rows.Err() != nil {
			t.Fatal(rows.Err())
		}
	}
	read(`SELECT id, mail FROM users WHERE id <= $1 ORDER BY mail`, 10)
	read(`SELECT u.mail FROM users u WHERE u.id = $1`, 3)
	read(`SELECT first_name FROM users WHERE id = $1`, 3) // first_name feeds a computed column: not on new
	cnt := se.waitCompared(3)
	if cnt.Matched != 2 || cnt.Skipped != 1 {
		t.Fatalf("outcomes %+v: want 2 matched through the mapping and 1 skipped", cnt)
	}
	if err := se.new.Exec(ctx, se.db, `UPDATE accounts SET email = 'changed' WHERE id = 3`); err != nil {
		t.Fatal(err)
	}
	read(`SELECT u.mail FROM users u WHERE u.id = $1`, 3)
	if cnt := se.waitCompared(4); cnt.Mismatched != 1 {
		t.Fatalf("planted change behind a mapping: %+v", cnt)
	}
	recs := se.mismatches()
	var d shadow.Diff
	if err := json.Unmarshal(recs[0].Diff, &d); err != nil || len(d.OnlyShadow) != 1 || *d.OnlyShadow[0][0] != "changed" {
		t.Fatalf("diff %s %v", recs[0].Diff, err)
	}
}

// A session's state reaches its shadow runs: a SET made before the session
// left the byte relay (search_path: the same name is another table), and a
// statement prepared before it (no Describe seen by the routed engine:
// the worker describes it on the served store).
func TestShadowSessionState(t *testing.T) {
	se := newShadowEnv(t, `CREATE SCHEMA s2;
		CREATE TABLE public.t (id int PRIMARY KEY, v text); INSERT INTO public.t VALUES (1, 'public');
		CREATE TABLE s2.t (id int PRIMARY KEY, v text); INSERT INTO s2.t VALUES (1, 's2');`)
	ctx := context.Background()
	// On new, public.t differs: a shadow that ignored search_path would
	// read it and report a mismatch.
	if err := se.new.Exec(ctx, se.db, `UPDATE public.t SET v = 'other'`); err != nil {
		t.Fatal(err)
	}
	c := se.client() // passthrough: the byte relay
	if _, err := c.Exec(ctx, `SET search_path = s2`); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Prepare(ctx, "byid", `SELECT id, v FROM t WHERE id = $1`); err != nil {
		t.Fatal(err)
	}
	se.set(route.Settings{Primary: route.Old, Mirror: true, Shadow: 100})
	var v string
	if err := c.QueryRow(ctx, "byid", 1).Scan(new(int), &v); err != nil || v != "s2" {
		t.Fatalf("read %q %v", v, err)
	}
	if cnt := se.waitCompared(1); cnt.Matched != 1 {
		t.Fatalf("outcomes %+v: want the prepared read in s2 matched", cnt)
	}
}

// Parameters can be left out of mismatch records, and a served result
// over shadow.max_result_bytes is skipped, not compared.
func TestShadowRedactAndSizeBound(t *testing.T) {
	se := newShadowEnv(t, `CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 100) g;`,
		func(c *config.Config) { c.Shadow.MaxResultBytes = 4 * config.KiB })
	ctx := context.Background()
	if err := se.new.Exec(ctx, se.db, `UPDATE t SET v = 'planted' WHERE id = 5`); err != nil {
		t.Fatal(err)
	}
	se.set(route.Settings{Primary: route.Old, Mirror: true, Shadow: 100})
	c := se.client()
	var v string
	if err := c.QueryRow(ctx, `SELECT v FROM t WHERE id = $1`, 5).Scan(&v); err != nil {
		t.Fatal(err)
	}
	rows, err := c.Query(ctx, `SELECT * FROM t`) // ~10 kB
	if err != nil {
		t.Fatal(err)
	}
	rows.Close()
	cnt := se.waitCompared(2)
	if cnt.Mismatched != 1 || cnt.Skipped != 1 {
		t.Fatalf("outcomes %+v: want 1 mismatched and the large read skipped", cnt)
	}
	if recs := se.mismatches(); len(recs) != 1 || recs[0].Params != nil {
		t.Fatalf("records %+v: want one, without parameters", recs)
	}
}
