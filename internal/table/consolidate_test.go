package table

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
)

// The consolidation example (deploy/examples/consolidate): the shop
// service's orders become the rows of tenant 'shop' in a shared orders
// table keyed by (tenant, id).
const (
	consolOld = `CREATE TABLE orders (id bigint PRIMARY KEY, total numeric(12,2), created_at timestamptz)`
	consolNew = `CREATE TABLE orders (tenant text, id bigint, total numeric(12,2), created_at timestamptz, PRIMARY KEY (tenant, id))`
	// billingRows are another deployment's rows on new: one shares an id
	// with a shop row, one has an id shop never had.
	billingRows = `INSERT INTO orders VALUES ('billing', 1, 999.99, '2020-01-01Z'), ('billing', 77, 7.77, '2020-01-02Z')`
	billingText = `SELECT string_agg(id || '|' || total, ',' ORDER BY id) FROM orders WHERE tenant = 'billing'`
	shopText    = `SELECT coalesce(string_agg(id || '|' || total, ',' ORDER BY id), '') FROM orders WHERE tenant = 'shop'`
	oldText     = `SELECT coalesce(string_agg(id || '|' || total, ',' ORDER BY id), '') FROM orders`
)

func shopMapping(t *testing.T, old, nw *pgx.Conn, decl config.TableMap) *Mapping {
	t.Helper()
	ms, probs, err := LoadMappings(context.Background(), config.Tables{Map: map[string]config.TableMap{"orders": decl}}, old, nw)
	if err != nil {
		t.Fatal(err)
	}
	if len(probs) > 0 {
		t.Fatalf("problems: %v", probs)
	}
	m := ms.ForOld(Name{"public", "orders"})
	if m == nil || m.Identity() {
		t.Fatalf("mapping %v", m)
	}
	return m
}

// TestConsolidateCopy copies the shop's orders into the shared table by
// key, by range (both chunk paths) and back, and checks that the billing
// rows on new are never touched: not overwritten, not deleted as keys
// absent on old, not copied back to the shop's old store.
func TestConsolidateCopy(t *testing.T) {
	for _, path := range copyPaths {
		t.Run(path.name, func(t *testing.T) { testConsolidateCopy(t, path.fastRows) })
	}
}

func testConsolidateCopy(t *testing.T, fast int) {
	ctx := context.Background()
	s := newStores(t)
	s.old(consolOld + `; INSERT INTO orders SELECT g, g * 1.5, '2021-01-01Z' FROM generate_series(1, 20) g`)
	s.new(consolNew + "; " + billingRows)
	old, nw := s.primary(), s.secondary()
	m := shopMapping(t, old, nw, config.TableMap{Discriminator: map[string]string{"tenant": "shop"}})
	if cols, ok := m.KeyPreserving(); !ok || len(cols) != 1 || cols[0].Name != "id" {
		t.Fatalf("KeyPreserving = %v %v, want id (the key without the discriminator)", cols, ok)
	}
	billing := queryText(t, nw, billingText)

	if _, err := copyTableMappedOn(ctx, fast, old, nw, m, true, 7); err != nil {
		t.Fatal(err)
	}
	if got, want := queryText(t, nw, shopText), queryText(t, old, oldText); got != want {
		t.Fatalf("shop on new = %s\nold = %s", got, want)
	}
	if got := queryText(t, nw, billingText); got != billing {
		t.Fatalf("billing rows changed by the shop's copy: %s, were %s", got, billing)
	}

	// A key absent on old: deleted for the shop only; 77 is billing's.
	s.new(`INSERT INTO orders VALUES ('shop', 77, 1, now())`)
	res, err := CopyKeysMapped(ctx, old, nw, m, true, [][]string{{"77"}, {"3"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Deleted != 1 || res.Upserted != 1 {
		t.Fatalf("CopyKeysMapped: %+v, want 1 upserted, 1 deleted", res)
	}
	if got := queryText(t, nw, billingText); got != billing {
		t.Fatalf("billing rows changed by a key copy: %s, were %s", got, billing)
	}

	// Back to old (after a flip): by key, a billing key is not the shop's
	// to copy; a shop key is; a whole-table copy brings only shop rows.
	s.new(`UPDATE orders SET total = 0.5 WHERE tenant = 'shop' AND id = 2`)
	if res, err = CopyKeysMapped(ctx, nw, old, m, false, [][]string{{"billing", "77"}, {"billing", "1"}, {"shop", "2"}}); err != nil {
		t.Fatal(err)
	}
	if res.Upserted != 1 || res.Deleted != 0 {
		t.Fatalf("reverse CopyKeysMapped: %+v, want only the shop's key 2 upserted", res)
	}
	if got := queryText(t, old, `SELECT id || '|' || total FROM orders WHERE id IN (1, 2) ORDER BY id LIMIT 1 OFFSET 1`); got != "2|0.50" {
		t.Fatalf("old row 2 = %s", got)
	}
	s.new(`DELETE FROM orders WHERE tenant = 'shop' AND id = 20`)
	if res, err = copyTableMappedOn(ctx, fast, nw, old, m, false, 6); err != nil {
		t.Fatal(err)
	}
	if got, want := queryText(t, old, oldText), queryText(t, nw, shopText); got != want {
		t.Fatalf("old after the reverse copy = %s\nshop on new = %s", got, want)
	}
	if strings.Contains(queryText(t, old, oldText), "999.99") || queryText(t, old, `SELECT count(*)::text FROM orders WHERE id = 77`) != "0" {
		t.Fatalf("billing rows reached the shop's old store: %s", queryText(t, old, oldText))
	}
}

// TestPredicateCopy: a where predicate carries only matching old rows; a
// row that stops matching is deleted on new by the next copy of its key,
// and a copy back to old leaves old's rows outside the predicate alone.
func TestPredicateCopy(t *testing.T) {
	for _, path := range copyPaths {
		t.Run(path.name, func(t *testing.T) {
			ctx := context.Background()
			s := newStores(t)
			s.old(`CREATE TABLE orders (id int PRIMARY KEY, region text NOT NULL, total numeric);
				INSERT INTO orders SELECT g, CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END, g FROM generate_series(1, 30) g`)
			s.new(`CREATE TABLE eu_orders (id int PRIMARY KEY, region text NOT NULL, total numeric)`)
			old, nw := s.primary(), s.secondary()
			m := shopMapping(t, old, nw, config.TableMap{To: "eu_orders", Where: "region = 'eu'"})
			const eu = `SELECT string_agg(id::text, ',' ORDER BY id) FROM orders WHERE region = 'eu'`
			if _, err := copyTableMappedOn(ctx, path.fastRows, old, nw, m, true, 4); err != nil {
				t.Fatal(err)
			}
			if got, want := queryText(t, nw, `SELECT string_agg(id::text, ',' ORDER BY id) FROM eu_orders`), queryText(t, old, eu); got != want {
				t.Fatalf("eu_orders = %s, want %s", got, want)
			}
			s.old(`UPDATE orders SET region = 'us' WHERE id = 1; UPDATE orders SET region = 'eu' WHERE id = 3`)
			if _, err := CopyKeysMapped(ctx, old, nw, m, true, [][]string{{"1"}, {"3"}}); err != nil {
				t.Fatal(err)
			}
			if got, want := queryText(t, nw, `SELECT string_agg(id::text, ',' ORDER BY id) FROM eu_orders`), queryText(t, old, eu); got != want {
				t.Fatalf("eu_orders after rows moved = %s, want %s", got, want)
			}
			before := queryText(t, old, `SELECT count(*)::text FROM orders WHERE region <> 'eu'`)
			if _, err := copyTableMappedOn(ctx, path.fastRows, nw, old, m, false, 4); err != nil {
				t.Fatal(err)
			}
			if got := queryText(t, old, `SELECT count(*)::text FROM orders WHERE region <> 'eu'`); got != before {
				t.Fatalf("the reverse copy deleted old rows outside the predicate: %s left of %s", got, before)
			}
		})
	}
}

// TestFilterProblems: declarations the catalogs refuse, each named with
// the declaration's key it is about.
func TestFilterProblems(t *testing.T) {
	ctx := context.Background()
	s := newStores(t)
	s.old(consolOld)
	s.new(consolNew + `; CREATE TABLE orders_nokey (tenant text, id bigint PRIMARY KEY, total numeric(12,2), created_at timestamptz);
		CREATE TABLE orders_int (tenant int, id bigint, total numeric(12,2), created_at timestamptz, PRIMARY KEY (tenant, id))`)
	old, nw := s.primary(), s.secondary()
	for _, c := range []struct {
		decl        config.TableMap
		field, want string
	}{
		{config.TableMap{Where: "totl > 0", Discriminator: map[string]string{"tenant": "shop"}}, "where", `read by the where predicate but public.orders has no such column (did you mean "total"?)`},
		{config.TableMap{Where: "total", Discriminator: map[string]string{"tenant": "shop"}}, "where", "must be type boolean"},
		{config.TableMap{Where: "total > 0; DROP TABLE orders", Discriminator: map[string]string{"tenant": "shop"}}, "where", "does not parse"},
		{config.TableMap{Discriminator: map[string]string{"tenant": "shop"}, To: "orders_nokey"}, "discriminator.tenant", "not in the primary key"},
		{config.TableMap{Discriminator: map[string]string{"tenant": "01"}, To: "orders_int"}, "discriminator.tenant", `printed by the new store as "1"`},
		{config.TableMap{Discriminator: map[string]string{"tenant": "shop"}, To: "orders_int"}, "discriminator.tenant", "is not a valid integer"},
	} {
		_, probs, err := LoadMappings(ctx, config.Tables{Map: map[string]config.TableMap{"orders": c.decl}}, old, nw)
		if err != nil {
			t.Fatal(err)
		}
		if len(probs) != 1 || probs[0].Field != c.field || !strings.Contains(probs[0].String(), c.want) {
			t.Errorf("%+v: problems %+v, want one about %s saying %q", c.decl, probs, c.field, c.want)
		}
	}
}
