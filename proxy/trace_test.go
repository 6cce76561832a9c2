package proxy

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/route"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// tracedPair is a pairEnv whose proxy records its spans in memory.
func tracedPair(t *testing.T, setup string) (*pairEnv, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	e := newPairEnvWith(t, sharedNew(t), Options{Tracer: tp.Tracer("test")}, setup)
	return e, rec
}

func attr(s sdktrace.ReadOnlySpan, key string) string {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == key {
			return kv.Value.Emit()
		}
	}
	return ""
}

// children returns the names of parent's child spans, sorted.
func children(spans []sdktrace.ReadOnlySpan, parent sdktrace.ReadOnlySpan) ([]string, map[string]sdktrace.ReadOnlySpan) {
	var names []string
	byName := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range spans {
		if s.Parent().SpanID() == parent.SpanContext().SpanID() && s.SpanContext().TraceID() == parent.SpanContext().TraceID() {
			names = append(names, s.Name())
			byName[s.Name()] = s
		}
	}
	slices.Sort(names)
	return names, byName
}

// unitSpans returns the unit spans whose query summary is summary.
func unitSpans(spans []sdktrace.ReadOnlySpan, summary string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range spans {
		if s.Name() == spanUnit && attr(s, "db.query.summary") == summary {
			out = append(out, s)
		}
	}
	return out
}

// noValues fails when any attribute of any span carries a statement's
// literal: spans name statements, never their values.
func noValues(t *testing.T, spans []sdktrace.ReadOnlySpan, secrets ...string) {
	t.Helper()
	for _, s := range spans {
		for _, kv := range s.Attributes() {
			for _, secret := range secrets {
				if strings.Contains(kv.Value.Emit(), secret) {
					t.Errorf("span %s attribute %s carries a value: %q", s.Name(), kv.Key, kv.Value.Emit())
				}
			}
		}
	}
}

// TestTraceMirroredWrite: one mirrored autocommit write is a unit span
// with children for the primary, the secondary and the secondary's commit,
// with the store, kind, fingerprint and summary as attributes and no
// value anywhere; a write the secondary refuses adds the drift-ledger
// write; and a statement with a sqlcommenter traceparent joins the
// application's trace.
func TestTraceMirroredWrite(t *testing.T) {
	e, rec := tracedPair(t, `CREATE TABLE tr (id int PRIMARY KEY, v text)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	ctx := context.Background()
	c := e.client()
	if _, err := c.Exec(ctx, `INSERT INTO tr VALUES (1, 'secret-one')`, pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	if n := e.assertEqual("tr", "id"); n != 1 {
		t.Fatalf("tr has %d rows", n)
	}
	units := unitSpans(rec.Ended(), "INSERT tr")
	if len(units) != 1 {
		t.Fatalf("%d unit spans for the INSERT, want 1", len(units))
	}
	u := units[0]
	names, kids := children(rec.Ended(), u)
	if want := []string{spanPrimary, spanSecondary, spanSecondaryCommit}; !slices.Equal(names, want) {
		t.Fatalf("the mirrored write's spans: %v, want %v", names, want)
	}
	for k, want := range map[string]string{"db.system.name": "postgresql", "db.operation.name": "INSERT",
		"tandem.statement.kind": "write", "tandem.routing.primary": "old", "db.namespace": e.db} {
		if got := attr(u, k); got != want {
			t.Errorf("unit span %s = %q, want %q", k, got, want)
		}
	}
	if len(attr(u, "tandem.statement.fingerprint")) < 8 {
		t.Errorf("unit span has no fingerprint: %v", u.Attributes())
	}
	if attr(kids[spanPrimary], "tandem.store") != "old" || attr(kids[spanSecondary], "tandem.store") != "new" {
		t.Errorf("store attributes: primary %q, secondary %q", attr(kids[spanPrimary], "tandem.store"), attr(kids[spanSecondary], "tandem.store"))
	}
	if u.SpanKind() != trace.SpanKindServer || kids[spanPrimary].SpanKind() != trace.SpanKindClient || u.Parent().IsValid() {
		t.Errorf("kinds: unit %v, primary %v; unit parent %v", u.SpanKind(), kids[spanPrimary].SpanKind(), u.Parent())
	}

	// The secondary refuses a row: the drift is written to the ledger
	// before the client hears of the commit, under its own span.
	if err := e.new.Exec(ctx, e.db, `ALTER TABLE tr ADD CONSTRAINT small CHECK (id < 100)`); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, `INSERT INTO tr VALUES (100, 'secret-two')`, pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	if n := e.openDrift(); n != 1 {
		t.Fatalf("open drift after the refused mirror: %d, want 1", n)
	}
	units = unitSpans(rec.Ended(), "INSERT tr")
	if names, _ := children(rec.Ended(), units[len(units)-1]); !slices.Contains(names, spanLedger) || !slices.Contains(names, spanSecondary) {
		t.Errorf("the write the secondary refused: spans %v, want the ledger's among them", names)
	}

	// An application's trace context in a sqlcommenter comment.
	traceID, parentID := "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	q := fmt.Sprintf(`INSERT INTO tr VALUES (2, 'secret-three') /*traceparent='00-%s-%s-01'*/`, traceID, parentID)
	if _, err := c.Exec(ctx, q, pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	units = unitSpans(rec.Ended(), "INSERT tr")
	joined := units[len(units)-1]
	if got := joined.SpanContext().TraceID().String(); got != traceID {
		t.Errorf("the unit's trace is %s, want the application's %s", got, traceID)
	}
	if got := joined.Parent().SpanID().String(); got != parentID || !joined.Parent().IsRemote() {
		t.Errorf("the unit's parent is %s (remote %v), want the application's span %s", got, joined.Parent().IsRemote(), parentID)
	}
	if names, _ := children(rec.Ended(), joined); !slices.Contains(names, spanPrimary) || !slices.Contains(names, spanSecondary) {
		t.Errorf("the joined unit's spans: %v", names)
	}
	noValues(t, rec.Ended(), "secret", "'")
}

// TestTraceFenceWait: a write held at a write fence has a fence-wait span
// next to its primary and secondary spans, as long as the fence held it.
func TestTraceFenceWait(t *testing.T) {
	e, rec := tracedPair(t, `CREATE TABLE tf (id int PRIMARY KEY)`)
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	srv := e.proxy.srv
	ctx := context.Background()
	c := e.client()
	st := srv.State()
	st.Fence = 7
	srv.ApplyState(st)
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, `INSERT INTO tf VALUES (1)`)
		done <- err
	}()
	// Wait until the write is held: its fence-wait span has started.
	deadline := time.Now().Add(10 * time.Second)
	for !slices.ContainsFunc(rec.Started(), func(s sdktrace.ReadWriteSpan) bool { return s.Name() == spanFenceWait }) {
		if time.Now().After(deadline) {
			t.Fatal("no write waits at the fence")
		}
		time.Sleep(10 * time.Millisecond)
	}
	held := 50 * time.Millisecond
	time.Sleep(held)
	st.Fence = 0
	srv.ApplyState(st)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := e.assertEqual("tf", "id"); n != 1 {
		t.Fatalf("tf has %d rows", n)
	}
	var unit sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		if s.Name() == spanUnit && attr(s, "db.operation.name") == "INSERT" {
			if names, _ := children(rec.Ended(), s); slices.Contains(names, spanPrimary) {
				unit = s
			}
		}
	}
	if unit == nil {
		t.Fatal("no unit span ran the INSERT on the primary")
	}
	names, kids := children(rec.Ended(), unit)
	for _, want := range []string{spanFenceWait, spanPrimary, spanSecondary} {
		if !slices.Contains(names, want) {
			t.Errorf("the held write's spans: %v, want %s among them", names, want)
		}
	}
	if fw := kids[spanFenceWait]; fw != nil {
		if d := fw.EndTime().Sub(fw.StartTime()); d < held {
			t.Errorf("the fence wait span lasted %v, but the fence held the write at least %v", d, held)
		}
		if !fw.EndTime().Before(kids[spanPrimary].StartTime()) && !fw.EndTime().Equal(kids[spanPrimary].StartTime()) {
			t.Errorf("the primary ran before the fence wait ended")
		}
	}
}

// BenchmarkTraceOverhead: BenchmarkMirrorAutocommit's plain case (an
// autocommit INSERT, UPDATE and DELETE, mirrored) with tracing off (no
// tracer: the default), with a tracer that samples nothing, and with
// every unit sampled and exported to a no-op exporter.
func BenchmarkTraceOverhead(b *testing.B) {
	for _, tc := range []struct {
		name    string
		sampler sdktrace.Sampler // nil: no tracer
	}{
		{"off", nil},
		{"never_sampled", sdktrace.NeverSample()},
		{"sampled", sdktrace.AlwaysSample()},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var opts Options
			if tc.sampler != nil {
				tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(tc.sampler), sdktrace.WithSyncer(tracetest.NewNoopExporter()))
				b.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
				opts.Tracer = tp.Tracer("bench")
			}
			e := newPairEnvWith(b, sharedNew(b), opts, `CREATE TABLE bw (id int PRIMARY KEY, v int)`)
			e.set(route.Settings{Primary: route.Old, Mirror: true})
			c := e.client()
			ctx := context.Background()
			b.ResetTimer()
			for i := range b.N {
				if _, err := c.Exec(ctx, `INSERT INTO bw VALUES ($1, 0)`, i); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Exec(ctx, `UPDATE bw SET v = v + 1 WHERE id = $1`, i); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Exec(ctx, `DELETE FROM bw WHERE id = $1`, i); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkTraceSteps: the tracing calls one mirrored unit makes (the
// unit, the primary, the secondary, its commit, the ledger), without a
// database: "off" is the cost every unit pays by default.
func BenchmarkTraceSteps(b *testing.B) {
	for _, tc := range []struct {
		name    string
		sampler sdktrace.Sampler
	}{{"off", nil}, {"never_sampled", sdktrace.NeverSample()}, {"sampled", sdktrace.AlwaysSample()}} {
		b.Run(tc.name, func(b *testing.B) {
			srv := &Server{}
			if tc.sampler != nil {
				tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(tc.sampler), sdktrace.WithSyncer(tracetest.NewNoopExporter()))
				b.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
				srv.tracer = tp.Tracer("bench")
			}
			rs := &routedSession{srv: srv, ss: &session{ctx: context.Background()}}
			un := &unit{}
			b.ReportAllocs()
			for b.Loop() {
				end := rs.traceUnit(un)
				rs.traceStep(spanPrimary, route.Old)(nil)
				rs.traceStep(spanSecondary, route.New)(nil)
				rs.traceStep(spanSecondaryCommit, route.New)(nil)
				rs.traceStep(spanLedger, "")(nil)
				end(nil)
			}
		})
	}
}
