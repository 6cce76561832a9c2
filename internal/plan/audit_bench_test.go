package plan

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/table"
)

// BenchmarkAudit measures the data audit of a 1M-row table against one
// scan of it, in alternating rounds, and reports the medians and their
// ratios (docs/benchmarks.md). "One scan" is a read of every value, as the
// backfill's COPY ... TO STDOUT of the table does it (audit/copy, the
// issue's measure); SELECT count(*), as PostgreSQL plans it (parallel) and
// without parallel workers, reads no values and is reported beside it. The
// table is TestPlanAudit's (cmd/tandem) at 1M rows: mapped with a rename, a
// dropped and a computed column, one planted row of each reason, which the
// audit must find:
//
//	go test -run '^$' -bench Audit -benchtime 1x ./internal/plan
//
// With TANDEM_AUDIT_BASELINE naming a tandem binary of another build (the
// one before a change), each round also runs its tandem plan --audit on the
// same stores, which must find the same rejects, and reports its median
// audit time (the report's duration) and the ratio to it.
func BenchmarkAudit(b *testing.B) {
	old, new := pgtest.NewPair(b)
	ctx := context.Background()
	oldSQL, newSQL := auditFixture(b, 1000, 1000000)
	for _, step := range []struct {
		c   *pgtest.Cluster
		sql string
	}{{old, oldSQL}, {old, `VACUUM ANALYZE`}, {new, newSQL}} {
		if err := step.c.Exec(ctx, "postgres", step.sql); err != nil {
			b.Fatal(err)
		}
	}
	oldConn, newConn := harness.Connect(b, old, "postgres"), harness.Connect(b, new, "postgres")
	orders := table.Name{Schema: "public", Table: "orders"}
	opts := Options{Old: oldConn, New: newConn, Audit: true, Map: func(n table.Name) Mapping {
		switch n.Table {
		case "customers":
			return Mapping{New: table.Name{Schema: "public", Table: "clients"}, Declared: true}
		case "orders":
			return Mapping{New: table.Name{Schema: "public", Table: "purchases"}, Declared: true,
				Renames: map[string]string{"cust": "customer_id"}, Dropped: []string{"legacy"},
				Computed: map[string]string{"total": "price * amount"}, Consumed: map[string]bool{"price": true, "amount": true}}
		}
		return Mapping{New: n}
	}}
	const want = "check:505 fk_orphan:303 length:101 null:202 type_cast:606 unique_duplicate:dup"
	baseline := baselineAudit(b, os.Getenv("TANDEM_AUDIT_BASELINE"), old, new, want)
	const rounds = 7
	var audits, scans, serial, copies, baselines []time.Duration
	count := func() time.Duration {
		began := time.Now()
		var n int64
		if err := oldConn.QueryRow(ctx, "SELECT count(*) FROM "+orders.Quoted()).Scan(&n); err != nil || n != 1000000 {
			b.Fatal(n, err)
		}
		return time.Since(began)
	}
	b.ResetTimer()
	for range b.N {
		for range rounds {
			// count(*) as PostgreSQL plans it (parallel), then serial.
			scans = append(scans, count())
			if _, err := oldConn.Exec(ctx, "SET max_parallel_workers_per_gather = 0"); err != nil {
				b.Fatal(err)
			}
			serial = append(serial, count())
			if _, err := oldConn.Exec(ctx, "RESET max_parallel_workers_per_gather"); err != nil {
				b.Fatal(err)
			}
			// A scan that reads every value: the table's text, as the
			// backfill's COPY reads it.
			began := time.Now()
			if _, err := oldConn.PgConn().CopyTo(ctx, io.Discard, "COPY "+orders.Quoted()+" TO STDOUT"); err != nil {
				b.Fatal(err)
			}
			copies = append(copies, time.Since(began))

			rep, err := Run(ctx, opts)
			if err != nil {
				b.Fatal(err)
			}
			i := slices.IndexFunc(rep.Tables, func(t Table) bool { return t.Name == "public.orders" })
			a := rep.Tables[i].Audit
			var got []string
			for _, r := range a.Rejects {
				got = append(got, r.Reason+":"+strings.Join(r.Keys, ","))
			}
			if strings.Join(got, " ") != want || a.Rows != 1000000 {
				b.Fatalf("audit found %q in %d rows, want %q", got, a.Rows, want)
			}
			audits = append(audits, a.Duration.D())
			if baseline != nil {
				baselines = append(baselines, baseline())
			}
		}
	}
	b.StopTimer()
	audit, scan, one, cp := median(audits), median(scans), median(serial), median(copies)
	b.ReportMetric(float64(audit.Milliseconds()), "audit-ms")
	b.ReportMetric(float64(scan.Milliseconds()), "scan-ms")
	b.ReportMetric(float64(one.Milliseconds()), "serial-scan-ms")
	b.ReportMetric(float64(audit)/float64(scan), "audit/scan")
	b.ReportMetric(float64(audit)/float64(one), "audit/serial-scan")
	b.ReportMetric(float64(cp.Milliseconds()), "copy-ms")
	b.ReportMetric(float64(audit)/float64(cp), "audit/copy")
	if len(baselines) > 0 {
		base := median(baselines)
		b.ReportMetric(float64(base.Milliseconds()), "baseline-audit-ms")
		b.ReportMetric(float64(base)/float64(cp), "baseline/copy")
		b.ReportMetric(float64(base)/float64(scan), "baseline/scan")
		b.ReportMetric(float64(audit)/float64(base), "audit/baseline")
		b.Logf("baseline %s: median audit %v\nbaseline audits %v", os.Getenv("TANDEM_AUDIT_BASELINE"), base, baselines)
	}
	b.Logf("medians of %d alternating rounds: audit %v, count(*) %v, count(*) without parallel workers %v, COPY out %v\naudits %v\nscans %v\nserial scans %v\ncopies %v",
		len(audits), audit, scan, one, cp, audits, scans, serial, copies)
}

// baselineAudit returns what runs the data audit of bin (a tandem binary)
// on the benchmark's stores, checks that it finds want in public.orders,
// and returns the audit's duration as its report gives it; nil when bin is
// "".
func baselineAudit(b *testing.B, bin string, old, new *pgtest.Cluster, want string) func() time.Duration {
	if bin == "" {
		return nil
	}
	cfg := filepath.Join(b.TempDir(), "tandem.yaml")
	mapping, err := os.ReadFile("testdata/audit_map.yaml")
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte("old:\n  dsn: "+old.DSN("")+"\nnew:\n  dsn: "+new.DSN("")+"\n"+string(mapping)), 0o600); err != nil {
		b.Fatal(err)
	}
	return func() time.Duration {
		out, err := exec.Command(bin, "plan", "-c", cfg, "--json", "--sample-rows", "0", "--audit").Output()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) { // the plan's verdict is its exit status
			b.Fatal(err)
		}
		var rep Report
		if err := json.Unmarshal(out, &rep); err != nil {
			b.Fatalf("%s: %v\n%s", bin, err, out)
		}
		i := slices.IndexFunc(rep.Tables, func(t Table) bool { return t.Name == "public.orders" })
		if i < 0 || rep.Tables[i].Audit == nil {
			b.Fatalf("%s: no audit of public.orders:\n%s", bin, out)
		}
		a := rep.Tables[i].Audit
		var got []string
		for _, r := range a.Rejects {
			got = append(got, r.Reason+":"+strings.Join(r.Keys, ","))
		}
		if strings.Join(got, " ") != want || a.Rows != 1000000 {
			b.Fatalf("%s: audit found %q in %d rows, want %q", bin, got, a.Rows, want)
		}
		return a.Duration.D()
	}
}

// auditFixture is the audit's fixture, testdata/audit_old.sql (with
// customers parents and rows orders) and testdata/audit_new.sql, which
// cmd/tandem's TestPlanAudit reads too.
func auditFixture(tb testing.TB, customers, rows int) (old, new string) {
	tb.Helper()
	var sql [2]string
	for i, name := range []string{"audit_old.sql", "audit_new.sql"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			tb.Fatal(err)
		}
		sql[i] = string(b)
	}
	return strings.NewReplacer("{{customers}}", strconv.Itoa(customers), "{{rows}}", strconv.Itoa(rows)).Replace(sql[0]), sql[1]
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}
