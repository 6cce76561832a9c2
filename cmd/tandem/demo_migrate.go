package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/table"
)

// demoMigration walks the playbook from passthrough to a write flip and a
// rollback, through the proxy's admin API, while app connects through the
// proxy: dual-write, the backfill's locked copy, a 50% read shift, the
// flip, the rollback, and a check that both stores hold the same rows.
func demoMigration(ctx context.Context, n *narrator, rp *runningProxy, oldDB, newDB *pgtest.Cluster, app *pgx.Conn) error {
	d := &migrationDemo{n: n, rp: rp, oldDB: oldDB, newDB: newDB, app: app,
		api:    &demoAPI{base: "http://" + rp.AdminAddr(), client: &http.Client{Timeout: time.Minute}, token: rp.adminToken},
		appDSN: fmt.Sprintf("postgres://postgres@%s/shop?sslmode=disable&application_name=demo-app", rp.Addr())}
	var err error
	if d.oldConn, err = pgx.Connect(ctx, oldDB.DSN("shop")); err != nil {
		return err
	}
	defer d.oldConn.Close(ctx)
	if d.newConn, err = pgx.Connect(ctx, newDB.DSN("shop")); err != nil {
		return err
	}
	defer d.newConn.Close(ctx)

	n.section("Dual-write: writes go to old, then to new, in lockstep")
	if err := d.dualWrite(ctx); err != nil {
		return err
	}
	n.section("Backfill: the rows written before dual-write are copied under lock")
	if err := d.backfill(ctx); err != nil {
		return err
	}
	n.section("Read shift: new serves 50%% of the sessions' reads")
	if err := d.readShift(ctx); err != nil {
		return err
	}
	n.section("Is the new store right? A table verify, then shadow reads")
	if err := d.verifyAndShadow(ctx); err != nil {
		return err
	}
	n.section("Write flip: new becomes the store of record")
	if err := d.writeFlip(ctx); err != nil {
		return err
	}
	n.section("Rollback: old is the store of record again, nothing lost")
	if err := d.rollback(ctx); err != nil {
		return err
	}
	n.section("Both stores hold the same rows")
	if err := d.sameRows(ctx); err != nil {
		return err
	}
	n.section("The evidence: a verify of every table and the shadow-read summary")
	if err := demoVerify(ctx, n, rp, oldDB, newDB); err != nil {
		return err
	}
	return demoShadow(ctx, n, d.api, 200)
}

// migrationDemo is what the steps of demoMigration share: the proxy and
// its admin API, the app's session through it, and a session straight to
// each store to show where the rows are.
type migrationDemo struct {
	n                *narrator
	rp               *runningProxy
	api              *demoAPI
	oldDB, newDB     *pgtest.Cluster
	app              *pgx.Conn // the app's session, through the proxy
	appDSN           string
	oldConn, newConn *pgx.Conn // straight to each store
}

// counts are the orders on old and on new.
func (d *migrationDemo) counts(ctx context.Context) (int, int, error) {
	var o, w int
	if err := d.oldConn.QueryRow(ctx, "SELECT count(*) FROM orders").Scan(&o); err != nil {
		return 0, 0, err
	}
	err := d.newConn.QueryRow(ctx, "SELECT count(*) FROM orders").Scan(&w)
	return o, w, err
}

// dualWrite creates the schema on new, turns mirroring on and shows the
// app's writes reaching both stores.
func (d *migrationDemo) dualWrite(ctx context.Context) error {
	n, oldDB, newDB, app := d.n, d.oldDB, d.newDB, d.app
	// The new store gets the schema. served_by is a marker for the read
	// shift below: the same view on both stores, each naming its own store.
	if err := newDB.Exec(ctx, "shop", `CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL,
		total numeric(10,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
		CREATE TABLE order_events (id bigserial PRIMARY KEY, order_id bigint NOT NULL, kind text NOT NULL, at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return err
	}
	for _, c := range []*pgtest.Cluster{oldDB, newDB} {
		store := "old"
		if c == newDB {
			store = "new"
		}
		if err := c.Exec(ctx, "shop", "CREATE VIEW served_by AS SELECT '"+store+"'::text AS store"); err != nil {
			return err
		}
	}
	n.say("the schema is created on new (and a view served_by, naming the store that answers, on each)")
	if err := d.api.waitLive(ctx, 1); err != nil {
		return err
	}
	res, err := d.api.change(ctx, "/api/v1/route", `{"mirror": true, "reason": "demo: dual-write"}`)
	if err != nil {
		return err
	}
	n.say("POST /api/v1/route {\"mirror\": true}  ->  routing version %d: %s (acknowledged by %s)",
		res.State.Version, res.State.Settings, strings.Join(res.Report.Acked, ", "))
	var firstID int64
	for i := range 10 {
		var id int64
		if err := app.QueryRow(ctx, "INSERT INTO orders (customer, total) VALUES ($1, $2) RETURNING id",
			fmt.Sprintf("dual-%d", i), 10+i).Scan(&id); err != nil {
			return err
		}
		if i == 0 {
			firstID = id
		}
	}
	tx, err := app.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "UPDATE orders SET total = total * 2 WHERE id >= $1", firstID); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	o, w, err := d.counts(ctx)
	if err != nil {
		return err
	}
	n.say("the app inserted 10 orders and doubled their totals in a transaction, through the proxy")
	n.say("dual-write: old store %d orders, new store %d orders: every write since mirror=on reached both", o, w)
	return nil
}

// backfill copies the rows from before dual-write (demoBackfill).
func (d *migrationDemo) backfill(ctx context.Context) error {
	if err := demoBackfill(ctx, d.n, d.api, d.rp, d.oldDB, d.newDB); err != nil {
		return err
	}
	o, w, err := d.counts(ctx)
	if err != nil {
		return err
	}
	d.n.say("backfill done: old store %d orders, new store %d orders", o, w)
	return nil
}

// readShift sends half the sessions' reads to new and counts who served
// them.
func (d *migrationDemo) readShift(ctx context.Context) error {
	n := d.n
	res, err := d.api.change(ctx, "/api/v1/route", `{"reads": 50, "reason": "demo: read shift"}`)
	if err != nil {
		return err
	}
	n.say("POST /api/v1/route {\"reads\": 50}  ->  routing version %d: %s", res.State.Version, res.State.Settings)
	const sessions = 20
	byNew := 0
	for range sessions {
		c, err := pgx.Connect(ctx, d.appDSN)
		if err != nil {
			return err
		}
		var store string
		var count int
		err = c.QueryRow(ctx, "SELECT store, (SELECT count(*) FROM orders) FROM served_by").Scan(&store, &count)
		c.Close(ctx)
		if err != nil {
			return err
		}
		if store == "new" {
			byNew++
		}
	}
	n.say("read shift: new served the reads of %d of %d sessions (each session keeps its store; SELECT store FROM served_by)", byNew, sessions)
	served, err := readsServed(ctx, d.api.base+"/metrics")
	if err != nil {
		return err
	}
	n.say("/metrics: tandem_reads_total{tandem_outcome=\"served\",tandem_store=\"new\"} %d (pgx prepares each query, then runs it)", served)
	return nil
}

// verifyAndShadow verifies every table, then turns shadow reads on and
// runs the app's reads: the flip's gates want a recent clean verify of
// every table in scope and no confirmed shadow mismatch.
func (d *migrationDemo) verifyAndShadow(ctx context.Context) error {
	n := d.n
	if err := demoVerify(ctx, n, d.rp, d.oldDB, d.newDB); err != nil {
		return err
	}
	res, err := d.api.change(ctx, "/api/v1/route", `{"shadow": 100, "reason": "demo: shadow reads"}`)
	if err != nil {
		return err
	}
	n.say("POST /api/v1/route {\"shadow\": 100}  ->  routing version %d: %s: each read also runs on the other store, off the client's path",
		res.State.Version, res.State.Settings)
	if err := demoReads(ctx, d.appDSN, 200); err != nil {
		return err
	}
	n.say("the app ran 200 reads (by id, by customer, totals), each served by one store and compared with the other's answer")
	return nil
}

// writeFlip makes new the store of record and shows a write landing on
// both.
func (d *migrationDemo) writeFlip(ctx context.Context) error {
	n := d.n
	res, err := d.api.change(ctx, "/api/v1/route", `{"primary": "new", "reads": 100, "reason": "demo: cutover"}`)
	if err != nil {
		return err
	}
	seq := 0
	if res.Report.Sequences != nil {
		seq = res.Report.Sequences.Synced
	}
	n.say("POST /api/v1/route {\"primary\": \"new\", \"reads\": 100}  ->  routing version %d: %s", res.State.Version, res.State.Settings)
	n.say("write flip: fence held %.1f ms (new writes waited at most that long); drained and acknowledged by %s",
		res.Report.FenceMS, strings.Join(res.Report.Acked, ", "))
	n.say("sequences synced to new: %d (set past old's values by routing.sequence_margin)", seq)
	var id int64
	if err := d.app.QueryRow(ctx, "INSERT INTO orders (customer, total) VALUES ('after-flip', 7) RETURNING id").Scan(&id); err != nil {
		return err
	}
	onOld, onNew, err := hasOrder(ctx, d.oldConn, d.newConn, id)
	if err != nil {
		return err
	}
	n.say("order %d (its id from new's sequence) written on new, mirrored to old: on new %t, on old %t", id, onNew, onOld)
	return nil
}

// rollback makes old the store of record again and shows a write landing
// on both.
func (d *migrationDemo) rollback(ctx context.Context) error {
	n := d.n
	res, err := d.api.change(ctx, "/api/v1/rollback", `{"reason": "demo: rollback drill"}`)
	if err != nil {
		return err
	}
	n.say("POST /api/v1/rollback  ->  routing version %d: %s", res.State.Version, res.State.Settings)
	n.say("rollback: fence held %.1f ms; old kept receiving every write, so it is complete", res.Report.FenceMS)
	var id int64
	if err := d.app.QueryRow(ctx, "INSERT INTO orders (customer, total) VALUES ('after-rollback', 8) RETURNING id").Scan(&id); err != nil {
		return err
	}
	onOld, onNew, err := hasOrder(ctx, d.oldConn, d.newConn, id)
	if err != nil {
		return err
	}
	n.say("order %d written on old again, mirrored to new: on old %t, on new %t", id, onOld, onNew)
	return nil
}

// sameRows checks that both stores hold the same orders, and that no
// drift is open.
func (d *migrationDemo) sameRows(ctx context.Context) error {
	n := d.n
	var hashes [2]string
	var rows [2]int
	for i, c := range []*pgx.Conn{d.oldConn, d.newConn} {
		if err := c.QueryRow(ctx, "SELECT md5(string_agg(o::text, '|' ORDER BY id)), count(*) FROM orders o").Scan(&hashes[i], &rows[i]); err != nil {
			return err
		}
	}
	n.say("old store: %d orders, md5 %s", rows[0], hashes[0])
	n.say("new store: %d orders, md5 %s", rows[1], hashes[1])
	if hashes[0] != hashes[1] || rows[0] != rows[1] {
		return fmt.Errorf("the stores differ: old %d rows %s, new %d rows %s", rows[0], hashes[0], rows[1], hashes[1])
	}
	drift, err := table.OpenDriftTotal(ctx, d.oldConn)
	if err != nil {
		return err
	}
	n.say("data checked equal on both stores (md5 of every row in key order); open drift: %d", drift)
	return nil
}

// demoReads runs n reads through the proxy on one session: point reads by
// id, reads by customer and an aggregate, with parameters.
func demoReads(ctx context.Context, dsn string, n int) error {
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	for i := range n {
		var err error
		switch i % 3 {
		case 0:
			var total string
			err = c.QueryRow(ctx, "SELECT total::text FROM orders WHERE id = $1", 1+i%1000).Scan(&total)
		case 1:
			var id int64
			err = c.QueryRow(ctx, "SELECT id FROM orders WHERE customer = $1", fmt.Sprintf("customer-%d", 1+i%1000)).Scan(&id)
		case 2:
			var cnt int64
			var sum string
			err = c.QueryRow(ctx, "SELECT count(*), sum(total)::text FROM orders WHERE id <= $1", i).Scan(&cnt, &sum)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func hasOrder(ctx context.Context, oldConn, newConn *pgx.Conn, id int64) (onOld, onNew bool, err error) {
	const q = "SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)"
	if err := oldConn.QueryRow(ctx, q, id).Scan(&onOld); err != nil {
		return false, false, err
	}
	err = newConn.QueryRow(ctx, q, id).Scan(&onNew)
	return onOld, onNew, err
}

// readsServed returns the reads the new store served, from /metrics.
func readsServed(ctx context.Context, url string) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "tandem_reads_total{") && strings.Contains(line, `tandem_store="new"`) && strings.Contains(line, `tandem_outcome="served"`) {
			var v float64
			if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err == nil {
				total += int64(v)
			}
		}
	}
	return total, nil
}

// demoAPI calls the proxy's routing API, as an operator's script would.
type demoAPI struct {
	base   string
	client *http.Client
	token  string // the admin token, if the proxy has one
}

func (a *demoAPI) do(ctx context.Context, method, path, body string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, a.base+path, strings.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	if method != http.MethodGet {
		req.Header.Set("Content-Type", "application/json")
	}
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// change posts a routing change or a rollback and returns its result.
func (a *demoAPI) change(ctx context.Context, path, body string) (control.Result, error) {
	var res control.Result
	code, b, err := a.do(ctx, http.MethodPost, path, body)
	if err != nil {
		return res, err
	}
	if code != http.StatusOK {
		return res, fmt.Errorf("POST %s %s: %d %s", path, body, code, strings.TrimSpace(string(b)))
	}
	if err := json.Unmarshal(b, &res); err != nil {
		return res, fmt.Errorf("POST %s: %w", path, err)
	}
	return res, nil
}

// waitLive waits until n proxy replicas have reported to the control
// schema, so that a change waits for their acknowledgements.
func (a *demoAPI) waitLive(ctx context.Context, n int) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, b, err := a.do(ctx, http.MethodGet, "/api/v1/state", "")
		if err != nil {
			return err
		}
		var st control.Status
		live := 0
		if code == http.StatusOK && json.Unmarshal(b, &st) == nil {
			for _, r := range st.Replicas {
				if r.Live {
					live++
				}
			}
		}
		if live >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("the proxy did not report to the control schema within 10s")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
