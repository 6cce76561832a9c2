package main

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// The image has no open doors (issue 12): both ports on loopback unless
// configured, no example config baked in, a HEALTHCHECK through `tandem
// health` (the slim image has no curl), a pinned toolchain and a
// .dockerignore. Docker builds cannot run in CI, so this reads the files.
func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := string(b)
	for _, want := range []string{
		"ENV TANDEM_LISTEN=127.0.0.1:6432 TANDEM_ADMIN=127.0.0.1:9187",
		`HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["/usr/local/bin/tandem", "health"`,
		"ENV GOTOOLCHAIN=local",
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	if !regexp.MustCompile(`(?m)^FROM golang:\d+\.\d+\.\d+-`).MatchString(df) {
		t.Error("the Go toolchain image is not pinned to a patch release")
	}
	if strings.Contains(df, "0.0.0.0") && regexp.MustCompile(`(?m)^ENV .*0\.0\.0\.0`).MatchString(df) {
		t.Error("the image listens on all interfaces by default")
	}
	if regexp.MustCompile(`(?m)^COPY .*\.yaml`).MatchString(df) {
		t.Error("the image bakes a config in")
	}
	di, err := os.ReadFile("../../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{".git", "**/*.key", "**/*.token"} {
		if !strings.Contains(string(di), want+"\n") {
			t.Errorf(".dockerignore lacks %q", want)
		}
	}
}

// tandem health fails (exit status non-zero, saying where it asked) when
// nothing answers on the admin address.
func TestHealthDown(t *testing.T) {
	_, _, err := cli("health", "--old", "postgres://app@127.0.0.1:1/app", "--admin", "127.0.0.1:1", "--timeout", "2s")
	if err == nil || !strings.Contains(err.Error(), "http://127.0.0.1:1/healthz") {
		t.Fatalf("tandem health with nothing listening: %v", err)
	}
}
