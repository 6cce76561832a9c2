package admin

import (
	"context"
	_ "embed"
	"net/http"
	"time"
)

// statusPage is the migration status page served at GET /: one HTML file,
// its script and styles inline, no external assets (the admin server may
// have no route to the internet). It polls /api/v1/status and /metrics and
// posts routing changes to /api/v1/route and /api/v1/rollback with the
// admin token the operator types in.
//
//go:embed ui/index.html
var statusPage []byte

// uiPage serves the status page at GET /.
func uiPage(mux *http.ServeMux) {
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write(statusPage)
	})
}

// statusHandler serves GET /api/v1/status (what `tandem status --json`
// prints) when status is set. Collecting it reads both stores (mappings,
// the backfill and verify gates), so one collection serves every request
// within a second: the status page of every open browser polls it. A
// routing change through the API forgets it (see NewHandler).
func statusHandler(mux *http.ServeMux, status func(ctx context.Context) (any, error)) *coalesced[statusResult] {
	if status == nil {
		return nil
	}
	shared := &coalesced[statusResult]{maxAge: time.Second, timeout: 30 * time.Second, fn: func(ctx context.Context) statusResult {
		v, err := status(ctx)
		return statusResult{v, err}
	}}
	mux.HandleFunc("GET /api/v1/status", func(w http.ResponseWriter, r *http.Request) {
		res := shared.get(r.Context())
		if res.err != nil {
			writeError(w, res.err)
			return
		}
		writeJSON(w, http.StatusOK, res.v)
	})
	return shared
}

// statusResult is one collection of the migration status.
type statusResult struct {
	v   any
	err error
}
