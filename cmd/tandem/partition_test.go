package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
)

// TestPartitionSelfFence (issue 12): two proxy replicas; B reaches the
// control database through toxiproxy, its stores directly. B is cut off
// from the control database while a client writes through it, and a write
// flip to new runs through A. B fences itself (40001) within
// routing.self_fence of its last read; the flip does not complete until B
// has left the liveness window, so B's fence came first; and no write
// reaches old, the store that stopped being primary, after the flip
// (checked row by row, before the partition heals; mirroring stays on, so
// old gets writes again only as the secondary, once B follows the new
// state). Once B hears the state again it writes on new.
func TestPartitionSelfFence(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, `CREATE TABLE items (id int PRIMARY KEY, via text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())`)
	}
	_, cfgA := pairConfig(t, oldC, newC, "part-a")
	_, cfgB := pairConfig(t, oldC, newC, "part-b")
	toxi := toxiproxy.NewProxy(toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), quietToxiLogger(toxiproxy.NewServer)),
		"control", "127.0.0.1:0", fmt.Sprintf("127.0.0.1:%d", oldC.Port()))
	if err := toxi.Start(); err != nil {
		t.Fatal(err)
	}
	defer toxi.Stop()
	u, err := url.Parse(oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	u.Host = toxi.Listen
	cfgB.Control.DSN = u.String()
	// A liveness window (3 × poll = 9 s) longer than the flip's gates and
	// fence timeout, so that B is still live, and pending, when the fence
	// times out: the flip must then wait for B's self-fence.
	for _, c := range []*config.Config{cfgA, cfgB} {
		c.Routing.Poll = config.Duration(3 * time.Second)
		c.Routing.FenceTimeout = config.Duration(500 * time.Millisecond)
	}
	var proxies []*runningProxy
	for _, cfg := range []*config.Config{cfgA, cfgB} {
		rp := startQuietProxy(t, cfg)
		defer stopProxy(t, rp)
		proxies = append(proxies, rp)
	}
	a := newAdminClient(t, proxies[0])
	a.waitLive(2)
	a.change("/api/v1/route", `{"mirror": true, "reason": "dual-write"}`, "part-a", "part-b")

	ctx := context.Background()
	viaB, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", proxies[1].Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer viaB.Close(ctx)
	if _, err := viaB.Exec(ctx, `INSERT INTO items (id, via) VALUES (0, 'b before the cut')`); err != nil {
		t.Fatal(err)
	}

	// The partition: nothing passes between B and the control database.
	for _, stream := range []string{"upstream", "downstream"} {
		if _, err := toxi.Toxics.AddToxicJson(strings.NewReader(fmt.Sprintf(
			`{"name": "cut_%s", "type": "timeout", "stream": %q, "toxicity": 1, "attributes": {"timeout": 0}}`, stream, stream))); err != nil {
			t.Fatal(err)
		}
	}
	healed := false
	heal := func() {
		if !healed {
			healed = true
			toxi.Toxics.ResetToxics(ctx)
		}
	}
	defer heal()
	cut := time.Now()

	// A client keeps writing through B, remembering what it was told.
	type write struct {
		id    int
		at    time.Time
		err   error
		state string
	}
	var mu sync.Mutex
	var writes []write
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for id := 1; ; id++ {
			select {
			case <-stop:
				return
			default:
			}
			_, err := viaB.Exec(ctx, `INSERT INTO items (id, via) VALUES ($1, 'b during the cut')`, id)
			w := write{id: id, at: time.Now(), err: err}
			var pe *pgconn.PgError
			if errors.As(err, &pe) {
				w.state = pe.Code
			}
			mu.Lock()
			writes = append(writes, w)
			mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()

	var res control.Result
	code, raw := a.call("POST", "/api/v1/route", `{"primary": "new", "reads": 100, "force": true, "reason": "partition drill"}`, &res)
	flipped := time.Now()
	if code != 200 || res.State.Primary != route.New {
		t.Fatalf("flip through A while B is cut off: %d %s", code, raw)
	}
	if len(res.Report.SelfFenced) != 1 || res.Report.SelfFenced[0] != "part-b" {
		t.Fatalf("flip report %+v: want part-b self-fenced", res.Report)
	}
	time.Sleep(500 * time.Millisecond) // B keeps trying to write after the flip
	close(stop)
	<-done

	// When did the new state take effect, by the control database's clock
	// (the same host's clock the stores stamp rows with)?
	ctl, err := pgx.Connect(ctx, oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(ctx)
	var appliedAt time.Time
	if err := ctl.QueryRow(ctx, `SELECT changed_at FROM tandem.state_history WHERE version = $1`, res.State.Version).Scan(&appliedAt); err != nil {
		t.Fatal(err)
	}
	var firstRefused time.Time
	acked := map[int]bool{}
	for _, w := range writes {
		switch {
		case w.err == nil:
			acked[w.id] = true
		case w.state == "40001" && firstRefused.IsZero():
			firstRefused = w.at
		case w.state != "40001":
			t.Errorf("write %d through B: %v, want success or 40001", w.id, w.err)
		}
	}
	if firstRefused.IsZero() || !firstRefused.Before(appliedAt) {
		t.Fatalf("B's first refusal at %s, the flip applied at %s: B must fence itself first (%d writes)", firstRefused, appliedAt, len(writes))
	}
	t.Logf("cut at 0; B refused its first write at +%s; the flip (fence %.0f ms) applied at +%s and returned at +%s; %d writes acknowledged, %d refused",
		firstRefused.Sub(cut).Round(time.Millisecond), res.Report.FenceMS, appliedAt.Sub(cut).Round(time.Millisecond),
		flipped.Sub(cut).Round(time.Millisecond), len(acked), len(writes)-len(acked))

	// Row by row: old got no write after the flip, and holds exactly the
	// writes B acknowledged (and the one before the cut).
	rows, err := ctl.Query(ctx, `SELECT id, at FROM items ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	onOld := map[int]time.Time{}
	for rows.Next() {
		var id int
		var at time.Time
		if err := rows.Scan(&id, &at); err != nil {
			t.Fatal(err)
		}
		onOld[id] = at
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	for id, at := range onOld {
		if !at.Before(appliedAt) {
			t.Errorf("row %d reached old at %s, after the flip applied at %s", id, at, appliedAt)
		}
		if id != 0 && !acked[id] {
			t.Errorf("row %d is on old but its write was refused", id)
		}
	}
	for id := range acked {
		if _, ok := onOld[id]; !ok {
			t.Errorf("write %d was acknowledged but is not on old", id)
		}
	}

	// Healed: B reads the state again, and writes again, on new.
	heal()
	var lastErr error
	waitFor(t, func() bool {
		_, lastErr = viaB.Exec(ctx, `INSERT INTO items (id, via) VALUES (100000, 'b after the heal') ON CONFLICT DO NOTHING`)
		return lastErr == nil
	})
	if st := proxies[1].srv.State(); st.Version != res.State.Version {
		t.Fatalf("B writes again on version %d, want %d", st.Version, res.State.Version)
	}
	onNew, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer onNew.Close(ctx)
	var n int
	if err := onNew.QueryRow(ctx, `SELECT count(*) FROM items WHERE id = 100000`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("B's write after the heal is not on new, the primary: %d %v", n, err)
	}
}

// quietToxiLogger: see quietLogger in the proxy tests.
func quietToxiLogger[M, L any](func(M, L) *toxiproxy.ApiServer) L {
	var l L
	return l
}
