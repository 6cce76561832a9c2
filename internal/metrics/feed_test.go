package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestFeedExported: the change feed's instruments reach the Prometheus
// scrape under the names the docs give, with their table and kind labels.
func TestFeedExported(t *testing.T) {
	p, err := NewPrometheus()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Shutdown(t.Context()) //nolint:errcheck // test
	f, err := NewFeed(p.Provider.Meter("test"))
	if err != nil {
		t.Fatal(err)
	}
	f.Leader(true)
	f.Lag(1234, 0.5)
	f.Retained(4096)
	f.Checked("public.items", 3)
	f.Differences("public.items", "MissingOnNew", 2)
	var nilFeed *Feed
	nilFeed.Leader(true) // records nothing, does not panic
	rec := httptest.NewRecorder()
	p.Handler.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	for _, want := range []string{
		`tandem_feed_leader{`,
		`tandem_feed_lag_bytes{`,
		`tandem_feed_lag_seconds{`,
		`tandem_feed_retained_bytes{`,
		`tandem_feed_checked_total{`,
		`tandem_feed_differences_total{`,
		`tandem_feed_difference="MissingOnNew"`,
		`tandem_table="public.items"`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	if t.Failed() {
		t.Log(string(body))
	}
}
