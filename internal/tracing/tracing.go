// Package tracing builds the OpenTelemetry tracer provider of a tandem
// proxy: spans exported over OTLP/HTTP, sampled by ratio unless an
// application's traceparent decides, with a resource naming the service
// and the replica. It is off unless an endpoint is configured; what the
// spans are is the proxy's business (proxy/trace.go).
package tracing

import (
	"context"
	"fmt"
	"net/url"
	"strings"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// Options configure New; they mirror the tracing: section of the config.
type Options struct {
	// Endpoint is the collector: a URL (its path defaults to /v1/traces)
	// or host:port. Empty: tracing is off.
	Endpoint    string
	SampleRatio float64           // of units without a sampled or unsampled parent
	Insecure    bool              // plain HTTP to a host:port Endpoint
	Headers     map[string]string // sent with every export

	Version string // service.version
	Replica string // service.instance.id
}

// Provider is a running tracer provider. A nil *Provider is tracing off:
// its Tracer is nil and Shutdown does nothing.
type Provider struct {
	tp *sdktrace.TracerProvider
}

// New returns the provider for o, or nil when o.Endpoint is empty. It does
// not contact the collector: exports are batched in the background, and
// a collector that is down loses spans, never delays a client.
func New(o Options) (*Provider, error) {
	if o.Endpoint == "" {
		return nil, nil
	}
	opts := []otlptracehttp.Option{}
	if strings.Contains(o.Endpoint, "://") {
		u, err := url.Parse(o.Endpoint)
		if err != nil {
			return nil, fmt.Errorf("tracing.endpoint: %w", err)
		}
		if u.Path == "" || u.Path == "/" {
			u.Path = "/v1/traces"
		}
		opts = append(opts, otlptracehttp.WithEndpointURL(u.String()))
	} else {
		opts = append(opts, otlptracehttp.WithEndpoint(o.Endpoint))
		if o.Insecure {
			opts = append(opts, otlptracehttp.WithInsecure())
		}
	}
	if len(o.Headers) > 0 {
		opts = append(opts, otlptracehttp.WithHeaders(o.Headers))
	}
	exp, err := otlptracehttp.New(context.Background(), opts...)
	if err != nil {
		return nil, fmt.Errorf("tracing: %w", err)
	}
	res, err := resource.Merge(resource.Default(), resource.NewWithAttributes(semconv.SchemaURL,
		semconv.ServiceName("tandem"), semconv.ServiceVersion(o.Version), semconv.ServiceInstanceID(o.Replica)))
	if err != nil {
		return nil, err
	}
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithResource(res),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(o.SampleRatio))))
	return &Provider{tp: tp}, nil
}

// Tracer is the proxy's tracer (nil when p is nil).
func (p *Provider) Tracer() trace.Tracer {
	if p == nil {
		return nil
	}
	return p.tp.Tracer("github.com/tandemdb/tandem/proxy")
}

// Shutdown exports the spans still batched and stops the provider.
func (p *Provider) Shutdown(ctx context.Context) error {
	if p == nil {
		return nil
	}
	return p.tp.Shutdown(ctx)
}

// ParseHeaders reads "key=value,key2=value2" (as OTEL_EXPORTER_OTLP_HEADERS;
// config.Validate has checked the shape).
func ParseHeaders(s string) map[string]string {
	out := map[string]string{}
	for kv := range strings.SplitSeq(s, ",") {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.TrimSpace(k) != "" {
			out[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return out
}
