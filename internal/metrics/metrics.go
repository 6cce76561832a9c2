// Package metrics defines Tandem's OpenTelemetry instruments and exports them
// in the Prometheus text format. Instruments are created once, from a meter
// passed in; nothing here is a package global.
package metrics

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/exemplar"
	"go.opentelemetry.io/otel/sdk/resource"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
)

// Attribute keys that are Tandem's own; the db.* ones come from semconv.
const (
	KeyStore     = attribute.Key("tandem.store")
	KeyKind      = attribute.Key("tandem.statement.kind")
	KeyDirection = attribute.Key("tandem.direction")
	KeyOutcome   = attribute.Key("tandem.outcome")
	KeyOrigin    = attribute.Key("tandem.error.origin")
	KeyEngine    = attribute.Key("tandem.relay.engine")
)

// Statement kinds, the same words the router uses.
const (
	KindRead        = "read"
	KindWrite       = "write"
	KindDDL         = "ddl"
	KindTransaction = "transaction"
	KindSession     = "session"
	KindUnknown     = "unknown"
)

// Proxy holds the instruments the proxy records into. It is safe for
// concurrent use; a nil *Proxy records nothing.
//
// The per-batch counters (statements, bytes) are plain atomics that the
// meter reads when it is collected, so the relay's hot path never looks up
// an attribute set.
type Proxy struct {
	sessions    metric.Int64UpDownCounter
	connections metric.Int64Counter
	duration    metric.Float64Histogram
	errors      metric.Int64Counter
	relayed     metric.Int64Counter

	// Routing holds the routing and mirroring instruments.
	Routing *Routing

	counts [numStores]storeCounts

	mu     sync.RWMutex
	errOpt map[errKey][]metric.AddOption
	durOpt map[string][]metric.RecordOption
}

// Stores, by index.
const (
	storeOld = iota
	storeNew
	numStores
)

var storeNames = [numStores]string{"old", "new"}

func storeIndex(store string) int {
	if store == "new" {
		return storeNew
	}
	return storeOld
}

type storeCounts struct {
	bytes [2]atomic.Int64 // by direction: 0 client_to_store, 1 store_to_client
	stmts [len(verbs)]atomic.Int64
}

type errKey struct{ store, code, origin string }

// LatencyBuckets are the histogram bounds, in seconds: fine below 10 ms,
// where a proxy's overhead shows.
var latencyBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// NewProxy creates the proxy's instruments on meter.
func NewProxy(meter metric.Meter) (*Proxy, error) {
	p := &Proxy{
		errOpt: map[errKey][]metric.AddOption{},
		durOpt: map[string][]metric.RecordOption{},
	}
	var err error
	if p.sessions, err = meter.Int64UpDownCounter("tandem.client.sessions",
		metric.WithDescription("Client sessions currently open through the proxy."), metric.WithUnit("{session}")); err != nil {
		return nil, err
	}
	if p.connections, err = meter.Int64Counter("tandem.client.connections",
		metric.WithDescription("Client connections by outcome: accepted, too_many, auth_failed, protocol_error, upstream_failed, tls_required, cancel."),
		metric.WithUnit("{connection}")); err != nil {
		return nil, err
	}
	if p.relayed, err = meter.Int64Counter("tandem.relay.sessions",
		metric.WithDescription("Client sessions by the relay engine that carried them: epoll, or goroutines (TLS sessions, and relay.engine=goroutines)."),
		metric.WithUnit("{session}")); err != nil {
		return nil, err
	}
	statements, err := meter.Int64ObservableCounter("tandem.statements",
		metric.WithDescription("Statements completed, by store, kind (read, write, ddl, transaction, session, unknown) and command tag."),
		metric.WithUnit("{statement}"))
	if err != nil {
		return nil, err
	}
	if p.duration, err = meter.Float64Histogram("db.client.operation.duration",
		metric.WithDescription("Round-trip time of a client request on a store, from its first message to ReadyForQuery."),
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(latencyBuckets...)); err != nil {
		return nil, err
	}
	bytes, err := meter.Int64ObservableCounter("tandem.bytes",
		metric.WithDescription("Protocol bytes relayed, by store and direction (client_to_store, store_to_client)."),
		metric.WithUnit("By"))
	if err != nil {
		return nil, err
	}
	if p.errors, err = meter.Int64Counter("tandem.errors",
		metric.WithDescription("ErrorResponses sent to clients, by SQLSTATE and origin (store: relayed from a store; proxy: Tandem's own)."),
		metric.WithUnit("{error}")); err != nil {
		return nil, err
	}
	stmtAttrs := make([][len(verbs)]metric.ObserveOption, numStores)
	byteAttrs := make([][2]metric.ObserveOption, numStores)
	for si, store := range storeNames {
		for vi, op := range verbs {
			stmtAttrs[si][vi] = metric.WithAttributeSet(attribute.NewSet(KeyStore.String(store),
				KeyKind.String(KindOfCommand(op)), semconv.DBOperationName(op), semconv.DBSystemNamePostgreSQL))
		}
		for di, dir := range []string{ClientToStore, StoreToClient} {
			byteAttrs[si][di] = metric.WithAttributeSet(attribute.NewSet(KeyStore.String(store), KeyDirection.String(dir)))
		}
	}
	_, err = meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		for si := range p.counts {
			c := &p.counts[si]
			for vi := range c.stmts {
				if n := c.stmts[vi].Load(); n > 0 {
					o.ObserveInt64(statements, n, stmtAttrs[si][vi])
				}
			}
			for di := range c.bytes {
				if n := c.bytes[di].Load(); n > 0 {
					o.ObserveInt64(bytes, n, byteAttrs[si][di])
				}
			}
		}
		return nil
	}, statements, bytes)
	if err != nil {
		return nil, err
	}
	if p.Routing, err = newRouting(meter); err != nil {
		return nil, err
	}
	return p, nil
}

// R returns the routing instruments (nil-safe).
func (p *Proxy) R() *Routing {
	if p == nil {
		return nil
	}
	return p.Routing
}

// SessionOpened and SessionClosed track the open-session gauge.
func (p *Proxy) SessionOpened(ctx context.Context) {
	if p != nil {
		p.sessions.Add(ctx, 1)
	}
}

func (p *Proxy) SessionClosed(ctx context.Context) {
	if p != nil {
		p.sessions.Add(ctx, -1)
	}
}

// Relayed counts one session carried by engine.
func (p *Proxy) Relayed(ctx context.Context, engine string) {
	if p != nil {
		p.relayed.Add(ctx, 1, metric.WithAttributes(KeyEngine.String(engine)))
	}
}

// Connection counts one client connection attempt by its outcome.
func (p *Proxy) Connection(ctx context.Context, outcome string) {
	if p != nil {
		p.connections.Add(ctx, 1, metric.WithAttributes(KeyOutcome.String(outcome)))
	}
}

// Statement counts n completed statements with command tag verb op (see
// CommandVerb) on store.
func (p *Proxy) Statement(store, op string, n int64) {
	if p == nil {
		return
	}
	p.counts[storeIndex(store)].stmts[verbIndex(op)].Add(n)
}

// Latency records one request round trip on store.
func (p *Proxy) Latency(ctx context.Context, store string, d time.Duration) {
	if p == nil {
		return
	}
	p.mu.RLock()
	opt, ok := p.durOpt[store]
	p.mu.RUnlock()
	if !ok {
		opt = []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(
			KeyStore.String(store), semconv.DBSystemNamePostgreSQL))}
		p.mu.Lock()
		p.durOpt[store] = opt
		p.mu.Unlock()
	}
	p.duration.Record(ctx, d.Seconds(), opt...)
}

// Directions for Bytes.
const (
	ClientToStore = "client_to_store"
	StoreToClient = "store_to_client"
)

// Bytes counts n bytes relayed between a client and store in direction.
func (p *Proxy) Bytes(store, direction string, n int64) {
	if p == nil {
		return
	}
	d := 0
	if direction == StoreToClient {
		d = 1
	}
	p.counts[storeIndex(store)].bytes[d].Add(n)
}

// Error origins.
const (
	OriginStore = "store"
	OriginProxy = "proxy"
)

// Error counts one ErrorResponse with SQLSTATE code sent to a client.
func (p *Proxy) Error(ctx context.Context, store, code, origin string) {
	if p == nil {
		return
	}
	k := errKey{store, code, origin}
	p.mu.RLock()
	opt, ok := p.errOpt[k]
	p.mu.RUnlock()
	if !ok {
		opt = []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(
			KeyStore.String(store), semconv.DBResponseStatusCode(code), KeyOrigin.String(origin)))}
		p.mu.Lock()
		p.errOpt[k] = opt
		p.mu.Unlock()
	}
	p.errors.Add(ctx, 1, opt...)
}

// KindOfCommand maps a CommandComplete verb (the tag's first word) to the
// statement kind it reports.
func KindOfCommand(op string) string {
	switch op {
	case "SELECT", "FETCH", "SHOW", "MOVE":
		return KindRead
	case "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "CALL":
		return KindWrite
	case "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PREPARE", "END", "ABORT":
		return KindTransaction
	case "SET", "RESET", "DISCARD", "LISTEN", "UNLISTEN", "NOTIFY", "DEALLOCATE", "DECLARE", "CLOSE", "LOAD":
		return KindSession
	case "CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "GRANT", "REVOKE", "REINDEX", "CLUSTER",
		"VACUUM", "ANALYZE", "REFRESH", "SECURITY", "IMPORT", "REASSIGN":
		return KindDDL
	}
	return KindUnknown
}

// verbs are the command tag verbs counted separately; anything else is
// "OTHER", so the attribute's cardinality stays bounded.
var verbs = [...]string{"OTHER", "SELECT", "FETCH", "SHOW", "MOVE", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY",
	"CALL", "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PREPARE", "END", "ABORT", "SET", "RESET",
	"DISCARD", "LISTEN", "UNLISTEN", "NOTIFY", "DEALLOCATE", "DECLARE", "CLOSE", "LOAD", "CREATE", "ALTER", "DROP",
	"TRUNCATE", "COMMENT", "GRANT", "REVOKE", "REINDEX", "CLUSTER", "VACUUM", "ANALYZE", "REFRESH", "SECURITY",
	"IMPORT", "REASSIGN", "EXECUTE", "DO", "LOCK", "CHECKPOINT", "EXPLAIN"}

var verbIndexes = func() map[string]int {
	m := make(map[string]int, len(verbs))
	for i, v := range verbs {
		m[v] = i
	}
	return m
}()

func verbIndex(op string) int { return verbIndexes[op] } // unknown verbs map to 0, "OTHER"

// CommandVerb returns the first word of a CommandComplete tag as one of the
// counted verbs, or "OTHER".
func CommandVerb(tag []byte) string {
	i := 0
	for i < len(tag) && tag[i] >= 'A' && tag[i] <= 'Z' {
		i++
	}
	if idx, ok := verbIndexes[string(tag[:i])]; ok { // no allocation: lookup by converted []byte
		return verbs[idx]
	}
	return "OTHER"
}

// Prometheus is a meter provider whose instruments are served in the
// Prometheus text format by Handler.
type Prometheus struct {
	Provider *sdkmetric.MeterProvider
	Handler  http.Handler
	gatherer prometheus.Gatherer
}

// PromOption configures NewPrometheus.
type PromOption func(*promConfig)

type promConfig struct {
	attrs []attribute.KeyValue
	build *BuildInfo
}

// BuildInfo labels the tandem_build_info series.
type BuildInfo struct {
	Version, Commit, GoVersion string
}

// WithService names the process in the OpenTelemetry resource
// (service.name "tandem", service.version, service.instance.id = the
// replica's id), so every exported series says which replica it is from.
func WithService(version, instance string) PromOption {
	return func(c *promConfig) {
		c.attrs = append(c.attrs, semconv.ServiceName("tandem"), semconv.ServiceVersion(version))
		if instance != "" {
			c.attrs = append(c.attrs, semconv.ServiceInstanceID(instance))
		}
	}
}

// WithBuildInfo adds the tandem_build_info gauge: always 1, labelled with the
// build's version, commit and Go version.
func WithBuildInfo(b BuildInfo) PromOption {
	return func(c *promConfig) { c.build = &b }
}

// NewPrometheus builds a meter provider exporting to a private Prometheus
// registry (never the default global one). Exemplars are off: most
// measurements have no span (tracing is off by default, and sampled when
// on), and sampling them costs time on every measurement.
func NewPrometheus(opts ...PromOption) (*Prometheus, error) {
	var cfg promConfig
	for _, o := range opts {
		o(&cfg)
	}
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		return nil, err
	}
	popts := []sdkmetric.Option{sdkmetric.WithReader(exp), sdkmetric.WithExemplarFilter(exemplar.AlwaysOffFilter)}
	if len(cfg.attrs) > 0 {
		res, err := resource.Merge(resource.Default(), resource.NewWithAttributes(semconv.SchemaURL, cfg.attrs...))
		if err != nil {
			return nil, err
		}
		popts = append(popts, sdkmetric.WithResource(res))
	}
	mp := sdkmetric.NewMeterProvider(popts...)
	if b := cfg.build; b != nil {
		attrs := metric.WithAttributes(
			attribute.String("tandem.version", b.Version),
			attribute.String("tandem.commit", b.Commit),
			attribute.String("tandem.go_version", b.GoVersion))
		_, err := mp.Meter("tandem").Int64ObservableGauge("tandem.build.info",
			metric.WithDescription("Always 1; the labels say which build of Tandem is running."),
			metric.WithInt64Callback(func(_ context.Context, o metric.Int64Observer) error {
				o.Observe(1, attrs)
				return nil
			}))
		if err != nil {
			return nil, err
		}
	}
	return &Prometheus{
		Provider: mp,
		Handler:  promhttp.HandlerFor(reg, promhttp.HandlerOpts{}),
		gatherer: reg,
	}, nil
}

// Shutdown flushes and stops the provider.
func (p *Prometheus) Shutdown(ctx context.Context) error { return p.Provider.Shutdown(ctx) }
