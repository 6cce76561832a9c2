package admin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/route"
)

// routingHandlers serves /api/v1/state, /api/v1/route and /api/v1/rollback.
func routingHandlers(mux *http.ServeMux, rt *control.Routing) {
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
		var req control.RouteRequest
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
func changeContext(r *http.Request, rt *control.Routing) (context.Context, context.CancelFunc) {
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
		return &control.BadRequestError{Reason: "reading the body: " + err.Error()}
	}
	if len(body) > 64<<10 {
		return &control.BadRequestError{Reason: "the body is larger than 64 KiB"}
	}
	if len(strings.TrimSpace(string(body))) == 0 && emptyOK {
		return nil
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &control.BadRequestError{Reason: "invalid JSON body: " + err.Error()}
	}
	if dec.More() {
		return &control.BadRequestError{Reason: "invalid JSON body: more than one value"}
	}
	return nil
}

type errorBody struct {
	Error string `json:"error"`
}

// respond writes a change's result: 200 with the state and report, or the
// error's status.
func respond(w http.ResponseWriter, res control.Result, err error) {
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
	var bad *control.BadRequestError
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
