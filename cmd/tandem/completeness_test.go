package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
)

// convergeBound is how soon after the writers stop both stores must hash
// the same: 10s, as issue 11 asks; longer under the race detector, which
// slows the proxy several times over.
var convergeBound = map[bool]time.Duration{false: 10 * time.Second, true: 45 * time.Second}[raceEnabled]

// completenessSchema is an ordinary application schema with what a
// dual-write proxy cannot see from statement text: ON DELETE/UPDATE CASCADE
// children, a trigger that writes another table, and a function that
// writes two tables.
const completenessSchema = `
CREATE TABLE parent (id serial PRIMARY KEY, v int NOT NULL DEFAULT 0);
CREATE TABLE child (id serial PRIMARY KEY, parent_id int NOT NULL REFERENCES parent ON DELETE CASCADE ON UPDATE CASCADE, v int);
CREATE INDEX ON child (parent_id);
CREATE TABLE audit (id bigserial PRIMARY KEY, parent_id int, op text, v int);
CREATE FUNCTION audit_parent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (parent_id, op, v) VALUES (NEW.id, TG_OP, NEW.v); RETURN NEW; END $$;
CREATE TRIGGER parent_audit AFTER INSERT OR UPDATE ON parent FOR EACH ROW EXECUTE FUNCTION audit_parent();
CREATE FUNCTION bump(k int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN UPDATE parent SET v = v + 1 WHERE id = k; INSERT INTO child (parent_id, v) SELECT id, v FROM parent WHERE id = k; END $$;
INSERT INTO parent (v) SELECT g FROM generate_series(1, 200) g;
INSERT INTO child (parent_id, v) SELECT 1 + g % 200, g FROM generate_series(1, 400) g;
`

var completenessTables = []string{"parent", "child", "audit"}

// tolerated are the errors an application expects from this workload:
// constraint violations and serialization failures between its own
// writers. Anything else a client sees is a failure of the proxy.
func tolerated(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (strings.HasPrefix(pe.Code, "23") || pe.Code == "40001" || pe.Code == "40P01")
}

// proxyWriter runs random writes of every kind through the proxy until
// stop: inserts, cascading deletes and key changes, updates that fire the
// audit trigger, a function that writes, and a DO block.
func proxyWriter(ctx context.Context, dsn string, seed uint64, stop *atomic.Bool, bad func(error)) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		bad(err)
		return
	}
	defer conn.Close(context.WithoutCancel(ctx))
	r := rand.New(rand.NewPCG(seed, 3))
	for !stop.Load() {
		k := 1 + r.IntN(260)
		var err error
		switch r.IntN(8) {
		case 0:
			_, err = conn.Exec(ctx, "INSERT INTO parent (v) VALUES ($1)", r.IntN(1000))
		case 1:
			_, err = conn.Exec(ctx, "INSERT INTO child (parent_id, v) VALUES ($1, $2)", k, r.IntN(1000))
		case 2:
			_, err = conn.Exec(ctx, "DELETE FROM parent WHERE id = $1", k)
		case 3:
			_, err = conn.Exec(ctx, "UPDATE parent SET v = v + 1 WHERE id = $1", k)
		case 4:
			_, err = conn.Exec(ctx, "SELECT bump($1)", k)
		case 5:
			_, err = conn.Exec(ctx, fmt.Sprintf("DO $$ BEGIN INSERT INTO parent (v) VALUES (%d); END $$", r.IntN(1000)))
		case 6:
			_, err = conn.Exec(ctx, "UPDATE parent SET id = id + 100000 WHERE id = $1", k)
		case 7:
			_, err = conn.Exec(ctx, "DELETE FROM child WHERE id = $1", 1+r.IntN(600))
		}
		if err != nil && !tolerated(err) {
			bad(err)
			return
		}
	}
}

// directWriter writes straight to old, as a cron job or another service
// would, until stop or until the routing state carries a write fence: each
// write's transaction first takes a share lock on the state row, so a flip
// raising its fence waits for it, and it sees the fence right after.
func directWriter(ctx context.Context, dsn string, stop *atomic.Bool, writes *atomic.Int64, bad func(error)) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		bad(err)
		return
	}
	defer conn.Close(context.WithoutCancel(ctx))
	r := rand.New(rand.NewPCG(99, 9))
	for !stop.Load() {
		tx, err := conn.Begin(ctx)
		if err != nil {
			bad(err)
			return
		}
		var fence int64
		if err := tx.QueryRow(ctx, "SELECT fence FROM tandem.state WHERE id = 1 FOR SHARE").Scan(&fence); err != nil {
			_ = tx.Rollback(ctx)
			bad(err)
			return
		}
		if fence != 0 {
			_ = tx.Rollback(ctx)
			return
		}
		k := 1 + r.IntN(260)
		switch r.IntN(4) {
		case 0:
			_, err = tx.Exec(ctx, "INSERT INTO parent (v) VALUES (-1)")
		case 1:
			_, err = tx.Exec(ctx, "UPDATE parent SET v = -v WHERE id = $1", k)
		case 2:
			_, err = tx.Exec(ctx, "DELETE FROM parent WHERE id = $1", k)
		case 3:
			_, err = tx.Exec(ctx, "UPDATE child SET v = -1 WHERE parent_id = $1", k)
		}
		if err != nil {
			_ = tx.Rollback(ctx)
			if !tolerated(err) {
				bad(err)
				return
			}
			continue
		}
		if err := tx.Commit(ctx); err != nil {
			if !tolerated(err) {
				bad(err)
				return
			}
			continue
		}
		writes.Add(1)
		time.Sleep(2 * time.Millisecond)
	}
}

// storesDiffer returns the tables whose independent row hashes differ.
func storesDiffer(t *testing.T, oldC, newC *pgtest.Cluster) []string {
	t.Helper()
	var out []string
	for _, tbl := range completenessTables {
		ho, no := storeHash(t, oldC, tbl, "id")
		hn, nn := storeHash(t, newC, tbl, "id")
		if ho != hn {
			out = append(out, fmt.Sprintf("%s (old %d rows, new %d)", tbl, no, nn))
		}
	}
	return out
}

// TestCompletenessUnderChaos is issue 11's randomized test: 16 writers
// through the proxy over a schema with cascading children, an audit
// trigger and a function that writes, plus a writer straight to old,
// while the new store is killed -9 and restarted. After the writers stop,
// every table hashes the same on both stores: lockstep mirroring, the
// ledger and the change feed together leave nothing behind.
func TestCompletenessUnderChaos(t *testing.T) {
	// The new store keeps what it acknowledges, as a production store
	// does: with pgtest's default synchronous_commit=off, kill -9 lost a
	// repair it had acknowledged (the ledger said repaired, the rows were
	// gone), which no proxy can know.
	oldC, newC := pgtest.NewPair(t, pgtest.Options{Settings: map[string]string{"synchronous_commit": "on"}})
	mustExec(t, oldC, completenessSchema)
	mustExec(t, newC, completenessSchema)
	file, cfg := pairConfig(t, oldC, newC, "chaos-proxy", repairEvery(100*time.Millisecond), feedOn)
	// The proxy's warnings and the feed's and repairer's notes, for a
	// failure message.
	var logs lockedBuffer
	rp, err := startProxy(cfg, newLogger(config.Log{Format: "text", Level: "info"}, &logs))
	if err != nil {
		t.Fatal(err)
	}
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}
	// The backfill's starting point: the rows that existed before mirroring.
	backfillAll(t, file)
	if d := storesDiffer(t, oldC, newC); len(d) > 0 {
		t.Fatalf("after the backfill: %v", d)
	}

	ctx := context.Background()
	var stop atomic.Bool
	var failures sync.Map
	bad := func(err error) { failures.Store(err.Error(), true) }
	var wg sync.WaitGroup
	dsn := "postgres://postgres@" + rp.Addr() + "/postgres?sslmode=disable"
	for w := range 16 {
		wg.Go(func() { proxyWriter(ctx, dsn, uint64(w), &stop, bad) })
	}
	var direct atomic.Int64
	wg.Go(func() { directWriter(ctx, oldC.DSN("postgres"), &stop, &direct, bad) })

	time.Sleep(2 * time.Second)
	if err := newC.Kill(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if err := newC.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	stop.Store(true)
	wg.Wait()
	failures.Range(func(k, _ any) bool {
		t.Errorf("a client saw: %v", k)
		return true
	})
	stopped := time.Now()

	var diff []string
	for {
		if diff = storesDiffer(t, oldC, newC); len(diff) == 0 {
			break
		}
		if time.Since(stopped) > convergeBound {
			t.Logf("proxy log:\n%s", logs.String())
			t.Fatalf("%s after the writers stopped, these tables still differ: %v\n%s\n%s\nold: %s\nnew: %s", convergeBound, diff, ledgerReport(t, oldC), rowDiffs(t, oldC, newC), activity(oldC), activity(newC))
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("%d direct writes on old; every table equal %s after the writers stopped", direct.Load(), time.Since(stopped).Round(10*time.Millisecond))
}

// TestFlipWithDirectWritesMissesNothing: writers through the proxy and a
// writer straight to old up to the write fence; then the flip to new. The
// flip waits for the change feed, so when it returns, before any repair
// runs on its own (the repairer runs once an hour), every table on
// new hashes the same as on old: nothing committed before the fence,
// through the proxy or around it, is missing on the new store of record.
func TestFlipWithDirectWritesMissesNothing(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, completenessSchema)
	mustExec(t, newC, completenessSchema)
	// No repair runs on its own: what the flip does is all there is. The
	// flip waits for the feed up to routing.feed_wait: 30s, which a loaded
	// machine running -race does not exceed (the default 5s it did, once,
	// with the feed 86 kB of WAL short).
	file, cfg := pairConfig(t, oldC, newC, "flip-feed-proxy", repairEvery(time.Hour), feedOn, feedWait(30*time.Second))
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}
	backfillAll(t, file)

	ctx := context.Background()
	var stopProxy, stopDirect atomic.Bool
	var failures sync.Map
	bad := func(err error) { failures.Store(err.Error(), true) }
	var wg, dw sync.WaitGroup
	dsn := "postgres://postgres@" + rp.Addr() + "/postgres?sslmode=disable"
	for w := range 8 {
		wg.Go(func() { proxyWriter(ctx, dsn, uint64(100+w), &stopProxy, bad) })
	}
	var direct atomic.Int64
	dw.Go(func() { directWriter(ctx, oldC.DSN("postgres"), &stopDirect, &direct, bad) })
	time.Sleep(3 * time.Second)

	// The proxy's writers stop as the flip starts (the fence would hold
	// them anyway); the direct writer goes on until it sees the fence.
	stopProxy.Store(true)
	wg.Wait()
	out, errOut, err := cli("route", "set", "-c", file, "--primary", "new", "--reads", "100", "--force", "--reason", "flip with direct writes")
	stopDirect.Store(true)
	dw.Wait()
	if err != nil {
		t.Fatalf("flip: %v\n%s%s", err, out, errOut)
	}
	if strings.Contains(out+errOut, "change feed: NOT caught up") {
		t.Fatalf("the flip went past the change feed:\n%s%s", out, errOut)
	}
	failures.Range(func(k, _ any) bool {
		t.Errorf("a client saw: %v", k)
		return true
	})
	if d := storesDiffer(t, oldC, newC); len(d) > 0 {
		t.Fatalf("after the flip, before any repair of its own: %v differ\n%s\n%s", d, out, ledgerReport(t, oldC))
	}
	t.Logf("%d direct writes on old up to the fence; equal after the flip", direct.Load())
}

// rowDiffs names, for a failure message, up to 10 rows per table that
// differ between the stores (missing on one, or different), each with
// every drift entry recorded for its key, repaired or not.
func rowDiffs(t *testing.T, oldC, newC *pgtest.Cluster) string {
	t.Helper()
	ctx := context.Background()
	read := func(c *pgtest.Cluster, tbl string) map[string]string {
		conn, err := pgx.Connect(ctx, c.DSN("postgres"))
		if err != nil {
			t.Log(err)
			return nil
		}
		defer conn.Close(ctx)
		rows, err := conn.Query(ctx, "SELECT id::text, r::text FROM "+tbl+" r")
		if err != nil {
			t.Log(err)
			return nil
		}
		out := map[string]string{}
		for rows.Next() {
			var k, v string
			if rows.Scan(&k, &v) == nil {
				out[k] = v
			}
		}
		rows.Close()
		return out
	}
	conn, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		return err.Error()
	}
	defer conn.Close(ctx)
	var b strings.Builder
	for _, tbl := range completenessTables {
		o, n := read(oldC, tbl), read(newC, tbl)
		keys := map[string]string{}
		maps.Copy(keys, o)
		maps.Copy(keys, n)
		shown := 0
		for _, k := range slices.Sorted(maps.Keys(keys)) {
			if o[k] == n[k] || shown == 10 {
				continue
			}
			shown++
			fmt.Fprintf(&b, "%s %s: old %q new %q\n", tbl, k, o[k], n[k])
			rows, err := conn.Query(ctx, `SELECT reason, stale, recorded_at::time::text, coalesce(repaired_at::time::text, 'open'), attempts
				FROM tandem.drift WHERE table_name = $1 AND (key = ARRAY[$2] OR key IS NULL) ORDER BY id`, tbl, k)
			if err != nil {
				continue
			}
			for rows.Next() {
				var reason, stale, at, rep string
				var attempts int
				if rows.Scan(&reason, &stale, &at, &rep, &attempts) == nil {
					fmt.Fprintf(&b, "  drift %q stale %s at %s repaired %s attempts %d\n", reason, stale, at, rep, attempts)
				}
			}
			rows.Close()
		}
	}
	return b.String()
}

// ledgerReport says what the control schema knows, for a failure message:
// the feed's rows and the open drift by reason.
func ledgerReport(t *testing.T, control *pgtest.Cluster) string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, control.DSN("postgres"))
	if err != nil {
		return err.Error()
	}
	defer conn.Close(ctx)
	var b strings.Builder
	rows, err := conn.Query(ctx, `SELECT store, coalesce(holder, '-'), coalesce(checked_lsn::text, '-'), now() - heartbeat_at, coalesce(last_error, '') FROM tandem.feed`)
	if err == nil {
		for rows.Next() {
			var store, holder, lsn, lastErr string
			var age time.Duration
			if rows.Scan(&store, &holder, &lsn, &age, &lastErr) == nil {
				fmt.Fprintf(&b, "feed %s: holder %s checked %s heartbeat %s ago, last error %q\n", store, holder, lsn, age, lastErr)
			}
		}
		rows.Close()
	}
	rows, err = conn.Query(ctx, `SELECT table_name, left(reason, 60), count(*), max(attempts), left(max(coalesce(last_error, '')), 120)
		FROM tandem.drift WHERE repaired_at IS NULL GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10`)
	if err == nil {
		for rows.Next() {
			var tbl, reason, lastErr string
			var n, attempts int
			if rows.Scan(&tbl, &reason, &n, &attempts, &lastErr) == nil {
				fmt.Fprintf(&b, "open drift %s %q: %d entries, up to %d attempts, %s\n", tbl, reason, n, attempts, lastErr)
			}
		}
		rows.Close()
	}
	return b.String()
}

// activity lists what a store's sessions are doing, for a failure message.
func activity(c *pgtest.Cluster) string {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, c.DSN("postgres"))
	if err != nil {
		return err.Error()
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT pid, state, coalesce(wait_event_type || '/' || wait_event, '-'), coalesce(extract(epoch FROM now() - xact_start)::int, -1), left(query, 100)
		FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' AND state <> 'idle'`)
	if err != nil {
		return err.Error()
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		var pid, secs int
		var state, wait, q string
		if rows.Scan(&pid, &state, &wait, &secs, &q) == nil {
			fmt.Fprintf(&b, "\n  %d %s wait %s xact %ds: %s", pid, state, wait, secs, q)
		}
	}
	return b.String()
}

// lockedBuffer is a log destination several goroutines write to.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
