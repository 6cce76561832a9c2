package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/internal/pgtest"
)

// demoEvents is how many order events the demo's old store holds before
// dual-write: the backfill's bulk.
const demoEvents = 300000

// demoBackfill runs the backfill engine, as `tandem backfill` does, over
// every table in scope, printing a progress line a second (the demo's
// output is captured, so no bars), and shows the backfill's API and the
// flip gate it opens.
func demoBackfill(ctx context.Context, n *narrator, api *demoAPI, rp *runningProxy, oldDB, newDB *pgtest.Cluster) error {
	code, b, err := api.do(ctx, http.MethodPost, "/api/v1/route", `{"primary": "new", "reads": 100, "reason": "demo: too early"}`)
	if err != nil {
		return err
	}
	var refusal struct{ Error string }
	_ = json.Unmarshal(b, &refusal)
	n.say("POST /api/v1/route {\"primary\": \"new\"} before the backfill  ->  %d: %.160s...", code, refusal.Error)

	stores, err := openDemoStores(ctx, rp, oldDB, newDB)
	if err != nil {
		return err
	}
	defer stores.close(ctx)
	cfgs, ms := stores.cfgs, stores.ms
	// The control schema is on old (no control.dsn).
	eng, err := backfill.New(backfill.Options{Control: cfgs[0], Primary: cfgs[0], Secondary: cfgs[1], Mappings: ms,
		Workers: 4, Chunk: 2000, RangeRows: 25000, WorkerID: "demo"})
	if err != nil {
		return err
	}
	n.say("tandem backfill --workers 4 --chunk 2000: every table in scope, chunks claimed FOR UPDATE SKIP LOCKED from tandem.backfill_chunks")
	type result struct {
		s   backfill.Summary
		err error
	}
	done := make(chan result, 1)
	go func() {
		s, err := eng.Run(ctx)
		done <- result{s, err}
	}()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	start := time.Now()
	var sum backfill.Summary
wait:
	for {
		select {
		case r := <-done:
			if r.err != nil {
				return r.err
			}
			sum = r.s
			break wait
		case <-t.C:
			for _, p := range eng.Progress() {
				if p.Skipped == "" && p.Done < p.Total {
					n.say("backfill progress: %s %d/%d rows, %d/%d chunks, %.0f rows/s", p.Table, p.Done, p.Total, p.ChunksDone, p.Chunks,
						float64(p.Done)/time.Since(start).Seconds())
				}
			}
		}
	}
	var rows int64
	for _, p := range sum.Tables {
		rows += p.Done
		n.say("backfill %s: %d rows in %d/%d chunks, %d failed", p.Table, p.Done, p.ChunksDone, p.Chunks, p.ChunksFailed)
	}
	n.say("backfill copied %d rows in %s (%.0f rows/s): each unit locked its chunk FOR SHARE on old, upserted it on new with its checkpoint",
		rows, sum.Duration.Round(100*time.Millisecond), float64(rows)/sum.Duration.Seconds())
	code, b, err = api.do(ctx, http.MethodGet, "/api/v1/backfill", "")
	if err != nil {
		return err
	}
	var st backfill.State
	if err := json.Unmarshal(b, &st); err != nil || code != http.StatusOK {
		return fmt.Errorf("GET /api/v1/backfill: %d %s", code, b)
	}
	n.say("GET /api/v1/backfill  ->  %d tables, finished %t, rate %v rows/s (0 = unlimited), paused %t", len(st.Tables), st.Finished, st.Rate, st.Paused)
	return nil
}
