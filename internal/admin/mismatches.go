package admin

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/mismatch"
)

// Mismatches serves GET /api/v1/mismatches from the control schema.
type Mismatches struct {
	// Connect opens a connection to the control database.
	Connect func(ctx context.Context) (*pgx.Conn, error)
	// Window is the default window of the outcome counters (the gate's).
	Window time.Duration
}

// MismatchReport is the answer of GET /api/v1/mismatches: the outcome
// counters over the window (per fingerprint) and the stored mismatches
// grouped by fingerprint.
type MismatchReport struct {
	Rate   mismatch.Rate    `json:"rate"`
	Groups []mismatch.Group `json:"groups"`
}

// Report reads the counters over window and the mismatches since since.
func (m *Mismatches) Report(ctx context.Context, window time.Duration, o mismatch.ListOptions) (MismatchReport, error) {
	conn, err := m.Connect(ctx)
	if err != nil {
		return MismatchReport{}, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rate, err := mismatch.WindowRate(ctx, conn, window)
	if err != nil {
		return MismatchReport{}, err
	}
	groups, err := mismatch.List(ctx, conn, o)
	if err != nil {
		return MismatchReport{}, err
	}
	return MismatchReport{Rate: rate, Groups: groups}, nil
}

func mismatchHandlers(mux *http.ServeMux, m *Mismatches) {
	mux.HandleFunc("GET /api/v1/mismatches", func(w http.ResponseWriter, r *http.Request) {
		if m == nil {
			writeJSON(w, http.StatusNotFound, errorBody{"shadow reads are not configured: they need a new store (new.dsn)"})
			return
		}
		q := r.URL.Query()
		window := m.Window
		if v := q.Get("window"); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				writeError(w, &control.BadRequestError{Reason: "window must be a positive duration such as 15m, not " + strconv.Quote(v)})
				return
			}
			window = d
		}
		o := mismatch.ListOptions{Fingerprint: q.Get("fingerprint")}
		if v := q.Get("since"); v != "" {
			t, err := time.Parse(time.RFC3339, v)
			if err != nil {
				writeError(w, &control.BadRequestError{Reason: "since must be an RFC 3339 time such as 2026-11-21T10:00:00Z, not " + strconv.Quote(v)})
				return
			}
			o.Since = t
		}
		if v := q.Get("samples"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 100 {
				writeError(w, &control.BadRequestError{Reason: "samples must be 1..100, not " + strconv.Quote(v)})
				return
			}
			o.Samples = n
		}
		rep, err := m.Report(r.Context(), window, o)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, rep)
	})
}
