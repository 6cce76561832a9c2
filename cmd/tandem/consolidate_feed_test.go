package main

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/route"
	"go.uber.org/goleak"
)

// TestConsolidationFeed runs the consolidation example with the change feed
// on in both deployments, each under its feed.name (the tenant): the two
// service databases share the old cluster and the two deployments share the
// new database, where slot names and the publication would otherwise be
// one. Before the flip each feed catches a write made directly on its own
// service database and the repairer carries it to new under its tenant;
// after both deployments flip, each feed reads its own slot on the shared
// new store, checks only its own tenant's rows, and carries a direct write
// on new back to its own old store and to no other.
func TestConsolidationFeed(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := context.Background()
	cons := startConsolidation(t, oldC, newC, 300, func(d *consolDeployment) {
		// Without a name of its own, the feed is refused with a
		// consolidation's discriminator.
		yaml, err := os.ReadFile(d.file)
		if err != nil {
			t.Fatal(err)
		}
		feed := func(section string) {
			if err := os.WriteFile(d.file, []byte(strings.Replace(string(yaml), "\ntables:\n", "\nfeed:\n  enabled: true\n"+section+"tables:\n", 1)), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		feed("")
		if out, errOut, err := cli("config", "check", "-c", d.file); err == nil || !strings.Contains(out+errOut, "set feed.name") {
			t.Fatalf("config check of a consolidation's feed without feed.name: %v\n%s%s", err, out, errOut)
		}
		feed("  name: " + d.tenant + "\n")
	})
	defer cons.stop(t)
	newDSN, deps := cons.newDSN, cons.deps
	slots := func(c *pgtest.Cluster) []string {
		t.Helper()
		conn, err := pgx.Connect(ctx, c.DSN("postgres"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		rows, err := conn.Query(ctx, "SELECT slot_name || '@' || database FROM pg_replication_slots WHERE slot_name LIKE 'tandem\\_feed%' ORDER BY 1")
		if err != nil {
			t.Fatal(err)
		}
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return names
	}
	// Each equal on its own: the repairer and the feed bring them there.
	equalSoon := func(when string) {
		t.Helper()
		harness.SucceedsSoon(t, 60*time.Second, func() error {
			for _, d := range deps {
				ho, no := tenantText(t, d.oldDSN, "")
				hn, nn := tenantText(t, newDSN, "WHERE tenant = '"+d.tenant+"'")
				if ho != hn || no != nn {
					return fmt.Errorf("%s: %s differs: old %d rows %s, new %d rows %s", when, d.tenant, no, ho, nn, hn)
				}
			}
			return nil
		})
	}
	for _, d := range deps {
		backfillAll(t, d.file) // waits for its own feed's slot on old
	}
	if got, want := slots(oldC), []string{"tandem_feed_billing_old@billing", "tandem_feed_shop_old@shop"}; !slices.Equal(got, want) {
		t.Fatalf("slots on the old cluster: %v, want %v", got, want)
	}
	equalSoon("after the backfills")

	// Writes straight to each service's database, which the proxies never
	// see: only the feeds can find them.
	direct := func(dsn, sql string) {
		t.Helper()
		c, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	direct(deps[0].oldDSN, "UPDATE orders SET total = 77 WHERE id = 3")
	direct(deps[1].oldDSN, "DELETE FROM orders WHERE id = 4; INSERT INTO orders VALUES (5000, 1.25, now())")
	equalSoon("after direct writes on old")
	for _, d := range deps {
		verifyAll(t, d.file)
	}

	for _, d := range deps {
		if res := d.api.change("/api/v1/route", `{"primary": "new", "reads": 100, "reason": "cutover"}`, d.tenant); res.State.Primary != route.New {
			t.Fatalf("%s flip: %+v", d.tenant, res)
		}
	}
	if got, want := slots(newC), []string{"tandem_feed_billing_new@consolidated", "tandem_feed_shop_new@consolidated"}; !slices.Equal(got, want) {
		t.Fatalf("slots on the new cluster after both flips: %v, want %v", got, want)
	}
	// Each feed has caught up with the shared store before the writes, so
	// that what it counts as checked from here is theirs.
	checked := func(d *consolDeployment) int {
		t.Helper()
		_, raw := d.api.call("GET", "/metrics", "", nil)
		m := regexp.MustCompile(`(?m)^tandem_feed_checked_total\{[^}]*table="public.orders"[^}]*\} (\d+)`).FindStringSubmatch(raw)
		if m == nil {
			return 0
		}
		n, err := strconv.Atoi(m[1])
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	waitNewChecked := func() {
		t.Helper()
		nc, err := pgx.Connect(ctx, newDSN)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close(ctx)
		var target string
		if err := nc.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&target); err != nil {
			t.Fatal(err)
		}
		for _, d := range deps {
			ctl, err := pgx.Connect(ctx, d.oldDSN)
			if err != nil {
				t.Fatal(err)
			}
			harness.SucceedsSoon(t, 60*time.Second, func() error {
				var ok *bool
				if err := ctl.QueryRow(ctx, "SELECT checked_lsn >= $1::pg_lsn FROM tandem.feed WHERE store = 'new' AND holder = $2", target, d.tenant).Scan(&ok); err != nil {
					return err
				}
				if ok == nil || !*ok {
					return fmt.Errorf("%s's feed has not checked new up to %s", d.tenant, target)
				}
				return nil
			})
			ctl.Close(ctx)
		}
	}
	waitNewChecked()
	before := []int{checked(deps[0]), checked(deps[1])}
	shopOld, _ := tenantText(t, deps[0].oldDSN, "")
	// Straight to the shared new database: one write of the shop's, three
	// of billing's (one on a row the shop has too, id 10).
	direct(newDSN, `UPDATE orders SET total = 555 WHERE tenant = 'shop' AND id = 10;
		UPDATE orders SET total = 556 WHERE tenant = 'billing' AND id = 10;
		INSERT INTO orders VALUES ('billing', 8000, 8.5, now());
		DELETE FROM orders WHERE tenant = 'billing' AND id = 11`)
	equalSoon("after direct writes on new")
	waitNewChecked()
	if got := []int{checked(deps[0]) - before[0], checked(deps[1]) - before[1]}; got[0] != 1 || got[1] != 3 {
		t.Fatalf("keys checked by the shop's and billing's feeds after the writes on new: %v, want [1 3] (each its own tenant's rows)", got)
	}
	if h, _ := tenantText(t, deps[0].oldDSN, ""); h == shopOld {
		t.Fatal("the shop's direct write on new did not reach its old store")
	}
	var total string
	c, err := pgx.Connect(ctx, deps[0].oldDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	if err := c.QueryRow(ctx, "SELECT total::text FROM orders WHERE id = 10").Scan(&total); err != nil || total != "555.00" {
		t.Fatalf("the shop's old store has total %q for id 10 (%v), want 555.00", total, err)
	}
}
