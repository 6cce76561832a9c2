package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
	"go.uber.org/goleak"
)

// consolDeployment is one service of the consolidation example: its own
// database on the old cluster (with its control schema), its Tandem
// deployment in front of it and of the shared new database.
type consolDeployment struct {
	tenant string
	file   string
	rp     *runningProxy
	api    *adminClient
	oldDSN string
	dsn    string // through the proxy
}

// consolConfig is the example's config file for tenant (deploy/examples/
// consolidate/<tenant>.yaml) with this test's addresses and DSNs: the
// example's own tables section, unchanged.
func consolConfig(t *testing.T, tenant, oldDSN, newDSN string) string {
	t.Helper()
	example, err := os.ReadFile(filepath.Join("..", "..", "deploy", "examples", "consolidate", tenant+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(example), "\ntables:\n")
	if i < 0 {
		t.Fatalf("%s.yaml has no tables section", tenant)
	}
	yaml := pairYAML(oldDSN, newDSN, tenant) + string(example[i+1:])
	file := filepath.Join(t.TempDir(), tenant+".yaml")
	if err := os.WriteFile(file, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return file
}

func exampleSQL(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "examples", "consolidate", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// tenantText is an independent rendering of one tenant's orders: on its
// old store all rows, on the new store the rows WHERE tenant = it, as
// id|total|created_at in id order, hashed, and the count.
func tenantText(t *testing.T, dsn, where string) (string, int) {
	t.Helper()
	ctx := context.Background()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var h string
	var n int
	if _, err := c.Exec(ctx, `SET TimeZone = 'UTC'`); err != nil {
		t.Fatal(err)
	}
	if err := c.QueryRow(ctx, `SELECT coalesce(md5(string_agg(id || '|' || coalesce(total::text, '-') || '|' || coalesce(created_at::text, '-'), ',' ORDER BY id)), ''), count(*) FROM orders `+where).Scan(&h, &n); err != nil {
		t.Fatal(err)
	}
	return h, n
}

// consolLoad is random writes to orders through each deployment's proxy,
// in the old schema (before a flip or after its rollback).
type consolLoad struct{ writerLoad }

func (l *consolLoad) run(deps []*consolDeployment, writers int) {
	l.start(writers, func(w int) (string, string) {
		d := deps[w%len(deps)]
		return fmt.Sprintf("%s writer %d", d.tenant, w), d.dsn
	}, func(ctx context.Context, c *pgx.Conn, rnd *rand.Rand, next *int64) error {
		id := 1 + rnd.Int64N(3000)
		switch op := rnd.IntN(10); {
		case op < 3:
			*next++
			_, err := c.Exec(ctx, `INSERT INTO orders VALUES ($1, $2, now())`, *next, rnd.IntN(100000))
			return err
		case op < 6:
			_, err := c.Exec(ctx, `UPDATE orders SET total = total + 1 WHERE id = $1`, id)
			return err
		case op < 7:
			_, err := c.Exec(ctx, `DELETE FROM orders WHERE id = $1`, id)
			return err
		}
		return pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
			*next++
			if _, err := tx.Exec(ctx, `INSERT INTO orders VALUES ($1, 1, now())`, *next); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE orders SET total = total * 2 WHERE id IN ($1, $2)`, *next, id); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `INSERT INTO orders VALUES ($1, 3, now()) ON CONFLICT (id) DO UPDATE SET total = excluded.total`, id)
			return err
		})
	})
}

// consolidation is the example's two deployments on a pair of clusters:
// each service's database (shop, billing) with rows orders of its own on
// oldC, the consolidated database on newC, and each
// deployment's proxy started, in dual-write. edit, when set, may change a
// deployment's config file first; config check and plan must then pass.
// stop stops the proxies.
type consolidation struct {
	oldC, newC *pgtest.Cluster
	newDSN     string
	deps       []*consolDeployment
}

func startConsolidation(t *testing.T, oldC, newC *pgtest.Cluster, rows int, edit func(d *consolDeployment)) *consolidation {
	t.Helper()
	ctx := context.Background()
	c := &consolidation{oldC: oldC, newC: newC}
	if err := c.newC.CreateDatabase(ctx, "consolidated"); err != nil {
		t.Fatal(err)
	}
	if err := c.newC.Exec(ctx, "consolidated", exampleSQL(t, "consolidated.sql")); err != nil {
		t.Fatal(err)
	}
	c.newDSN = c.newC.DSN("consolidated")
	for i, tenant := range []string{"shop", "billing"} {
		if err := c.oldC.CreateDatabase(ctx, tenant); err != nil {
			c.stop(t)
			t.Fatal(err)
		}
		// The same ids in both services, different values.
		if err := c.oldC.Exec(ctx, tenant, exampleSQL(t, "service.sql")+fmt.Sprintf(
			`; INSERT INTO orders SELECT g, g * %d + 0.25, '2024-01-01Z'::timestamptz + g * interval '1 minute' FROM generate_series(1, %d) g`, i+2, rows)); err != nil {
			c.stop(t)
			t.Fatal(err)
		}
		d := &consolDeployment{tenant: tenant, oldDSN: c.oldC.DSN(tenant)}
		d.file = consolConfig(t, tenant, d.oldDSN, c.newDSN)
		if edit != nil {
			edit(d)
		}
		for _, cmd := range []string{"config", "plan"} {
			args := []string{cmd, "-c", d.file}
			if cmd == "config" {
				args = []string{"config", "check", "-c", d.file}
			}
			if out, errOut, err := cli(args...); err != nil {
				c.stop(t)
				t.Fatalf("%s %s: %v\n%s%s", cmd, tenant, err, out, errOut)
			}
		}
		d.rp = startQuietProxy(t, loadConfig(t, d.file))
		c.deps = append(c.deps, d)
		d.api = newAdminClient(t, d.rp)
		d.dsn = fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable&application_name=consol-load", d.rp.Addr(), tenant)
		d.api.waitLive(1)
		d.api.change("/api/v1/route", `{"mirror": true, "reason": "dual-write"}`, tenant)
	}
	return c
}

func (c *consolidation) stop(t *testing.T) {
	for i := len(c.deps) - 1; i >= 0; i-- {
		stopProxy(t, c.deps[i].rp)
	}
}

// TestConsolidation is the consolidation example (deploy/examples/
// consolidate) end to end: two service databases on the old cluster, each
// with its own Tandem deployment, consolidate into one new database with a
// tenant column in the key. 8 random writers (4 through each proxy) write
// while both backfills run; then each tenant's verify is clean, and stays
// clean (and touches nothing) when another tenant's rows on new are made
// to differ; shadow reads through one proxy match; each deployment flips
// and rolls back, with writes through it in the new schema after the flip
// reaching only its own old store, even a write to another tenant's row;
// and after every step each tenant's old orders equal the new orders WHERE
// tenant = it.
func TestConsolidation(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := context.Background()
	cons := startConsolidation(t, oldC, newC, 3000, nil)
	defer cons.stop(t)
	newDSN, deps := cons.newDSN, cons.deps
	equal := func(when string) {
		t.Helper()
		for _, d := range deps {
			ho, no := tenantText(t, d.oldDSN, "")
			hn, nn := tenantText(t, newDSN, "WHERE tenant = '"+d.tenant+"'")
			if ho != hn || no != nn {
				t.Fatalf("%s: %s differs: old %d rows %s, new %d rows %s", when, d.tenant, no, ho, nn, hn)
			}
		}
	}
	noDrift := func() {
		t.Helper()
		for _, d := range deps {
			waitNoDrift(t, d.oldDSN, d.tenant, 10*time.Second)
		}
	}

	// Both backfills, at once, under 8 writers.
	var load consolLoad
	load.run(deps, 8)
	waitFor(t, func() bool { return load.done() >= 200 })
	var wg sync.WaitGroup
	for i, d := range deps {
		path := []string{"snapshot", "locked"}[i] // both copy paths, one per tenant
		wg.Go(func() {
			if out, errOut, err := cli("backfill", "-c", d.file, "--chunk", "500", "--path", path); err != nil {
				t.Errorf("tandem backfill (%s): %v\n%s%s", d.tenant, err, out, errOut)
			}
		})
	}
	wg.Wait()
	load.finishAfter(t, 200, "the two proxies")
	noDrift()
	equal("after the backfills")
	for _, d := range deps {
		verifyAll(t, d.file)
	}

	// One tenant's verify reads only its own rows: make billing's rows on
	// new differ (a changed value, a row old billing never had, a row
	// missing) and the shop's verify, with --repair, stays clean and
	// leaves them as they are.
	var changed, missing int64 // two ids billing has (the writers deleted some)
	nc, err := pgx.Connect(ctx, newDSN)
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.QueryRow(ctx, `SELECT min(id), max(id) FROM (SELECT id FROM orders WHERE tenant = 'billing' ORDER BY id LIMIT 2) x`).Scan(&changed, &missing); err != nil {
		t.Fatal(err)
	}
	nc.Close(ctx)
	plant := fmt.Sprintf(`UPDATE orders SET total = -1 WHERE tenant = 'billing' AND id = %d;
		INSERT INTO orders VALUES ('billing', 999999, 9, now());
		DELETE FROM orders WHERE tenant = 'billing' AND id = %d`, changed, missing)
	bh, bn := tenantText(t, newDSN, "WHERE tenant = 'billing'")
	if err := newC.Exec(ctx, "consolidated", plant); err != nil {
		t.Fatal(err)
	}
	planted, _ := tenantText(t, newDSN, "WHERE tenant = 'billing'")
	out, errOut, err := cli("compare", "-c", deps[0].file, "--repair")
	if err != nil || !strings.Contains(out, "clean") {
		t.Fatalf("shop's verify with billing's rows changed: %v\n%s%s", err, out, errOut)
	}
	if h, _ := tenantText(t, newDSN, "WHERE tenant = 'billing'"); h != planted {
		t.Fatal("the shop's verify changed billing's rows")
	}
	// And billing's own verify finds exactly the three and repairs them.
	out, errOut, err = cli("compare", "-c", deps[1].file, "--repair")
	if err != nil || !strings.Contains(out, "3 differences (1 MissingOnNew, 1 MissingOnOld, 1 ValueDiff), 3 repaired") {
		t.Fatalf("billing's verify: %v\n%s%s", err, out, errOut)
	}
	if h, n := tenantText(t, newDSN, "WHERE tenant = 'billing'"); h != bh || n != bn {
		t.Fatalf("billing's rows after its repair: %d rows %s, want %d %s", n, h, bn, bh)
	}
	for _, d := range deps {
		verifyAll(t, d.file) // the flip's gate wants a clean last run
	}

	// Shadow reads through the shop's proxy: rewritten to the new orders
	// WHERE tenant = 'shop' (billing has the same ids, other totals).
	shop := deps[0]
	shop.api.change("/api/v1/route", `{"mirror": true, "shadow": 100}`, "shop")
	app, err := pgx.Connect(ctx, shop.dsn)
	if err != nil {
		t.Fatal(err)
	}
	for id := 1; id <= 20; id++ {
		var n int
		if err := app.QueryRow(ctx, "SELECT count(*) FROM orders WHERE id = $1 AND total IS NOT NULL", id).Scan(&n); err != nil {
			t.Fatal(err)
		}
	}
	app.Close(ctx)
	waitShadowed(t, shop.api, 20, 0)
	shop.api.change("/api/v1/route", `{"mirror": true, "shadow": 0}`, "shop")

	// Each deployment: flip, write in the new schema, rollback, write in
	// the old one.
	for i, d := range deps {
		other := deps[1-i]
		res := d.api.change("/api/v1/route", `{"primary": "new", "reads": 100, "reason": "cutover"}`, d.tenant)
		if res.State.Primary != route.New {
			t.Fatalf("%s flip: %+v", d.tenant, res)
		}
		otherOld, _ := tenantText(t, other.oldDSN, "")
		c, err := pgx.Connect(ctx, d.dsn)
		if err != nil {
			t.Fatal(err)
		}
		var otherTotal string
		if err := c.QueryRow(ctx, `SELECT total::text FROM orders WHERE tenant = $1 AND id = 7`, other.tenant).Scan(&otherTotal); err != nil {
			t.Fatal(err)
		}
		for _, q := range []struct {
			sql  string
			args []any
		}{
			{`INSERT INTO orders VALUES ($1, 9000001, 1.5, now())`, []any{d.tenant}},
			{`UPDATE orders SET total = 42 WHERE tenant = $1 AND id = 5`, []any{d.tenant}},
			{`DELETE FROM orders WHERE tenant = $1 AND id = 6`, []any{d.tenant}},
			// Another tenant's rows, written through this deployment (the
			// new store allows it): id 7 exists in both old stores.
			{`UPDATE orders SET total = 0 WHERE tenant = $1 AND id = 7`, []any{other.tenant}},
			{`INSERT INTO orders VALUES ($1, 9000002, 2.5, now())`, []any{other.tenant}},
			{`DELETE FROM orders WHERE tenant = $1 AND id = 8`, []any{other.tenant}},
		} {
			if _, err := c.Exec(ctx, q.sql, q.args...); err != nil {
				t.Fatalf("%s after the flip: %s: %v", d.tenant, q.sql, err)
			}
		}
		c.Close(ctx)
		noDrift()
		// This tenant's old store has its own writes and none of the
		// other tenant's; the other tenant's old store is untouched.
		ho, no := tenantText(t, d.oldDSN, "")
		hn, nn := tenantText(t, newDSN, "WHERE tenant = '"+d.tenant+"'")
		if ho != hn || no != nn {
			t.Fatalf("%s after the flip: old %d rows %s, new %d rows %s", d.tenant, no, ho, nn, hn)
		}
		if h, _ := tenantText(t, other.oldDSN, ""); h != otherOld {
			t.Fatalf("%s's writes after its flip reached %s's old store", d.tenant, other.tenant)
		}
		// Put the other tenant's rows on new back as its old store has
		// them, as its own deployment would never have seen those writes.
		if err := newC.Exec(ctx, "consolidated", fmt.Sprintf(`UPDATE orders SET total = %s WHERE tenant = '%s' AND id = 7;
			DELETE FROM orders WHERE tenant = '%[2]s' AND id = 9000002`, otherTotal, other.tenant)); err != nil {
			t.Fatal(err)
		}
		oc, err := pgx.Connect(ctx, other.oldDSN)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := oc.Exec(ctx, `DELETE FROM orders WHERE id = 8`); err != nil { // as deleted on new
			t.Fatal(err)
		}
		oc.Close(ctx)
		equal(d.tenant + " flipped")

		res = d.api.change("/api/v1/rollback", `{"reason": "drill"}`, d.tenant)
		if res.State.Primary != route.Old {
			t.Fatalf("%s rollback: %+v", d.tenant, res)
		}
		after := consolLoad{writerLoad{base: int64(1+i) * 10000000}}
		after.run([]*consolDeployment{d}, 2)
		waitFor(t, func() bool { return after.done() >= 100 })
		after.finish(t)
		noDrift()
		equal(d.tenant + " rolled back")
	}
}

// TestPlanFilterPositions: `tandem plan` checks a where predicate and a
// discriminator against the catalogs and reports a wrong one with its
// file, line and column.
func TestPlanFilterPositions(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	mustExec(t, oldC, exampleSQL(t, "service.sql")+"; CREATE TABLE items (id int PRIMARY KEY, region text)")
	mustExec(t, newC, exampleSQL(t, "consolidated.sql")+"; CREATE TABLE items (id int PRIMARY KEY, region text)")
	file, _, base := positionsConfig(t, oldC, newC, "plan-filters") // base: the lines before tables:
	appendFile(t, file, `tables:
  map:
    orders:
      discriminator:
        tenant: "shop"
      where: "total > 'many'"
    items:
      where: "regoin = 'eu'"
`)
	out, errOut, err := cli("plan", "-c", file)
	if ec, ok := err.(exitCode); !ok || ec != 2 {
		t.Fatalf("plan: %v, want exit status 2\n%s%s", err, out, errOut)
	}
	for _, want := range []string{
		fmt.Sprintf("%s:%d:7: ", file, base+6) + `tables.map[orders].where: public.orders (old): the where predicate "total > 'many'" does not compile over public.orders: invalid input syntax for type numeric: "many"`,
		fmt.Sprintf("%s:%d:7: ", file, base+8) + `tables.map[items].where: public.items: old column "regoin": is read by the where predicate but public.items has no such column (did you mean "region"?)`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("plan output lacks\n  %s\n%s", want, out)
		}
	}
}
