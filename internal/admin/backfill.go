package admin

import (
	"net/http"

	"github.com/tandemdb/tandem/internal/control"
)

// backfillHandlers serves /api/v1/backfill; without a control plane (no
// new store) it answers 404.
func backfillHandlers(mux *http.ServeMux, b *control.Backfill) {
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
		var req control.BackfillRequest
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
