package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// Routing is the routing control plane: it reads the routing state and runs
// routing changes and rollbacks through route.Set. The admin API's
// /api/v1/state, /api/v1/route and /api/v1/rollback and the CLI's
// `tandem route` commands both use it, so they run the same code.
type Routing struct {
	// Connect opens a connection to the control database. Each call of a
	// method uses its own connection and closes it.
	Connect func(ctx context.Context) (*pgx.Conn, error)
	// Options configure route.Set. The drift gate (DriftGate) is added to
	// its Gates.
	Options route.Options
	// Observe, if set, is called with the report of every change that
	// changed something (e.g. to record the fence time).
	Observe func(ctx context.Context, rep route.Report)
	// History is how many history entries Status returns (default 10).
	History int
	// StuckAttempts is the failed repair attempts after which a drift entry
	// is stuck (routing.drift_stuck_attempts; default
	// table.DefaultStuckAttempts): Status lists it and StuckDriftGate
	// refuses a write flip.
	StuckAttempts int
	// Feed, if set, reads the change feed's state for Status (it reaches
	// the stores, which Routing does not); conn is the control database.
	Feed func(ctx context.Context, conn *pgx.Conn) (*Feed, error)
}

// Status is the routing state as GET /api/v1/state and `tandem route show`
// report it.
type Status struct {
	State    route.State          `json:"state"`
	Replicas []route.Replica      `json:"replicas"` // every replica recorded; Live marks those that count
	History  []route.HistoryEntry `json:"history"`  // newest first
	Drift    *Drift               `json:"drift"`    // nil when the drift ledger does not exist yet
	Feed     *Feed                `json:"feed"`     // nil when the proxy is not configured to read it
}

// Drift is the open part of the drift ledger.
type Drift struct {
	Open   int64            `json:"open"`   // open entries
	Tables map[string]int   `json:"tables"` // open entries per "schema.table"
	Stale  map[string]int64 `json:"stale"`  // open entries per store that missed the writes ("old", "new")
	// Stuck is the open entries the repairer has failed on at least
	// StuckAttempts times; StuckEntries are the first of them (failing
	// longest first).
	Stuck         int64        `json:"stuck"`
	StuckAttempts int          `json:"stuck_attempts"`
	StuckEntries  []StuckEntry `json:"stuck_entries"`
}

// StuckEntry is a drift entry the repairer keeps failing on.
type StuckEntry struct {
	ID           int64     `json:"id"`    // tandem.drift.id
	Table        string    `json:"table"` // "schema.table", as the store that had the write names it
	Key          []string  `json:"key"`   // the key values as text; null = the whole table
	Stale        string    `json:"stale"` // the store that missed the write ("old", "new")
	Reason       string    `json:"reason"`
	Attempts     int       `json:"attempts"`
	LastError    string    `json:"last_error"`
	FailingSince time.Time `json:"failing_since"`
	NextAttempt  time.Time `json:"next_attempt"`
}

// stuckShown is how many stuck entries Status and the gate name.
const stuckShown = 10

func (e StuckEntry) String() string {
	key := "(whole table)"
	if e.Key != nil {
		key = "key (" + strings.Join(e.Key, ", ") + ")"
	}
	return fmt.Sprintf("entry %d: %s %s, stale on %s, %d attempts since %s, last error: %s",
		e.ID, e.Table, key, e.Stale, e.Attempts, e.FailingSince.UTC().Format(time.RFC3339), e.LastError)
}

// RouteRequest is a partial routing change: nil fields keep their current
// value. It is the JSON body of POST /api/v1/route.
type RouteRequest struct {
	Primary *string `json:"primary,omitempty"` // "old" or "new"
	Mirror  *bool   `json:"mirror,omitempty"`
	Reads   *int    `json:"reads,omitempty"`  // 0..100
	Shadow  *int    `json:"shadow,omitempty"` // 0..100
	Force   bool    `json:"force,omitempty"`  // override cutover gates (recorded in the history)
	Reason  string  `json:"reason,omitempty"` // recorded in the history
}

// BadRequestError is a malformed request.
type BadRequestError struct{ Reason string }

func (e *BadRequestError) Error() string { return e.Reason }

// Check reports what is malformed in req, as a *BadRequestError.
func (req RouteRequest) Check() error {
	var errs []string
	if req.Primary != nil && *req.Primary != string(route.Old) && *req.Primary != string(route.New) {
		errs = append(errs, fmt.Sprintf("primary must be old or new, not %q", *req.Primary))
	}
	for _, p := range []struct {
		name string
		v    *int
	}{{"reads", req.Reads}, {"shadow", req.Shadow}} {
		if p.v != nil && (*p.v < 0 || *p.v > 100) {
			errs = append(errs, fmt.Sprintf("%s must be a percentage from 0 to 100, not %d", p.name, *p.v))
		}
	}
	if req.Primary == nil && req.Mirror == nil && req.Reads == nil && req.Shadow == nil {
		errs = append(errs, "nothing to change: set primary, mirror, reads or shadow")
	}
	if len(errs) > 0 {
		return &BadRequestError{Reason: strings.Join(errs, "; ")}
	}
	return nil
}

// Edit applies req to cur.
func (req RouteRequest) Edit(cur route.Settings) route.Settings {
	if req.Primary != nil {
		cur.Primary = route.Store(*req.Primary)
	}
	if req.Mirror != nil {
		cur.Mirror = *req.Mirror
	}
	if req.Reads != nil {
		cur.Reads = *req.Reads
	}
	if req.Shadow != nil {
		cur.Shadow = *req.Shadow
	}
	return cur
}

// Result is what a change did: the state after it and route.Set's report.
type Result struct {
	State  route.State  `json:"state"`
	Report route.Report `json:"report"`
}

// Status reads the state, the replicas, the history tail and the open drift.
func (r *Routing) Status(ctx context.Context) (Status, error) {
	var st Status
	conn, err := r.Connect(ctx)
	if err != nil {
		return st, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if st.State, err = route.Load(ctx, conn); err != nil {
		return st, err
	}
	live := r.options().Live
	if st.Replicas, err = route.ListReplicas(ctx, conn, live); err != nil {
		return st, err
	}
	n := r.History
	if n <= 0 {
		n = 10
	}
	if st.History, err = route.History(ctx, conn, n); err != nil {
		return st, err
	}
	if st.Drift, err = openDrift(ctx, conn, r.stuckAttempts()); err != nil {
		return st, err
	}
	if r.Feed != nil {
		if st.Feed, err = r.Feed(ctx, conn); err != nil {
			return st, fmt.Errorf("reading the change feed's state: %w", err)
		}
	}
	return st, nil
}

func (r *Routing) stuckAttempts() int {
	if r.StuckAttempts > 0 {
		return r.StuckAttempts
	}
	return table.DefaultStuckAttempts
}

// noLedger reports whether err says the drift ledger does not exist.
func noLedger(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "42P01" // undefined_table: no proxy with a new store has run yet
}

// openDrift reads the drift ledger, with the entries stuck at
// stuckAttempts; nil when it does not exist.
func openDrift(ctx context.Context, conn *pgx.Conn, stuckAttempts int) (*Drift, error) {
	m, err := table.OpenDriftByStore(ctx, conn)
	if noLedger(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	d := &Drift{Tables: map[string]int{}, Stale: map[string]int64{}, StuckAttempts: stuckAttempts, StuckEntries: []StuckEntry{}}
	for store, tables := range m {
		for name, n := range tables {
			d.Tables[name.String()] += n
			d.Stale[store] += int64(n)
			d.Open += int64(n)
		}
	}
	if d.StuckEntries, d.Stuck, err = stuckDrift(ctx, conn, stuckAttempts); err != nil {
		return nil, err
	}
	return d, nil
}

// stuckDrift reads the first stuck entries and how many there are.
func stuckDrift(ctx context.Context, conn *pgx.Conn, attempts int) ([]StuckEntry, int64, error) {
	list, total, err := table.StuckDrift(ctx, conn, attempts, stuckShown)
	if err != nil {
		return nil, 0, err
	}
	out := make([]StuckEntry, 0, len(list))
	for _, e := range list {
		out = append(out, StuckEntry{ID: e.ID, Table: e.Table.String(), Key: e.Key, Stale: e.Stale, Reason: e.Reason,
			Attempts: e.Attempts, LastError: e.LastError, FailingSince: e.FailingSince, NextAttempt: e.NextAttempt})
	}
	return out, total, nil
}

// DriftGate is the cutover gate on open drift: a write flip is refused
// while the drift ledger has open entries, since the store becoming
// primary may miss those writes.
func DriftGate(ctx context.Context, conn *pgx.Conn, cur, next route.Settings) error {
	d, err := openDrift(ctx, conn, table.DefaultStuckAttempts)
	if err != nil || d == nil || d.Open == 0 {
		return err
	}
	names := make([]string, 0, len(d.Tables))
	for n := range d.Tables {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b string) int { return d.Tables[b] - d.Tables[a] })
	if len(names) > 3 {
		names = append(names[:3], "...")
	}
	var stale []string
	for _, s := range []route.Store{route.Old, route.New} {
		if n := d.Stale[string(s)]; n > 0 {
			stale = append(stale, fmt.Sprintf("%d to the %s store", n, s))
		}
	}
	return &route.IllegalError{Gate: true, Reason: fmt.Sprintf("drift is open: %d entries on %d tables (%s): the repairer has not yet copied them (%s)",
		d.Open, len(d.Tables), strings.Join(names, ", "), strings.Join(stale, ", "))}
}

// StuckDriftGate is the cutover gate on stuck drift: a write flip is
// refused while an open drift entry has failed to repair at least attempts
// times, naming the first entries with their error. DriftGate refuses
// while any entry is open; this one says which entries will not close by
// themselves, and what to do about them (issue 10).
func StuckDriftGate(attempts int) route.Gate {
	return func(ctx context.Context, conn *pgx.Conn, cur, next route.Settings) error {
		list, total, err := stuckDrift(ctx, conn, attempts)
		if noLedger(err) || (err == nil && total == 0) {
			return nil
		}
		if err != nil {
			return &route.IllegalError{Gate: true, Reason: "stuck drift could not be checked: " + err.Error()}
		}
		shown := make([]string, 0, len(list))
		for i, e := range list {
			if i == 3 {
				shown = append(shown, fmt.Sprintf("and %d more", total-3))
				break
			}
			shown = append(shown, e.String())
		}
		return &route.IllegalError{Gate: true, Reason: fmt.Sprintf(
			"drift is stuck: %d entries failed to repair at least %d times (routing.drift_stuck_attempts): %s; "+
				"fix the cause (the table's mapping, or the row the stale store rejects) and the repairer retries each entry within routing.repair_backoff_max; "+
				"an entry that can never apply (a dropped or temporary table) can be closed with UPDATE tandem.drift SET repaired_at = now() WHERE id = <id>; "+
				"tandem route show lists them",
			total, attempts, strings.Join(shown, "; "))}
	}
}

func (r *Routing) options() route.Options {
	o := r.Options
	o.Gates = append(slices.Clip(o.Gates), DriftGate, StuckDriftGate(r.stuckAttempts()))
	return o
}

// Route applies req: by names who asks, for the history.
func (r *Routing) Route(ctx context.Context, by string, req RouteRequest) (Result, error) {
	if err := req.Check(); err != nil {
		return Result{}, err
	}
	return r.set(ctx, route.Change{Edit: req.Edit, By: by, Reason: req.Reason, Force: req.Force})
}

// Rollback moves to route.Rollback of the current settings: old is primary
// and serves every read. It skips the cutover gates.
func (r *Routing) Rollback(ctx context.Context, by, reason string, force bool) (Result, error) {
	return r.set(ctx, route.Change{Rollback: true, By: by, Reason: reason, Force: force})
}

func (r *Routing) set(ctx context.Context, ch route.Change) (Result, error) {
	conn, err := r.Connect(ctx)
	if err != nil {
		return Result{}, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	st, rep, err := route.Set(ctx, conn, ch, r.options())
	if r.Observe != nil && (rep.ToVersion != rep.FromVersion || rep.Fence > 0) {
		r.Observe(ctx, rep)
	}
	return Result{State: st, Report: rep}, err
}

// routingHandlers serves /api/v1/state, /api/v1/route and /api/v1/rollback.
func routingHandlers(mux *http.ServeMux, rt *Routing) {
	if rt == nil {
		off := func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, http.StatusNotFound, errorBody{"routing is not configured: it needs a new store (new.dsn)"})
		}
		mux.HandleFunc("GET /api/v1/state", off)
		mux.HandleFunc("POST /api/v1/route", off)
		mux.HandleFunc("POST /api/v1/rollback", off)
		return
	}
	mux.HandleFunc("GET /api/v1/state", func(w http.ResponseWriter, r *http.Request) {
		st, err := rt.Status(r.Context())
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("POST /api/v1/route", func(w http.ResponseWriter, r *http.Request) {
		var req RouteRequest
		if err := decode(r, &req, false); err != nil {
			writeError(w, err)
			return
		}
		ctx, cancel := changeContext(r, rt)
		defer cancel()
		res, err := rt.Route(ctx, "admin-api "+r.RemoteAddr, req)
		respond(w, res, err)
	})
	mux.HandleFunc("POST /api/v1/rollback", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Force  bool   `json:"force"`
			Reason string `json:"reason"`
		}
		if err := decode(r, &req, true); err != nil {
			writeError(w, err)
			return
		}
		ctx, cancel := changeContext(r, rt)
		defer cancel()
		res, err := rt.Rollback(ctx, "admin-api "+r.RemoteAddr, req.Reason, req.Force)
		respond(w, res, err)
	})
}

// changeContext is the context of a change requested over HTTP: a client
// that hangs up does not abort a flip half way (route.Set would release
// the fence, but the operator would not learn the outcome); it is bounded
// by the flip's own timeouts instead.
func changeContext(r *http.Request, rt *Routing) (context.Context, context.CancelFunc) {
	o := rt.Options
	budget := o.FenceTimeout + o.AckTimeout + o.FenceLease + time.Minute
	if o.Feed != nil {
		budget += o.Feed.Timeout
	}
	return context.WithTimeout(context.WithoutCancel(r.Context()), budget)
}

// decode reads a JSON body of at most 64 KiB, refusing unknown fields.
func decode(r *http.Request, v any, emptyOK bool) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<10+1))
	if err != nil {
		return &BadRequestError{Reason: "reading the body: " + err.Error()}
	}
	if len(body) > 64<<10 {
		return &BadRequestError{Reason: "the body is larger than 64 KiB"}
	}
	if len(strings.TrimSpace(string(body))) == 0 && emptyOK {
		return nil
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &BadRequestError{Reason: "invalid JSON body: " + err.Error()}
	}
	if dec.More() {
		return &BadRequestError{Reason: "invalid JSON body: more than one value"}
	}
	return nil
}

type errorBody struct {
	Error string `json:"error"`
}

// respond writes a change's result: 200 with the state and report, or the
// error's status.
func respond(w http.ResponseWriter, res Result, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// writeError maps err to a status: 400 for a malformed request, 409 for a
// refusal (illegal transition, cutover gate, a concurrent change or flip),
// 503 when a write fence did not drain or the change feed did not catch
// up, else 500.
func writeError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	var bad *BadRequestError
	var fe *route.FenceError
	var feed *route.FeedError
	var ie *route.IllegalError
	switch {
	case errors.As(err, &bad):
		status = http.StatusBadRequest
	case errors.As(err, &ie):
		status = http.StatusConflict
		err = errors.New(ie.Reason)
	case errors.Is(err, route.ErrConcurrentChange):
		status = http.StatusConflict
	case errors.As(err, &fe), errors.As(err, &feed):
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, errorBody{err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = jsonout.Write(w, v)
}
