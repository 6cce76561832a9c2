package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/admin"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/table"
)

// writerLoad is random writes through a proxy: writers, each on its own
// connection, each calling its write until finish. A writer's random
// numbers come from its number and base, and the ids it inserts start
// after base + 100000 per writer, so two loads with different bases never
// insert the same id.
type writerLoad struct {
	base int64
	mu   sync.Mutex
	ok   int
	errs []error
	wg   sync.WaitGroup
	stop chan struct{}
}

// writeFunc is one random write on c: next is the last id the writer
// inserted, to be advanced for a new one.
type writeFunc func(ctx context.Context, c *pgx.Conn, rnd *rand.Rand, next *int64) error

// start starts writers; who names writer w (for its errors) and gives the
// DSN it connects to.
func (l *writerLoad) start(writers int, who func(w int) (name, dsn string), write writeFunc) {
	l.stop = make(chan struct{})
	ctx := context.Background()
	for w := range writers {
		name, dsn := who(w)
		l.wg.Go(func() {
			fail := func(err error) {
				l.mu.Lock()
				l.errs = append(l.errs, fmt.Errorf("%s: %w", name, err))
				l.mu.Unlock()
			}
			c, err := pgx.Connect(ctx, dsn)
			if err != nil {
				fail(err)
				return
			}
			defer c.Close(ctx)
			rnd := rand.New(rand.NewPCG(uint64(w), uint64(l.base)))
			next := l.base + int64(100000+w*100000)
			for i := 0; ; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				if err := write(ctx, c, rnd, &next); err != nil {
					fail(fmt.Errorf("write %d: %w", i, err))
					return
				}
				l.mu.Lock()
				l.ok++
				l.mu.Unlock()
			}
		})
	}
}

// done is how many writes were acknowledged; once a writer has failed it
// is the largest int, so that a wait for more ends and finish reports it.
func (l *writerLoad) done() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) > 0 {
		return int(^uint(0) >> 1)
	}
	return l.ok
}

// finish stops the writers and reports each one's error.
func (l *writerLoad) finish(t *testing.T) {
	close(l.stop)
	l.wg.Wait()
	for _, err := range l.errs {
		t.Errorf("client error: %v", err)
	}
}

// waitNoDrift waits up to within for the drift ledger of the control
// database at dsn to have no open entry, and fails naming the open ones.
func waitNoDrift(t *testing.T, dsn, what string, within time.Duration) {
	t.Helper()
	ctx := context.Background()
	ctl, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	deadline := time.Now().Add(within)
	for {
		n, err := table.OpenDriftTotal(ctx, ctl)
		if err == nil && n == 0 {
			return
		}
		if time.Now().After(deadline) {
			var rows string
			_ = ctl.QueryRow(ctx, `SELECT string_agg(format('%s %s %s %s: %s', table_name, key, stale, reason, last_error), E'\n') FROM tandem.drift WHERE repaired_at IS NULL`).Scan(&rows)
			t.Fatalf("%s: open drift %d (%v):\n%s", what, n, err, rows)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitShadowed waits until the proxy behind api has compared at least
// compared shadow reads and skipped at least skipped, and fails on any
// mismatch.
func waitShadowed(t *testing.T, api *adminClient, compared, skipped int64) {
	t.Helper()
	deadline := time.Now().Add(3 * control.ShadowFlush)
	for {
		var rep admin.MismatchReport
		code, raw := api.call("GET", "/api/v1/mismatches", "", &rep)
		if code != http.StatusOK {
			t.Fatalf("GET /api/v1/mismatches: %d %s", code, raw)
		}
		if rep.Rate.Total.Mismatched != 0 || len(rep.Groups) != 0 {
			t.Fatalf("shadow mismatches: %s", raw)
		}
		if rep.Rate.Total.Compared() >= compared && rep.Rate.Total.Skipped >= skipped {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("shadow reads not compared (%d wanted) and skipped (%d wanted): %s", compared, skipped, raw)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// finishAfter lets the writers make more acknowledged writes than they
// have made so far, then stops them, fails the test now on any client
// error and logs how many writes went through (via names where).
func (l *writerLoad) finishAfter(t *testing.T, more int, via string) {
	t.Helper()
	before := l.done()
	waitFor(t, func() bool { return l.done() >= before+more })
	l.finish(t)
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d writes acknowledged through %s", l.done(), via)
}
