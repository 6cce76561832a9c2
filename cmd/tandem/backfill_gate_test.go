package main

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
)

// TestBackfillGateAndAPI: the write flip is refused while an in-scope
// table has not been backfilled (naming it and its rows), the admin API
// pauses and resumes a running backfill in another process through the
// control row and reports its progress, /metrics shows it, and once the
// backfill has finished the flip goes through.
func TestBackfillGateAndAPI(t *testing.T) {
	oldC, newC := pgtest.NewPair(t)
	const schema = "CREATE TABLE items (id int PRIMARY KEY, v text);"
	mustExec(t, oldC, schema+"INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 3000) g")
	mustExec(t, newC, schema)
	file, cfg := pairConfig(t, oldC, newC, "gate")
	rp, err := startProxy(cfg, newLogger(config.Log{Format: "text", Level: "error"}, io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := rp.stop(); err != nil {
			t.Error(err)
		}
	}()
	api := newAdminClient(t, rp)
	api.waitLive(1)
	api.change("/api/v1/route", `{"mirror": true}`, "gate")

	var st backfill.State
	if code, raw := api.call("GET", "/api/v1/backfill", "", &st); code != http.StatusOK || len(st.Tables) != 0 || st.Finished || st.Paused {
		t.Fatalf("GET /api/v1/backfill before any backfill: %d %s", code, raw)
	}
	for _, bad := range []string{`{}`, `{"rate": -1}`, `{"rate": "fast"}`, `{"paused": "yes"}`, `{"speed": 1}`, `not json`} {
		if code, raw := api.call("POST", "/api/v1/backfill", bad, nil); code != http.StatusBadRequest {
			t.Errorf("POST /api/v1/backfill %s: %d %s, want 400", bad, code, raw)
		}
	}
	flip := `{"primary": "new", "reads": 100}`
	if code, raw := api.call("POST", "/api/v1/route", flip, nil); code != http.StatusConflict ||
		!strings.Contains(raw, "the backfill has not finished on 1 table(s) in scope, ~3000 rows left: public.items (not backfilled: ~3000 rows)") {
		t.Fatalf("flip before the backfill: %d %s", code, raw)
	}

	// Paused before it starts: the backfill's one worker copies at most
	// one unit, then holds.
	if code, raw := api.call("POST", "/api/v1/backfill", `{"paused": true, "rate": 5000}`, &st); code != http.StatusOK || !st.Paused || st.Rate != 5000 {
		t.Fatalf("pause: %d %s", code, raw)
	}
	done := make(chan error, 1)
	go func() {
		out, errOut, err := cli("backfill", "-c", file, "--workers", "1", "--chunk", "100")
		if err != nil {
			err = &cliError{err: err, out: out + errOut}
		}
		done <- err
	}()
	waitFor(t, func() bool {
		code, _ := api.call("GET", "/api/v1/backfill", "", &st)
		return code == http.StatusOK && len(st.Tables) == 1 && st.Tables[0].ChunksRunning == 1
	})
	if tb := st.Tables[0]; tb.Finished || tb.ChunksDone != 0 || tb.TotalRows != 3000 || tb.Chunks != 2 {
		t.Fatalf("a paused backfill: %+v", st)
	}
	if code, raw := api.call("POST", "/api/v1/route", flip, nil); code != http.StatusConflict || !strings.Contains(raw, "public.items (~3000 rows left)") {
		t.Fatalf("flip during the backfill: %d %s", code, raw)
	}
	if code, raw := api.call("POST", "/api/v1/backfill", `{"paused": false, "rate": 0}`, &st); code != http.StatusOK || st.Paused || st.Rate != 0 {
		t.Fatalf("resume: %d %s", code, raw)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if code, raw := api.call("GET", "/api/v1/backfill", "", &st); code != http.StatusOK || !st.Finished ||
		st.Tables[0].DoneRows != 3000 || st.Tables[0].ChunksDone != 2 || st.Tables[0].RowsLeft() != 0 {
		t.Fatalf("after the backfill: %d %s", code, raw)
	}
	waitFor(t, func() bool {
		_, m := api.call("GET", "/metrics", "", nil)
		return strings.Contains(m, `tandem_backfill_rows_copied{`) && strings.Contains(m, `tandem_table="public.items"} 3000`) &&
			strings.Contains(m, "tandem_backfill_paused") && strings.Contains(m, "tandem_backfill_chunks")
	})
	verifyAll(t, file) // the flip's verify gate
	res := api.change("/api/v1/route", flip, "gate")
	if res.State.Primary != route.New || len(res.Report.Forced) != 0 {
		t.Fatalf("flip after the backfill: %+v", res)
	}
}

type cliError struct {
	err error
	out string
}

func (e *cliError) Error() string { return e.err.Error() + "\n" + e.out }
