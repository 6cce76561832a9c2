package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// TestBackfillRace: 16 writers run random inserts, updates and deletes
// through the proxy in dual-write mode while a 4-worker backfill copies the
// rows that existed before. At the end both stores hold the same rows,
// checked by a full-row hash independent of Tandem. The backfill takes the
// snapshot path (the clusters have wal_level=logical): the writers delete
// and update rows the snapshot holds and insert keys it does not have
// (ids up to 10% past the existing ones), during the copy and the
// reconcile; one case forces the locked path.
func TestBackfillRace(t *testing.T) {
	for _, tc := range []raceCase{
		{name: "int_key", rows: 200000,
			old: `CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text);
				INSERT INTO acct SELECT g, g, md5(g::text) FROM generate_series(1, %d) g;`,
			new: `CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text)`},
		{name: "composite_key", rows: 50000,
			old: `CREATE TABLE acct (id int NOT NULL, part int NOT NULL, bal bigint NOT NULL, note text, PRIMARY KEY (part, id));
				INSERT INTO acct SELECT g, mod(g, 7), g, md5(g::text) FROM generate_series(1, %d) g;`,
			new:    `CREATE TABLE acct (id int NOT NULL, part int NOT NULL, bal bigint NOT NULL, note text, PRIMARY KEY (part, id))`,
			insert: `INSERT INTO acct VALUES ($1, $1 % 7, 0, 'ins') ON CONFLICT (part, id) DO UPDATE SET bal = acct.bal + 1`},
		{name: "uuid_key", rows: 50000,
			old: `CREATE TABLE acct (uid uuid PRIMARY KEY, id int UNIQUE NOT NULL, bal bigint NOT NULL, note text);
				INSERT INTO acct SELECT md5(g::text)::uuid, g, g, md5(g::text) FROM generate_series(1, %d) g;`,
			new:    `CREATE TABLE acct (uid uuid PRIMARY KEY, id int UNIQUE NOT NULL, bal bigint NOT NULL, note text)`,
			insert: `INSERT INTO acct VALUES (md5($1::int::text)::uuid, $1::int, 0, 'ins') ON CONFLICT (uid) DO UPDATE SET bal = acct.bal + 1`,
			key:    "uid"},
		{name: "mapped", rows: 50000,
			old: `CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text);
				INSERT INTO acct SELECT g, g, md5(g::text) FROM generate_series(1, %d) g;`,
			new:      `CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text, note_len int)`,
			mapping:  "tables:\n  map:\n    public.acct:\n      to: public.accounts\n      rename: {bal: balance}\n      compute: {note_len: \"length(note)\"}\n",
			newTable: "accounts", newOrder: "id", oldHashSQL: "(SELECT id, bal AS balance, note, length(note) AS note_len FROM acct)"},
		{name: "int_key_locked", rows: 50000, path: backfill.PathLocked,
			old: `CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text);
				INSERT INTO acct SELECT g, g, md5(g::text) FROM generate_series(1, %d) g;`,
			new: `CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL, note text)`},
	} {
		t.Run(tc.name, func(t *testing.T) { backfillRace(t, tc) })
	}
}

type raceCase struct {
	name               string
	rows               int
	old, new, insert   string
	key                string        // the key to order the hash by; default id
	mapping            string        // a tables: section appended to the config
	newTable, newOrder string        // the table and order on new when mapped
	oldHashSQL         string        // what old's rows look like on new, for the hash
	path               backfill.Path // forced; default auto, which must take the snapshot path
}

func backfillRace(t *testing.T, tc raceCase) {
	existing := tc.rows
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, fmt.Sprintf(tc.old, existing))
	mustExec(t, newC, tc.new)
	file, cfg := pairConfig(t, oldC, newC, "race-proxy")
	if tc.mapping != "" {
		appendFile(t, file, tc.mapping)
		var err error
		if cfg, err = config.Load(file, nil); err == nil {
			err = cfg.Validate()
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	insertSQL := tc.insert
	if insertSQL == "" {
		insertSQL = `INSERT INTO acct VALUES ($1, 0, 'ins') ON CONFLICT (id) DO UPDATE SET bal = acct.bal + 1`
	}
	rp, err := startProxy(cfg, newLogger(config.Log{Format: "text", Level: "error"}, io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := rp.stop(); err != nil {
			t.Error(err)
		}
	}()
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}
	ctx := context.Background()
	waitFor(t, func() bool { return rp.srv.State().Mirror })

	// The writers.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ops atomic.Int64
	errs := make(chan error, 16)
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", rp.Addr()))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close(ctx)
			rnd := uint32(w*7919 + 7)
			next := func(n int) int { rnd = rnd*1103515245 + 12345; return int(rnd>>8) % n }
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := 1 + next(existing+existing/10)
				stmt := func(q interface {
					Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
				}) error {
					var err error
					switch next(3) {
					case 0:
						_, err = q.Exec(ctx, insertSQL, id)
					case 1:
						_, err = q.Exec(ctx, `UPDATE acct SET bal = bal + 1, note = md5(random()::text) WHERE id = $1`, id)
					default:
						_, err = q.Exec(ctx, `DELETE FROM acct WHERE id = $1`, id)
					}
					return err
				}
				var err error
				if i%2 == 0 {
					err = stmt(c)
				} else {
					err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
						if err := stmt(tx); err != nil {
							return err
						}
						return stmt(tx)
					})
				}
				if err != nil {
					if sqlStateOf(err) == "40P01" {
						continue
					}
					errs <- fmt.Errorf("writer %d: %w", w, err)
					return
				}
				ops.Add(1)
			}
		}()
	}

	// The backfill, with 4 workers, while they write.
	ms, probs, err := control.LoadMappings(ctx, cfg)
	if err != nil || len(probs) > 0 {
		t.Fatalf("mappings: %v %v", probs, err)
	}
	cc, _ := control.ControlConnConfig(cfg)
	oc, _ := control.StoreConnConfig(cfg, route.Old)
	nc, _ := control.StoreConnConfig(cfg, route.New)
	eng, err := backfill.New(backfill.Options{Control: cc, Primary: oc, Secondary: nc, Mappings: ms,
		Workers: 4, Chunk: 1000, RangeRows: 10000, Tables: []table.Name{{Schema: "public", Table: "acct"}}, Path: tc.path})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sum, err := eng.Run(ctx)
	if err != nil {
		t.Fatalf("backfill: %v (%+v)", err, sum)
	}
	took := time.Since(start)
	want := tc.path
	if want == "" {
		want = backfill.PathSnapshot
	}
	if p, why := eng.Path(); p != want {
		t.Fatalf("the backfill took the %s path (%s), want %s", p, why, want)
	}
	time.Sleep(200 * time.Millisecond) // writes during the last units too
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("backfill of %d rows with 4 workers took %v while 16 writers made %d writes", existing, took.Round(time.Millisecond), ops.Load())
	if p := sum.Tables[0]; want == backfill.PathSnapshot {
		// Under the writers a chunk's range often holds mirrored rows
		// already (staged), or gets one during its straight COPY (raced,
		// then staged): how many of each is the machine's timing.
		t.Logf("snapshot chunks: %d straight, %d staged (%d of them after a raced straight COPY), of %d", p.StraightChunks, p.StagedChunks, p.StraightRaced, p.Chunks)
		if p.StraightChunks+p.StagedChunks > p.Chunks || p.StraightRaced > p.StagedChunks {
			t.Fatalf("chunk counts do not add up: %+v", p)
		}
	}
	// Writes whose mirror failed are in the drift ledger: the proxy's
	// repairer drains it.
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	waitFor(t, func() bool {
		n, err := table.OpenDriftTotal(ctx, ctl)
		return err == nil && n == 0
	})
	key := tc.key
	if key == "" {
		key = "id"
	}
	oldTable, newTable := "acct", "acct"
	if tc.oldHashSQL != "" {
		oldTable, newTable = tc.oldHashSQL, tc.newTable
	}
	ho, no := storeHash(t, oldC, oldTable, key)
	hn, nn := storeHash(t, newC, newTable, key)
	if ho != hn || no != nn {
		t.Fatalf("acct differs after the backfill: old %d rows %s, new %d rows %s", no, ho, nn, hn)
	}
}

func sqlStateOf(err error) string {
	var pe *pgconn.PgError
	if err != nil && errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}
