package main

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/tandemdb/tandem/internal/config"
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
// headless Chromium: it renders the routing state and the gates, a write
// flip clicked on the page is refused with the backfill gate's reason, and
// once the backfill and the verify have run, the same click flips. The
// page's screenshot is saved as tandem-status-page.png in the test's
// output directory ($TANDEM_SCREENSHOT_DIR, else the temp dir).
func TestStatusPageInBrowser(t *testing.T) {
	browser := chromiumPath(t)
	oldC, newC := pgtest.NewPair(t)
	file, cfg := pairConfig(t, oldC, newC, "page-proxy")
	for _, c := range []*pgtest.Cluster{oldC, newC} {
		mustExec(t, c, "CREATE TABLE orders (id serial PRIMARY KEY, note text)")
	}
	mustExec(t, oldC, "INSERT INTO orders (note) SELECT 'x' FROM generate_series(1, 100)")
	rp, err := startProxy(cfg, newLogger(config.Log{Format: "text", Level: "error"}, io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := rp.stop(); err != nil {
			t.Error(err)
		}
	}()
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
	// The page asks for confirmation before a routing change: accept it.
	dialogs := chromedp.Events(ctx, page.JavascriptDialogOpening)
	go func() {
		for _, err := range dialogs {
			if err != nil {
				return
			}
			_, _ = chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: true})
		}
	}()
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
	waitText("#result", "done: routing version 3: primary=new")
	waitText("#state", "routing version 3: primary=new mirror=on reads=100%")
	if st := rp.srv.State(); st.Primary != route.New || st.Version != 3 {
		t.Fatalf("after the page's flip the proxy applies version %d %s", st.Version, st.Settings)
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
