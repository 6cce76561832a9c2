package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestMirroredExported: mirrored writes are counted by mode and result with
// the attribute sets Mirrored builds once per pair, and applied ones timed.
func TestMirroredExported(t *testing.T) {
	p, err := NewPrometheus()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Shutdown(t.Context()) //nolint:errcheck // test
	r, err := newRouting(p.Provider.Meter("test"))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		r.Mirrored(t.Context(), "row_image", MirrorApplied, time.Millisecond)
	}
	r.Mirrored(t.Context(), "statement", "failed", time.Millisecond)
	rec := httptest.NewRecorder()
	p.Handler.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	var applied, failed bool
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, "tandem_mirror_writes_total{") {
			continue
		}
		switch {
		case strings.Contains(line, `tandem_mirror_mode="row_image"`) && strings.Contains(line, `tandem_mirror_result="`+MirrorApplied+`"`):
			applied = strings.HasSuffix(line, " 3")
		case strings.Contains(line, `tandem_mirror_mode="statement"`) && strings.Contains(line, `tandem_mirror_result="failed"`):
			failed = strings.HasSuffix(line, " 1")
		}
	}
	if !applied || !failed || !strings.Contains(string(body), "tandem_mirror_duration") {
		t.Fatalf("scrape lacks the mirrored counts (applied %v, failed %v):\n%s", applied, failed, body)
	}
}
