package proxy

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/tandemdb/tandem/internal/route"
)

// Clients that give up mid-request (pgx cancels the query and drops the
// connection) while 16 of them write and read with shadowing on: whatever
// was committed on old is on new, or in the drift ledger. Never silently
// missing.
func TestMirrorClientsCancelMidFlight(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE acct (id serial PRIMARY KEY, owner text NOT NULL, n int NOT NULL DEFAULT 0);`)
	e.set(route.Settings{Primary: route.Old, Mirror: true, Reads: 50, Shadow: 100})
	for round := range 6 {
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for w := range 16 {
			wg.Go(func() {
				c := e.client()
				r := rand.New(rand.NewPCG(uint64(w), uint64(round)))
				for ctx.Err() == nil {
					_, _ = c.Exec(ctx, `INSERT INTO acct (owner) VALUES ($1)`, fmt.Sprint(r.IntN(50)))
					_, _ = c.Exec(ctx, `UPDATE acct SET n = n + 1 WHERE id = $1`, 1+r.IntN(100))
					_, _ = c.Exec(ctx, `SELECT * FROM acct WHERE id = $1`, 1+r.IntN(100))
					_, _ = c.Exec(ctx, `DELETE FROM acct WHERE id = (SELECT max(id) FROM acct WHERE id > 100)`)
				}
			})
		}
		time.Sleep(300 * time.Millisecond)
		cancel()
		wg.Wait()
	}
	time.Sleep(500 * time.Millisecond)
	d := e.openDrift()
	ho, no := tableHash(t, e.old, e.db, "acct", "id")
	hn, nn := tableHash(t, e.new, e.db, "acct", "id")
	t.Logf("open drift %d; old %d rows, new %d rows; equal %v", d, no, nn, ho == hn)
	if ho != hn && d == 0 {
		e.dump("acct", "id")
		t.Fatal("stores differ with no drift recorded")
	}
}
