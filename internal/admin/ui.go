package admin

import (
	"context"
	_ "embed"
	"net/http"
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
// prints) when status is set.
func statusHandler(mux *http.ServeMux, status func(ctx context.Context) (any, error)) {
	if status == nil {
		return
	}
	mux.HandleFunc("GET /api/v1/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := status(r.Context())
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
}
