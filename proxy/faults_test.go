package proxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
)

// load runs writers that update random rows until stop is closed, and
// returns the errors clients saw.
func load(t *testing.T, dsn string, writers int, stop <-chan struct{}) (done func() []error, ops *atomic.Int64) {
	t.Helper()
	ctx := context.Background()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	ops = new(atomic.Int64)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := pgx.Connect(ctx, dsn)
			if err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
				return
			}
			defer c.Close(ctx)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := 1 + (w*131+i*17)%200
				var err error
				if i%2 == 0 {
					_, err = c.Exec(ctx, `INSERT INTO acct (id, bal, note) VALUES ($1, 1, 'ins') ON CONFLICT (id) DO UPDATE SET bal = acct.bal + 1, note = md5(random()::text)`, id)
				} else {
					err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
						if _, err := tx.Exec(ctx, `UPDATE acct SET bal = bal + 1 WHERE id = $1`, id); err != nil {
							return err
						}
						_, err := tx.Exec(ctx, `INSERT INTO acct (id, bal, note) VALUES ($1, 0, 'tx') ON CONFLICT (id) DO NOTHING`, 1000+w*100000+i)
						return err
					})
				}
				if err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("writer %d: %w", w, err))
					mu.Unlock()
					return
				}
				ops.Add(1)
			}
		}()
	}
	return func() []error { wg.Wait(); return errs }, ops
}

// TestMirrorNewStoreKilled: the new store is killed (-9) under load. Clients
// see no error, the breaker opens, the drift ledger records the keys; once
// the store is back, the repairer drains the ledger and old equals new.
func TestMirrorNewStoreKilled(t *testing.T) {
	// A store that acknowledges commits it has not written (pgtest's
	// synchronous_commit=off) loses them to kill -9, and no proxy can know:
	// this one keeps what it acknowledges, as a production store does.
	nc := pgtest.New(t, pgtest.Options{Settings: map[string]string{"synchronous_commit": "on"}})
	e := newPairEnvOn(t, nc, `CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text);
		INSERT INTO acct SELECT g, 0, 'seed' FROM generate_series(1, 200) g;`,
		func(c *config.Config) {
			c.Routing.BreakerFailures = 3
			c.Routing.BreakerOpen = config.Duration(300 * time.Millisecond)
			c.Routing.MirrorBudget = config.Duration(500 * time.Millisecond)
		})
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	stop := make(chan struct{})
	wait, ops := load(t, e.proxy.dsn(e.db), 8, stop)
	time.Sleep(300 * time.Millisecond)
	if err := nc.Kill(); err != nil {
		t.Fatal(err)
	}
	killedAt := ops.Load()
	sawOpen := false
	for range 40 {
		time.Sleep(25 * time.Millisecond)
		if e.proxy.srv.BreakerState() == "open" {
			sawOpen = true
		}
	}
	close(stop)
	for _, err := range wait() {
		t.Errorf("client saw an error: %v", err)
	}
	if !sawOpen {
		t.Errorf("the breaker never opened while the new store was down")
	}
	if ops.Load() <= killedAt {
		t.Errorf("no write completed while the new store was down (%d before, %d after)", killedAt, ops.Load())
	}
	drift := e.openDrift()
	if drift == 0 {
		t.Fatal("no drift recorded for writes the new store missed")
	}
	t.Logf("%d writes, %d after the kill, %d drift entries", ops.Load(), ops.Load()-killedAt, drift)

	ctx := context.Background()
	if err := nc.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	repairAll(t, e)
	e.assertEqual("acct", "id")
}

// TestBreakerHalfOpensWithoutTraffic: an open breaker reports half-open
// once its timeout has passed, with no write asking it in between. The
// drift repairer waits while the breaker is open and only asks for its
// state: when the state was the one last remembered from a change, the
// breaker stayed "open" after the writers had stopped, and the ledger was
// never drained (a failure of TestCompletenessUnderChaos in CI).
func TestBreakerHalfOpensWithoutTraffic(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE acct (id int PRIMARY KEY)`, func(c *config.Config) {
		c.Routing.BreakerFailures = 2
		c.Routing.BreakerOpen = config.Duration(200 * time.Millisecond)
	})
	srv := e.proxy.srv
	for range 2 {
		_, _ = srv.breaker.Execute(func() (struct{}, error) { return struct{}{}, errors.New("the secondary is down") })
	}
	if got := srv.BreakerState(); got != "open" {
		t.Fatalf("after 2 failures the breaker is %q, want open", got)
	}
	time.Sleep(300 * time.Millisecond)
	if got := srv.BreakerState(); got != "half-open" {
		t.Fatalf("300ms after opening with a 200ms timeout, and no traffic, the breaker is %q, want half-open", got)
	}
}
