package admin

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/tandemdb/tandem/internal/jsonout"
)

// HistorySample is one point of the status page's charts: what this
// process's /metrics said at At, as a rate over the interval before it
// where the metric is a counter.
type HistorySample struct {
	At        time.Time `json:"at"`
	DriftOpen float64   `json:"drift_open"` // tandem_drift_open
	// MirrorLatencyMS is the mean time the secondary took to apply a
	// mirrored statement over the interval (0 when none was mirrored).
	MirrorLatencyMS  float64 `json:"mirror_latency_ms"`
	Mirrored         float64 `json:"mirrored"`          // mirrored statements in the interval
	ShadowCompared   float64 `json:"shadow_compared"`   // shadow reads compared in the interval (matched + mismatched)
	ShadowMismatched float64 `json:"shadow_mismatched"` // of which mismatched
	FeedLagSeconds   float64 `json:"feed_lag_seconds"`  // tandem_feed_lag_seconds, the largest over the stores
}

// HistoryDoc is GET /api/v1/history.
type HistoryDoc struct {
	Interval jsonout.Duration `json:"interval"` // between samples
	Span     jsonout.Duration `json:"span"`     // how far back the samples reach at most
	Samples  []HistorySample  `json:"samples"`  // oldest first
}

// History keeps this process's recent samples for the status page, so that
// the page's charts show the last hour as soon as it opens, not only what
// happened while it was open. Its methods are safe for concurrent use.
type History struct {
	// Interval is the time between samples (default 10s); Span how much
	// history is kept (default an hour).
	Interval, Span time.Duration
	// Read returns the metric sums as metrics.Prometheus.Sums does.
	Read func() (map[string]float64, error)

	mu      sync.Mutex
	samples []HistorySample
	prev    map[string]float64
}

func (h *History) interval() time.Duration {
	if h.Interval <= 0 {
		return 10 * time.Second
	}
	return h.Interval
}

func (h *History) span() time.Duration {
	if h.Span <= 0 {
		return time.Hour
	}
	return h.Span
}

// Run samples now and every Interval until ctx ends.
func (h *History) Run(ctx context.Context) {
	t := time.NewTicker(h.interval())
	defer t.Stop()
	for {
		h.sample(time.Now())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (h *History) sample(now time.Time) {
	cur, err := h.Read()
	if err != nil {
		return // the gap shows on the chart
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	s := HistorySample{At: now.UTC(), DriftOpen: cur["tandem_drift_open"]}
	for k, v := range cur {
		if strings.HasPrefix(k, "tandem_feed_lag_seconds{") && v > s.FeedLagSeconds {
			s.FeedLagSeconds = v
		}
	}
	if s.FeedLagSeconds == 0 {
		s.FeedLagSeconds = cur["tandem_feed_lag_seconds"]
	}
	if p := h.prev; p != nil {
		delta := func(k string) float64 { return max(0, cur[k]-p[k]) }
		s.Mirrored = delta("tandem_mirror_duration_seconds_count")
		if s.Mirrored > 0 {
			s.MirrorLatencyMS = 1000 * delta("tandem_mirror_duration_seconds_sum") / s.Mirrored
		}
		s.ShadowMismatched = delta("tandem_shadow_reads_total{tandem_outcome=mismatched}")
		s.ShadowCompared = delta("tandem_shadow_reads_total{tandem_outcome=matched}") + s.ShadowMismatched
	}
	h.prev = cur
	h.samples = append(h.samples, s)
	keep := int(h.span()/h.interval()) + 1
	if n := len(h.samples) - keep; n > 0 {
		h.samples = append(h.samples[:0:0], h.samples[n:]...)
	}
}

// Doc returns the samples kept.
func (h *History) Doc() HistoryDoc {
	h.mu.Lock()
	defer h.mu.Unlock()
	return HistoryDoc{Interval: jsonout.Duration(h.interval()), Span: jsonout.Duration(h.span()), Samples: append([]HistorySample{}, h.samples...)}
}

// historyHandler serves GET /api/v1/history when h is set.
func historyHandler(mux *http.ServeMux, h *History) {
	if h == nil {
		return
	}
	mux.HandleFunc("GET /api/v1/history", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, h.Doc())
	})
}
