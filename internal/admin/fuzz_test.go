package admin

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/internal/control"
)

// FuzzAdminJSON posts arbitrary bodies to every admin endpoint that reads
// JSON, through the whole handler (token, type and Host checks included),
// with a control database that cannot be reached. The handler never panics;
// it answers with a JSON object; 400 exactly when the body is not one JSON
// value of the endpoint's shape with valid fields (so a valid request is
// never refused as malformed and a malformed one never reaches the store);
// and the token never appears in an answer.
func FuzzAdminJSON(f *testing.F) {
	for _, s := range []string{
		`{"mirror": true}`, `{"primary": "new", "reason": "go"}`, `{"reads": 50, "shadow": 100}`, `{"reads": 101}`,
		`{"primary": "sideways"}`, `{}`, ``, `{"force": true, "reason": "x"}`, `{"rate": 100}`, `{"paused": true}`,
		`{"rate": -1}`, `{"rate": 1e400}`, `{"mirror": true}{"mirror": false}`, `{"mirror": "yes"}`, `{"unknown": 1}`,
		`[1,2]`, `null`, `"str"`, `{"mirror": true, "mirror": false}`, "{\"reason\": \"\xff\"}", strings.Repeat(`{"a":`, 1000),
		`{"reads": 9223372036854775808}`, `{"reason": "` + strings.Repeat("x", 70000) + `"}`,
	} {
		for _, path := range []string{"/api/v1/route", "/api/v1/rollback", "/api/v1/backfill"} {
			f.Add(path, s)
		}
	}
	down := errors.New("the control database is down")
	connect := func(context.Context) (*pgx.Conn, error) { return nil, down }
	h := NewHandler(Options{
		Routing:  &control.Routing{Connect: connect},
		Backfill: &control.Backfill{Connect: connect},
		Security: Security{Token: testToken},
	})
	f.Fuzz(func(t *testing.T, path, body string) {
		switch path {
		case "/api/v1/route", "/api/v1/rollback", "/api/v1/backfill":
		default:
			return
		}
		req := httptest.NewRequest(http.MethodPost, "http://127.0.0.1:9187"+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+testToken)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var answer map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &answer); err != nil {
			t.Fatalf("%s %q: answer %d is not a JSON object: %q", path, body, rec.Code, rec.Body.String())
		}
		if strings.Contains(rec.Body.String(), testToken) {
			t.Fatalf("the token is in the answer: %s", rec.Body.String())
		}
		valid := wellFormed(path, body)
		switch {
		case rec.Code == http.StatusBadRequest && valid:
			t.Fatalf("%s %q: a well-formed request refused as malformed: %s", path, body, rec.Body.String())
		case rec.Code != http.StatusBadRequest && !valid:
			t.Fatalf("%s %q: a malformed request got %d: %s", path, body, rec.Code, rec.Body.String())
		case rec.Code != http.StatusBadRequest && rec.Code != http.StatusInternalServerError:
			t.Fatalf("%s %q: %d with the store down: %s", path, body, rec.Code, rec.Body.String())
		}
	})
}

// wellFormed decides independently of the handler whether body is a
// request the endpoint at path accepts: at most 64 KiB, exactly one JSON
// value of its shape without unknown fields, and valid field values.
func wellFormed(path, body string) bool {
	if len(body) > 64<<10 {
		return false
	}
	if path == "/api/v1/rollback" && strings.TrimSpace(body) == "" {
		return true
	}
	dec := json.NewDecoder(strings.NewReader(body))
	dec.DisallowUnknownFields()
	switch path {
	case "/api/v1/route":
		var r control.RouteRequest
		if dec.Decode(&r) != nil || dec.More() {
			return false
		}
		return r.Check() == nil
	case "/api/v1/rollback":
		var r struct {
			Force  bool   `json:"force"`
			Reason string `json:"reason"`
		}
		return dec.Decode(&r) == nil && !dec.More()
	default:
		var r control.BackfillRequest
		if dec.Decode(&r) != nil || dec.More() {
			return false
		}
		return backfill.ControlChange{Rate: r.Rate, Paused: r.Paused}.Check() == nil
	}
}
