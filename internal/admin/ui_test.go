package admin

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestStatusCollectedOnce: concurrent GET /api/v1/status requests share one
// collection, and later ones within a second reuse it (each collection
// reads both stores); a routing request through the API forgets it, so the
// next status shows the change; after a second it is collected again.
func TestStatusCollectedOnce(t *testing.T) {
	var calls atomic.Int32
	release := make(chan struct{})
	status := func(ctx context.Context) (any, error) {
		n := calls.Add(1)
		if n == 1 {
			<-release // hold the first collection while the others arrive
		}
		return map[string]int32{"collection": n}, nil
	}
	srv := httptest.NewServer(NewHandler(Options{Status: status}))
	defer srv.Close()
	api := apiClient{t, srv.URL}
	collection := func(body string) int32 {
		var v struct{ Collection int32 }
		if err := json.Unmarshal([]byte(body), &v); err != nil {
			t.Fatalf("%q: %v", body, err)
		}
		return v.Collection
	}

	var wg sync.WaitGroup
	bodies := make([]string, apiConcurrency)
	for i := range bodies {
		wg.Go(func() {
			code, body := api.do("GET", "/api/v1/status", "")
			if code != 200 {
				t.Errorf("status: %d %s", code, body)
			}
			bodies[i] = body
		})
	}
	for calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // the others wait on the first collection
	close(release)
	wg.Wait()
	for _, b := range bodies {
		if collection(b) != 1 {
			t.Fatalf("concurrent requests got %q; want the one collection", bodies)
		}
	}
	if _, body := api.do("GET", "/api/v1/status", ""); collection(body) != 1 || calls.Load() != 1 {
		t.Fatalf("within a second: %s after %d collections", body, calls.Load())
	}
	// A routing request (refused here: no new store) forgets the status.
	api.do("POST", "/api/v1/route", `{"reads":10}`)
	if _, body := api.do("GET", "/api/v1/status", ""); collection(body) != 2 {
		t.Fatalf("after a routing request: %s", body)
	}
	time.Sleep(1100 * time.Millisecond)
	if _, body := api.do("GET", "/api/v1/status", ""); collection(body) != 3 {
		t.Fatalf("after a second: %s", body)
	}
}
