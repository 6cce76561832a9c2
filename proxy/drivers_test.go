package proxy

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
)

// The phases a live session goes through during a migration, in order:
// the same connection must keep working across all of them.
var sessionPhases = []struct {
	name string
	set  route.Settings
}{
	{"passthrough", route.Settings{Primary: route.Old}},
	{"mirror", route.Settings{Primary: route.Old, Mirror: true}},
	{"reads_shifted", route.Settings{Primary: route.Old, Mirror: true, Reads: 100}},
	{"shadow", route.Settings{Primary: route.Old, Mirror: true, Reads: 100, Shadow: 100}},
	{"flipped", route.Settings{Primary: route.New, Mirror: true, Reads: 100}},
	{"rolled_back", route.Settings{Primary: route.Old, Mirror: true, Reads: 100}},
}

var execModes = []struct {
	name string
	mode pgx.QueryExecMode
	// noCache disables pgx's statement and description caches.
	noCache bool
}{
	{"cache_statement", pgx.QueryExecModeCacheStatement, false},
	{"cache_describe", pgx.QueryExecModeCacheDescribe, false},
	{"describe_exec", pgx.QueryExecModeDescribeExec, false},
	{"exec", pgx.QueryExecModeExec, false},
	{"simple_protocol", pgx.QueryExecModeSimpleProtocol, false},
	{"no_cache", pgx.QueryExecModeDescribeExec, true},
}

const driverSchema = `
CREATE TABLE acct (id int PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL DEFAULT 0);
CREATE FUNCTION acct_pair(a int, OUT doubled int, OUT label text) LANGUAGE sql AS $$ SELECT a * 2, 'n' || a $$;
CREATE PROCEDURE acct_open(INOUT new_id int, owner text) LANGUAGE plpgsql AS $$
BEGIN INSERT INTO acct (id, owner) VALUES (new_id, owner); new_id := new_id + 1; END $$;
`

// TestDriverModesAcrossPhases runs an ordinary driver workload through one
// pgx connection per query exec mode (and database/sql over pgx's stdlib)
// while the routing state moves through every phase of a migration, the
// connections staying open: every call must succeed, and after each phase
// both stores hold the same rows.
func TestDriverModesAcrossPhases(t *testing.T) {
	e := newPairEnv(t, driverSchema, generousBudget)
	ctx := context.Background()
	conns := make([]*pgx.Conn, len(execModes))
	for i, m := range execModes {
		cfg, err := pgx.ParseConfig(e.proxy.dsn(e.db))
		if err != nil {
			t.Fatal(err)
		}
		cfg.DefaultQueryExecMode = m.mode
		if m.noCache {
			cfg.StatementCacheCapacity, cfg.DescriptionCacheCapacity = 0, 0
		}
		c, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(ctx) })
		conns[i] = c
	}
	sqlDB := stdlib.OpenDB(*mustParse(t, e.proxy.dsn(e.db)))
	t.Cleanup(func() { sqlDB.Close() })
	sqlDB.SetMaxOpenConns(1)

	for _, c := range conns { // opened and used while relayed
		if _, err := c.Exec(ctx, `SELECT 1`); err != nil {
			t.Fatal(err)
		}
	}
	id := 0
	for _, ph := range sessionPhases[1:] {
		e.set(ph.set)
		for i, m := range execModes {
			c := conns[i]
			id += 10
			where := fmt.Sprintf("%s/%s", ph.name, m.name)
			must := func(err error, what string) {
				t.Helper()
				if err != nil {
					t.Fatalf("%s: %s: %v", where, what, err)
				}
			}
			_, err := c.Exec(ctx, `INSERT INTO acct (id, owner, balance) VALUES ($1, $2, $3)`, id, "o"+where, "10.5")
			must(err, "insert")
			_, err = c.Exec(ctx, `UPDATE acct SET balance = balance + $2 WHERE id = $1`, id, 2)
			must(err, "update")
			var doubled int
			var label string
			must(c.QueryRow(ctx, `SELECT * FROM acct_pair($1)`, id).Scan(&doubled, &label), "function with OUT parameters")
			if doubled != 2*id || label != fmt.Sprintf("n%d", id) {
				t.Fatalf("%s: acct_pair(%d) = %d, %q", where, id, doubled, label)
			}
			var next int
			must(c.QueryRow(ctx, `CALL acct_open($1, $2)`, id+1, "proc").Scan(&next), "procedure with INOUT parameter")
			if next != id+2 {
				t.Fatalf("%s: acct_open returned %d", where, next)
			}
			var balance string
			must(c.QueryRow(ctx, `SELECT balance::text FROM acct WHERE id = $1`, id).Scan(&balance), "read back")
			if balance != "12.5" {
				t.Fatalf("%s: balance %s", where, balance)
			}
			// A batch: many statements, one Sync.
			b := &pgx.Batch{}
			b.Queue(`INSERT INTO acct (id, owner) VALUES ($1, 'batch')`, id+3)
			b.Queue(`UPDATE acct SET balance = 1 WHERE id = $1`, id+3)
			b.Queue(`SELECT count(*) FROM acct WHERE id BETWEEN $1 AND $2`, id, id+9)
			var n int
			b.Queue(`SELECT count(*) FROM acct WHERE id = $1`, id+3).QueryRow(func(r pgx.Row) error { return r.Scan(&n) })
			must(c.SendBatch(ctx, b).Close(), "batch")
			if n != 1 {
				t.Fatalf("%s: batch saw %d rows", where, n)
			}
			// A failing statement in a transaction, then a rollback.
			tx, err := c.Begin(ctx)
			must(err, "begin")
			_, err = tx.Exec(ctx, `INSERT INTO acct (id, owner) VALUES ($1, 'dup')`, id)
			if sqlState(err) != "23505" {
				t.Fatalf("%s: duplicate insert: %v", where, err)
			}
			must(tx.Rollback(ctx), "rollback")
		}
		// database/sql through pgx's stdlib.
		id += 10
		if _, err := sqlDB.ExecContext(ctx, `INSERT INTO acct (id, owner) VALUES ($1, $2)`, id, "stdlib"); err != nil {
			t.Fatalf("%s/stdlib: %v", ph.name, err)
		}
		var owner string
		if err := sqlDB.QueryRowContext(ctx, `SELECT owner FROM acct WHERE id = $1`, id).Scan(&owner); err != nil || owner != "stdlib" {
			t.Fatalf("%s/stdlib: read %q, %v", ph.name, owner, err)
		}
		if ph.set.Mirror {
			// A write the secondary missed (past the mirror budget on a
			// loaded machine) is in the drift ledger: the repairer's.
			e.set(route.Settings{Primary: route.Old, Mirror: true})
			repairDrift(t, e)
			e.assertEqual("acct", "id")
		}
	}
}

// generousBudget keeps a loaded test machine from sending writes to the
// drift ledger instead of mirroring them.
func generousBudget(c *config.Config) { c.Routing.MirrorBudget = config.Duration(5 * time.Second) }

func mustParse(t *testing.T, dsn string) *pgx.ConnConfig {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

const userTypesSchema = `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (a int, b text);
CREATE TYPE floatrange AS RANGE (subtype = float8);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE typed (id int PRIMARY KEY, m mood, p pair, r floatrange, mr floatmultirange, d posint, ms mood[]);
`

// TestDriverUserTypes: a driver that loads user-defined types once (pgx's
// LoadTypes, as most drivers' type caches do) keeps working, in text and
// binary, while the session moves through every phase, with the types
// having different OIDs on the two stores.
func TestDriverUserTypes(t *testing.T) {
	// Shift the OIDs on new: the same types get other numbers there.
	e := newPairEnv(t, "", generousBudget)
	ctx := context.Background()
	if err := e.new.Exec(ctx, e.db, `CREATE TYPE shift_oids AS ENUM ('x'); CREATE TABLE shift_oids_t (a shift_oids)`); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*pgtest.Cluster{e.old, e.new} {
		if err := c.Exec(ctx, e.db, userTypesSchema); err != nil {
			t.Fatal(err)
		}
	}
	oidOn := func(c *pgtest.Cluster) uint32 {
		conn, err := pgx.Connect(ctx, c.DSN(e.db))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		var o uint32
		if err := conn.QueryRow(ctx, `SELECT 'mood'::regtype::oid`).Scan(&o); err != nil {
			t.Fatal(err)
		}
		return o
	}
	if oidOn(e.old) == oidOn(e.new) {
		t.Fatal("the test needs the type OIDs to differ between the stores")
	}

	for _, m := range execModes[:3] { // the modes that describe statements and use binary formats
		t.Run(m.name, func(t *testing.T) {
			e.set(route.Settings{Primary: route.Old})
			cfg := mustParse(t, e.proxy.dsn(e.db))
			cfg.DefaultQueryExecMode = m.mode
			c, err := pgx.ConnectConfig(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close(ctx)
			for _, name := range []string{"mood", "_mood", "pair", "floatrange", "floatmultirange", "posint"} {
				typ, err := c.LoadType(ctx, name)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				c.TypeMap().RegisterType(typ)
			}
			base := 1000 * (1 + indexOfMode(m.name))
			for i, ph := range sessionPhases[1:] {
				e.set(ph.set)
				id := base + i
				where := ph.name
				r := pgtype.Range[float64]{Lower: 1.5, Upper: 2.5, LowerType: pgtype.Inclusive, UpperType: pgtype.Exclusive, Valid: true}
				mr := pgtype.Multirange[pgtype.Range[float64]]{r}
				if _, err := c.Exec(ctx, `INSERT INTO typed VALUES ($1, $2, $3, $4, $5, $6, $7)`,
					id, "happy", pgtype.CompositeFields{id, "x"}, r, mr, 7, []string{"sad", "ok"}); err != nil {
					t.Fatalf("%s: insert: %v", where, err)
				}
				var mood string
				var pa int
				var pb string
				p := pgtype.CompositeFields{&pa, &pb}
				var gotR pgtype.Range[float64]
				var gotMR pgtype.Multirange[pgtype.Range[float64]]
				var d int
				var ms []string
				if err := c.QueryRow(ctx, `SELECT m, p, r, mr, d, ms FROM typed WHERE id = $1`, id).Scan(&mood, &p, &gotR, &gotMR, &d, &ms); err != nil {
					t.Fatalf("%s: read: %v", where, err)
				}
				if mood != "happy" || pa != id || pb != "x" || gotR.Lower != 1.5 || len(gotMR) != 1 || d != 7 || len(ms) != 2 || ms[1] != "ok" {
					t.Fatalf("%s: read back %v %v %v %v %v %v %v", where, mood, pa, pb, gotR, gotMR, d, ms)
				}
				// The catalog lookups a driver makes agree with what it decodes.
				var oid uint32
				if err := c.QueryRow(ctx, `SELECT 'mood'::regtype::oid`).Scan(&oid); err != nil {
					t.Fatalf("%s: %v", where, err)
				}
				if want, ok := c.TypeMap().TypeForName("mood"); !ok || want.OID != oid {
					t.Fatalf("%s: the catalog says mood is OID %d; the driver loaded %v", where, oid, want)
				}
			}
		})
	}
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	repairDrift(t, e)
	e.assertEqual("typed", "id")
}

func indexOfMode(name string) int {
	for i, m := range execModes {
		if m.name == name {
			return i
		}
	}
	return -1
}
