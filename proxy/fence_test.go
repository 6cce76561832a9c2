package proxy

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
)

// The write fence waits for Server.Writers to reach zero: every way a unit
// can end must release the session's mark, or the next flip (or the
// instant rollback) cannot drain (issue 10).

// wantWriters waits up to 5 s for srv's writer count to be n.
func wantWriters(t testing.TB, srv *Server, n int64, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for srv.Writers() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d writers, want %d; %v", what, srv.Writers(), n, srv.WriterSessions())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// drains checks that a write fence raised now drains within a second.
func drains(t testing.TB, e *pairEnv, what string) {
	t.Helper()
	st := e.proxy.srv.State()
	fenced := st
	fenced.Fence = st.Version*1000 + 1
	e.proxy.srv.ApplyState(fenced)
	defer e.proxy.srv.ApplyState(st)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := e.proxy.srv.DrainWrites(ctx); err != nil {
		t.Fatalf("%s: a write fence did not drain (%d writers): %v; %v", what, e.proxy.srv.Writers(), err, e.proxy.srv.WriterSessions())
	}
}

func rawClose(c *pgx.Conn) {
	_ = c.PgConn().Conn().Close()
	c.Close(context.Background())
}

// TestFenceUnitEndings: after every kind of unit ending the writer count is
// back at zero and a fence drains: an error on the primary in and out of a
// transaction, a deadlock, a cancel, the client leaving in the middle of a
// transaction or after a Flush-ended batch, a secondary that refuses or
// loses the write, and a routing change while a transaction is open.
func TestFenceUnitEndings(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
		INSERT INTO f (id) VALUES (1), (2)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client()
	check := func(what string) {
		t.Helper()
		wantWriters(t, srv, 0, what)
		drains(t, e, what)
	}

	t.Run("error on the primary", func(t *testing.T) {
		if _, err := c.Exec(ctx, `INSERT INTO f (id) VALUES (1)`); sqlState(err) != "23505" {
			t.Fatalf("want 23505, got %v", err)
		}
		check("autocommit write failed on the primary")
		err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `UPDATE f SET v = v + 1 WHERE id = 2`); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `INSERT INTO f (id) VALUES (1)`)
			return err
		})
		if sqlState(err) != "23505" {
			t.Fatalf("want 23505, got %v", err)
		}
		check("transaction failed on the primary and rolled back")
		// An error in a transaction leaves it open (aborted) until the
		// client ends it: that is a writer, then not.
		if _, err := c.Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "SELECT 1/0"); sqlState(err) != "22012" {
			t.Fatalf("want 22012, got %v", err)
		}
		wantWriters(t, srv, 1, "aborted transaction still open")
		if _, err := c.Exec(ctx, "ROLLBACK"); err != nil {
			t.Fatal(err)
		}
		check("aborted transaction rolled back")
	})

	t.Run("deadlock", func(t *testing.T) {
		c2 := e.client()
		var wg sync.WaitGroup
		errs := make([]error, 2)
		start := make(chan struct{})
		var locked sync.WaitGroup
		locked.Add(2)
		for i, conn := range []*pgx.Conn{c, c2} {
			wg.Go(func() {
				errs[i] = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
					first, second := 1+i, 2-i
					_, err := tx.Exec(ctx, `UPDATE f SET v = v + 1 WHERE id = $1`, first)
					locked.Done()
					if err != nil {
						return err
					}
					<-start
					_, err = tx.Exec(ctx, `UPDATE f SET v = v + 1 WHERE id = $1`, second)
					return err
				})
			})
		}
		locked.Wait()
		wantWriters(t, srv, 2, "two transactions holding a lock each")
		close(start)
		wg.Wait()
		if (sqlState(errs[0]) == "40P01") == (sqlState(errs[1]) == "40P01") {
			t.Fatalf("want one deadlock, got %v and %v", errs[0], errs[1])
		}
		check("deadlock")
		rawClose(c2)
		check("deadlock's survivor gone")
	})

	t.Run("cancel", func(t *testing.T) {
		c2 := e.client()
		cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		_, err := c2.Exec(cctx, `UPDATE f SET v = v + 1 WHERE id = 1 AND pg_sleep(2) IS NOT NULL`)
		cancel()
		if err == nil {
			t.Fatal("the cancelled write succeeded")
		}
		check("autocommit write cancelled")
		if !c2.IsClosed() {
			tx, err := c2.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
			_, err = tx.Exec(cctx, `UPDATE f SET v = v + 1 WHERE id = 1 AND pg_sleep(2) IS NOT NULL`)
			cancel()
			if err == nil {
				t.Fatal("the cancelled write succeeded")
			}
			_ = tx.Rollback(ctx)
			check("write cancelled in a transaction")
		}
		rawClose(c2)
		check("cancelled client gone")
	})

	t.Run("client leaves mid-transaction", func(t *testing.T) {
		c2 := e.client()
		if _, err := c2.Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		if _, err := c2.Exec(ctx, `UPDATE f SET v = v + 1 WHERE id = 2`); err != nil {
			t.Fatal(err)
		}
		wantWriters(t, srv, 1, "open transaction")
		rawClose(c2)
		check("client gone mid-transaction")
	})

	t.Run("lone flush", func(t *testing.T) {
		// A Flush with nothing before it opens no transaction: the session
		// must not count as a writer until some later Sync.
		pl := c.PgConn().StartPipeline(ctx)
		pl.SendFlushRequest()
		if err := pl.Flush(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
		check("a lone Flush")
		pl.SendPipelineSync()
		if err := pl.Flush(); err != nil {
			t.Fatal(err)
		}
		if res, err := pl.GetResults(); err != nil {
			t.Fatal(err)
		} else if _, ok := res.(*pgconn.PipelineSync); !ok {
			t.Fatalf("after a lone Flush and a Sync: %T", res)
		}
		if err := pl.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, `UPDATE f SET v = v + 1 WHERE id = 1`); err != nil {
			t.Fatal(err)
		}
		check("after a lone Flush")
	})

	t.Run("flush-ended batch then the client leaves", func(t *testing.T) {
		c2 := e.client()
		pl := c2.PgConn().StartPipeline(ctx)
		pl.SendQueryParams(`INSERT INTO f (id) VALUES (100)`, nil, nil, nil, nil)
		pl.SendFlushRequest()
		if err := pl.Flush(); err != nil {
			t.Fatal(err)
		}
		res, err := pl.GetResults()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := res.(*pgconn.ResultReader).Close(); err != nil {
			t.Fatal(err)
		}
		wantWriters(t, srv, 1, "implicit transaction open after a Flush")
		rawClose(c2)
		check("client gone after a Flush-ended batch")
		// The primary never committed it, and neither did the secondary.
		if n := e.assertEqual("f", "id"); n != 2 {
			t.Fatalf("f has %d rows, want 2: the implicit transaction was committed", n)
		}
	})
}

// TestFenceBrokenSecondary: a secondary that refuses a mirrored write, or
// whose session dies, breaks the transaction's mirror; the transaction
// still ends, its keys go to the drift ledger, and its writer mark goes.
func TestFenceBrokenSecondary(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)`)
	if err := e.new.Exec(context.Background(), e.db, `ALTER TABLE f ADD CONSTRAINT small CHECK (v < 100)`); err != nil {
		t.Fatal(err)
	}
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client()

	err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO f VALUES (1, 500)`) // new refuses it
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	wantWriters(t, srv, 0, "transaction whose mirror the secondary refused")
	drains(t, e, "secondary refused a write")

	// The secondary's session dies in the middle of a transaction.
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO f VALUES (2, 1)`); err != nil {
		t.Fatal(err)
	}
	nc, err := pgx.Connect(ctx, e.new.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close(ctx)
	var killed int
	if err := nc.QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'`).Scan(&killed); err != nil || killed == 0 {
		t.Fatalf("terminating the secondary's sessions: %d %v", killed, err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO f VALUES (3, 1)`); err != nil {
		t.Fatal(err)
	}
	wantWriters(t, srv, 1, "transaction open, its secondary gone")
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	wantWriters(t, srv, 0, "transaction committed without its secondary")
	drains(t, e, "secondary lost mid-transaction")
	if n := e.openDrift(); n == 0 {
		t.Fatal("no drift recorded for the writes the secondary missed")
	}
}

// TestFenceStateChangeMidTransaction: a routing change, and a write fence,
// arriving while a transaction is open: the transaction runs on under the
// state it started with, the fence waits for it (and only for it), and
// once it commits the count is zero.
func TestFenceStateChangeMidTransaction(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client()
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO f VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	e.set(route.Settings{Primary: route.Old, Mirror: true, Reads: 50, Shadow: 50})
	st := srv.State()
	st.Fence = 77
	srv.ApplyState(st)
	defer func() {
		st.Fence = 0
		srv.ApplyState(st)
	}()
	dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = srv.DrainWrites(dctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a fence drained while a transaction was open: %v", err)
	}
	if got := srv.WriterSessions(); len(got) != 1 {
		t.Fatalf("writer sessions: %v", got)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO f VALUES (2)`); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	dctx, cancel = context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := srv.DrainWrites(dctx); err != nil {
		t.Fatalf("the fence did not drain once the transaction committed: %v (%v)", err, srv.WriterSessions())
	}
	st.Fence = 0
	srv.ApplyState(st)
	if n := e.assertEqual("f", "id"); n != 2 {
		t.Fatalf("f has %d rows", n)
	}
}

// TestFenceHoldsWrites: while a fence is up a write waits (without
// counting, so the fence drains), a read does not, and the write runs on
// the state the fence ends with: after a flip, on the new primary.
func TestFenceHoldsWrites(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client()
	if _, err := c.Exec(ctx, `INSERT INTO f VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	st := srv.State()
	st.Fence = 5
	srv.ApplyState(st)
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, `INSERT INTO f VALUES (2)`)
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("a write ran through a write fence: %v", err)
	default:
	}
	wantWriters(t, srv, 0, "a write waiting at the fence")
	dctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := srv.DrainWrites(dctx); err != nil {
		t.Fatalf("a write waiting at the fence kept it from draining: %v", err)
	}
	// A read from another session is not held, nor is preparing a
	// statement (Parse, Describe, Sync: it runs nothing).
	other := e.client()
	var n int
	if err := other.QueryRow(ctx, `SELECT count(*) FROM f`, pgx.QueryExecModeSimpleProtocol).Scan(&n); err != nil || n != 1 {
		t.Fatalf("read under the fence: %d %v", n, err)
	}
	pctx, pcancel := context.WithTimeout(ctx, time.Second)
	defer pcancel()
	if _, err := other.Prepare(pctx, "ins", `INSERT INTO f VALUES ($1)`); err != nil {
		t.Fatalf("preparing a statement under the fence: %v", err)
	}
	// The flip applies its state (fence still up), then releases the fence.
	flipped := route.State{Version: st.Version + 1, Fence: 5, Settings: route.Settings{Primary: route.New, Mirror: true, Reads: 100}}
	srv.ApplyState(flipped)
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("a write ran before the fence was released: %v", err)
	default:
	}
	flipped.Fence = 0
	srv.ApplyState(flipped)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	wantWriters(t, srv, 0, "the held write done")
	// The statement prepared under the fence (on old) runs after the flip.
	if _, err := other.Exec(ctx, "ins", 3); err != nil {
		t.Fatalf("the statement prepared under the fence: %v", err)
	}
	// They ran on new as primary, mirrored to old: both have them.
	if n := e.assertEqual("f", "id"); n != 3 {
		t.Fatalf("f has %d rows", n)
	}
}

// TestFenceHeldTooLong: a write held at a fence for 2 × fence_timeout
// without the state moving on is refused with a retryable error and runs
// nowhere; never on the state the fence is moving away from. The session
// stays usable: after a Query, a Sync-ended batch and a Flush-ended one
// (whose messages up to the next Sync are skipped). A lone Sync is not held.
func TestFenceHeldTooLong(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY)`, func(c *config.Config) {
		c.Routing.FenceTimeout = config.Duration(50 * time.Millisecond)
	})
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client()
	st := srv.State()
	st.Fence = 9
	srv.ApplyState(st)
	// A Sync alone writes nothing: it is answered at once.
	pl := c.PgConn().StartPipeline(ctx)
	pl.SendPipelineSync()
	if err := pl.Flush(); err != nil {
		t.Fatal(err)
	}
	if res, err := pl.GetResults(); err != nil {
		t.Fatalf("a lone Sync under the fence: %v", err)
	} else if _, ok := res.(*pgconn.PipelineSync); !ok {
		t.Fatalf("a lone Sync under the fence: %T", res)
	}
	if err := pl.Close(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := c.Exec(ctx, `INSERT INTO f VALUES (1)`); sqlState(err) != "40001" {
		t.Fatalf("simple query held at a stuck fence: want 40001, got %v", err)
	}
	if took := time.Since(start); took < 100*time.Millisecond || took > 2*time.Second {
		t.Fatalf("refused after %s, want about 2 × fence_timeout", took)
	}
	if _, err := c.Exec(ctx, `INSERT INTO f VALUES ($1)`, 2); sqlState(err) != "40001" {
		t.Fatalf("extended batch held at a stuck fence: want 40001, got %v", err)
	}
	pl = c.PgConn().StartPipeline(ctx)
	pl.SendQueryParams(`INSERT INTO f VALUES (3)`, nil, nil, nil, nil)
	pl.SendFlushRequest()
	if err := pl.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := pl.GetResults(); sqlState(err) != "40001" {
		t.Fatalf("Flush-ended batch held at a stuck fence: want 40001, got %v", err)
	}
	pl.SendQueryParams(`INSERT INTO f VALUES (4)`, nil, nil, nil, nil) // skipped, as after any error
	pl.SendPipelineSync()
	if err := pl.Flush(); err != nil {
		t.Fatal(err)
	}
	for {
		res, err := pl.GetResults()
		if err != nil {
			t.Fatalf("after the refused Flush batch: %v", err)
		}
		if _, ok := res.(*pgconn.PipelineSync); ok {
			break
		}
		if rr, ok := res.(*pgconn.ResultReader); ok {
			if _, err := rr.Close(); err != nil {
				t.Fatalf("a message after the refused Flush batch ran: %v", err)
			}
		}
	}
	if err := pl.Close(); err != nil {
		t.Fatal(err)
	}
	wantWriters(t, srv, 0, "refused writes")
	st.Fence = 0
	srv.ApplyState(st)
	if _, err := c.Exec(ctx, `INSERT INTO f VALUES (5)`); err != nil {
		t.Fatalf("the session after the fence: %v", err)
	}
	var ids string
	if err := c.QueryRow(ctx, `SELECT string_agg(id::text, ',' ORDER BY id) FROM f`).Scan(&ids); err != nil || ids != "5" {
		t.Fatalf("f: %q %v: a refused write ran", ids, err)
	}
	e.assertEqual("f", "id")
}

// TestFenceKilledWhileHeld: a session killed (the proxy shutting down)
// while its write waits at a fence ends at once, and its write never runs.
func TestFenceKilledWhileHeld(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client()
	st := srv.State()
	st.Fence = 3
	srv.ApplyState(st)
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, `INSERT INTO f VALUES (1)`)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	sctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	_ = srv.Shutdown(sctx)
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the held write succeeded")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a session killed at the fence did not end")
	}
	st.Fence = 0
	srv.ApplyState(st)
	time.Sleep(50 * time.Millisecond)
	if _, n := tableHash(t, e.old, e.db, "f", "id"); n != 0 {
		t.Fatalf("the write of a session killed at the fence ran (%d rows)", n)
	}
	if w := srv.Writers(); w != 0 {
		t.Fatalf("%d writers after shutdown", w)
	}
}

// TestFenceRelayedTransaction: a session still relayed byte for byte (in a
// transaction since before mirroring was turned on) counts as a writer
// until its transaction ends, so a fence waits for it.
func TestFenceRelayedTransaction(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY)`)
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client() // passthrough: relayed
	if _, err := c.Exec(ctx, `INSERT INTO f VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	wantWriters(t, srv, 0, "relayed autocommit write done")
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO f VALUES (2)`); err != nil {
		t.Fatal(err)
	}
	wantWriters(t, srv, 1, "relayed transaction open")
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	st := srv.State()
	st.Fence = 4
	srv.ApplyState(st)
	dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = srv.DrainWrites(dctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a fence drained while a relayed transaction was open: %v", err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	dctx, cancel = context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := srv.DrainWrites(dctx); err != nil {
		t.Fatalf("the fence did not drain once the relayed transaction committed: %v (%v)", err, srv.WriterSessions())
	}
	st.Fence = 0
	srv.ApplyState(st)
	// The next write is routed (and mirrored); the relayed session's end
	// releases nothing twice.
	if _, err := c.Exec(ctx, `INSERT INTO f VALUES (3)`); err != nil {
		t.Fatal(err)
	}
	rawClose(c)
	wantWriters(t, srv, 0, "relayed-then-routed session gone")
}

// TestFenceClientLeavesWhileHeld: a client that goes away while its write
// waits at a fence: the session ends at once and the write runs nowhere,
// even after the fence is released.
func TestFenceClientLeavesWhileHeld(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY)`, func(c *config.Config) {
		c.Routing.FenceTimeout = config.Duration(time.Minute) // no refusal meanwhile
	})
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client()
	st := srv.State()
	st.Fence = 6
	srv.ApplyState(st)
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, `INSERT INTO f VALUES (1)`)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	_ = c.PgConn().Conn().Close()
	if err := <-done; err == nil {
		t.Fatal("the held write succeeded")
	}
	deadline := time.Now().Add(2 * time.Second)
	for srv.Sessions() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions: a session whose client left while held at the fence did not end", srv.Sessions())
		}
		time.Sleep(5 * time.Millisecond)
	}
	st.Fence = 0
	srv.ApplyState(st)
	time.Sleep(50 * time.Millisecond)
	if _, n := tableHash(t, e.old, e.db, "f", "id"); n != 0 {
		t.Fatalf("the write of a client gone while held at the fence ran (%d rows)", n)
	}
	wantWriters(t, srv, 0, "client gone at the fence")
}

// TestFenceNoWriteAfterDrain: once a fence has drained, nothing commits on
// the primary until it is released, however the writers' units and the
// fence interleave; and none of them sees an error.
func TestFenceNoWriteAfterDrain(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id serial PRIMARY KEY, w int NOT NULL)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		c := e.client()
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.Exec(ctx, `INSERT INTO f (w) VALUES ($1)`, w); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	direct, err := pgx.Connect(ctx, e.old.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(ctx)
	count := func() int64 {
		var n int64
		if err := direct.QueryRow(ctx, `SELECT count(*) FROM f`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for i := range 30 {
		st := srv.State()
		st.Fence = int64(1000 + i)
		srv.ApplyState(st)
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := srv.DrainWrites(dctx)
		cancel()
		if err != nil {
			t.Fatalf("fence %d did not drain: %v (%v)", i, err, srv.WriterSessions())
		}
		before := count()
		time.Sleep(20 * time.Millisecond)
		if after := count(); after != before {
			t.Fatalf("fence %d: %d rows committed on the primary after the drain", i, after-before)
		}
		st.Fence = 0
		srv.ApplyState(st)
		time.Sleep(time.Duration(5+i%10) * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("client error: %v", err)
	}
	wantWriters(t, srv, 0, "writers done")
	e.assertEqual("f", "id")
}
