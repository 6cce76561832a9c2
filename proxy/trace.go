package proxy

import (
	"context"
	"errors"
	"regexp"
	"slices"
	"strings"

	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/route"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
)

// Tracing: with Options.Tracer set, a routed session records a span per
// client unit (tandem.unit) with children for the steps an operator asks
// about when a statement is slow: the primary running it (tandem.primary),
// the secondary applying the mirror (tandem.secondary, and
// tandem.secondary.commit for its commit), the drift-ledger write
// (tandem.ledger) and a wait at a write fence (tandem.fence_wait).
// Attributes name the store, the statement kind, its fingerprint and a
// summary of operation and tables; never parameter values or the
// statement's text. A statement carrying a sqlcommenter traceparent
// (/*traceparent='00-…-…-01'*/) puts the unit in the application's trace.
// Without a tracer each step costs one nil check.

// Span names.
const (
	spanUnit            = "tandem.unit"
	spanPrimary         = "tandem.primary"
	spanSecondary       = "tandem.secondary"
	spanSecondaryCommit = "tandem.secondary.commit"
	spanLedger          = "tandem.ledger"
	spanFenceWait       = "tandem.fence_wait"
)

// Attribute keys that are Tandem's own (the db.* ones are semconv's).
const (
	keyFingerprint = attribute.Key("tandem.statement.fingerprint")
	keyStatements  = attribute.Key("tandem.statements")
	keyVersion     = attribute.Key("tandem.routing.version")
	keyPrimary     = attribute.Key("tandem.routing.primary")
)

// unitTrace is the span of the unit being served, if it is traced.
type unitTrace struct {
	ctx  context.Context
	span trace.Span
}

func noEnd(error) {}

// traceparentRe finds a sqlcommenter traceparent: the value is
// URL-encoded hex and dashes, so it needs no decoding.
var traceparentRe = regexp.MustCompile(`traceparent='([0-9a-fA-F-]{55})'`)

// traceUnit starts the unit's span and returns the function that ends it
// with the unit's outcome.
func (rs *routedSession) traceUnit(un *unit) func(error) {
	tr := rs.srv.tracer
	if tr == nil {
		return noEnd
	}
	ctx := rs.ss.ctx
	stmts, texts := unitStatements(un)
	for _, text := range texts {
		if m := traceparentRe.FindStringSubmatch(text); m != nil {
			ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier{"traceparent": m[1]})
			break
		}
	}
	op, summary := operation(stmts)
	attrs := []attribute.KeyValue{semconv.DBSystemNamePostgreSQL, keyStatements.Int(len(stmts))}
	if op != "" {
		attrs = append(attrs, semconv.DBOperationName(op), semconv.DBQuerySummary(summary))
	}
	if len(un.kinds) > 0 {
		attrs = append(attrs, metrics.KeyKind.String(unitKind(un.kinds)))
	}
	if len(stmts) > 0 && stmts[0].Fingerprint != "" {
		attrs = append(attrs, keyFingerprint.String(stmts[0].Fingerprint))
	}
	if db := rs.ss.database; db != "" {
		attrs = append(attrs, semconv.DBNamespace(db))
	}
	ctx, span := tr.Start(ctx, spanUnit, trace.WithSpanKind(trace.SpanKindServer), trace.WithAttributes(attrs...))
	if !span.IsRecording() {
		// Not sampled: its steps would not be either; skip them.
		span.End()
		return noEnd
	}
	rs.trace = unitTrace{ctx: ctx, span: span}
	return func(err error) {
		span.SetAttributes(keyVersion.Int64(rs.state.Version), keyPrimary.String(string(rs.state.Primary)))
		endSpan(span, err)
		rs.trace = unitTrace{}
	}
}

// traceStep starts a child of the unit's span for one step on store ("":
// not a store's) and returns the function that ends it.
func (rs *routedSession) traceStep(name string, store route.Store) func(error) {
	if rs.trace.span == nil {
		return noEnd
	}
	attrs := []attribute.KeyValue{}
	kind := trace.SpanKindInternal
	if store != "" {
		kind = trace.SpanKindClient
		attrs = append(attrs, metrics.KeyStore.String(string(store)), semconv.DBSystemNamePostgreSQL)
	}
	_, span := rs.srv.tracer.Start(rs.trace.ctx, name, trace.WithSpanKind(kind), trace.WithAttributes(attrs...))
	return func(err error) { endSpan(span, err) }
}

// endSpan ends span, marking it failed by the error's SQLSTATE (or its
// type), never by its message: a server's message can quote values.
func endSpan(span trace.Span, err error) {
	if err != nil {
		code := "error"
		var pe *pgwire.Error
		var se *storeError
		switch {
		case errors.As(err, &pe):
			code = pe.Code
		case errors.As(err, &se):
			code = se.code
		}
		span.SetAttributes(semconv.ErrorTypeKey.String(code))
		span.SetStatus(codes.Error, code)
	}
	span.End()
}

// unitStatements returns the statements the unit runs (from its Query or
// Parse messages, else from the statements its Binds use) and the client's
// texts, where a traceparent comment may be.
func unitStatements(un *unit) ([]classify.StmtPlan, []string) {
	var stmts []classify.StmtPlan
	var texts, bound []string
	var fromBind []classify.StmtPlan
	for i := range un.dec {
		d := &un.dec[i]
		switch {
		case d.plan != nil:
			stmts = append(stmts, d.plan.Stmts...)
			texts = append(texts, d.sql, d.parse.sql)
		case d.stmt != nil && d.stmt.plan != nil:
			fromBind = append(fromBind, d.stmt.plan.Stmts...)
			bound = append(bound, d.stmt.sql)
		}
	}
	if len(stmts) == 0 {
		return fromBind, bound
	}
	return stmts, texts
}

// operation names the unit's operation for db.operation.name (the first
// keyword, or BATCH for several statements) and db.query.summary (the
// operation and up to three tables, as written): no values.
func operation(stmts []classify.StmtPlan) (op, summary string) {
	if len(stmts) == 0 {
		return "", ""
	}
	first := strings.TrimLeft(stmts[0].SQL, "( \t\r\n")
	end := strings.IndexFunc(first, func(r rune) bool { return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') })
	if end < 0 {
		end = len(first)
	}
	op = strings.ToUpper(first[:end])
	if len(stmts) > 1 {
		op = "BATCH " + op
	}
	var tables []string
	for _, s := range stmts {
		for _, t := range s.Tables {
			if !slices.Contains(tables, t) && len(tables) < 3 {
				tables = append(tables, t)
			}
		}
	}
	return op, strings.TrimSpace(op + " " + strings.Join(tables, " "))
}

// unitKind is the kind the unit counts as: a write if any statement
// writes, else the first statement's.
func unitKind(kinds []classify.Kind) string {
	for _, k := range kinds {
		if k == classify.Write || k == classify.DDL {
			return k.String()
		}
	}
	return kinds[0].String()
}
