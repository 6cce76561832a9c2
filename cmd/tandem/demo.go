package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
)

func newDemoCmd() *cobra.Command {
	var verbose bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Walk through Tandem on two throwaway local PostgreSQL clusters",
		Long: `Start two throwaway PostgreSQL clusters (old and new) from the installed
server binaries, put a Tandem proxy in front of them, and walk the playbook
with traffic going through it: passthrough, dual-write, a backfill, a 50%
read shift, the write flip and a rollback (through the admin API), then
check that both stores hold the same rows, show the proxy's metrics, and
clean up.

It needs the PostgreSQL server binaries (pg_config --bindir); as root it runs
them as the 'postgres' user. Nothing outside a temporary directory is touched.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDemo(cmd.Context(), cmd.OutOrStdout(), verbose)
		},
	}
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "also print the proxy's own log lines")
	return cmd
}

type narrator struct {
	w    io.Writer
	step int
}

func (n *narrator) section(format string, args ...any) {
	n.step++
	fmt.Fprintf(n.w, "\n== %d. %s\n", n.step, fmt.Sprintf(format, args...))
}

func (n *narrator) say(format string, args ...any) {
	fmt.Fprintf(n.w, "   %s\n", fmt.Sprintf(format, args...))
}

func runDemo(ctx context.Context, w io.Writer, verbose bool) (err error) {
	n := &narrator{w: w}
	fmt.Fprintln(w, "Tandem demo: a PostgreSQL proxy that turns a migration into a routing flip.")

	n.section("Starting two throwaway PostgreSQL clusters: the old store and the new store")
	oldDB, newDB, err := demoClusters(ctx, n)
	if err != nil {
		return err
	}
	defer func() {
		n.section("Cleaning up")
		err = errors.Join(err, oldDB.Destroy(), newDB.Destroy())
		n.say("both clusters stopped and their directories removed")
	}()
	if err := demoShop(ctx, n, oldDB, newDB); err != nil {
		return err
	}

	n.section("Starting the Tandem proxy in front of them")
	cfg, rp, err := demoProxy(n, w, verbose, oldDB, newDB)
	if err != nil {
		return err
	}
	stopped := false
	defer func() {
		if !stopped {
			err = errors.Join(err, rp.stop())
		}
	}()

	n.section("The app talks to Tandem exactly as it talked to PostgreSQL")
	appDSN := fmt.Sprintf("postgres://postgres@%s/shop?sslmode=disable&application_name=demo-app", rp.Addr())
	conn, err := pgx.Connect(ctx, appDSN)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	if err := demoTransparent(ctx, n, conn); err != nil {
		return err
	}

	n.section("Where the rows live")
	onOld, err := countRows(ctx, oldDB.DSN("shop"))
	if err != nil {
		return err
	}
	n.say("old store: %d orders. Routing is in step 1 of the playbook (primary=old, mirror=off):", onOld)
	n.say("every statement ran on the old store, the store of record; the new store is not touched yet.")

	if err := demoMigration(ctx, n, rp, oldDB, newDB, conn); err != nil {
		return err
	}

	n.section("The whole migration on one screen: tandem status")
	if err := demoStatus(ctx, n, w, cfg, rp); err != nil {
		return err
	}

	n.section("What the operator sees: /metrics")
	if err := demoOperator(ctx, n, rp); err != nil {
		return err
	}

	n.section("Graceful shutdown (what SIGTERM does)")
	stopped = true
	return demoShutdown(ctx, n, rp, conn)
}

// demoClusters starts the two stores.
func demoClusters(ctx context.Context, n *narrator) (oldDB, newDB *pgtest.Cluster, err error) {
	t0 := time.Now()
	oldDB, newDB, err = pgtest.StartPair(ctx, pgtest.Options{})
	if err != nil {
		return nil, nil, fmt.Errorf("starting clusters: %w", err)
	}
	n.say("old store: PostgreSQL %s on 127.0.0.1:%d", oldDB.Version(), oldDB.Port())
	n.say("new store: PostgreSQL %s on 127.0.0.1:%d (ready in %s)", newDB.Version(), newDB.Port(), time.Since(t0).Round(10*time.Millisecond))
	return oldDB, newDB, nil
}

// demoShop gives both stores the app's database, shop, and old its orders
// and order events.
func demoShop(ctx context.Context, n *narrator, oldDB, newDB *pgtest.Cluster) error {
	for _, c := range []*pgtest.Cluster{oldDB, newDB} {
		if err := c.CreateDatabase(ctx, "shop"); err != nil {
			return err
		}
	}
	if err := oldDB.Exec(ctx, "shop", `CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL,
		total numeric(10,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
		INSERT INTO orders (customer, total) SELECT 'customer-' || g, g * 1.5 FROM generate_series(1, 1000) g;
		CREATE TABLE order_events (id bigserial PRIMARY KEY, order_id bigint NOT NULL, kind text NOT NULL, at timestamptz NOT NULL DEFAULT now());
		INSERT INTO order_events (order_id, kind) SELECT g % 1000 + 1, (ARRAY['placed', 'paid', 'shipped'])[g % 3 + 1] FROM generate_series(1, `+fmt.Sprint(demoEvents)+`) g;`); err != nil {
		return err
	}
	n.say("the app's database 'shop' on old holds 1000 orders and %d order events", demoEvents)
	return nil
}

// demoProxy starts Tandem in front of both stores, logging to w only when
// verbose.
func demoProxy(n *narrator, w io.Writer, verbose bool, oldDB, newDB *pgtest.Cluster) (*config.Config, *runningProxy, error) {
	cfg := config.Default()
	cfg.Listen, cfg.Admin = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Old.DSN, cfg.New.DSN = oldDB.DSN("shop"), newDB.DSN("shop")
	cfg.Limits.DrainTimeout = config.Duration(5 * time.Second)
	cfg.Routing.ReplicaID = "demo-proxy"
	logOut := io.Discard
	if verbose {
		logOut = w
	}
	rp, err := startProxy(&cfg, newLogger(config.Log{Format: "text", Level: "info"}, logOut))
	if err != nil {
		return nil, nil, err
	}
	n.say("clients connect to %s (admin API on http://%s)", rp.Addr(), rp.AdminAddr())
	n.say("the app's only change: its connection string now names the proxy")
	return &cfg, rp, nil
}

// demoTransparent shows the app's session through the proxy as it was on
// PostgreSQL: the extended protocol, RETURNING, a transaction, COPY and an
// error, unchanged.
func demoTransparent(ctx context.Context, n *narrator, conn *pgx.Conn) error {
	var count int
	var sum string
	if err := conn.QueryRow(ctx, "SELECT count(*), sum(total)::text FROM orders").Scan(&count, &sum); err != nil {
		return err
	}
	n.say("extended protocol:  SELECT count(*), sum(total) FROM orders  ->  %d orders, %s in total", count, sum)
	var id int64
	if err := conn.QueryRow(ctx, "INSERT INTO orders (customer, total) VALUES ($1, $2) RETURNING id", "walk-in", "42.00").Scan(&id); err != nil {
		return err
	}
	n.say("parameterised INSERT ... RETURNING id  ->  order %d", id)
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "UPDATE orders SET total = total + 1 WHERE id = $1", id); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	n.say("a transaction (BEGIN; UPDATE; COMMIT) runs on one upstream session")
	res, err := conn.PgConn().CopyFrom(ctx, strings.NewReader("copy-1\t10.00\ncopy-2\t20.00\ncopy-3\t30.00\n"),
		"COPY orders (customer, total) FROM STDIN")
	if err != nil {
		return err
	}
	n.say("COPY FROM STDIN loaded %d rows", res.RowsAffected())
	_, err = conn.Exec(ctx, "INSERT INTO orders (id, customer, total) VALUES ($1, 'dup', 1)", id)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return fmt.Errorf("expected a unique violation, got %v", err)
	}
	n.say("errors arrive unchanged: %q, SQLSTATE %s", pgErr.Message, pgErr.Code)
	return nil
}

// demoStatus prints tandem status, as the operator would run it.
func demoStatus(ctx context.Context, n *narrator, w io.Writer, cfg *config.Config, rp *runningProxy) error {
	rt, err := control.NewRouting(cfg, newLogger(config.Log{Format: "text", Level: "error"}, io.Discard), nil)
	if err != nil {
		return err
	}
	st, err := collectStatus(ctx, cfg, rt)
	if err != nil {
		return err
	}
	printMigration(w, st, rt.Options.Live)
	n.say("the same, live, with charts and the routing controls: http://%s/ (while the proxy runs)", rp.AdminAddr())
	return nil
}

// demoOperator shows the metrics and the readiness probe.
func demoOperator(ctx context.Context, n *narrator, rp *runningProxy) error {
	if err := printMetrics(ctx, n, "http://"+rp.AdminAddr()+"/metrics"); err != nil {
		return err
	}
	resp, err := http.Get("http://" + rp.AdminAddr() + "/readyz")
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	n.say("/readyz -> %d %s", resp.StatusCode, strings.TrimSpace(string(body)))
	return nil
}

// demoShutdown stops the proxy as SIGTERM does and shows what the app's
// idle session gets.
func demoShutdown(ctx context.Context, n *narrator, rp *runningProxy, conn *pgx.Conn) error {
	if err := rp.stop(); err != nil {
		return err
	}
	n.say("the proxy stopped accepting, let open transactions finish, and closed idle sessions")
	_, err := conn.PgConn().Exec(ctx, "SELECT 1").ReadAll()
	var shutdownErr *pgconn.PgError
	if !errors.As(err, &shutdownErr) {
		return fmt.Errorf("expected the session to be closed with 57P01, got %v", err)
	}
	n.say("the app's idle session got SQLSTATE %s: %s", shutdownErr.Code, shutdownErr.Message)
	n.say("proxy stopped")
	return nil
}

func countRows(ctx context.Context, dsn string) (int, error) {
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, err
	}
	defer c.Close(ctx)
	var n int
	err = c.QueryRow(ctx, "SELECT count(*) FROM orders").Scan(&n)
	return n, err
}

// printMetrics prints the proxy's own series, skipping histogram buckets.
func printMetrics(ctx context.Context, n *narrator, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || strings.Contains(line, "_bucket{") {
			continue
		}
		if strings.HasPrefix(line, "tandem_") || strings.HasPrefix(line, "db_client_operation_duration") {
			n.say("%s", shortenLabels(line))
		}
	}
	return sc.Err()
}

// shortenLabels drops the scope labels the exporter adds to every series.
func shortenLabels(line string) string {
	for _, l := range []string{"otel_scope_name", "otel_scope_schema_url", "otel_scope_version"} {
		for {
			i := strings.Index(line, l+"=\"")
			if i < 0 {
				break
			}
			j := strings.Index(line[i+len(l)+2:], "\"")
			end := i + len(l) + 2 + j + 1
			if end < len(line) && line[end] == ',' {
				end++
			}
			line = line[:i] + line[end:]
		}
	}
	return strings.ReplaceAll(strings.ReplaceAll(line, ",}", "}"), "{}", "")
}
