package admin

import (
	"context"
	"net/http"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/backfill"
)

// Backfill serves the backfill's status and its live throttle from the
// control database: GET /api/v1/backfill and POST /api/v1/backfill. The
// throttle is the control row every running `tandem backfill` process
// polls (backfill.SetControl), so a change reaches them all within about a
// second.
type Backfill struct {
	// Connect opens a connection to the control database; each request
	// uses its own and closes it.
	Connect func(ctx context.Context) (*pgx.Conn, error)
}

// BackfillRequest is the body of POST /api/v1/backfill: nil fields keep
// their value.
type BackfillRequest struct {
	Rate   *float64 `json:"rate,omitempty"` // rows per second, >= 0; 0 = unlimited
	Paused *bool    `json:"paused,omitempty"`
}

// Status reads the backfill's status (backfill.Status).
func (b *Backfill) Status(ctx context.Context) (backfill.State, error) {
	conn, err := b.Connect(ctx)
	if err != nil {
		return backfill.State{}, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return backfill.Status(ctx, conn)
}

// Set changes the live throttle and returns the status after the change;
// a malformed request is a *BadRequestError.
func (b *Backfill) Set(ctx context.Context, by string, req BackfillRequest) (backfill.State, error) {
	ch := backfill.ControlChange{Rate: req.Rate, Paused: req.Paused, By: by}
	if err := ch.Check(); err != nil {
		return backfill.State{}, &BadRequestError{Reason: err.Error()}
	}
	conn, err := b.Connect(ctx)
	if err != nil {
		return backfill.State{}, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := backfill.SetControl(ctx, conn, ch); err != nil {
		return backfill.State{}, err
	}
	return backfill.Status(ctx, conn)
}

// backfillHandlers serves /api/v1/backfill; without a control plane (no
// new store) it answers 404.
func backfillHandlers(mux *http.ServeMux, b *Backfill) {
	if b == nil {
		off := func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, http.StatusNotFound, errorBody{"the backfill is not configured: it needs a new store (new.dsn)"})
		}
		mux.HandleFunc("GET /api/v1/backfill", off)
		mux.HandleFunc("POST /api/v1/backfill", off)
		return
	}
	mux.HandleFunc("GET /api/v1/backfill", func(w http.ResponseWriter, r *http.Request) {
		st, err := b.Status(r.Context())
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("POST /api/v1/backfill", func(w http.ResponseWriter, r *http.Request) {
		var req BackfillRequest
		if err := decode(r, &req, false); err != nil {
			writeError(w, err)
			return
		}
		st, err := b.Set(r.Context(), "admin-api "+r.RemoteAddr, req)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
}
