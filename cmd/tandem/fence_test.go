package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// randomLoad is the fence tests' client traffic: writers that mix plain
// writes with what ends units the hard way — deadlocks, errors in and out
// of transactions, savepoints, cancels, disconnects in the middle of a
// transaction or of a Flush-ended batch — and keep the errors they caused
// apart from the ones they did not.
type randomLoad struct {
	mu    sync.Mutex
	ops   map[string]int // by kind, units that ran to their end
	own   map[string]int // errors the workload caused, by kind
	errs  []error        // any other error a client saw
	ended int            // units that ended as expected
	wg    sync.WaitGroup
	stop  chan struct{}
}

func (l *randomLoad) note(kind string, own bool, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case err == nil:
		l.ops[kind]++
		l.ended++
	case own:
		l.own[kind]++
		l.ended++
	default:
		l.errs = append(l.errs, fmt.Errorf("%s: %w", kind, err))
	}
}

func (l *randomLoad) done() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ended
}

func sqlstate(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// run starts writers writers, writer w on dsns[w%len(dsns)], until stop.
func (l *randomLoad) run(dsns []string, writers int, seed uint64) {
	l.stop = make(chan struct{})
	l.ops, l.own = map[string]int{}, map[string]int{}
	for w := range writers {
		l.wg.Go(func() { l.writer(dsns[w%len(dsns)], w, rand.New(rand.NewPCG(seed, uint64(w)))) })
	}
}

func (l *randomLoad) finish() {
	close(l.stop)
	l.wg.Wait()
}

func (l *randomLoad) writer(dsn string, w int, r *rand.Rand) {
	ctx := context.Background()
	var c *pgx.Conn
	defer func() {
		if c != nil {
			c.Close(ctx)
		}
	}()
	for i := 0; ; i++ {
		select {
		case <-l.stop:
			return
		default:
		}
		if c == nil || c.IsClosed() {
			var err error
			if c, err = pgx.Connect(ctx, dsn); err != nil {
				l.note("connect", false, err)
				c = nil
				time.Sleep(50 * time.Millisecond)
				continue
			}
		}
		// A little think time between units, as applications have: 16
		// writers with none would only measure the 2-core test machine's
		// run queue.
		time.Sleep(time.Duration(r.IntN(3000)) * time.Microsecond)
		counter := func() int { return 1 + r.IntN(fenceCounters) }
		switch op := r.IntN(24); {
		case op < 5: // an autocommit insert
			var id int64
			err := c.QueryRow(ctx, `INSERT INTO items (writer, n, note) VALUES ($1, $2, 'auto') RETURNING id`, w, i).Scan(&id)
			l.note("insert", false, err)
		case op < 9: // a transaction: insert, update, a shared counter
			err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				var id int64
				if err := tx.QueryRow(ctx, `INSERT INTO items (writer, n, note) VALUES ($1, $2, 'tx') RETURNING id`, w, i).Scan(&id); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, `UPDATE items SET note = note || ' updated' WHERE id = $1`, id); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, `UPDATE counters SET hits = hits + 1 WHERE id = $1`, counter())
				return err
			})
			l.note("transaction", sqlstate(err) == "40P01", err)
		case op < 12: // two counters in either order: deadlocks
			a, b := counter(), counter()
			for b == a {
				b = counter()
			}
			err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				for _, id := range []int{a, b} {
					if _, err := tx.Exec(ctx, `UPDATE counters SET hits = hits + 1 WHERE id = $1`, id); err != nil {
						return err
					}
				}
				return nil
			})
			l.note("deadlock-prone", sqlstate(err) == "40P01", err)
		case op == 12: // an error inside a transaction
			err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, `INSERT INTO items (writer, n, note) VALUES ($1, $2, 'doomed')`, w, i); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, `INSERT INTO uniq (k) VALUES (1)`)
				return err
			})
			l.note("error in transaction", sqlstate(err) == "23505", err)
		case op == 13: // an autocommit write that fails
			_, err := c.Exec(ctx, `INSERT INTO items (writer, n, note) VALUES ($1, 1 / $2::int, 'div')`, w, 0)
			l.note("failing write", sqlstate(err) == "22012", err)
		case op == 14: // a savepoint rolled back to after an error
			err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, `INSERT INTO items (writer, n, note) VALUES ($1, $2, 'sp')`, w, i); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, `SAVEPOINT s`); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, `INSERT INTO uniq (k) VALUES (1)`); sqlstate(err) != "23505" {
					return fmt.Errorf("want a duplicate key, got %v", err)
				}
				if _, err := tx.Exec(ctx, `ROLLBACK TO SAVEPOINT s`); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, `UPDATE counters SET hits = hits + 1 WHERE id = $1`, counter())
				return err
			})
			l.note("savepoint", sqlstate(err) == "40P01", err)
		case op == 15: // a write cancelled mid-flight (pgx cancels, may drop the connection)
			cctx, cancel := context.WithTimeout(ctx, time.Duration(1+r.IntN(10))*time.Millisecond)
			_, err := c.Exec(cctx, `UPDATE counters SET hits = hits + 1 WHERE id = $1 AND pg_sleep(0.02) IS NOT NULL`, counter())
			cancel()
			l.note("cancelled write", sqlstate(err) == "" || sqlstate(err) == "57014", err)
		case op == 16: // the client goes away in the middle of a transaction
			tx, err := c.Begin(ctx)
			if err == nil {
				_, err = tx.Exec(ctx, `INSERT INTO items (writer, n, note) VALUES ($1, $2, 'abandoned')`, w, i)
			}
			l.note("disconnect in transaction", false, err)
			_ = c.PgConn().Conn().Close()
			c.Close(ctx)
			c = nil
		case op == 17: // a Flush-ended batch, then the client goes away
			pl := c.PgConn().StartPipeline(ctx)
			pl.SendQueryParams(`INSERT INTO items (writer, n, note) VALUES ($1, $2, 'flushed')`,
				[][]byte{[]byte(strconv.Itoa(w)), []byte(strconv.Itoa(i))}, nil, nil, nil)
			pl.SendFlushRequest()
			err := pl.Flush()
			if err == nil {
				var res any
				if res, err = pl.GetResults(); err == nil {
					if rr, ok := res.(*pgconn.ResultReader); ok {
						_, err = rr.Close()
					}
				}
			}
			l.note("flush then disconnect", false, err)
			_ = c.PgConn().Conn().Close()
			c.Close(ctx)
			c = nil
		case op == 18: // reads
			var n int64
			err := c.QueryRow(ctx, `SELECT count(*) FROM items WHERE writer = $1`, w).Scan(&n)
			if err == nil {
				err = c.QueryRow(ctx, `SELECT hits FROM counters WHERE id = $1`, counter()).Scan(&n)
			}
			l.note("read", false, err)
		case op == 19: // session settings, which a store opened later must get too
			_, err := c.Exec(ctx, fmt.Sprintf("SET statement_timeout = '%ds'", 30+r.IntN(30)))
			l.note("set", false, err)
		case op == 20: // a short session
			c.Close(ctx)
			c = nil
			l.note("reconnect", false, nil)
		default: // simple protocol: two statements in one Query, inside a transaction
			_, err := c.Exec(ctx, "BEGIN")
			if err == nil {
				_, err = c.Exec(ctx, fmt.Sprintf(`UPDATE counters SET hits = hits + 1 WHERE id = %d;
					INSERT INTO items (writer, n, note) VALUES (%d, %d, 'simple')`, counter(), w, i))
			}
			if err == nil {
				_, err = c.Exec(ctx, "COMMIT")
			} else if !c.IsClosed() {
				_, _ = c.Exec(ctx, "ROLLBACK")
			}
			l.note("simple transaction", sqlstate(err) == "40P01", err)
		}
	}
}

// fenceCounters is how many shared counters the writers update: as in
// TestFlipUnderLoad, 8 for 16 writers, hot enough for lock queues and
// deadlocks (which the fence waits for, as it must).
const fenceCounters = 8

// fenceStats summarises fence durations in milliseconds.
func fenceStats(ms []float64) (p50, p99, worst float64) {
	s := slices.Sorted(slices.Values(ms))
	at := func(q float64) float64 {
		i := int(q*float64(len(s)) + 0.5)
		return s[min(max(i-1, 0), len(s)-1)]
	}
	return at(0.5), at(0.99), s[len(s)-1]
}

// TestFenceFlipsUnderRandomWriters is issue 10's "done when": write flips
// and rollbacks, alternating, under 16 random writers in dual-write (two
// proxy replicas), each succeeding without --force, with fences under
// 100 ms at p99 and no client error beyond the workload's own; then no
// writer is left, no drift is open and old equals new. make test runs 3
// of each, 1.5 s apart; TANDEM_FENCE_SOAK=1 (make soak) runs 10 of each,
// 10 s apart as in the issue, and holds the fences to the 100 ms p99.
// TANDEM_FENCE_ROUNDS and TANDEM_FENCE_GAP override the count and the gap,
// TANDEM_FENCE_P99_MS the bound.
func TestFenceFlipsUnderRandomWriters(t *testing.T) {
	rounds, gap := 3, 1500*time.Millisecond
	soak := os.Getenv("TANDEM_FENCE_SOAK") != ""
	if soak {
		rounds, gap = 10, 10*time.Second
	} else if testing.Short() {
		t.Skip("a load test")
	}
	if v, err := strconv.Atoi(os.Getenv("TANDEM_FENCE_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	if v, err := time.ParseDuration(os.Getenv("TANDEM_FENCE_GAP")); err == nil && v > 0 {
		gap = v
	}
	// A deadlock is broken after 20 ms rather than PostgreSQL's default 1 s:
	// the fence waits for the transactions in it.
	oldC, newC := pgtest.NewPair(t, pgtest.Options{Settings: map[string]string{"deadlock_timeout": "20ms"}})
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, fmt.Sprintf(`CREATE TABLE items (id serial PRIMARY KEY, writer int NOT NULL, n int NOT NULL, note text);
			CREATE TABLE counters (id int PRIMARY KEY, hits bigint NOT NULL DEFAULT 0);
			INSERT INTO counters (id) SELECT generate_series(1, %d);
			CREATE TABLE uniq (k int PRIMARY KEY); INSERT INTO uniq VALUES (1);`, fenceCounters))
	}
	replicas := []string{"fence-a", "fence-b"}
	file, proxies, stopAll := startReplicas(t, oldC, newC, replicas...)
	defer stopAll()
	a, b := newAdminClient(t, proxies[0]), newAdminClient(t, proxies[1])
	a.waitLive(len(replicas))
	a.change("/api/v1/route", `{"mirror": true, "reason": "dual-write"}`, replicas...)
	backfillAll(t, file)
	verifyAll(t, file)

	var dsns []string
	for _, rp := range proxies {
		dsns = append(dsns, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable&application_name=fence-load", rp.Addr()))
	}
	var load randomLoad
	seed := uint64(time.Now().UnixNano())
	t.Logf("workload seed %d", seed)
	load.run(dsns, 16, seed)
	stopped := false
	defer func() {
		if !stopped {
			load.finish()
		}
	}()
	waitFor(t, func() bool { return load.done() >= 200 })

	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	driftReasons := func(open bool) string {
		rows, _ := ctl.Query(ctx, `SELECT reason || ' (' || table_name || ', stale on ' || stale || ')', count(*) FROM tandem.drift
			WHERE $1 = false OR repaired_at IS NULL GROUP BY 1 ORDER BY 2 DESC`, open)
		type reason struct {
			Reason string
			N      int
		}
		rs, err := pgx.CollectRows(rows, pgx.RowToStructByPos[reason])
		if err != nil {
			return err.Error()
		}
		return fmt.Sprint(rs)
	}
	noDrift := func() {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			n, err := table.OpenDriftTotal(ctx, ctl)
			if err == nil && n == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("drift still open after 10s (%d, %v): %s", n, err, driftReasons(true))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	var fences []float64
	progress := func(what string) {
		t.Helper()
		before := load.done()
		time.Sleep(gap)
		if load.done() <= before {
			t.Fatalf("no unit ended in the %s after the %s", gap, what)
		}
	}
	for i := range rounds {
		noDrift() // the drift gate would refuse the flip
		flip := a.change("/api/v1/route", `{"primary": "new", "reads": 100, "reason": "flip under random writers"}`, replicas...)
		if !flip.Report.Flip || flip.State.Primary != route.New || len(flip.Report.Forced) > 0 {
			t.Fatalf("flip %d: %+v", i, flip)
		}
		fences = append(fences, flip.Report.FenceMS)
		t.Logf("flip %d: fence %.1f ms", i, flip.Report.FenceMS)
		progress("flip")
		back := b.change("/api/v1/rollback", `{"reason": "rollback under random writers"}`, replicas...)
		if !back.Report.Flip || back.State.Primary != route.Old || len(back.Report.Forced) > 0 {
			t.Fatalf("rollback %d: %+v", i, back)
		}
		fences = append(fences, back.Report.FenceMS)
		t.Logf("rollback %d: fence %.1f ms", i, back.Report.FenceMS)
		progress("rollback")
	}
	// Under load the admin API names the sessions a fence would wait for.
	waitFor(t, func() bool {
		var got struct {
			Writers  int      `json:"writers"`
			Sessions []string `json:"sessions"`
		}
		code, _ := a.call("GET", "/api/v1/writers", "", &got)
		return code == 200 && got.Writers > 0 && got.Writers == len(got.Sessions) &&
			strings.Contains(got.Sessions[0], "postgres@postgres")
	})
	stopped = true
	load.finish()
	for _, err := range load.errs {
		t.Errorf("client error: %v", err)
	}
	p50, p99, mx := fenceStats(fences)
	t.Logf("%d fences: p50 %.1f ms, p99 %.1f ms, max %.1f ms; units %v; the workload's own errors %v", len(fences), p50, p99, mx, load.ops, load.own)
	// The bound holds for the soak (make soak: 20 fences, no race
	// detector). The short run in make test has 6 fences, shares two cores
	// with the rest of the suite, under the race detector: its fence times
	// are reported, and a fence that does not drain fails its flip above.
	bound := 100.0 // ms, the issue's; TANDEM_FENCE_P99_MS for slower machines
	if v, err := strconv.ParseFloat(os.Getenv("TANDEM_FENCE_P99_MS"), 64); err == nil && v > 0 {
		bound = v
	}
	if soak && p99 >= bound {
		t.Errorf("fence p99 %.1f ms, want under %.0f ms (all: %v)", p99, bound, fences)
	}
	for _, rp := range proxies {
		waitForWriters(t, rp)
	}
	noDrift()
	t.Logf("drift recorded (and repaired) over the run: %s", driftReasons(false))
	for _, tbl := range []string{"items", "counters"} {
		ho, no := storeHash(t, oldC, tbl, "id")
		hn, nn := storeHash(t, newC, tbl, "id")
		if ho != hn || no != nn {
			t.Errorf("%s differs: old %d rows %s, new %d rows %s; %s", tbl, no, ho, nn, hn, rowDiff(t, oldC, newC, tbl))
		}
	}
}

// rowDiff describes the rows of tbl that differ between the stores.
func rowDiff(t *testing.T, oldC, newC *pgtest.Cluster, tbl string) string {
	ctx := context.Background()
	rowsOf := func(c *pgtest.Cluster) map[string]string {
		conn, err := pgx.Connect(ctx, c.DSN("postgres"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		rows, _ := conn.Query(ctx, fmt.Sprintf("SELECT id::text, r::text FROM %s r", tbl))
		m := map[string]string{}
		for rows.Next() {
			var id, r string
			if err := rows.Scan(&id, &r); err != nil {
				t.Fatal(err)
			}
			m[id] = r
		}
		return m
	}
	o, n := rowsOf(oldC), rowsOf(newC)
	var out []string
	for id, r := range o {
		if n[id] != r {
			out = append(out, fmt.Sprintf("old %s new %q", r, n[id]))
		}
	}
	for id, r := range n {
		if _, ok := o[id]; !ok {
			out = append(out, fmt.Sprintf("only on new %s", r))
		}
	}
	slices.Sort(out)
	if len(out) > 30 {
		out = out[:30]
	}
	return fmt.Sprint(out)
}

// waitForWriters wants rp's count of sessions in a transaction or a write
// back at zero once the clients are gone, and the admin API to agree.
func waitForWriters(t *testing.T, rp *runningProxy) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for rp.srv.Writers() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d writers left on a proxy with no client: %v", rp.srv.Writers(), rp.srv.WriterSessions())
		}
		time.Sleep(10 * time.Millisecond)
	}
	var got struct {
		Writers  int      `json:"writers"`
		Sessions []string `json:"sessions"`
	}
	if code, raw := newAdminClient(t, rp).call("GET", "/api/v1/writers", "", &got); code != 200 || got.Writers != 0 || got.Sessions == nil {
		t.Fatalf("GET /api/v1/writers: %d %s", code, raw)
	}
}
