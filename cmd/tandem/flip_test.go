package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
	"go.uber.org/goleak"
)

// adminClient calls one proxy's admin API.
type adminClient struct {
	t    *testing.T
	addr string
	http *http.Client
}

func newAdminClient(t *testing.T, rp *runningProxy) *adminClient {
	return &adminClient{t: t, addr: rp.AdminAddr(), http: &http.Client{
		Timeout: time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}}
}

// call sends body to path and decodes the reply into v; it returns the
// status and the raw reply.
func (a *adminClient) call(method, path, body string, v any) (int, string) {
	a.t.Helper()
	resp, b := harness.Request(a.t, a.http, method, "http://"+a.addr+path, body)
	if v != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, v); err != nil {
			a.t.Fatalf("%s %s: %v\n%s", method, path, err, b)
		}
	}
	return resp.StatusCode, string(b)
}

// waitLive waits until n replicas are live: a change waits only for the
// replicas it has heard from.
func (a *adminClient) waitLive(n int) {
	a.t.Helper()
	waitFor(a.t, func() bool {
		var st control.Status
		if code, _ := a.call("GET", "/api/v1/state", "", &st); code != http.StatusOK {
			return false
		}
		live := 0
		for _, r := range st.Replicas {
			if r.Live {
				live++
			}
		}
		return live == n
	})
}

// change posts a routing change or rollback and checks that it succeeded
// and that every replica acknowledged it.
func (a *adminClient) change(path, body string, replicas ...string) control.Result {
	a.t.Helper()
	var res control.Result
	code, raw := a.call("POST", path, body, &res)
	if code != http.StatusOK {
		a.t.Fatalf("POST %s %s: %d %s", path, body, code, raw)
	}
	acked := slices.Sorted(slices.Values(res.Report.Acked))
	if !slices.Equal(acked, replicas) || len(res.Report.NotAcked) > 0 {
		a.t.Fatalf("POST %s %s: acknowledged by %v (not by %v), want %v", path, body, acked, res.Report.NotAcked, replicas)
	}
	return res
}

// backfillAll runs `tandem backfill -c file` to the end, as the playbook
// does before a write flip.
func backfillAll(t *testing.T, file string) {
	t.Helper()
	out, errOut, err := cli("backfill", "-c", file, "--chunk", "500")
	if err != nil {
		t.Fatalf("tandem backfill: %v\n%s%s", err, out, errOut)
	}
}

// writeLoad is the flip test's client traffic: writers through the proxies
// that remember what they were acknowledged.
type writeLoad struct {
	mu      sync.Mutex
	ids     []int64       // every acknowledged insert into items
	hits    map[int]int64 // acknowledged increments per counter
	commits int           // acknowledged transactions
	errs    []error       // what clients saw
	wg      sync.WaitGroup
	stop    chan struct{}
}

// run starts writers writers, writer w on dsns[w%len(dsns)], until stop.
// Each loops over: an autocommit INSERT ... RETURNING id; a transaction
// that inserts, updates the inserted row and increments a shared counter.
func (l *writeLoad) run(t *testing.T, dsns []string, writers, counters int) {
	l.stop = make(chan struct{})
	l.hits = map[int]int64{}
	ctx := context.Background()
	for w := range writers {
		l.wg.Go(func() {
			fail := func(err error) {
				l.mu.Lock()
				l.errs = append(l.errs, fmt.Errorf("writer %d: %w", w, err))
				l.mu.Unlock()
			}
			c, err := pgx.Connect(ctx, dsns[w%len(dsns)])
			if err != nil {
				fail(err)
				return
			}
			defer c.Close(ctx)
			for i := 0; ; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				var id int64
				if i%3 == 0 {
					if err := c.QueryRow(ctx, `INSERT INTO items (writer, n, note) VALUES ($1, $2, 'auto') RETURNING id`, w, i).Scan(&id); err != nil {
						fail(fmt.Errorf("autocommit insert %d: %w", i, err))
						return
					}
					l.mu.Lock()
					l.ids = append(l.ids, id)
					l.mu.Unlock()
					continue
				}
				counter := 1 + (w+i)%counters
				err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
					if err := tx.QueryRow(ctx, `INSERT INTO items (writer, n, note) VALUES ($1, $2, 'tx') RETURNING id`, w, i).Scan(&id); err != nil {
						return err
					}
					if _, err := tx.Exec(ctx, `UPDATE items SET note = note || ' updated', n = n + 1000000 WHERE id = $1`, id); err != nil {
						return err
					}
					_, err := tx.Exec(ctx, `UPDATE counters SET hits = hits + 1, at = clock_timestamp() WHERE id = $1`, counter)
					return err
				})
				if err != nil {
					fail(fmt.Errorf("transaction %d: %w", i, err))
					return
				}
				l.mu.Lock()
				l.ids = append(l.ids, id)
				l.hits[counter]++
				l.commits++
				l.mu.Unlock()
			}
		})
	}
}

func (l *writeLoad) acked() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.ids)
}

func (l *writeLoad) finish() {
	close(l.stop)
	l.wg.Wait()
}

// storeHash is an independent fingerprint of a table on one store: md5 of
// every row as text, in key order, and the row count.
func storeHash(t *testing.T, c *pgtest.Cluster, tbl, key string) (string, int) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, c.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var h string
	var n int
	if err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT coalesce(md5(string_agg(r::text, '|' ORDER BY %s)), ''), count(*) FROM %s r`, key, tbl)).Scan(&h, &n); err != nil {
		t.Fatal(err)
	}
	return h, n
}

// TestFlipUnderLoad is the write flip and the rollback as an operator runs
// them: two proxy replicas share the control schema on old, 16 writers
// spread across them insert (autocommit and in transactions) and update
// shared counters, and the flip to primary=new and the rollback to old run
// through the admin API while they write. No client sees an error, both
// replicas acknowledge every change, old and new end identical, and every
// acknowledged insert is there exactly once.
func TestFlipUnderLoad(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	const writers, counters = 16, 8
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, fmt.Sprintf(`CREATE TABLE items (id serial PRIMARY KEY, writer int NOT NULL, n int NOT NULL, note text,
				at timestamptz NOT NULL DEFAULT clock_timestamp());
			CREATE TABLE counters (id int PRIMARY KEY, hits bigint NOT NULL DEFAULT 0, at timestamptz);
			INSERT INTO counters (id) SELECT generate_series(1, %d);`, counters))
	}
	replicas := []string{"flip-a", "flip-b"}
	file, proxies, stopAll := startReplicas(t, oldC, newC, replicas...)
	defer stopAll()
	a, b := newAdminClient(t, proxies[0]), newAdminClient(t, proxies[1])
	// Both replicas must be live before mirroring is turned on, or a
	// change would not wait for the one not yet heard from.
	a.waitLive(len(replicas))
	a.change("/api/v1/route", `{"mirror": true, "reason": "dual-write"}`, replicas...)

	var dsns []string
	for _, rp := range proxies {
		dsns = append(dsns, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable&application_name=flip-load", rp.Addr()))
	}
	var load writeLoad
	load.run(t, dsns, writers, counters)
	stopped := false
	defer func() {
		if !stopped {
			load.finish()
		}
	}()
	// Let every writer get going, with mirroring on.
	waitFor(t, func() bool { return load.acked() >= 200 })
	// The playbook's backfill, under the load: the flip's gate waits for it.
	backfillAll(t, file)
	verifyAll(t, file) // and its verify gate, also under the load

	before := load.acked()
	flip := a.change("/api/v1/route", `{"primary": "new", "reads": 100, "reason": "cutover under load"}`, replicas...)
	if !flip.Report.Flip || flip.Report.FenceMS <= 0 || flip.State.Primary != route.New ||
		!slices.Equal(slices.Sorted(slices.Values(flip.Report.Drained)), replicas) {
		t.Fatalf("write flip: %+v", flip)
	}
	t.Logf("write flip under load: fence held %.2f ms, drained by %v, acknowledged by %v, sequences %+v (%d inserts acknowledged before)",
		flip.Report.FenceMS, flip.Report.Drained, flip.Report.Acked, flip.Report.Sequences, before)
	for _, rp := range proxies {
		if st := rp.srv.State(); st.Version != flip.State.Version || st.Primary != route.New {
			t.Fatalf("a replica is on version %d %s after the flip", st.Version, st.Settings)
		}
	}

	// Keep writing on new as primary for about a second.
	afterFlip := load.acked()
	time.Sleep(time.Second)
	if load.acked() <= afterFlip {
		t.Fatalf("no write was acknowledged in the second after the flip (%d)", afterFlip)
	}

	rollback := b.change("/api/v1/rollback", `{"reason": "drill under load"}`, replicas...)
	if !rollback.Report.Flip || rollback.Report.FenceMS <= 0 || rollback.State.Primary != route.Old || rollback.State.Reads != 0 {
		t.Fatalf("rollback: %+v", rollback)
	}
	t.Logf("rollback under load: fence held %.2f ms, acknowledged by %v", rollback.Report.FenceMS, rollback.Report.Acked)
	afterRollback := load.acked()
	waitFor(t, func() bool { return load.acked() >= afterRollback+100 })
	stopped = true
	load.finish()

	for _, err := range load.errs {
		t.Errorf("client error: %v", err)
	}
	t.Logf("%d inserts and %d transactions acknowledged (%d after the flip, %d after the rollback)",
		len(load.ids), load.commits, afterRollback-afterFlip, len(load.ids)-afterRollback)

	// No drift: nothing was recorded, or the repairer closed it.
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	var recorded int64
	if err := ctl.QueryRow(ctx, "SELECT count(*) FROM tandem.drift").Scan(&recorded); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		n, err := table.OpenDriftTotal(ctx, ctl)
		return err == nil && n == 0
	})
	if recorded > 0 {
		t.Logf("%d drift entries were recorded and repaired", recorded)
	}

	// Old and new hold the same rows.
	for _, tbl := range []string{"items", "counters"} {
		ho, no := storeHash(t, oldC, tbl, "id")
		hn, nn := storeHash(t, newC, tbl, "id")
		if ho != hn || no != nn {
			t.Errorf("%s differs: old %d rows %s, new %d rows %s", tbl, no, ho, nn, hn)
		}
	}

	// Every acknowledged insert is there exactly once, and nothing else.
	seen := map[int64]int{}
	for _, id := range load.ids {
		seen[id]++
		if seen[id] == 2 {
			t.Errorf("id %d was acknowledged to two inserts", id)
		}
	}
	for name, c := range map[string]*pgtest.Cluster{"old": oldC, "new": newC} {
		conn, err := pgx.Connect(ctx, c.DSN("postgres"))
		if err != nil {
			t.Fatal(err)
		}
		rows, _ := conn.Query(ctx, "SELECT id FROM items")
		ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			t.Fatal(err)
		}
		var stored int
		for _, id := range ids {
			if seen[id] == 0 {
				t.Errorf("%s store: items has id %d, which no client was acknowledged", name, id)
			}
			stored++
		}
		if stored != len(seen) {
			t.Errorf("%s store: items has %d rows, %d inserts were acknowledged", name, stored, len(seen))
		}
		// Every acknowledged increment, and no other.
		rows, _ = conn.Query(ctx, "SELECT id, hits FROM counters ORDER BY id")
		type counter struct {
			ID   int
			Hits int64
		}
		got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[counter])
		if err != nil {
			t.Fatal(err)
		}
		for _, g := range got {
			if g.Hits != load.hits[g.ID] {
				t.Errorf("%s store: counter %d has %d hits, %d were acknowledged", name, g.ID, g.Hits, load.hits[g.ID])
			}
		}
		conn.Close(ctx)
	}
}

// TestRepairerBothDirections: the proxy's repairer closes drift whichever
// store missed the write. With old primary, an entry stale on new is
// copied from old and one stale on old (a write old missed while new was
// primary, before a rollback) from new: new's good row is kept.
func TestRepairerBothDirections(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'seed'), (2, 'seed'), (3, 'seed')")
	}
	mustExec(t, oldC, "UPDATE t SET v = 'good' WHERE id = 2")                             // new missed it
	mustExec(t, newC, "UPDATE t SET v = 'good' WHERE id = 1; DELETE FROM t WHERE id = 3") // old missed these
	_, cfg := pairConfig(t, oldC, newC, "repairer")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	api := newAdminClient(t, rp)
	api.waitLive(1)
	api.change("/api/v1/route", `{"mirror": true}`, "repairer")
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	tn := table.Name{Schema: "public", Table: "t"}
	if err := table.RecordDrift(ctx, ctl, []table.DriftEntry{
		{Table: tn, Key: []string{"2"}, Stale: table.StaleNew},
		{Table: tn, Key: []string{"1"}, Stale: table.StaleOld},
		{Table: tn, Key: []string{"3"}, Stale: table.StaleOld},
	}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		n, err := table.OpenDriftTotal(ctx, ctl)
		return err == nil && n == 0
	})
	for name, c := range map[string]*pgtest.Cluster{"old": oldC, "new": newC} {
		conn, err := pgx.Connect(ctx, c.DSN("postgres"))
		if err != nil {
			t.Fatal(err)
		}
		var rows string
		err = conn.QueryRow(ctx, "SELECT string_agg(id || '=' || v, ' ' ORDER BY id) FROM t").Scan(&rows)
		conn.Close(ctx)
		if err != nil || rows != "1=good 2=good" {
			t.Errorf("%s store after the repair: %q %v", name, rows, err)
		}
	}
}

// TestDriftAfterFlipRepairedTowardsOld: while new is primary, a write that
// old refuses is recorded as drift stale on old; after a rollback, before
// the repair, the repairer copies that row from new to old, never old's
// stale state over new's row.
func TestDriftAfterFlipRepairedTowardsOld(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE t (id int PRIMARY KEY, v text)")
	}
	mustExec(t, oldC, "ALTER TABLE t ADD CONSTRAINT no_bad CHECK (v <> 'bad')") // old refuses the mirrored row
	file, cfg := pairConfig(t, oldC, newC, "direction")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	api := newAdminClient(t, rp)
	api.waitLive(1)
	api.change("/api/v1/route", `{"mirror": true}`, "direction")
	backfillAll(t, file)
	verifyAll(t, file)
	api.change("/api/v1/route", `{"primary": "new", "reads": 100}`, "direction")
	ctx := context.Background()
	app, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", rp.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(ctx)
	for _, v := range []string{"good", "bad"} {
		if _, err := app.Exec(ctx, "INSERT INTO t (id, v) SELECT coalesce(max(id), 0) + 1, $1 FROM t", v); err != nil {
			t.Fatalf("insert %s: %v", v, err)
		}
	}
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	var entries string
	if err := ctl.QueryRow(ctx, "SELECT string_agg(table_name || array_to_string(key, ',') || ':' || stale, ' ') FROM tandem.drift").Scan(&entries); err != nil ||
		entries != "t2:old" {
		t.Fatalf("drift ledger: %q %v, want row 2 stale on old", entries, err)
	}
	// A rollback must not make old, which missed row 2, the store of
	// record: the flip repairs old under the fence first. Old still refuses
	// the row, so the rollback is refused, saying why, and nothing changes.
	var refused map[string]any
	if code, raw := api.call("POST", "/api/v1/rollback", `{}`, &refused); code != http.StatusConflict ||
		!strings.Contains(raw, "preparing the old store to become primary failed") || !strings.Contains(raw, "23514") {
		t.Fatalf("rollback while old cannot take its missed row: %d %s", code, raw)
	}
	var v string
	nc, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close(ctx)
	if err := nc.QueryRow(ctx, "SELECT v FROM t WHERE id = 2").Scan(&v); err != nil || v != "bad" {
		t.Fatalf("row 2 on new after a repair attempt: %q %v: the repair went the wrong way", v, err)
	}
	// Once old accepts it, the rollback repairs old under the fence and
	// goes through.
	mustExec(t, oldC, "ALTER TABLE t DROP CONSTRAINT no_bad")
	api.change("/api/v1/rollback", `{}`, "direction")
	waitFor(t, func() bool {
		n, err := table.OpenDriftTotal(ctx, ctl)
		return err == nil && n == 0
	})
	ho, no := storeHash(t, oldC, "t", "id")
	hn, nn := storeHash(t, newC, "t", "id")
	if ho != hn || no != 2 || nn != 2 {
		t.Errorf("t: old %d rows %s, new %d rows %s", no, ho, nn, hn)
	}
}
