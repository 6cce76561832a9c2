package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

const deployDir = "../../deploy"

// TestDeployManifests: every Kubernetes document in deploy/kubernetes
// decodes strictly into its API type (a misspelt field fails), the
// Deployment is what the docs promise (two replicas, probes on the admin
// server's endpoints, a grace period longer than the drain), and the config
// it mounts passes `tandem config check`.
func TestDeployManifests(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(deployDir, "kubernetes", "tandem.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	var dep *appsv1.Deployment
	var cm *corev1.ConfigMap
	for i, doc := range regexp.MustCompile(`(?m)^---$`).Split(string(raw), -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			t.Fatalf("document %d: %v", i, err)
		}
		var obj any
		switch tm.APIVersion + " " + tm.Kind {
		case "v1 ConfigMap":
			cm = &corev1.ConfigMap{}
			obj = cm
		case "apps/v1 Deployment":
			dep = &appsv1.Deployment{}
			obj = dep
		case "v1 Service":
			obj = &corev1.Service{}
		case "policy/v1 PodDisruptionBudget":
			obj = &policyv1.PodDisruptionBudget{}
		case "networking.k8s.io/v1 NetworkPolicy":
			obj = &networkingv1.NetworkPolicy{}
		default:
			t.Fatalf("document %d: unexpected %s %s", i, tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			t.Errorf("document %d (%s): %v", i, tm.Kind, err)
		}
		kinds[tm.Kind]++
	}
	for _, k := range []string{"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} {
		if kinds[k] == 0 {
			t.Errorf("no %s in the manifests", k)
		}
	}
	if dep == nil || cm == nil {
		t.Fatal("the Deployment or its ConfigMap is missing")
	}
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas != 2 {
		t.Errorf("replicas: %v, want 2", dep.Spec.Replicas)
	}
	c := dep.Spec.Template.Spec.Containers[0]
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" ||
		c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Errorf("probes: readiness %+v liveness %+v", c.ReadinessProbe, c.LivenessProbe)
	}

	// The mounted config is valid, and its drain ends before SIGKILL. The
	// Secret's files are stand-ins in a temporary directory.
	dir := t.TempDir()
	secrets := filepath.Join(dir, "secrets")
	if err := os.Mkdir(secrets, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string]string{
		"old.pgpass":   "old-postgres:5432:shop:app:secret\n",
		"new.pgpass":   "new-postgres:5432:shop:app:secret\n",
		"userlist.txt": `"app" "secret"` + "\n",
		"admin-token":  "a-long-random-admin-token-for-the-test\n",
	} {
		if err := os.WriteFile(filepath.Join(secrets, name), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	mounted := false
	for _, v := range c.VolumeMounts {
		mounted = mounted || v.MountPath == "/etc/tandem/secrets"
	}
	if !mounted {
		t.Error("the Secret is not mounted at /etc/tandem/secrets, where the config reads it")
	}
	file := filepath.Join(dir, "tandem.yaml")
	text := strings.ReplaceAll(cm.Data["tandem.yaml"], "/etc/tandem/secrets", secrets)
	if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	if problems := config.Check(file, func(string) (string, bool) { return "", false }); len(problems) > 0 {
		t.Errorf("the ConfigMap's tandem.yaml: %v", problems)
	}
	cfg, err := config.Load(file, nil)
	if err != nil {
		t.Fatal(err)
	}
	grace := dep.Spec.Template.Spec.TerminationGracePeriodSeconds
	if grace == nil || time.Duration(*grace)*time.Second <= cfg.Limits.DrainTimeout.Duration()+5*time.Second {
		t.Errorf("terminationGracePeriodSeconds %v leaves no room after limits.drain_timeout %s", grace, cfg.Limits.DrainTimeout.Duration())
	}
}

// alertRules is the shape of deploy/prometheus/tandem-alerts.yaml, decoded
// strictly.
type alertRules struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert       string            `json:"alert"`
			Expr        string            `json:"expr"`
			For         string            `json:"for,omitempty"`
			Labels      map[string]string `json:"labels"`
			Annotations map[string]string `json:"annotations"`
		} `json:"rules"`
	} `json:"groups"`
}

// deployExprs returns every PromQL expression in the alert rules and the
// Grafana dashboard, by where it is.
func deployExprs(t *testing.T) map[string]string {
	t.Helper()
	exprs := map[string]string{}
	raw, err := os.ReadFile(filepath.Join(deployDir, "prometheus", "tandem-alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var rules alertRules
	if err := yaml.UnmarshalStrict(raw, &rules); err != nil {
		t.Fatalf("alert rules: %v", err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" || r.Expr == "" || r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
				t.Errorf("alert rule %+v lacks a name, expression, severity or summary", r)
			}
			exprs["alert "+r.Alert] = r.Expr
		}
	}
	raw, err = os.ReadFile(filepath.Join(deployDir, "grafana", "tandem-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&dash); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	for _, p := range dash.Panels {
		for i, tg := range p.Targets {
			exprs[fmt.Sprintf("panel %q target %d", p.Title, i)] = tg.Expr
		}
	}
	if len(exprs) < 10 {
		t.Fatalf("only %d expressions found", len(exprs))
	}
	return exprs
}

var (
	seriesName = regexp.MustCompile(`\b(?:tandem|db_client)_[a-z_]+\b`)
	// Label names, not series: inside {...} matchers and by/without (...).
	labelLists = regexp.MustCompile(`\{[^}]*\}|\b(?:by|without)\s*\([^)]*\)`)
)

// TestDeployMetricsExist: every metric the alert rules and the dashboard
// name is on a proxy's /metrics, after the traffic of a short migration
// (dual-write, a backfill, a mirrored write the new store rejects, shadowed
// and shifted reads, an error, a flip and a rollback).
func TestDeployMetricsExist(t *testing.T) {
	exprs := deployExprs(t)
	want := map[string][]string{} // series -> where it is used
	for where, e := range exprs {
		for _, s := range seriesName.FindAllString(labelLists.ReplaceAllString(e, " "), -1) {
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				s = strings.TrimSuffix(s, suf)
			}
			want[s] = append(want[s], where)
		}
	}

	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "deploy-proxy")
	mustExec(t, oldC, "CREATE TABLE items (id serial PRIMARY KEY, v int)")
	mustExec(t, newC, "CREATE TABLE items (id serial PRIMARY KEY, v int CHECK (v < 1000))")
	mustExec(t, oldC, "INSERT INTO items (v) SELECT g FROM generate_series(1, 50) g")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	routeSet := func(args ...string) {
		t.Helper()
		if out, errOut, err := cli(append([]string{"route", "set", "-c", file}, args...)...); err != nil {
			t.Fatalf("route set %v: %v\n%s%s", args, err, out, errOut)
		}
	}
	routeSet("--mirror", "on", "--shadow", "100")
	backfillAll(t, file)
	routeSet("--reads", "100")

	ctx := context.Background()
	conn, err := pgx.Connect(ctx, "postgres://postgres@"+rp.Addr()+"/postgres?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{
		"INSERT INTO items (v) VALUES (1)",
		"INSERT INTO items (v) VALUES (5000)", // new refuses it: drift
		"SELECT v FROM items WHERE id = 1",
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	if _, err := conn.Exec(ctx, "SELECT 1/0"); err == nil {
		t.Fatal("division by zero succeeded")
	}
	conn.Close(ctx)
	// The flip through this proxy's admin API, so its fence is measured here.
	api := newAdminClient(t, rp)
	api.change("/api/v1/route", `{"primary":"new","force":true,"reason":"metrics"}`, "deploy-proxy")
	api.change("/api/v1/rollback", `{"force":true,"reason":"metrics"}`, "deploy-proxy")

	var missing []string
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + rp.AdminAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		have := map[string]bool{}
		for _, line := range strings.Split(string(body), "\n") {
			if name, _, ok := strings.Cut(line, " "); ok && !strings.HasPrefix(line, "#") {
				name, _, _ = strings.Cut(name, "{")
				for _, suf := range []string{"_bucket", "_sum", "_count"} {
					name = strings.TrimSuffix(name, suf)
				}
				have[name] = true
			}
		}
		missing = missing[:0]
		for s := range want {
			if !have[s] {
				missing = append(missing, s)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	slices.Sort(missing)
	for _, s := range missing {
		t.Errorf("%s is named by %v but is not on /metrics", s, want[s])
	}
}
