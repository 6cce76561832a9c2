package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/compare"
	"github.com/tandemdb/tandem/internal/admin"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/table"
)

// demoStores are the demo's two stores ("shop" on each), connected, and
// the table mappings between them.
type demoStores struct {
	cfgs  [2]*pgx.ConnConfig
	conns [2]*pgx.Conn
	ms    *table.Mappings
}

func openDemoStores(ctx context.Context, rp *runningProxy, oldDB, newDB *pgtest.Cluster) (*demoStores, error) {
	st := &demoStores{}
	for i, c := range []*pgtest.Cluster{oldDB, newDB} {
		var err error
		if st.cfgs[i], err = pgx.ParseConfig(c.DSN("shop")); err != nil {
			st.close(ctx)
			return nil, err
		}
		if st.conns[i], err = pgx.ConnectConfig(ctx, st.cfgs[i]); err != nil {
			st.close(ctx)
			return nil, err
		}
	}
	var err error
	if st.ms, _, err = table.LoadMappings(ctx, rp.cfg.Tables, st.conns[0], st.conns[1]); err != nil {
		st.close(ctx)
		return nil, err
	}
	return st, nil
}

func (st *demoStores) close(ctx context.Context) {
	for _, c := range st.conns {
		if c != nil {
			c.Close(ctx)
		}
	}
}

// demoVerify runs the table verify over every table in scope, as
// `tandem compare` does, and prints one line per table. It fails if a
// table is not clean.
func demoVerify(ctx context.Context, n *narrator, rp *runningProxy, oldDB, newDB *pgtest.Cluster) error {
	st, err := openDemoStores(ctx, rp, oldDB, newDB)
	if err != nil {
		return err
	}
	defer st.close(ctx)
	for _, m := range st.ms.All() {
		s, err := compare.Table(ctx, st.conns[0], st.conns[1], m, compare.Options{Control: st.cfgs[0]})
		if err != nil {
			return err
		}
		state := "clean"
		if d := s.Differences(); d > 0 {
			state = fmt.Sprintf("%d differences", d)
		}
		how := fmt.Sprintf("%d key ranges", s.Ranges)
		if s.WholeTable {
			how = "one whole-table pass"
		}
		n.say("verify %s -> %s: %d rows hashed on both stores in %s, %s, %d transient, %v",
			s.Table, s.NewTable, s.Rows, how, state, s.Transient, s.Duration.D().Round(time.Millisecond))
		if !s.Clean() {
			return fmt.Errorf("verify of %s is not clean: %d differences", s.Table, s.Differences())
		}
	}
	return nil
}

// demoShadow prints the shadow-read outcomes the proxy has stored, from
// GET /api/v1/mismatches, once at least want reads have been compared.
func demoShadow(ctx context.Context, n *narrator, api *demoAPI, want int64) error {
	deadline := time.Now().Add(3 * control.ShadowFlush)
	var rep admin.MismatchReport
	for {
		code, b, err := api.do(ctx, http.MethodGet, "/api/v1/mismatches", "")
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("GET /api/v1/mismatches: %d %s", code, b)
		}
		rep = admin.MismatchReport{}
		if err := json.Unmarshal(b, &rep); err != nil {
			return err
		}
		if rep.Rate.Total.Compared() >= want || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	t := rep.Rate.Total
	n.say("GET /api/v1/mismatches  ->  shadow reads over the last %s: %d compared, %d matched, %d mismatched, %d transient (a race with a write, settled on re-read), %d skipped, %d dropped",
		rep.Rate.Window, t.Compared(), t.Matched, t.Mismatched, t.Transient, t.Skipped, t.Dropped)
	if t.Compared() > 0 {
		n.say("shadow latency, side by side: served %.2f ms, shadow %.2f ms per compared read (mean); %d statement fingerprints; mismatch records: %d",
			1000*t.ServedSeconds/float64(t.Compared()), 1000*t.ShadowSeconds/float64(t.Compared()), len(rep.Rate.Fingerprints), len(rep.Groups))
	}
	if t.Mismatched > 0 {
		return fmt.Errorf("shadow reads found %d mismatches", t.Mismatched)
	}
	return nil
}
