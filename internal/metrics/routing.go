package metrics

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Attribute keys of the routing instruments.
const (
	KeyMode   = attribute.Key("tandem.mirror.mode")   // row_image or statement
	KeyResult = attribute.Key("tandem.mirror.result") // applied, failed, skipped
	KeyReason = attribute.Key("tandem.reason")
	// KeyFingerprint is a statement's pg_query fingerprint (semconv has no
	// attribute for it; db.query.summary is a different thing).
	KeyFingerprint = attribute.Key("tandem.statement.fingerprint")
	KeyRole        = attribute.Key("tandem.shadow.role") // served or shadow
)

// Shadow-read outcomes.
const (
	ShadowMatched    = "matched"
	ShadowMismatched = "mismatched"
	ShadowTransient  = "transient"
	ShadowDropped    = "dropped"
	ShadowSkipped    = "skipped"
)

// Mirror modes and results.
const (
	ModeRowImage  = "row_image"
	ModeStatement = "statement"

	MirrorApplied = "applied" // applied on the secondary
	MirrorFailed  = "failed"  // the secondary failed or ran out of budget: keys recorded as drift
	MirrorSkipped = "skipped" // the breaker was open: keys recorded as drift
)

// Routing holds the routing and mirroring instruments. A nil *Routing
// records nothing.
type Routing struct {
	mirrored    metric.Int64Counter
	mirrorDur   metric.Float64Histogram
	fallbacks   metric.Int64Counter
	drift       metric.Int64Counter
	shifted     metric.Int64Counter
	fenceDur    metric.Float64Histogram
	fenceWaits  metric.Int64Counter
	shadowReads metric.Int64Counter
	shadowDur   metric.Float64Histogram
	version     atomic.Int64
	breaker     atomic.Int64 // 0 closed, 1 half-open, 2 open
	driftOpen   atomic.Int64
	driftOpenOK atomic.Bool
	driftStuck  atomic.Int64 // -1 unknown
	// mirrorOpts holds Mirrored's attribute options by mode and result,
	// built once: a new attribute set per mirrored write cost about 2.5%
	// of the proxy's CPU in dual-write (issue 15).
	mirrorOpts sync.Map // mirrorKey -> *mirrorOpt
}

type mirrorKey struct{ mode, result string }

type mirrorOpt struct {
	add    []metric.AddOption
	record []metric.RecordOption
}

func newRouting(meter metric.Meter) (*Routing, error) {
	r := &Routing{}
	r.driftStuck.Store(-1)
	var err error
	if r.mirrored, err = meter.Int64Counter("tandem.mirror.writes",
		metric.WithDescription("Writes mirrored to the secondary store, by mode (row_image, statement) and result (applied, failed, skipped)."),
		metric.WithUnit("{statement}")); err != nil {
		return nil, err
	}
	if r.mirrorDur, err = meter.Float64Histogram("tandem.mirror.duration",
		metric.WithDescription("Time the secondary store took to apply one mirrored statement (row images or statement), inside the client's request."),
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(latencyBuckets...)); err != nil {
		return nil, err
	}
	if r.fallbacks, err = meter.Int64Counter("tandem.mirror.statement_fallbacks",
		metric.WithDescription("Writes mirrored as statement text instead of row images, by reason (no_key, not_rewritable, ddl, unknown)."),
		metric.WithUnit("{statement}")); err != nil {
		return nil, err
	}
	if r.drift, err = meter.Int64Counter("tandem.drift.recorded",
		metric.WithDescription("Drift ledger entries written because a mirrored write was skipped or failed (keys, or whole tables)."),
		metric.WithUnit("{entry}")); err != nil {
		return nil, err
	}
	if r.shifted, err = meter.Int64Counter("tandem.reads",
		metric.WithDescription("Eligible reads by the store that served them and outcome (served, retried_on_primary)."),
		metric.WithUnit("{statement}")); err != nil {
		return nil, err
	}
	if r.fenceDur, err = meter.Float64Histogram("tandem.fence.duration",
		metric.WithDescription("How long write flips held the write fence, measured by the process that ran the flip."),
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(latencyBuckets...)); err != nil {
		return nil, err
	}
	if r.fenceWaits, err = meter.Int64Counter("tandem.fence.waits",
		metric.WithDescription("Write units that waited at a raised write fence."), metric.WithUnit("{unit}")); err != nil {
		return nil, err
	}
	if r.shadowReads, err = meter.Int64Counter("tandem.shadow.reads",
		metric.WithDescription("Shadow-read samples by outcome (matched, mismatched, transient, dropped, skipped), statement fingerprint and, when skipped, reason."),
		metric.WithUnit("{statement}")); err != nil {
		return nil, err
	}
	if r.shadowDur, err = meter.Float64Histogram("tandem.shadow.duration",
		metric.WithDescription("Latency of compared reads, side by side: the served read (role served) and its shadow run (role shadow), by store."),
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(latencyBuckets...)); err != nil {
		return nil, err
	}
	version, err := meter.Int64ObservableGauge("tandem.state.version",
		metric.WithDescription("Routing state version this replica applies."), metric.WithUnit("{version}"))
	if err != nil {
		return nil, err
	}
	breaker, err := meter.Int64ObservableGauge("tandem.breaker.state",
		metric.WithDescription("Circuit breaker on the secondary store: 0 closed, 1 half-open, 2 open."), metric.WithUnit("{state}"))
	if err != nil {
		return nil, err
	}
	driftOpen, err := meter.Int64ObservableGauge("tandem.drift.open",
		metric.WithDescription("Open drift ledger entries (keys or whole tables not yet repaired), as last read from the control schema."),
		metric.WithUnit("{entry}"))
	if err != nil {
		return nil, err
	}
	driftStuck, err := meter.Int64ObservableGauge("tandem.drift.stuck",
		metric.WithDescription("Open drift ledger entries the repairer has failed on at least routing.drift_stuck_attempts times; while any exist a write flip is refused. See tandem route show."),
		metric.WithUnit("{entry}"))
	if err != nil {
		return nil, err
	}
	_, err = meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveInt64(version, r.version.Load())
		o.ObserveInt64(breaker, r.breaker.Load())
		if r.driftOpenOK.Load() {
			o.ObserveInt64(driftOpen, r.driftOpen.Load())
		}
		if n := r.driftStuck.Load(); n >= 0 {
			o.ObserveInt64(driftStuck, n)
		}
		return nil
	}, version, breaker, driftOpen, driftStuck)
	return r, err
}

// Mirrored records one mirrored write.
func (r *Routing) Mirrored(ctx context.Context, mode, result string, d time.Duration) {
	if r == nil {
		return
	}
	k := mirrorKey{mode, result}
	v, ok := r.mirrorOpts.Load(k)
	if !ok {
		v, _ = r.mirrorOpts.LoadOrStore(k, &mirrorOpt{
			add:    []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(KeyMode.String(mode), KeyResult.String(result)))},
			record: []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(KeyMode.String(mode)))},
		})
	}
	o := v.(*mirrorOpt)
	r.mirrored.Add(ctx, 1, o.add...)
	if result == MirrorApplied {
		r.mirrorDur.Record(ctx, d.Seconds(), o.record...)
	}
}

// Fallback counts a write mirrored as statement text, with why.
func (r *Routing) Fallback(ctx context.Context, reason string) {
	if r != nil {
		r.fallbacks.Add(ctx, 1, metric.WithAttributes(KeyReason.String(reason)))
	}
}

// Drift counts n drift ledger entries written.
func (r *Routing) Drift(ctx context.Context, n int) {
	if r != nil {
		r.drift.Add(ctx, int64(n))
	}
}

// Read counts one eligible read served by store with outcome.
func (r *Routing) Read(ctx context.Context, store, outcome string) {
	if r != nil {
		r.shifted.Add(ctx, 1, metric.WithAttributes(KeyStore.String(store), KeyOutcome.String(outcome)))
	}
}

// Shadow counts one shadow-read sample's outcome; reason is set for
// skipped samples only.
func (r *Routing) Shadow(ctx context.Context, fingerprint, outcome, reason string) {
	if r == nil {
		return
	}
	attrs := []attribute.KeyValue{KeyOutcome.String(outcome), KeyFingerprint.String(fingerprint)}
	if reason != "" {
		attrs = append(attrs, KeyReason.String(reason))
	}
	r.shadowReads.Add(ctx, 1, metric.WithAttributes(attrs...))
}

// ShadowLatency records one side of a compared read.
func (r *Routing) ShadowLatency(ctx context.Context, store, role string, d time.Duration) {
	if r != nil {
		r.shadowDur.Record(ctx, d.Seconds(), metric.WithAttributes(KeyStore.String(store), KeyRole.String(role)))
	}
}

// Fence records a write flip's fence hold time.
func (r *Routing) Fence(ctx context.Context, d time.Duration) {
	if r != nil {
		r.fenceDur.Record(ctx, d.Seconds())
	}
}

// FenceWait counts one unit held at the fence.
func (r *Routing) FenceWait(ctx context.Context) {
	if r != nil {
		r.fenceWaits.Add(ctx, 1)
	}
}

// StateVersion records the routing version applied.
func (r *Routing) StateVersion(v int64) {
	if r != nil {
		r.version.Store(v)
	}
}

// Breaker records the breaker state: "closed", "half-open" or "open".
func (r *Routing) Breaker(state string) {
	if r == nil {
		return
	}
	v := int64(0)
	switch state {
	case "half-open":
		v = 1
	case "open":
		v = 2
	}
	r.breaker.Store(v)
}

// DriftStuck records the stuck drift entries last read from the ledger.
func (r *Routing) DriftStuck(n int64) {
	if r != nil {
		r.driftStuck.Store(n)
	}
}

// DriftOpen records the open drift entries last read from the ledger.
func (r *Routing) DriftOpen(n int64) {
	if r != nil {
		r.driftOpen.Store(n)
		r.driftOpenOK.Store(true)
	}
}
