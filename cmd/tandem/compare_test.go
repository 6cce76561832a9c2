package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/compare"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/time/rate"
)

func runCompareCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, _, err := execCommand(t, newCompareCmd(), args...)
	return out, err
}

// TestCompareCLI plants differences on new, checks that compare reports
// them and exits 1, that --repair exits 0, and that a second compare is
// clean, in JSON.
func TestCompareCLI(t *testing.T) {
	old, new := pgtest.NewPair(t)
	schema := `CREATE TABLE items (id bigint PRIMARY KEY, name text);
		INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 3000) g;`
	mustExec(t, old, schema)
	mustExec(t, new, schema+`UPDATE items SET name = 'x' WHERE id = 10;
		DELETE FROM items WHERE id IN (20, 30, 40); INSERT INTO items VALUES (5000, 'a'), (5001, 'b');`)
	base := []string{"--old", old.DSN(""), "--new", new.DSN("")}
	got, err := runCompareCmd(t, append(base, "--table", "items", "--batch", "500")...)
	var ec exitCode
	if !errors.As(err, &ec) || ec != 1 || !strings.Contains(got, "6 differences (3 MissingOnNew, 2 MissingOnOld, 1 ValueDiff)") ||
		!strings.Contains(got, "ValueDiff    key 10") {
		t.Fatalf("compare: %v\n%s", err, got)
	}
	got, err = runCompareCmd(t, append(base, "--repair")...)
	if err != nil || !strings.Contains(got, "6 repaired") {
		t.Fatalf("--repair: %v\n%s", err, got)
	}
	got, err = runCompareCmd(t, append(base, "--json")...)
	if err != nil {
		t.Fatalf("--json: %v\n%s", err, got)
	}
	var res struct {
		Tables []struct {
			Table string
			Rows  int64
			Diffs []any `json:"differences"`
		}
	}
	if err := json.Unmarshal([]byte(got), &res); err != nil || len(res.Tables) != 1 || res.Tables[0].Rows != 3000 || len(res.Tables[0].Diffs) != 0 {
		t.Fatalf("--json: %v\n%s", err, got)
	}
	if _, err := runCompareCmd(t, append(base, "--table", "nosuch")...); err == nil {
		t.Fatal("unknown table accepted")
	}
}

func TestCompareHelp(t *testing.T) {
	got, err := runCompareCmd(t, "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"MissingOnNew", "MissingOnOld", "ValueDiff", "--repair", "--json", "locked-copy unit", "Exit status", "transient",
		"--rate", "--since-checkpoint", "drift", "tandem.verify_runs", "Cutover gate", "tandem.migration_log"} {
		if !strings.Contains(got, want) {
			t.Errorf("help lacks %q", want)
		}
	}
}

// compareJSON runs tandem compare --json with args and returns its tables
// by old name and its error.
func compareJSON(t *testing.T, args ...string) (map[string]compare.TableSummary, string, error) {
	t.Helper()
	out, errOut, err := cli(append([]string{"compare", "--json"}, args...)...)
	var res struct {
		Tables []compare.TableSummary `json:"tables"`
	}
	if jerr := json.Unmarshal([]byte(out), &res); jerr != nil {
		t.Fatalf("compare %v: %v (%v)\n%s%s", args, jerr, err, out, errOut)
	}
	m := map[string]compare.TableSummary{}
	for _, s := range res.Tables {
		m[s.Table] = s
	}
	return m, out + errOut, err
}

func diffLines(s compare.TableSummary) []string {
	var out []string
	for _, d := range s.Diffs {
		out = append(out, string(d.Kind)+" "+strings.Join(d.Key, ","))
	}
	slices.Sort(out)
	return out
}

// TestComparePlantedUnderLiveWrites plants differences directly on the
// new store of a 1M-row table and of a renamed table while four writers
// update and insert rows of the big table through the proxy with mirror
// on, for the whole of three compares: the first reports exactly the
// planted rows with their kinds and exits 1, --repair fixes them and exits
// 0, and the third is clean. The writers' own writes never show up as
// differences: they are transient at most.
func TestComparePlantedUnderLiveWrites(t *testing.T) {
	if testing.Short() {
		t.Skip("1M rows under live writes")
	}
	oldC, newC := pgtest.NewPair(t)
	const rows = 1_000_000
	schema := fmt.Sprintf(`CREATE TABLE big (id bigint PRIMARY KEY, name text, n int, amount numeric(12,2), at timestamptz);
		INSERT INTO big SELECT g, md5(g::text), g %% 1000, g * 0.25, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 second'
			FROM generate_series(1, %d) g;
		ANALYZE big;`, rows)
	users := `INSERT INTO %s SELECT g, 'user' || g || '@example.org' FROM generate_series(1, 1000) g;`
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, s := range []struct {
		c   *pgtest.Cluster
		sql string
	}{
		{oldC, schema + `CREATE TABLE users (id int PRIMARY KEY, email text);` + fmt.Sprintf(users, "users")},
		{newC, schema + `CREATE TABLE accounts (id int PRIMARY KEY, email text);` + fmt.Sprintf(users, "accounts")},
	} {
		wg.Go(func() { errs[i] = s.c.Exec(context.Background(), "postgres", s.sql) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	file, _ := pairConfig(t, oldC, newC, "compare-proxy")
	appendFile(t, file, "tables:\n  map:\n    public.users:\n      to: public.accounts\n")
	cfg := loadConfig(t, file)
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}

	// Writers through the proxy, 600 writes/s in all: updates of ids 1000..989999 and inserts
	// of ids from 2,000,000 up, never the planted keys.
	ctx, stop := context.WithCancel(context.Background())
	var writes atomic.Int64
	werrs := make([]error, 4)
	var writers sync.WaitGroup
	for w := range 4 {
		writers.Go(func() {
			conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable&application_name=compare-load", rp.Addr()))
			if err != nil {
				werrs[w] = err
				return
			}
			defer conn.Close(context.Background())
			next := int64(2_000_000 + w*1_000_000)
			// Paced, so that on two cores under -race the writers leave
			// room for the proxy and the compares.
			pace := rate.NewLimiter(150, 1)
			for pace.Wait(ctx) == nil {
				if rand.IntN(5) == 0 {
					next++
					_, err = conn.Exec(ctx, "INSERT INTO big VALUES ($1, 'live', 1, 1.5, now())", next)
				} else {
					_, err = conn.Exec(ctx, "UPDATE big SET n = n + 1, name = 'live', at = now() WHERE id = $1", 1000+rand.Int64N(989_000))
				}
				if err != nil {
					if ctx.Err() == nil {
						werrs[w] = err
					}
					return
				}
				writes.Add(1)
			}
		})
	}
	stopWriters := func() {
		stop()
		writers.Wait()
		if err := errors.Join(werrs...); err != nil {
			t.Fatalf("writers: %v", err)
		}
	}
	defer stopWriters()
	waitFor(t, func() bool { return writes.Load() > 100 })

	mustExec(t, newC, `UPDATE big SET name = 'planted' WHERE id = 500;
		DELETE FROM big WHERE id IN (100, 200, 995500);
		INSERT INTO big VALUES (1500000, 'planted', 0, 0, now()), (1500001, 'planted', 0, 0, now());
		UPDATE accounts SET email = 'planted@example.org' WHERE id = 42;`)

	base := []string{"-c", file, "--batch", "20000"}
	sums, out, err := compareJSON(t, base...)
	var ec exitCode
	if !errors.As(err, &ec) || ec != 1 {
		t.Fatalf("compare with planted differences: %v\n%s", err, out)
	}
	wantBig := []string{"MissingOnNew 100", "MissingOnNew 200", "MissingOnNew 995500", "MissingOnOld 1500000", "MissingOnOld 1500001", "ValueDiff 500"}
	big, us := sums["public.big"], sums["public.users"]
	if !slices.Equal(diffLines(big), wantBig) || big.Counts[compare.MissingOnNew] != 3 || big.Counts[compare.MissingOnOld] != 2 ||
		big.Counts[compare.ValueDiff] != 1 || big.Rows < rows {
		t.Fatalf("big: %+v\n%s", big, out)
	}
	if !slices.Equal(diffLines(us), []string{"ValueDiff 42"}) || us.NewTable != "public.accounts" {
		t.Fatalf("users: %+v\n%s", us, out)
	}
	t.Logf("first compare: big %d rows in %v, %d transient; %d writes so far", big.Rows, big.Duration, big.Transient, writes.Load())

	sums, out, err = compareJSON(t, append(base, "--repair")...)
	if err != nil || sums["public.big"].Repaired != 6 || sums["public.users"].Repaired != 1 ||
		!slices.Equal(diffLines(sums["public.big"]), wantBig) {
		t.Fatalf("--repair: %v\n%s", err, out)
	}
	sums, out, err = compareJSON(t, base...)
	if err != nil || sums["public.big"].Differences() != 0 || sums["public.users"].Differences() != 0 {
		t.Fatalf("after repair: %v\n%s", err, out)
	}
	n := writes.Load()
	stopWriters()
	t.Logf("%d writes through the proxy during the compares; last compare %v, %d transient", n, sums["public.big"].Duration, sums["public.big"].Transient)

	ctl, err := pgx.Connect(context.Background(), oldC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close(context.Background())
	runs, err := compare.LastRuns(context.Background(), ctl)
	if err != nil || !runs[table.Name{Schema: "public", Table: "big"}].Clean || !runs[table.Name{Schema: "public", Table: "users"}].Clean {
		t.Fatalf("last runs: %+v, %v", runs, err)
	}
	var logged int
	if err := ctl.QueryRow(context.Background(), `SELECT coalesce(sum(rows), 0) FROM tandem.migration_log WHERE source = 'compare' AND status = 'repaired'`).Scan(&logged); err != nil || logged != 7 {
		t.Fatalf("repairs in the migration log: %d, %v", logged, err)
	}
}
