package admin

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type apiClient struct {
	t    *testing.T
	base string
}

func (c apiClient) do(method, path, body string) (int, string) {
	c.t.Helper()
	resp, b := harness.Request(c.t, http.DefaultClient, method, c.base+path, body)
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" && resp.StatusCode != http.StatusMethodNotAllowed {
		c.t.Errorf("%s %s: Content-Type %q", method, path, ct)
	}
	return resp.StatusCode, string(b)
}

// TestRoutingAPI drives /api/v1 against a real control database: state,
// legal and illegal changes, bad input, the drift gate and its override,
// and rollback.
func TestRoutingAPI(t *testing.T) {
	c := pgtest.New(t)
	ctx := context.Background()
	connect := func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, c.DSN("postgres")) }
	conn, err := connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := route.EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}
	var synced []route.Store
	var observed []route.Report
	rt := &control.Routing{
		Connect: connect,
		Options: route.Options{FenceTimeout: time.Second, AckTimeout: time.Second,
			PrepareSequences: func(ctx context.Context, to route.Store) (func(context.Context) (route.SequenceSync, error), func(), error) {
				return func(context.Context) (route.SequenceSync, error) {
					synced = append(synced, to)
					return route.SequenceSync{}, nil
				}, func() {}, nil
			}},
		Observe: func(_ context.Context, rep route.Report) { observed = append(observed, rep) },
	}
	srv := httptest.NewServer(NewHandler(Options{Routing: rt}))
	defer srv.Close()
	api := apiClient{t, srv.URL}

	// Before the drift ledger exists, the state says so. The control schema
	// is one migration now, so a schema without the ledger is one an older
	// release made (without tandem.schema_version either); table.EnsureSchema
	// below upgrades it.
	if _, err := conn.Exec(ctx, "DROP TABLE tandem.drift; DROP TABLE tandem.schema_version"); err != nil {
		t.Fatal(err)
	}
	code, body := api.do("GET", "/api/v1/state", "")
	var st control.Status
	if err := json.Unmarshal([]byte(body), &st); err != nil || code != 200 {
		t.Fatalf("GET state: %d %s %v", code, body, err)
	}
	if st.State.Version != 1 || st.State.Primary != route.Old || st.Drift != nil || len(st.History) != 1 {
		t.Fatalf("initial state: %+v", st)
	}
	if err := table.EnsureSchema(ctx, conn); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name, path, body string
		code             int
		want             string
	}{
		{"bad JSON", "/api/v1/route", `{"mirror": "yes"}`, 400, "invalid JSON body"},
		{"unknown field", "/api/v1/route", `{"mirorr": true}`, 400, `unknown field \"mirorr\"`},
		{"nothing to change", "/api/v1/route", `{"reason": "x"}`, 400, "nothing to change"},
		{"out of range", "/api/v1/route", `{"reads": 150, "primary": "both"}`, 400, "primary must be old or new"},
		{"flip without mirror", "/api/v1/route", `{"primary": "new", "reads": 100}`, 409, "only while mirror is on"},
		{"reads without mirror", "/api/v1/route", `{"reads": 10}`, 409, "reads from new need mirror=on"},
		{"dual-write", "/api/v1/route", `{"mirror": true, "shadow": 5, "reason": "start dual-write"}`, 200, `"primary": "old"`},
		{"rollback with a bad body", "/api/v1/rollback", `[1]`, 400, "invalid JSON body"},
	} {
		code, body := api.do("POST", tc.path, tc.body)
		if code != tc.code || !strings.Contains(body, tc.want) {
			t.Errorf("%s: %d %s, want %d with %q", tc.name, code, body, tc.code, tc.want)
		}
	}
	if code, body := api.do("GET", "/api/v1/route", ""); code != http.StatusMethodNotAllowed {
		t.Errorf("GET /api/v1/route: %d %s", code, body)
	}

	// Open drift refuses the flip with the numbers; force overrides it.
	if err := table.RecordDrift(ctx, conn, []table.DriftEntry{
		{Table: table.Name{Schema: "public", Table: "orders"}, Key: []string{"1"}},
		{Table: table.Name{Schema: "public", Table: "orders"}, Key: []string{"2"}},
		{Table: table.Name{Schema: "public", Table: "items"}, Stale: table.StaleOld},
	}); err != nil {
		t.Fatal(err)
	}
	code, body = api.do("POST", "/api/v1/route", `{"primary": "new", "reads": 100}`)
	var e struct{ Error string }
	if json.Unmarshal([]byte(body), &e); code != 409 || !strings.HasPrefix(e.Error, "drift is open: 3 entries on 2 tables (public.orders, public.items)") ||
		!strings.HasSuffix(e.Error, "(1 to the old store, 2 to the new store) (--force overrides)") {
		t.Fatalf("flip with open drift: %d %s", code, body)
	}
	code, body = api.do("POST", "/api/v1/route", `{"primary": "new", "reads": 100, "force": true, "reason": "accepted"}`)
	var res control.Result
	if err := json.Unmarshal([]byte(body), &res); err != nil || code != 200 {
		t.Fatalf("forced flip: %d %s", code, body)
	}
	if res.State.Primary != route.New || res.State.Version != 3 || !res.Report.Flip || len(res.Report.Forced) != 1 || len(synced) != 1 || synced[0] != route.New {
		t.Fatalf("forced flip result: %+v", res)
	}
	if len(observed) != 2 || !observed[1].Flip {
		t.Fatalf("observed reports: %+v", observed)
	}

	// State shows the drift, the history and the forced flip.
	code, body = api.do("GET", "/api/v1/state", "")
	st = control.Status{}
	if err := json.Unmarshal([]byte(body), &st); err != nil || code != 200 {
		t.Fatalf("GET state: %d %s %v", code, body, err)
	}
	if st.Drift == nil || st.Drift.Open != 3 || st.Drift.Tables["public.orders"] != 2 || st.Drift.Stale["new"] != 2 || st.Drift.Stale["old"] != 1 || len(st.History) != 3 ||
		!st.History[0].Forced || st.History[0].FenceMS == nil || !strings.Contains(st.History[0].ChangedBy, "admin-api") {
		t.Fatalf("state after the flip: %s", body)
	}

	// Rollback ignores the drift gate.
	code, body = api.do("POST", "/api/v1/rollback", `{"reason": "bad p99"}`)
	res = control.Result{}
	if err := json.Unmarshal([]byte(body), &res); err != nil || code != 200 || res.State.Primary != route.Old || res.State.Reads != 0 || !res.Report.Flip {
		t.Fatalf("rollback: %d %s", code, body)
	}
	// Again: nothing to do, same version.
	code, body = api.do("POST", "/api/v1/rollback", "")
	res = control.Result{}
	if err := json.Unmarshal([]byte(body), &res); err != nil || code != 200 || res.State.Version != 4 || res.Report.ToVersion != 4 {
		t.Fatalf("second rollback: %d %s", code, body)
	}
}

// TestRoutingNotConfigured: without a new store the routing endpoints say so.
func TestRoutingNotConfigured(t *testing.T) {
	srv := httptest.NewServer(NewHandler(Options{}))
	defer srv.Close()
	api := apiClient{t, srv.URL}
	for _, p := range []struct{ method, path string }{{"GET", "/api/v1/state"}, {"POST", "/api/v1/route"}, {"POST", "/api/v1/rollback"}} {
		if code, body := api.do(p.method, p.path, "{}"); code != 404 || !strings.Contains(body, "needs a new store") {
			t.Errorf("%s %s: %d %s", p.method, p.path, code, body)
		}
	}
}

// TestStuckDriftGate: an entry the repairer has failed on
// routing.drift_stuck_attempts times refuses a write flip, named with its
// key, attempts and last error and a hint; Status lists it; --force
// overrides; once the cause is fixed and the entry repaired, the flip
// passes.
func TestStuckDriftGate(t *testing.T) {
	c := pgtest.New(t)
	ctx := context.Background()
	connect := func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, c.DSN("postgres")) }
	var conns []*pgx.Conn
	for range 3 {
		conn, err := connect(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		conns = append(conns, conn)
	}
	ctl, source, target := conns[0], conns[1], conns[2]
	if err := route.EnsureSchema(ctx, ctl); err != nil {
		t.Fatal(err)
	}
	if err := table.EnsureSchema(ctx, ctl); err != nil {
		t.Fatal(err)
	}
	rt := &control.Routing{
		Connect:       connect,
		Options:       route.Options{FenceTimeout: time.Second, AckTimeout: time.Second},
		StuckAttempts: 3,
	}
	if _, err := rt.Route(ctx, "test", control.RouteRequest{Mirror: ptr(true)}); err != nil {
		t.Fatal(err)
	}
	if err := table.RecordDrift(ctx, ctl, []table.DriftEntry{{Table: table.Name{Schema: "public", Table: "ghost"}, Key: []string{"7"}}}); err != nil {
		t.Fatal(err)
	}
	// The repairer fails on it (the table does not exist), attempt after
	// attempt. Source and target are one database: a repair copies a row
	// onto itself, which is enough to settle an entry.
	repair := func() (int, error) {
		return table.RepairWith(ctx, ctl, source, target, table.RepairOptions{Target: table.StaleNew, Limit: 10, IgnoreBackoff: true})
	}
	flip := func(force bool) (control.Result, error) {
		return rt.Route(ctx, "test", control.RouteRequest{Primary: ptr(string(route.New)), Reads: ptr(100), Force: force})
	}
	for attempt := 1; attempt <= 3; attempt++ {
		if n, err := repair(); n != 0 || err == nil {
			t.Fatalf("attempt %d: %d, %v; want a failure", attempt, n, err)
		}
		_, err := flip(false)
		var ie *route.IllegalError
		if !errors.As(err, &ie) || !strings.Contains(ie.Reason, "drift is open: 1 entries") {
			t.Fatalf("flip after %d attempts: %v", attempt, err)
		}
		if stuck := strings.Contains(ie.Reason, "drift is stuck"); stuck != (attempt == 3) {
			t.Fatalf("flip after %d attempts (stuck at 3): %s", attempt, ie.Reason)
		}
		if attempt < 3 {
			continue
		}
		for _, want := range []string{"drift is stuck: 1 entries failed to repair at least 3 times (routing.drift_stuck_attempts)",
			"public.ghost key (7), stale on new, 3 attempts since", "last error: repairing public.ghost on new: on the primary: table public.ghost does not exist",
			"fix the cause", "UPDATE tandem.drift SET repaired_at = now() WHERE id = <id>", "(--force overrides)"} {
			if !strings.Contains(ie.Reason, want) {
				t.Errorf("refusal lacks %q:\n%s", want, ie.Reason)
			}
		}
	}
	st, err := rt.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := st.Drift; d == nil || d.Stuck != 1 || d.StuckAttempts != 3 || len(d.StuckEntries) != 1 || d.StuckEntries[0].Table != "public.ghost" ||
		d.StuckEntries[0].Attempts != 3 || !strings.Contains(d.StuckEntries[0].LastError, "does not exist") || d.StuckEntries[0].FailingSince.IsZero() {
		t.Fatalf("status drift: %+v", st.Drift)
	}

	// --force goes past it, and the history says so; roll back.
	res, err := flip(true)
	if err != nil || res.State.Primary != route.New || !strings.Contains(strings.Join(res.Report.Forced, "; "), "drift is stuck") {
		t.Fatalf("forced flip: %+v %v", res, err)
	}
	if _, err := rt.Rollback(ctx, "test", "", false); err != nil {
		t.Fatal(err)
	}

	// The cause fixed, the entry is repaired: the flip passes.
	if _, err := ctl.Exec(ctx, "CREATE TABLE ghost (id int PRIMARY KEY); INSERT INTO ghost VALUES (7)"); err != nil {
		t.Fatal(err)
	}
	if n, err := repair(); n != 1 || err != nil {
		t.Fatalf("repair after the fix: %d, %v", n, err)
	}
	if res, err := flip(false); err != nil || res.State.Primary != route.New || len(res.Report.Forced) != 0 {
		t.Fatalf("flip after the repair: %+v %v", res, err)
	}
}

func ptr[T any](v T) *T { return &v }

// TestWriteErrorStatus: a flip that gave up because writes did not drain or
// the change feed did not catch up is a 503 (retry later), not a refusal.
func TestWriteErrorStatus(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{&route.FenceError{Timeout: time.Second}, http.StatusServiceUnavailable},
		{&route.FeedError{Report: route.FeedReport{Store: route.Old}, Why: "the change feed has not checked"}, http.StatusServiceUnavailable},
		{&route.IllegalError{Gate: true, Reason: "change feed: it is down"}, http.StatusConflict},
		{&control.BadRequestError{Reason: "x"}, http.StatusBadRequest},
		{errors.New("boom"), http.StatusInternalServerError},
	} {
		rec := httptest.NewRecorder()
		writeError(rec, c.err)
		if rec.Code != c.want {
			t.Errorf("%T: status %d, want %d", c.err, rec.Code, c.want)
		}
		if _, ok := c.err.(*route.FeedError); ok && !strings.Contains(rec.Body.String(), "change feed: write flip refused") {
			t.Errorf("feed error body: %s", rec.Body.String())
		}
	}
}
