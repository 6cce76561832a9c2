// Package harness is what every package's integration tests share: the
// clusters a test binary starts once in TestMain, fresh database names for
// each test, and the goroutine-leak check that ends a passing run.
//
// It is for tests only (it imports testing and goleak); the clusters
// themselves come from internal/pgtest, which `tandem demo` also uses.
package harness

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"go.uber.org/goleak"
)

// Run starts one throwaway cluster per pointer in clusters (two are started
// as a pair, in parallel), runs the package's tests, destroys the clusters,
// calls each of after, and returns the exit code: non-zero when a test
// failed, a cluster did not start, or a passing run leaked goroutines. Use
// it as TestMain's whole body:
//
//	func TestMain(m *testing.M) { os.Exit(harness.Run(m, &oldStore, &newStore)) }
//
// A fuzzing run (-test.fuzz) starts no cluster: fuzz targets of codecs need
// none.
func Run(m *testing.M, clusters []**pgtest.Cluster, after ...func()) int {
	flag.Parse()
	if f := flag.Lookup("test.fuzz"); f != nil && f.Value.String() != "" {
		return m.Run()
	}
	started, err := start(len(clusters))
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting test clusters:", err)
		return 1
	}
	for i, p := range clusters {
		*p = started[i]
	}
	code := m.Run()
	for _, fn := range after {
		fn()
	}
	for _, c := range started {
		if err := c.Destroy(); err != nil {
			fmt.Fprintln(os.Stderr, "destroying test cluster:", err)
		}
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	return code
}

// Clusters is a readable way to pass Run its cluster variables.
func Clusters(ps ...**pgtest.Cluster) []**pgtest.Cluster { return ps }

func start(n int) ([]*pgtest.Cluster, error) {
	ctx := context.Background()
	switch n {
	case 0:
		return nil, nil
	case 2:
		o, nw, err := pgtest.StartPair(ctx, pgtest.Options{})
		if err != nil {
			return nil, err
		}
		return []*pgtest.Cluster{o, nw}, nil
	}
	var out []*pgtest.Cluster
	for range n {
		c, err := pgtest.Start(ctx, pgtest.Options{})
		if err != nil {
			for _, s := range out {
				_ = s.Destroy()
			}
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

var dbSeq atomic.Int64

// DBName returns a database name no other test of this binary gets: a
// sequence number and the test's name, lower-cased, at most 60 bytes (under
// PostgreSQL's 63).
func DBName(t testing.TB) string {
	n := dbSeq.Add(1)
	name := fmt.Sprintf("t%d_%s", n, strings.ToLower(strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())))
	if len(name) > 60 {
		name = name[:60]
	}
	return name
}

// NewDB creates a database of its own for t on c (named by DBName) and
// returns its name.
func NewDB(t testing.TB, c *pgtest.Cluster) string {
	t.Helper()
	name := DBName(t)
	if err := c.CreateDatabase(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	return name
}

// NewDBs creates a database of its own for t (named by DBName) with the
// same name on each of clusters, runs schema in each (unless it is ""),
// and returns its name.
func NewDBs(t testing.TB, schema string, clusters ...*pgtest.Cluster) string {
	t.Helper()
	name := DBName(t)
	for _, c := range clusters {
		if err := c.CreateDatabase(t.Context(), name); err != nil {
			t.Fatal(err)
		}
		if schema == "" {
			continue
		}
		if err := c.Exec(t.Context(), name, schema); err != nil {
			t.Fatal(err)
		}
	}
	return name
}

// Connect opens a connection to the database db on c, closed when t ends.
func Connect(t testing.TB, c *pgtest.Cluster, db string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), c.DSN(db))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// SucceedsSoon retries f every 20ms until it returns nil, failing the test
// with f's last error when d has passed.
func SucceedsSoon(t testing.TB, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Request sends an HTTP request with body through client (JSON, unless it
// is a GET) and returns the response, its body read and closed.
func Request(t testing.TB, client *http.Client, method, url, body string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if method != http.MethodGet {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}
