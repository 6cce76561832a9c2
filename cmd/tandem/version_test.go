package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func TestVersionCommand(t *testing.T) {
	out, _, err := cli("version")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out, "tandem "+release+" (commit ") || !strings.Contains(out, runtime.Version()) {
		t.Errorf("tandem version printed %q", out)
	}
	out, _, err = cli("version", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		GoVersion string `json:"go_version"`
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, k := range []string{"version", "commit", "modified", "go_version"} {
		if _, ok := m[k]; !ok {
			t.Errorf("tandem version --json lacks %q: %s", k, out)
		}
	}
	_ = json.Unmarshal([]byte(out), &v)
	if v.GoVersion != runtime.Version() {
		t.Errorf("go_version %q, want %q", v.GoVersion, runtime.Version())
	}
}

// TestUnknownSubcommand: a mistyped subcommand fails and suggests the
// right one, where cobra alone prints help and exits 0.
func TestUnknownSubcommand(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"route", "shw"}, `did you mean "show"?`},
		{[]string{"config", "chek"}, `did you mean "check"?`},
		{[]string{"route", "nonsense"}, `unknown command "nonsense" for "tandem route"`},
	} {
		_, _, err := cli(tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("tandem %s: error %v, want one containing %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
	// The group alone still prints its help and succeeds.
	out, _, err := cli("route")
	if err != nil || !strings.Contains(out, "Available Commands") {
		t.Errorf("tandem route: %v\n%s", err, out)
	}
}

// TestConfigCheckFlag: config check takes -c FILE like every other command,
// and still takes the file as an argument.
func TestConfigCheckFlag(t *testing.T) {
	good := filepath.Join(t.TempDir(), "good.yaml")
	if err := os.WriteFile(good, []byte("old:\n  dsn: postgres://u@127.0.0.1:1/db\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("old:\n  dsn: postgres://u@127.0.0.1:1/db\nlisten_typo: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"config", "check", "-c", good}, {"config", "check", good}} {
		out, _, err := cli(args...)
		if err != nil || !strings.Contains(out, "ok") {
			t.Errorf("tandem %s: %v %s", strings.Join(args, " "), err, out)
		}
	}
	out, _, err := cli("config", "check", "-c", bad)
	if ec, ok := err.(exitCode); !ok || ec != 1 || !strings.Contains(out, "listen_typo") {
		t.Errorf("tandem config check -c bad: %v %s", err, out)
	}
	if _, _, err := cli("config", "check", "-c", good, bad); err == nil {
		t.Error("two different files were accepted")
	}
}
