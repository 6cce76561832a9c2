package proxy

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// The tests of this file are the holes of issue 11, section 1: writes the
// proxy itself sees whose effect on the secondary used to be lost without
// a drift entry. Each names the mechanism that now catches it: lockstep
// (the secondary is equal before any repair, the ledger empty) or the
// ledger (an entry is open when the client has its acknowledgement, and
// the repairer makes the stores equal).

// openEntries returns the open drift entries as "table key reason" lines.
func (e *pairEnv) openEntries() []string {
	e.t.Helper()
	rows, err := e.control.Query(context.Background(), `SELECT table_name || ' ' || coalesce(key::text, '(whole table)') || ' ' || reason FROM tandem.drift WHERE repaired_at IS NULL ORDER BY id`)
	if err != nil {
		e.t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *pairEnv) exec(c *pgx.Conn, sqls ...string) {
	e.t.Helper()
	for _, s := range sqls {
		if _, err := c.Exec(context.Background(), s); err != nil {
			e.t.Fatalf("%s: %v", s, err)
		}
	}
}

// assertLockstep: the stores are equal before any repair, and nothing is
// in the ledger.
func (e *pairEnv) assertLockstep(what string) {
	e.t.Helper()
	if d := e.openEntries(); len(d) > 0 {
		e.t.Fatalf("%s: want lockstep, but the ledger has %d open entries: %v", what, len(d), d)
	}
	if !assertStoresEqual(e.t.(*testing.T), e.old, e.new, e.db, nil) {
		e.t.Fatalf("%s: the stores differ without any drift recorded", what)
	}
}

// assertLedger: the ledger holds an entry for each of tables (open when the
// client got its acknowledgement), and the repairer makes the stores equal.
func (e *pairEnv) assertLedger(what string, tables ...string) {
	e.t.Helper()
	d := e.openEntries()
	for _, tbl := range tables {
		found := false
		for _, l := range d {
			found = found || strings.HasPrefix(l, tbl+" ")
		}
		if !found {
			e.t.Fatalf("%s: want a drift entry for %s, open entries: %v", what, tbl, d)
		}
	}
	repairDrift(e.t, e)
	if !assertStoresEqual(e.t.(*testing.T), e.old, e.new, e.db, nil) {
		e.t.Fatalf("%s: the stores differ after the repairer ran", what)
	}
}

const cascadeSchema = `
CREATE TABLE p (id int PRIMARY KEY, code text UNIQUE);
CREATE TABLE c_cascade (id int PRIMARY KEY, pid int REFERENCES p ON DELETE CASCADE);
CREATE TABLE gc (id int PRIMARY KEY, cid int REFERENCES c_cascade ON DELETE CASCADE);
CREATE TABLE gc_null (id int PRIMARY KEY, cid int REFERENCES c_cascade ON DELETE SET NULL);
CREATE TABLE c_null (id int PRIMARY KEY, pid int REFERENCES p ON DELETE SET NULL);
CREATE TABLE p2 (a int, b int, PRIMARY KEY (a, b));
CREATE TABLE c_cols (id int PRIMARY KEY, pid int, tag int, note text,
	FOREIGN KEY (pid, tag) REFERENCES p2 (a, b) ON DELETE SET NULL (tag));
CREATE TABLE c_def (id int PRIMARY KEY, pid int DEFAULT 0 REFERENCES p ON DELETE SET DEFAULT);
CREATE TABLE c_upd (id int PRIMARY KEY, pcode text REFERENCES p (code) ON UPDATE CASCADE ON DELETE CASCADE);
CREATE TABLE c_upd_null (id int PRIMARY KEY, pcode text REFERENCES p (code) ON UPDATE SET NULL ON DELETE CASCADE);
CREATE TABLE c_plain (id int PRIMARY KEY, pid int REFERENCES p (id));
CREATE TABLE tree (id int PRIMARY KEY, parent int REFERENCES tree ON DELETE CASCADE);
`

// TestHoleCascade: deleting parents through the proxy leaves the children
// equal on new, for ON DELETE CASCADE (in chains, and on a self-referencing
// table), SET NULL (all columns or a list) and SET DEFAULT: lockstep. An
// update of a referenced column with ON UPDATE CASCADE: ledger.
func TestHoleCascade(t *testing.T) {
	e := newPairEnv(t, cascadeSchema)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	c := e.client()
	e.exec(c,
		`INSERT INTO p SELECT g, 'c' || g FROM generate_series(0, 12) g`,
		`INSERT INTO p2 SELECT g, g FROM generate_series(1, 4) g`,
		`INSERT INTO c_cascade SELECT g, g % 12 + 1 FROM generate_series(1, 40) g`,
		`INSERT INTO gc SELECT g, g % 40 + 1 FROM generate_series(1, 80) g`,
		`INSERT INTO gc_null SELECT g, g % 40 + 1 FROM generate_series(1, 80) g`,
		`INSERT INTO c_null SELECT g, g % 12 + 1 FROM generate_series(1, 30) g`,
		`INSERT INTO c_cols SELECT g, g % 4 + 1, g % 4 + 1, 'n' || g FROM generate_series(1, 12) g`,
		`INSERT INTO c_def SELECT g, g % 12 + 1 FROM generate_series(1, 30) g`,
		`INSERT INTO c_upd SELECT g, 'c' || (g % 12 + 1) FROM generate_series(1, 30) g`,
		`INSERT INTO c_upd_null SELECT g, 'c' || (g % 12 + 1) FROM generate_series(1, 30) g`,
		`INSERT INTO c_plain VALUES (1, 12)`,
		`INSERT INTO tree VALUES (1, NULL), (2, 1), (3, 1), (4, 2), (5, 4), (6, 5), (7, NULL), (8, 7)`,
	)
	e.assertLockstep("inserts")

	// Autocommit deletes, one in a transaction with a savepoint, one
	// through the extended protocol, and a chain down a tree.
	e.exec(c, `DELETE FROM p WHERE id IN (1, 2, 3)`)
	e.exec(c, `BEGIN`, `DELETE FROM p WHERE id = 4`, `SAVEPOINT s`, `DELETE FROM p WHERE id = 5`, `ROLLBACK TO SAVEPOINT s`, `DELETE FROM p WHERE id = 6`, `COMMIT`)
	if _, err := c.Exec(context.Background(), `DELETE FROM p WHERE id = $1`, 7); err != nil {
		t.Fatal(err)
	}
	e.exec(c, `DELETE FROM p2 WHERE a IN (1, 2)`, `DELETE FROM tree WHERE id = 1`, `DELETE FROM c_cascade WHERE id = 40`)
	e.assertLockstep("cascading deletes")

	// A referenced column that is not the key changes: ON UPDATE CASCADE
	// and SET NULL, in lockstep too (also where the value stays the same,
	// and in a transaction that changes it twice).
	e.exec(c, `UPDATE p SET code = code || 'x' WHERE id IN (8, 9)`, `UPDATE p SET code = code WHERE id = 10`,
		`BEGIN`, `UPDATE p SET code = 'y' || code WHERE id = 11`, `UPDATE p SET code = code || 'z' WHERE id = 11`, `COMMIT`,
		`INSERT INTO p VALUES (11, 'c11') ON CONFLICT (id) DO UPDATE SET code = 'w11'`)
	e.assertLockstep("ON UPDATE actions")

	// A key change: the ledger (the old keys are not in the row image).
	e.exec(c, `INSERT INTO p VALUES (50, 'c50')`, `UPDATE p SET id = id + 100, code = 'k50' WHERE id = 50`)
	e.assertLedger("key change of a parent", "p")
}

// TestHoleKeyChange: an UPDATE that changes a key leaves new with the new
// keys only, directly and through a table mapping: the ledger.
func TestHoleKeyChange(t *testing.T) {
	// m has a unique column besides its key: on new, the mirrored upsert of
	// a changed key meets the row under the old key still holding the
	// email, and so does the whole-table repair unless it removes the rows
	// old has lost first.
	e := newPairEnv(t, `CREATE TABLE k (id int PRIMARY KEY, v text); CREATE TABLE m (id int PRIMARY KEY, email text NOT NULL UNIQUE)`)
	ctx := context.Background()
	if err := e.old.Exec(ctx, e.db, `CREATE TABLE users (id int PRIMARY KEY, first_name text, last_name text)`); err != nil {
		t.Fatal(err)
	}
	if err := e.new.Exec(ctx, e.db, `CREATE TABLE accounts (id int PRIMARY KEY, full_name text)`); err != nil {
		t.Fatal(err)
	}
	cfg := config.Tables{Map: map[string]config.TableMap{
		"public.users": {
			To:      "public.accounts",
			Compute: map[string]string{"full_name": "first_name || ' ' || last_name"},
			Reverse: map[string]string{
				"first_name": "split_part(full_name, ' ', 1)",
				"last_name":  "substr(full_name, length(split_part(full_name, ' ', 1)) + 2)",
			},
		},
	}}
	ms, oc, nc := e.loadMappings(t, cfg)
	e.proxy.srv.SetMappings(ms)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	c := e.client()
	e.exec(c, `INSERT INTO k SELECT g, 'v' || g FROM generate_series(1, 5) g`,
		`INSERT INTO users VALUES (1, 'Ada', 'Lovelace'), (2, 'Alan', 'Turing')`,
		`INSERT INTO m SELECT g, 'e' || g FROM generate_series(1, 5) g`)
	if d := e.openEntries(); len(d) > 0 {
		t.Fatalf("inserts recorded drift: %v", d)
	}
	e.exec(c, `UPDATE k SET id = id + 100`, `UPDATE users SET id = id + 100 WHERE id = 1`, `UPDATE m SET id = id + 100 WHERE id > 2`)
	e.exec(c, `BEGIN`, `UPDATE k SET id = id + 100 WHERE id = 101`, `COMMIT`)
	d := e.openEntries()
	for _, tbl := range []string{"k", "users", "m"} {
		if !strings.Contains(strings.Join(d, "\n"), tbl+" (whole table) key columns updated") {
			t.Fatalf("want a whole-table entry for %s, open entries: %v", tbl, d)
		}
	}
	// The repairer copies users to accounts through the mapping.
	for i := 0; e.openDrift() > 0; i++ {
		if i == 50 {
			t.Fatalf("drift still open: %v", e.openEntries())
		}
		ctl, err := pgx.Connect(ctx, e.old.DSN(e.db))
		if err != nil {
			t.Fatal(err)
		}
		_, err = table.RepairWith(ctx, ctl, oc, nc, table.RepairOptions{Target: table.StaleNew, Limit: 1000, Mappings: ms})
		ctl.Close(ctx)
		if err != nil {
			t.Fatal(err)
		}
	}
	e.assertEqual("k", "id")
	e.assertEqual("m", "id")
	var ids string
	if err := nc.QueryRow(ctx, `SELECT string_agg(id::text || ':' || full_name, ',' ORDER BY id) FROM accounts`).Scan(&ids); err != nil || ids != "2:Alan Turing,101:Ada Lovelace" {
		t.Fatalf("accounts on new: %q %v", ids, err)
	}
}

// TestHoleTruncateAndDDL: a TRUNCATE, and an ALTER TABLE, that cannot run
// on new (a lock held there past the mirror budget) are recorded as
// whole-table drift, named by the statement's tag: the ledger.
func TestHoleTruncateAndDDL(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE tr (id int PRIMARY KEY, v text)`, func(c *config.Config) {
		c.Routing.MirrorBudget = config.Duration(300 * time.Millisecond)
	})
	ctx := context.Background()
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	c := e.client()
	e.exec(c, `INSERT INTO tr SELECT g, 'v' FROM generate_series(1, 20) g`)
	// TRUNCATE that ran on both: lockstep.
	e.exec(c, `TRUNCATE tr`, `INSERT INTO tr SELECT g, 'w' FROM generate_series(1, 20) g`)
	e.assertLockstep("TRUNCATE on both")

	hold := func() func() {
		lc, err := pgx.Connect(ctx, e.new.DSN(e.db))
		if err != nil {
			t.Fatal(err)
		}
		tx, err := lc.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, `LOCK TABLE tr IN ACCESS EXCLUSIVE MODE`); err != nil {
			t.Fatal(err)
		}
		return func() {
			// The proxy cancels the statement it gave up on; release the
			// lock only once it is gone, so it cannot run after all.
			succeedsSoon(t, func() error {
				var n int
				if err := lc.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'`).Scan(&n); err != nil {
					return err
				}
				if n > 0 {
					return fmt.Errorf("%d sessions still wait for the lock", n)
				}
				return nil
			})
			_ = tx.Rollback(ctx)
			lc.Close(ctx)
		}
	}
	release := hold()
	e.exec(c, `TRUNCATE tr`)
	release()
	d := e.openEntries()
	if len(d) != 1 || d[0] != "tr (whole table) TRUNCATE failed on the secondary" && !strings.HasPrefix(d[0], "tr (whole table) TRUNCATE") {
		t.Fatalf("want one whole-table entry for tr naming TRUNCATE, got %v", d)
	}
	e.assertLedger("TRUNCATE missed by new", "tr")

	release = hold()
	e.exec(c, `ALTER TABLE tr ADD COLUMN extra int`)
	release()
	d = e.openEntries()
	if len(d) != 1 || !strings.HasPrefix(d[0], "tr (whole table) ALTER TABLE") {
		t.Fatalf("want one whole-table entry for tr naming ALTER TABLE, got %v", d)
	}
	// The operator applies the DDL on new; the repairer then levels the rows.
	if err := e.new.Exec(ctx, e.db, `ALTER TABLE tr ADD COLUMN extra int`); err != nil {
		t.Fatal(err)
	}
	e.assertLedger("ALTER TABLE missed by new", "tr")
}

// TestHoleFlushBatch: a pipelined batch ended by Flush whose part on the
// secondary failed, committed by a later Sync: the drift is in the ledger
// when the client gets the Sync's ReadyForQuery, whether the secondary
// failed before the Sync's request or in it.
func TestHoleFlushBatch(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE f (id int PRIMARY KEY)`)
	ctx := context.Background()
	// new rejects ids 500 and 600.
	if err := e.new.Exec(ctx, e.db, `ALTER TABLE f ADD CONSTRAINT no500 CHECK (id <> 500), ADD CONSTRAINT no600 CHECK (id <> 600)`); err != nil {
		t.Fatal(err)
	}
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	pc := e.client().PgConn()
	run := func(first string, rest ...string) {
		t.Helper()
		pl := pc.StartPipeline(ctx)
		pl.SendQueryParams(`INSERT INTO f VALUES ($1)`, [][]byte{[]byte(first)}, nil, nil, nil)
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
		for _, id := range rest {
			pl.SendQueryParams(`INSERT INTO f VALUES ($1)`, [][]byte{[]byte(id)}, nil, nil, nil)
		}
		pl.SendPipelineSync()
		if err := pl.Flush(); err != nil {
			t.Fatal(err)
		}
		for {
			res, err := pl.GetResults()
			if err != nil {
				t.Fatal(err)
			}
			if rr, ok := res.(*pgconn.ResultReader); ok {
				if _, err := rr.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if _, ok := res.(*pgconn.PipelineSync); ok {
				break
			}
		}
		if err := pl.Close(); err != nil {
			t.Fatal(err)
		}
	}
	run("1", "2")
	e.assertLockstep("a batch new accepts")
	run("500", "3") // new failed in the Flush-ended part
	if d := e.openEntries(); len(d) == 0 {
		t.Fatal("the batch was acknowledged without its drift (failed before the Sync)")
	}
	if err := e.new.Exec(ctx, e.db, `ALTER TABLE f DROP CONSTRAINT no500`); err != nil {
		t.Fatal(err)
	}
	e.assertLedger("failed before the Sync", "f")
	run("4", "600") // new failed in the Sync's request
	if d := e.openEntries(); len(d) == 0 {
		t.Fatal("the batch was acknowledged without its drift (failed in the Sync's request)")
	}
	if err := e.new.Exec(ctx, e.db, `ALTER TABLE f DROP CONSTRAINT no600`); err != nil {
		t.Fatal(err)
	}
	e.assertLedger("failed in the Sync's request", "f")
}

// TestHoleTwoPhase: the drift of a prepared transaction is not repaired
// away before COMMIT PREPARED: the repairer leaves a table alone while a
// prepared transaction holds a lock on it on the primary. Ledger.
func TestHoleTwoPhase(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE tp (id int PRIMARY KEY, v text)`)
	ctx := context.Background()
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	c := e.client()
	e.exec(c, `INSERT INTO tp VALUES (1, 'a')`, `BEGIN`, `INSERT INTO tp VALUES (2, 'b')`, `UPDATE tp SET v = 'c' WHERE id = 1`, `PREPARE TRANSACTION 'hole2pc'`)
	t.Cleanup(func() { _ = e.old.Exec(context.Background(), e.db, `ROLLBACK PREPARED 'hole2pc'`) })
	if d := e.openEntries(); len(d) == 0 {
		t.Fatal("PREPARE TRANSACTION recorded no drift")
	}
	// A repair pass while the transaction is prepared: nothing is closed.
	ctl, err := pgx.Connect(ctx, e.old.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	oc, err := pgx.Connect(ctx, e.old.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer oc.Close(ctx)
	nc, err := pgx.Connect(ctx, e.new.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close(ctx)
	before := e.openDrift()
	// (Before the repairer knew of prepared transactions, this pass waited
	// for the prepared transaction's row locks: bounded here.)
	pass, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := table.Repair(pass, ctl, oc, nc, table.StaleNew, 1000); err != nil {
		t.Fatal(err)
	}
	if after := e.openDrift(); after != before {
		t.Fatalf("a repair pass closed drift of a prepared transaction: %d open before, %d after", before, after)
	}
	e.exec(c, `COMMIT PREPARED 'hole2pc'`)
	e.assertLedger("two-phase commit", "tp")
}

// TestHoleAmbiguousCommit: the primary committed, the secondary did not
// follow in lockstep (BEGIN; INSERT; COMMIT in one request commits before
// the mirror can), and the control database is cut off, so the drift
// cannot be recorded. The client gets no ReadyForQuery but SQLSTATE 08006,
// the proxy holds the entry in memory and records it once the control
// database is back; the repairer then makes the stores equal. Ledger.
func TestHoleAmbiguousCommit(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE amb (id int PRIMARY KEY, v text)`)
	ctx := context.Background()
	tp := startToxiproxy(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(e.old.Port())))
	pc, err := pgxpool.ParseConfig(e.old.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	host, port, err := net.SplitHostPort(tp.Listen)
	if err != nil {
		t.Fatal(err)
	}
	pn, _ := strconv.Atoi(port)
	pc.ConnConfig.Host, pc.ConnConfig.Port = host, uint16(pn)
	pc.ConnConfig.ConnectTimeout = 2 * time.Second
	ctl, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	p := startProxyWith(t, e.old, e.db, Options{RecordDrift: func(ctx context.Context, entries []table.DriftEntry) error {
		return table.RecordDrift(ctx, ctl, entries)
	}}, func(c *config.Config) { c.New.DSN = e.new.DSN(e.db) })
	p.srv.ApplyState(route.State{Version: 2, Settings: route.Settings{Primary: route.Old, Mirror: true}})
	c, err := pgx.Connect(ctx, p.dsn(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	e.exec(c, `INSERT INTO amb VALUES (1, 'a')`)
	e.assertLockstep("before the cut")

	tp.Stop()
	_, err = c.Exec(ctx, `BEGIN; INSERT INTO amb VALUES (2, 'b'); COMMIT`)
	if sqlState(err) != "08006" {
		t.Fatalf("want SQLSTATE 08006 for a commit whose drift could not be recorded, got %v", err)
	}
	if !c.IsClosed() {
		if err := c.Ping(ctx); err == nil {
			t.Fatal("the session survived an ambiguous commit")
		}
	}
	if n := p.srv.HeldDrift(); n == 0 {
		t.Fatal("no drift held in memory")
	}
	if d := e.openEntries(); len(d) != 0 {
		t.Fatalf("drift recorded while the control database was cut off: %v", d)
	}
	if err := tp.Start(); err != nil {
		t.Fatal(err)
	}
	succeedsSoon(t, func() error {
		if n := p.srv.HeldDrift(); n > 0 {
			return fmt.Errorf("%d entries still held", n)
		}
		return nil
	})
	e.assertLedger("ambiguous commit", "amb")
}

// TestHoleCascadeConcurrent: writers insert parents and children and
// delete parents (ON DELETE CASCADE and SET NULL) at once through the
// proxy. A child inserted by a transaction that committed on old but not
// yet on new must not survive its parent's cascade there: the stores are
// equal once the repairer has run (drift is only what a mirror that
// failed, e.g. on a deadlock, recorded).
func TestHoleCascadeConcurrent(t *testing.T) {
	e := newPairEnv(t, `
CREATE TABLE cp (id int PRIMARY KEY);
CREATE TABLE cc (id bigserial PRIMARY KEY, pid int REFERENCES cp ON DELETE CASCADE);
CREATE TABLE cn (id bigserial PRIMARY KEY, pid int REFERENCES cp ON DELETE SET NULL);
INSERT INTO cp SELECT generate_series(1, 40);`, generousBudget)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	// The sequences must give the same ids on both stores' rows: the
	// mirror copies the primary's ids, so new's sequence is never used.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := pgx.Connect(ctx, e.proxy.dsn(e.db))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(ctx)
			for i := range 60 {
				p := 1 + (w*7+i*13)%40
				var err error
				switch i % 4 {
				case 0, 1:
					_, err = c.Exec(ctx, `INSERT INTO cc (pid) VALUES ($1)`, p)
					if err == nil {
						_, err = c.Exec(ctx, `INSERT INTO cn (pid) VALUES ($1)`, p)
					}
				case 2:
					_, err = c.Exec(ctx, `DELETE FROM cp WHERE id = $1`, p)
				case 3:
					_, err = c.Exec(ctx, `INSERT INTO cp VALUES ($1) ON CONFLICT DO NOTHING`, p)
				}
				if err != nil && sqlState(err) != "23503" {
					errs <- fmt.Errorf("writer %d: %w", w, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("drift entries recorded: %d", e.openDrift())
	repairDrift(t, e)
	if !assertStoresEqual(t, e.old, e.new, e.db, nil) {
		t.Fatal("the stores differ after concurrent cascades")
	}
}

// TestHoleCommitReplyLost: the primary commits an autocommit write but its
// reply never reaches the proxy (the connection dies after the COMMIT went
// out). The client gets 08006, as from PostgreSQL, and the write's key is
// in the ledger, since the primary may have committed it and the
// secondary, whose transaction ends with the session, has not. Ledger.
func TestHoleCommitReplyLost(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE rl (id int PRIMARY KEY, v text)`)
	ctx := context.Background()
	var cut atomic.Bool
	var tp *toxiproxy.Proxy
	tp, c := e.dualWriteThroughToxiproxy(TestingKnobs{BeforePrimaryCommit: func() {
		if cut.CompareAndSwap(true, false) {
			cutReplies(t, tp) // the COMMIT still reaches old; its reply does not come back
		}
	}})
	e.exec(c, `INSERT INTO rl VALUES (1, 'a')`)
	e.assertLockstep("before the cut")
	cut.Store(true)
	_, err := c.Exec(ctx, `INSERT INTO rl VALUES (2, 'b')`)
	if sqlState(err) != "08006" {
		t.Fatalf("want SQLSTATE 08006 when the primary's commit reply is lost, got %v", err)
	}
	if err := tp.Toxics.RemoveToxic(ctx, "cut"); err != nil {
		t.Fatal(err)
	}
	if _, n := tableHash(t, e.old, e.db, "rl", "id"); n != 2 {
		t.Fatalf("old has %d rows: the primary did not commit, the test proves nothing", n)
	}
	d := e.openEntries()
	if len(d) != 1 || !strings.HasPrefix(d[0], "rl {2} the primary's commit outcome is unknown") {
		t.Fatalf("want one entry for key 2, got %v", d)
	}
	e.assertLedger("commit reply lost", "rl")
}

// TestHoleAutocommitDDLLost: a DDL outside a transaction block (the proxy
// does not wrap it) reaches old, and old's reply never comes back. It may
// have committed on old, and new never ran it: its table is recorded as
// whole-table drift before the client hears of the lost connection, where
// before nothing was recorded at all. (The repairer copies rows, not
// schema: the entry stays open, and refuses a flip, until the DDL is run
// on new by hand.)
func TestHoleAutocommitDDLLost(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE ddl (id int PRIMARY KEY, v text)`)
	ctx := context.Background()
	tp, c := e.dualWriteThroughToxiproxy(TestingKnobs{})
	e.exec(c, `INSERT INTO ddl VALUES (1, 'a')`, `ALTER TABLE ddl ADD COLUMN n int`)
	if d := e.openEntries(); len(d) > 0 {
		t.Fatalf("mirrored writes and DDL recorded drift: %v", d)
	}
	cutReplies(t, tp) // the DDL still reaches old; its reply does not come back
	_, err := c.Exec(ctx, `ALTER TABLE ddl ADD COLUMN extra int DEFAULT 7`)
	if sqlState(err) != "08006" {
		t.Fatalf("want SQLSTATE 08006 when the primary's reply to a DDL is lost, got %v", err)
	}
	if err := tp.Toxics.RemoveToxic(ctx, "cut"); err != nil {
		t.Fatal(err)
	}
	var onOld bool
	if err := e.control.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'ddl' AND column_name = 'extra')`).Scan(&onOld); err != nil || !onOld {
		t.Fatalf("the DDL did not commit on old (%v): the test proves nothing", err)
	}
	d := e.openEntries()
	if len(d) != 1 || d[0] != "ddl (whole table) the primary's outcome of an autocommit statement is unknown" {
		t.Fatalf("want one whole-table entry for ddl, got %v", d)
	}
}

// dualWriteThroughToxiproxy starts a proxy in dual-write whose old store is
// reached through a toxiproxy (for cutReplies), recording drift in e's
// ledger, with knobs, and a client connected through it.
func (e *pairEnv) dualWriteThroughToxiproxy(knobs TestingKnobs) (*toxiproxy.Proxy, *pgx.Conn) {
	t := e.t.(*testing.T)
	tp := startToxiproxy(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(e.old.Port())))
	p := startProxyWith(t, e.old, e.db, Options{
		RecordDrift: func(ctx context.Context, entries []table.DriftEntry) error {
			return table.RecordDrift(ctx, e.control, entries)
		},
		Knobs: knobs,
	}, func(c *config.Config) {
		c.Old.DSN = "postgres://postgres@" + tp.Listen + "/" + e.db + "?sslmode=disable"
		c.New.DSN = e.new.DSN(e.db)
	})
	p.srv.ApplyState(route.State{Version: 2, Settings: route.Settings{Primary: route.Old, Mirror: true}})
	c, err := pgx.Connect(context.Background(), p.dsn(e.db))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return tp, c
}

// cutReplies stops old's replies through tp (what the proxy sends still
// reaches old) and closes the connection 200 ms later; the test removes
// the toxic "cut" to end it.
func cutReplies(t *testing.T, tp *toxiproxy.Proxy) {
	if _, err := tp.Toxics.AddToxicJson(strings.NewReader(`{"name": "cut", "type": "timeout", "stream": "downstream", "attributes": {"timeout": 200}}`)); err != nil {
		t.Error(err)
	}
}
