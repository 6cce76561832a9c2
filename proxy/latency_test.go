package proxy

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
)

// TestSlowNewStore: the new store answers 2 s late (a toxiproxy latency
// toxic between the proxy and it). Clients' writes stay within the mirror
// budget plus a margin and see no error; the writes the new store missed go
// to the drift ledger. Once it is fast again the breaker closes, the
// repairer drains the ledger, and old equals new.
func TestSlowNewStore(t *testing.T) {
	if testing.Short() {
		t.Skip("runs three load phases of several seconds each")
	}
	const (
		budget      = 200 * time.Millisecond
		breakerOpen = time.Second
		margin      = 300 * time.Millisecond
		clients     = 4
		minOps      = 100 // per client and phase, half autocommit, half transactions
	)
	nc := pgtest.New(t)
	slow := startToxiproxy(t, fmt.Sprintf("%s:%d", nc.Host(), nc.Port()))
	e := newPairEnvOn(t, nc, `CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text);
		INSERT INTO acct SELECT g, 0, 'seed' FROM generate_series(1, 200) g;`,
		func(c *config.Config) {
			// The new store is reached only through toxiproxy.
			u, err := url.Parse(c.New.DSN)
			if err != nil {
				t.Fatal(err)
			}
			u.Host = slow.Listen
			c.New.DSN = u.String()
			c.Routing.MirrorBudget = config.Duration(budget)
			c.Routing.BreakerFailures = 3
			c.Routing.BreakerOpen = config.Duration(breakerOpen)
		})
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	dsn := e.proxy.dsn(e.db)

	// Phase 1: a healthy new store.
	fast := writeLoad(t, dsn, 1, clients, minOps, 0)
	fast.check(t)
	t.Logf("phase 1 (new store healthy): %s", fast)
	if d := e.openDrift(); d != 0 {
		t.Fatalf("open drift with a healthy new store: %d entries", d)
	}

	// Phase 2: every reply from the new store comes 2 s late. The load runs
	// long enough for the breaker to open and try the store again (half-open)
	// at least twice.
	if _, err := slow.Toxics.AddToxicJson(strings.NewReader(
		`{"name": "slow", "type": "latency", "stream": "downstream", "attributes": {"latency": 2000}}`)); err != nil {
		t.Fatal(err)
	}
	opened := watchBreaker(t, e.proxy.srv)
	lagged := writeLoad(t, dsn, 2, clients, minOps, 3*breakerOpen+3*time.Second)
	lagged.check(t)
	t.Logf("phase 2 (new store 2 s late): %s; breaker opened %d times; %d statements took longer than %v",
		lagged, opened(), lagged.over(budget+margin), budget+margin)
	if p99 := lagged.percentile(0.99); p99 >= budget+margin {
		t.Errorf("p99 write latency %v with a slow new store, want < %v (budget %v + %v)", p99, budget+margin, budget, margin)
	}
	if opened() == 0 {
		t.Error("the breaker never opened while the new store was slow")
	}
	drift := e.openDrift()
	if drift == 0 {
		t.Fatal("no drift recorded for the writes the slow new store missed")
	}

	// Phase 3: the new store is fast again. The breaker closes after its
	// open period, on the next writes; then the repairer converges.
	if err := slow.Toxics.RemoveToxic(context.Background(), "slow"); err != nil {
		t.Fatal(err)
	}
	c := e.client()
	ctx := context.Background()
	succeedsSoon(t, func() error {
		if _, err := c.Exec(ctx, `UPDATE acct SET bal = bal + 1 WHERE id = 1`); err != nil {
			t.Fatal(err)
		}
		if s := e.proxy.srv.BreakerState(); s != "closed" {
			return fmt.Errorf("breaker %s", s)
		}
		return nil
	})
	healed := writeLoad(t, dsn, 3, clients, minOps, 0)
	healed.check(t)
	t.Logf("phase 3 (new store healthy again, breaker closed): %s; %d drift entries from phase 2", healed, drift)

	repairAll(t, e)
	e.assertEqual("acct", "id")
}

// watchBreaker samples srv's breaker until the test ends; the function it
// returns counts the times it was seen to open so far.
func watchBreaker(t testing.TB, srv *Server) func() int {
	var mu sync.Mutex
	opened, last := 0, srv.BreakerState()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			s := srv.BreakerState()
			mu.Lock()
			if s == "open" && last != "open" {
				opened++
			}
			last = s
			mu.Unlock()
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		return opened
	}
}

// startToxiproxy runs a toxiproxy proxy in this process, listening on a
// free loopback port in front of upstream (host:port), until the test ends.
// Its Listen field is the address to connect to.
func startToxiproxy(t testing.TB, upstream string) *toxiproxy.Proxy {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), quietLogger(toxiproxy.NewServer))
	p := toxiproxy.NewProxy(srv, "new", "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop) // closes the listener and every connection
	return p
}

// quietLogger returns the zero value of the logger type toxiproxy.NewServer
// takes, a logger that writes nothing. The type is inferred rather than
// named so that the logging package stays an indirect dependency.
func quietLogger[M, L any](func(M, L) *toxiproxy.ApiServer) L {
	var l L
	return l
}

// latencies are the client-side durations of the statements of one load
// phase, and the errors the clients saw.
type latencies struct {
	stmts []time.Duration // every statement: autocommit writes, BEGIN, writes in a transaction, COMMIT
	txs   []time.Duration // whole transactions, BEGIN to COMMIT
	errs  []error
}

func (l *latencies) check(t *testing.T) {
	t.Helper()
	for _, err := range l.errs {
		t.Errorf("client saw an error: %v", err)
	}
	if len(l.stmts) == 0 {
		t.Fatal("no statement completed")
	}
}

// percentile returns the q quantile of the statement latencies (nearest rank).
func (l *latencies) percentile(q float64) time.Duration {
	return quantile(l.stmts, q)
}

func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// over counts the statements that took longer than d.
func (l *latencies) over(d time.Duration) int {
	n := 0
	for _, x := range l.stmts {
		if x > d {
			n++
		}
	}
	return n
}

func (l *latencies) String() string {
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }
	return fmt.Sprintf("%d statements p50 %s p99 %s max %s; %d transactions p50 %s p99 %s max %s",
		len(l.stmts), ms(quantile(l.stmts, 0.5)), ms(quantile(l.stmts, 0.99)), ms(slices.Max(l.stmts)),
		len(l.txs), ms(quantile(l.txs, 0.5)), ms(quantile(l.txs, 0.99)), ms(slices.Max(append(l.txs, 0))))
}

// writeLoad runs clients writers through dsn, each alternating an autocommit
// upsert of a seeded row and a transaction (BEGIN, UPDATE, INSERT of a new
// row, COMMIT), for at least ops operations and at least minDur, and returns
// the latencies. phase keeps the new rows of each call apart.
func writeLoad(t *testing.T, dsn string, phase, clients, ops int, minDur time.Duration) *latencies {
	t.Helper()
	ctx := context.Background()
	res := &latencies{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	until := time.Now().Add(minDur)
	for w := range clients {
		wg.Go(func() {
			var stmts, txs []time.Duration
			err := func() error {
				c, err := pgx.Connect(ctx, dsn)
				if err != nil {
					return err
				}
				defer c.Close(ctx)
				timed := func(sql string, args ...any) error {
					start := time.Now()
					_, err := c.Exec(ctx, sql, args...)
					stmts = append(stmts, time.Since(start))
					return err
				}
				for i := 0; i < ops || time.Now().Before(until); i++ {
					id := 1 + (w*131+i*17)%200
					if i%2 == 0 {
						if err := timed(`INSERT INTO acct (id, bal, note) VALUES ($1, 1, 'ins') ON CONFLICT (id) DO UPDATE SET bal = acct.bal + 1, note = md5(random()::text)`, id); err != nil {
							return fmt.Errorf("autocommit write %d: %w", i, err)
						}
						continue
					}
					start := time.Now()
					for _, s := range []struct {
						sql  string
						args []any
					}{
						{"BEGIN", nil},
						{`UPDATE acct SET bal = bal + 1 WHERE id = $1`, []any{id}},
						{`INSERT INTO acct (id, bal, note) VALUES ($1, 0, 'tx')`, []any{phase*1_000_000 + w*100_000 + i}},
						{"COMMIT", nil},
					} {
						if err := timed(s.sql, s.args...); err != nil {
							_, _ = c.Exec(ctx, "ROLLBACK")
							return fmt.Errorf("transaction %d, %s: %w", i, s.sql, err)
						}
					}
					txs = append(txs, time.Since(start))
				}
				return nil
			}()
			mu.Lock()
			defer mu.Unlock()
			res.stmts = append(res.stmts, stmts...)
			res.txs = append(res.txs, txs...)
			if err != nil {
				res.errs = append(res.errs, fmt.Errorf("writer %d: %w", w, err))
			}
		})
	}
	wg.Wait()
	return res
}
