package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// otlpReceiver is a tiny OTLP/HTTP trace collector: it decodes each export
// with the OTLP collector types and keeps the spans with their resource.
type otlpReceiver struct {
	mu       sync.Mutex
	spans    []*tracepb.Span
	resource map[string]string
	exports  int
}

func (r *otlpReceiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost || req.URL.Path != "/v1/traces" {
		http.Error(w, "not here", http.StatusNotFound)
		return
	}
	body, err := io.ReadAll(req.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var ex coltracepb.ExportTraceServiceRequest
	if err := proto.Unmarshal(body, &ex); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	r.exports++
	for _, rs := range ex.GetResourceSpans() {
		r.resource = attrMap(rs.GetResource().GetAttributes())
		for _, ss := range rs.GetScopeSpans() {
			r.spans = append(r.spans, ss.GetSpans()...)
		}
	}
	r.mu.Unlock()
	out, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

func attrMap(kvs []*commonpb.KeyValue) map[string]string {
	m := map[string]string{}
	for _, kv := range kvs {
		v := kv.GetValue()
		switch {
		case v.GetStringValue() != "":
			m[kv.GetKey()] = v.GetStringValue()
		default:
			m[kv.GetKey()] = fmt.Sprint(v.GetIntValue())
		}
	}
	return m
}

// mirroredWrite finds a unit span of an INSERT into orders with its
// primary and secondary children, and returns them.
func (r *otlpReceiver) mirroredWrite() (unit *tracepb.Span, kids map[string]*tracepb.Span) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.spans {
		a := attrMap(s.GetAttributes())
		if s.GetName() != "tandem.unit" || a["db.query.summary"] != "INSERT orders" {
			continue
		}
		kids = map[string]*tracepb.Span{}
		for _, c := range r.spans {
			if string(c.GetParentSpanId()) == string(s.GetSpanId()) && string(c.GetTraceId()) == string(s.GetTraceId()) {
				kids[c.GetName()] = c
			}
		}
		if kids["tandem.primary"] != nil && kids["tandem.secondary"] != nil {
			return s, kids
		}
	}
	return nil, nil
}

// TestTracingExportsOverOTLP runs the built binary as a proxy with
// tracing.endpoint at an in-test OTLP/HTTP receiver: a mirrored write
// through it (which reaches both stores) arrives as a unit span with its
// primary and secondary spans, under a resource naming the service and
// the replica.
func TestTracingExportsOverOTLP(t *testing.T) {
	bin := tandemBinary(t)
	recv := &otlpReceiver{}
	collector := httptest.NewServer(recv)
	defer collector.Close()

	oldC, newC := pgtest.NewPair(t)
	file, _ := pairConfig(t, oldC, newC, "traced-proxy")
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id int PRIMARY KEY, note text)")
	}
	cmd := exec.Command(bin, "proxy", "-c", file)
	cmd.Env = append(os.Environ(), "TANDEM_LOG_LEVEL=info", "TANDEM_TRACING_ENDPOINT="+collector.URL, "TANDEM_TRACING_SAMPLE_RATIO=1")
	proc := startLogged(t, cmd)
	defer proc.stop()
	log := proc.log
	started, _ := log.wait(t, 0, regexp.MustCompile(`tandem proxy started`))
	if !regexp.MustCompile(`tracing=true`).MatchString(started) {
		t.Fatalf("the proxy does not say it traces: %s", started)
	}
	addr := regexp.MustCompile(`listen=(\S+)`).FindStringSubmatch(started)[1]
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}

	ctx := context.Background()
	app, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", addr))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(ctx)
	if _, err := app.Exec(ctx, "INSERT INTO orders VALUES (1, 'traced')", pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	direct, err := pgx.Connect(ctx, newC.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	var onNew string
	err = direct.QueryRow(ctx, "SELECT note FROM orders WHERE id = 1").Scan(&onNew)
	direct.Close(ctx)
	if err != nil || onNew != "traced" {
		t.Fatalf("the write did not reach the new store: %q %v", onNew, err)
	}

	// The batcher exports within its 5s timeout.
	deadline := time.Now().Add(30 * time.Second)
	unit, kids := recv.mirroredWrite()
	for unit == nil {
		if time.Now().After(deadline) {
			recv.mu.Lock()
			t.Fatalf("no mirrored write's spans arrived in 30s (%d exports, %d spans)", recv.exports, len(recv.spans))
		}
		time.Sleep(200 * time.Millisecond)
		unit, kids = recv.mirroredWrite()
	}
	a := attrMap(unit.GetAttributes())
	if a["db.system.name"] != "postgresql" || a["db.operation.name"] != "INSERT" || a["tandem.statement.kind"] != "write" || a["tandem.statement.fingerprint"] == "" {
		t.Errorf("unit span attributes: %v", a)
	}
	if s := attrMap(kids["tandem.primary"].GetAttributes())["tandem.store"]; s != "old" {
		t.Errorf("primary span store %q", s)
	}
	if s := attrMap(kids["tandem.secondary"].GetAttributes())["tandem.store"]; s != "new" {
		t.Errorf("secondary span store %q", s)
	}
	recv.mu.Lock()
	res := recv.resource
	recv.mu.Unlock()
	if res["service.name"] != "tandem" || res["service.instance.id"] != "traced-proxy" {
		t.Errorf("resource: %v", res)
	}
}
