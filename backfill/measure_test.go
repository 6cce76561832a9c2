package backfill

import (
	"os"
	"testing"
	"time"
)

// TestMeasure200k times a 4-worker backfill of 200k rows (about 100 bytes
// each). It runs only with TANDEM_MEASURE=1: a measurement, not a check.
func TestMeasure200k(t *testing.T) {
	if os.Getenv("TANDEM_MEASURE") == "" {
		t.Skip("set TANDEM_MEASURE=1")
	}
	e := newEnv(t, `CREATE TABLE big (id bigint PRIMARY KEY, pad text, n int);`, true)
	e.exec(e.old, `INSERT INTO big SELECT g, repeat('x', 90), g FROM generate_series(1, 200000) g`)
	o := e.options(nil, "big")
	o.Chunk, o.RangeRows = 1000, 50000
	start := time.Now()
	s := mustRun(t, o)
	el := time.Since(start)
	t.Logf("%d rows in %v: %.0f rows/s (4 workers, chunk 1000)", s.Tables[0].Done, el, float64(s.Tables[0].Done)/el.Seconds())
	equalTables(t, e, "big")
}
