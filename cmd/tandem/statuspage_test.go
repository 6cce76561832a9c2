package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/route"
)

// chromiumPath finds the browser the page test drives (make test installs
// Debian's chromium with scripts/ensure-chromium.sh).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("no chromium on PATH: run scripts/ensure-chromium.sh (make test does)")
	return ""
}

// TestStatusPageInBrowser drives the admin server's status page in a real
// headless Chromium: it renders the routing state and the gates, the
// confirmation of a flip names what each gate says, a write flip clicked
// on the page is refused with the backfill gate's reason, and once the
// backfill and the verify have run, the same click flips. The charts draw
// the process's own samples (/api/v1/history), mirror latency included
// after writes through the proxy. The page's screenshot is saved as
// tandem-status-page.png in the test's output directory
// ($TANDEM_SCREENSHOT_DIR, else the temp dir).
func TestStatusPageInBrowser(t *testing.T) {
	browser := chromiumPath(t)
	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "page-proxy")
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id serial PRIMARY KEY, note text)")
	}
	mustExec(t, oldC, "INSERT INTO orders (note) SELECT 'x' FROM generate_series(1, 100)")
	rp := startQuietProxy(t, cfg)
	defer stopProxy(t, rp)
	if out, errOut, err := cli("route", "set", "-c", file, "--mirror", "on"); err != nil {
		t.Fatalf("mirror on: %v\n%s%s", err, out, errOut)
	}

	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.WindowSize(1400, 1100), chromedp.UserDataDir(t.TempDir()))...)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelTimeout := context.WithTimeout(ctx, 3*time.Minute)
	defer cancelTimeout()
	// The page asks for confirmation before a routing change: accept it,
	// and keep what it said.
	dialogs := chromedp.Events(ctx, page.JavascriptDialogOpening)
	confirmations := make(chan string, 10)
	go func() {
		for ev, err := range dialogs {
			if err != nil {
				return
			}
			select {
			case confirmations <- ev.Message:
			default:
			}
			_, _ = chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: true})
		}
	}()
	confirmation := func() string {
		t.Helper()
		select {
		case m := <-confirmations:
			return m
		case <-time.After(30 * time.Second):
			t.Fatal("the page asked for no confirmation")
			return ""
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("reading %s: %v", sel, err)
		}
		return s
	}
	waitText := func(sel, want string) string {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			s := text(sel)
			if strings.Contains(s, want) {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never showed %q; it shows %q (page error: %q)", sel, want, s, text("#error"))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	if err := chromedp.Do(ctx, chromedp.Navigate("http://"+rp.AdminAddr()+"/"), chromedp.WaitVisible(chromedp.CSS("#gates"))); err != nil {
		t.Fatal(err)
	}
	waitText("#state", "routing version 2: primary=old mirror=on")
	gates := waitText("#gates", "BLOCKED")
	if !strings.Contains(gates, "backfill") || !strings.Contains(gates, "the backfill has not finished") {
		t.Fatalf("gates before the backfill: %q", gates)
	}
	waitText("#replicas", "page-proxy")

	// A flip clicked now is refused with the gate's reason.
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#flip"))); err != nil {
		t.Fatal(err)
	}
	if c := confirmation(); !strings.Contains(c, "Write flip: primary old -> new") || !strings.Contains(c, "backfill: BLOCKED: the backfill has not finished") ||
		!strings.Contains(c, "mapping: ready") {
		t.Fatalf("the confirmation does not name what each gate says: %q", c)
	}
	refusal := waitText("#result", "refused (409)")
	if !strings.Contains(refusal, "the backfill has not finished") {
		t.Fatalf("the page's refusal does not name the backfill gate: %q", refusal)
	}
	if st := rp.srv.State(); st.Primary != route.Old {
		t.Fatalf("a refused flip changed the state: %s", st.Settings)
	}

	// The evidence: then the page shows every gate ready, and the flip goes.
	backfillAll(t, file)
	verifyAll(t, file)
	// Writes through the proxy are mirrored: the mirror latency chart has
	// something to draw once the next sample is taken.
	app, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", rp.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(context.Background())
	for i := range 20 {
		if _, err := app.Exec(ctx, "UPDATE orders SET note = $1 WHERE id = $2", "page", i+1); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for strings.Contains(text("#gates"), "BLOCKED") {
		if time.Now().After(deadline) {
			t.Fatalf("gates after the evidence: %q", text("#gates"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#flip"))); err != nil {
		t.Fatal(err)
	}
	if c := confirmation(); !strings.Contains(c, "backfill: ready") || strings.Contains(c, "BLOCKED") {
		t.Fatalf("the second confirmation: %q", c)
	}
	waitText("#result", "done: routing version 3: primary=new")
	waitText("#state", "routing version 3: primary=new mirror=on reads=100%")
	if st := rp.srv.State(); st.Primary != route.New || st.Version != 3 {
		t.Fatalf("after the page's flip the proxy applies version %d %s", st.Version, st.Settings)
	}

	// The charts: the mirror latency of the writes above, from the
	// process's samples (one every 10s).
	deadline = time.Now().Add(60 * time.Second)
	for {
		drawn, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("#c-mirror polyline, #c-drift polyline").length`))
		if err != nil {
			t.Fatal(err)
		}
		max, err := chromedp.Run(ctx, chromedp.Evaluate[string](`(document.querySelector("#c-mirror text") || {}).textContent || ""`))
		if err != nil {
			t.Fatal(err)
		}
		if drawn == 2 && max != "max 0" {
			t.Logf("charts: %s; mirror latency %s ms", text("#span"), strings.TrimPrefix(max, "max "))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the charts show %d lines, mirror latency %q (%s)", drawn, max, text("#span"))
		}
		time.Sleep(500 * time.Millisecond)
	}

	shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	dir := os.Getenv("TANDEM_SCREENSHOT_DIR")
	if dir == "" {
		dir = os.TempDir()
	}
	path := filepath.Join(dir, "tandem-status-page.png")
	if err := os.WriteFile(path, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s (%d bytes)", path, len(shot))
}
