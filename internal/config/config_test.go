package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
)

const validDSN = "postgres://app@localhost:5432/app?sslmode=disable"

// env returns a getenv function backed by m.
func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		v, ok := m[k]
		return v, ok
	}
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// writeKeyPair writes a self-signed certificate and its key as PEM files and returns their paths.
func writeKeyPair(t *testing.T, dir string) (cert, key string) {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "tandem test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	cert = writeFile(t, dir, "cert.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	key = writeFile(t, dir, "key.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})))
	return cert, key
}

// problemsOf extracts the problems from an error returned by Load, Validate or Flags.Load.
func problemsOf(t *testing.T, err error) Problems {
	t.Helper()
	if err == nil {
		return nil
	}
	var ps Problems
	if !errors.As(err, &ps) {
		t.Fatalf("error %v (%T) is not a Problems", err, err)
	}
	return ps
}

func problemStrings(ps []Problem) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return out
}

func TestDefault(t *testing.T) {
	d := Default()
	want := Config{
		Listen:   "127.0.0.1:6432",
		Admin:    "127.0.0.1:9187",
		AdminAPI: AdminAPI{MaxConnections: 64},
		Auth:     Auth{Method: "trust"},
		Limits: Limits{
			MaxClientSessions:  1000,
			MaxMessageBytes:    256 * 1024 * 1024,
			ConnectTimeout:     Duration(10 * time.Second),
			IdleSessionTimeout: 0,
			DrainTimeout:       Duration(30 * time.Second),
			MessageTimeout:     Duration(time.Minute),
			MaxBatchMessages:   10000,
			MaxBufferedBytes:   GiB,
		},
		Relay: Relay{Engine: "epoll"},
		Routing: Routing{MirrorBudget: Duration(500 * time.Millisecond), BreakerFailures: 5, BreakerOpen: Duration(5 * time.Second),
			Poll: Duration(2 * time.Second), FenceTimeout: Duration(5 * time.Second), SequenceMargin: 1000,
			RepairInterval: Duration(time.Second), RepairBackoffMax: Duration(5 * time.Minute), DriftStuckAttempts: 5, FeedWait: Duration(5 * time.Second)},
		Shadow: Shadow{Queue: 1000, Workers: 4, MaxResultBytes: MiB, Timeout: Duration(5 * time.Second), FloatTolerance: 1e-9},
		Gates: Gates{VerifyMaxAge: Duration(24 * time.Hour), ShadowWindow: Duration(15 * time.Minute),
			FeedMaxLag: Duration(30 * time.Second), FeedMaxLagBytes: 64 * MiB},
		Feed:    Feed{WALWarn: 1 * GiB, WALMax: 8 * GiB},
		Log:     Log{Format: "text", Level: "info"},
		Tracing: Tracing{SampleRatio: 0.1},
	}
	if !reflect.DeepEqual(d, want) {
		t.Errorf("Default() = %+v, want %+v", d, want)
	}
	// The defaults are valid once the one required setting is supplied.
	d.Old.DSN = validDSN
	if err := d.Validate(); err != nil {
		t.Errorf("Default() with old.dsn set: %v", err)
	}
	// Load with no file and no environment is the defaults.
	cfg, err := Load("", nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.src = nil
	if !reflect.DeepEqual(*cfg, want) {
		t.Errorf("Load(\"\", nil) = %+v, want %+v", *cfg, want)
	}
}

// TestOptionsCoverSchema keeps the option table (env vars, flags, file walk) in step with the Config struct.
func TestOptionsCoverSchema(t *testing.T) {
	var paths []string
	var collect func(reflect.Type, string)
	collect = func(rt reflect.Type, prefix string) {
		for i := range rt.NumField() {
			f := rt.Field(i)
			if !f.IsExported() {
				continue
			}
			path := prefix + f.Tag.Get("yaml")
			if path == "tables" {
				continue // a YAML-only section, walked and validated by tables.go
			}
			if f.Type.Kind() == reflect.Struct {
				collect(f.Type, path+".")
				continue
			}
			paths = append(paths, path)
		}
	}
	collect(reflect.TypeFor[Config](), "")
	var got []string
	var c Config
	for _, o := range options() {
		got = append(got, o.path)
		// field must point into c at the field named by the path.
		v := reflect.ValueOf(&c).Elem()
		for _, part := range strings.Split(o.path, ".") {
			for i := range v.NumField() {
				if v.Type().Field(i).Tag.Get("yaml") == part {
					v = v.Field(i)
					break
				}
			}
		}
		if v.Addr().Interface() != o.field(&c) {
			t.Errorf("option %s: field func points at the wrong field", o.path)
		}
	}
	if !reflect.DeepEqual(got, paths) {
		t.Errorf("options() paths = %v, want the Config fields %v", got, paths)
	}
}

func TestFlagsHelp(t *testing.T) {
	fs := pflag.NewFlagSet("tandem", pflag.ContinueOnError)
	NewFlags(fs)
	wantFlags := []string{"config", "listen", "admin", "old", "new", "old-password-file", "new-password-file",
		"auth-method", "auth-userlist", "tls-cert", "tls-key", "require-tls", "max-client-sessions",
		"max-message-bytes", "connect-timeout", "idle-session-timeout", "drain-timeout", "relay-engine",
		"control", "control-password-file", "replica-id", "mirror-budget", "breaker-failures", "breaker-open",
		"state-poll", "fence-timeout", "sequence-margin", "repair-interval", "log-format", "log-level"}
	for _, name := range wantFlags {
		if fs.Lookup(name) == nil {
			t.Errorf("flag --%s not registered", name)
		}
	}
	if f := fs.ShorthandLookup("c"); f == nil || f.Name != "config" {
		t.Errorf("-c is not --config")
	}
	for _, o := range options() {
		f := fs.Lookup(o.flag)
		if f == nil {
			continue
		}
		if !strings.Contains(f.Usage, "(env "+envName(o.path)+")") {
			t.Errorf("--%s usage %q does not name %s", o.flag, f.Usage, envName(o.path))
		}
	}
	help := fs.FlagUsages()
	for _, want := range []string{
		`--listen string`, `(default "127.0.0.1:6432")`,
		`--max-message-bytes bytes`, `(default 256MiB)`,
		`--connect-timeout duration`, `(default 10s)`,
		`--idle-session-timeout duration`, `(default 0s)`,
		`--drain-timeout duration`, `(default 30s)`,
		`--max-client-sessions int`, `(default 1000)`,
		`--old DSN`, `-c, --config file`, `(env TANDEM_CONFIG)`, `(env TANDEM_TLS_REQUIRE)`,
		`(env TANDEM_LIMITS_MAX_CLIENT_SESSIONS)`,
		`--control DSN`, `--control-password-file file`, `(env TANDEM_CONTROL_DSN)`,
		`--fence-timeout duration`, `(default 5s)`, `--state-poll duration`, `(default 2s)`,
		`--mirror-budget duration`, `(default 500ms)`, `--breaker-failures int`, `(default 5)`,
		`--sequence-margin int`, `(default 1000)`, `--repair-interval duration`, `(default 1s)`,
		`(env TANDEM_ROUTING_REPLICA_ID)`,
	} {
		if !strings.Contains(help, want) {
			t.Errorf("help does not contain %q:\n%s", want, help)
		}
	}
}

func TestPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "tandem.yaml", `
listen: "127.0.0.1:1111"
admin: "127.0.0.1:2222"
old:
  dsn: "postgres://file@localhost/app?sslmode=disable"
limits:
  max_client_sessions: 5
  drain_timeout: 5s
log:
  level: warn
`)
	other := writeFile(t, dir, "other.yaml", `listen: "127.0.0.1:3333"`+"\nold:\n  dsn: "+validDSN+"\n")

	type want struct {
		listen, admin, dsn, level string
		sessions                  int
		drain                     time.Duration
		msgBytes                  ByteSize
	}
	fileWant := want{"127.0.0.1:1111", "127.0.0.1:2222", "postgres://file@localhost/app?sslmode=disable", "warn", 5, 5 * time.Second, 256 * MiB}
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want want
	}{
		{"file only", []string{"-c", file}, nil, fileWant},
		{"defaults only", []string{"--old", validDSN}, nil,
			want{"127.0.0.1:6432", "127.0.0.1:9187", validDSN, "info", 1000, 30 * time.Second, 256 * MiB}},
		{"env over file", []string{"-c", file}, map[string]string{
			"TANDEM_LISTEN": "127.0.0.1:4444", "TANDEM_LIMITS_MAX_CLIENT_SESSIONS": "7", "TANDEM_LOG_LEVEL": "error",
			"TANDEM_LIMITS_MAX_MESSAGE_BYTES": "1MiB"},
			want{"127.0.0.1:4444", "127.0.0.1:2222", fileWant.dsn, "error", 7, 5 * time.Second, MiB}},
		{"flags over env over file", []string{"--config=" + file, "--listen=127.0.0.1:5555", "--max-client-sessions", "9", "--drain-timeout=0"},
			map[string]string{"TANDEM_LISTEN": "127.0.0.1:4444", "TANDEM_LIMITS_MAX_CLIENT_SESSIONS": "7", "TANDEM_ADMIN": "127.0.0.1:6666"},
			want{"127.0.0.1:5555", "127.0.0.1:6666", fileWant.dsn, "warn", 9, 0, 256 * MiB}},
		{"flag explicitly set to its default still overrides", []string{"-c", file, "--max-client-sessions=1000", "--log-level=info"},
			map[string]string{"TANDEM_LIMITS_MAX_CLIENT_SESSIONS": "7"},
			want{"127.0.0.1:1111", "127.0.0.1:2222", fileWant.dsn, "info", 1000, 5 * time.Second, 256 * MiB}},
		{"TANDEM_CONFIG names the file", nil, map[string]string{"TANDEM_CONFIG": file}, fileWant},
		{"-c wins over TANDEM_CONFIG", []string{"-c", file}, map[string]string{"TANDEM_CONFIG": other}, fileWant},
		{"flag DSN over file DSN", []string{"-c", file, "--old", validDSN, "--max-message-bytes", "64kB"}, nil,
			want{"127.0.0.1:1111", "127.0.0.1:2222", validDSN, "warn", 5, 5 * time.Second, 64 * KB}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := pflag.NewFlagSet("tandem", pflag.ContinueOnError)
			f := NewFlags(fs)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			cfg, err := f.Load(env(tt.env))
			if err != nil {
				t.Fatal(err)
			}
			got := want{cfg.Listen, cfg.Admin, cfg.Old.DSN, cfg.Log.Level, cfg.Limits.MaxClientSessions,
				cfg.Limits.DrainTimeout.Duration(), cfg.Limits.MaxMessageBytes}
			if got != tt.want {
				t.Errorf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestLoadGoodFile(t *testing.T) {
	cfg, err := Load(filepath.Join("testdata", "good.yaml"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	want := Config{
		Listen: "0.0.0.0:6432",
		Admin:  "127.0.0.1:9999",
		AdminAPI: AdminAPI{TokenFile: filepath.Join("testdata", "admin.token"), AllowedHosts: "tandem.internal, proxy-a",
			Pprof: true, MaxConnections: 16},
		Old: Store{DSN: "postgres://app:s3cret@old.internal:5432/app?sslmode=disable",
			PasswordFile: filepath.Join("testdata", "pgpass"), RequireAuth: "scram-sha-256"},
		New:  Store{DSN: "host=new.internal port=5433 dbname=app user=app sslmode=disable"},
		Auth: Auth{Method: "scram-sha-256", Userlist: filepath.Join("testdata", "userlist.txt")},
		Limits: Limits{
			MaxClientSessions:  200,
			MaxMessageBytes:    64 * MiB,
			ConnectTimeout:     Duration(5 * time.Second),
			IdleSessionTimeout: Duration(15 * time.Minute),
			DrainTimeout:       Duration(90 * time.Second),
			MessageTimeout:     Duration(30 * time.Second),
			MaxBatchBytes:      128 * MiB,
			MaxBatchMessages:   500,
			MaxBufferedBytes:   2 * GiB,
		},
		Relay:   Relay{Engine: "epoll"},
		Control: Control{DSN: "postgres://tandem@control.internal:5432/tandem?sslmode=disable", PasswordFile: filepath.Join("testdata", "pgpass")},
		Routing: Routing{ReplicaID: "proxy-a", MirrorBudget: Duration(250 * time.Millisecond), BreakerFailures: 3,
			BreakerOpen: Duration(10 * time.Second), Poll: Duration(time.Second), FenceTimeout: Duration(2 * time.Second),
			SequenceMargin: 5000, RepairInterval: Duration(500 * time.Millisecond), RepairBackoffMax: Duration(5 * time.Minute), DriftStuckAttempts: 5,
			FeedWait: Duration(5 * time.Second)},
		Shadow: Shadow{Queue: 50, Workers: 2, MaxResultBytes: 256 * KiB, Timeout: Duration(2 * time.Second),
			Settle: Duration(time.Second), FloatTolerance: 1e-6, AA: true, RecordValues: true},
		Gates: Gates{VerifyMaxAge: Duration(6 * time.Hour), ShadowWindow: Duration(30 * time.Minute), ShadowMaxMismatchRate: 0.001,
			FeedMaxLag: Duration(30 * time.Second), FeedMaxLagBytes: 64 * MiB},
		Feed:    Feed{WALWarn: 1 * GiB, WALMax: 8 * GiB},
		Log:     Log{Format: "json", Level: "debug"},
		Tracing: Tracing{SampleRatio: 0.1},
		Tables: Tables{
			Include: []string{"public.*", `"Sales".*`},
			Exclude: []string{"public.tmp_*"},
			Map: map[string]TableMap{
				"public.users": {
					To:      "public.accounts",
					Rename:  map[string]string{"mail": "email"},
					Drop:    []string{"legacy_flag"},
					Compute: map[string]string{"full_name": "first_name || ' ' || last_name"},
					Reverse: map[string]string{
						"first_name": "split_part(full_name, ' ', 1)",
						"last_name":  "substr(full_name, length(split_part(full_name, ' ', 1)) + 2)",
					},
				},
				`"Sales"."Order Items"`: {},
			},
		},
	}
	cfg.src = nil
	if !reflect.DeepEqual(*cfg, want) {
		t.Errorf("got  %+v\nwant %+v", *cfg, want)
	}
}

func TestRelativePaths(t *testing.T) {
	dir := t.TempDir()
	sub := filepath.Join(dir, "etc")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	abs := filepath.Join(dir, "abs-userlist")
	file := writeFile(t, sub, "tandem.yaml", "old:\n  password_file: pgpass\nauth:\n  userlist: "+abs+"\ntls:\n  cert: certs/c.pem\n")
	cfg, err := Load(file, env(map[string]string{"TANDEM_TLS_KEY": "k.pem"}))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, got, want string }{
		{"old.password_file (relative, from file)", cfg.Old.PasswordFile, filepath.Join(sub, "pgpass")},
		{"auth.userlist (absolute, from file)", cfg.Auth.Userlist, abs},
		{"tls.cert (relative, from file)", cfg.TLS.Cert, filepath.Join(sub, "certs", "c.pem")},
		{"tls.key (relative, from env)", cfg.TLS.Key, "k.pem"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.name, c.got, c.want)
		}
	}
}

func TestLoadFileErrors(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    []string // Problem strings, with the file name "t.yaml"
	}{
		{"unknown key in section", "limits:\n  max_client_sessions: 5\n  max_sesions: 3\n",
			[]string{`t.yaml:3:3: unknown field "max_sesions" in limits (valid: max_client_sessions, max_message_bytes, connect_timeout, idle_session_timeout, drain_timeout, message_timeout, max_batch_bytes, max_batch_messages, max_buffered_bytes)`}},
		{"unknown key with a suggestion", "old:\n  dns: x\n",
			[]string{`t.yaml:2:3: unknown field "dns" in old (did you mean "dsn"?)`}},
		{"unknown top-level key", "listn: x\n",
			[]string{`t.yaml:1:1: unknown field "listn" (did you mean "listen"?)`}},
		{"unknown section", "metrics:\n  port: 1\n",
			[]string{`t.yaml:1:1: unknown field "metrics" (valid: listen, admin, admin_api, old, new, auth, tls, limits, relay, control, routing, shadow, gates, feed, tracing, log, tables)`}},
		{"wrong type int", "limits:\n  max_client_sessions: lots\n",
			[]string{`t.yaml:2:3: limits.max_client_sessions: must be a whole number, not "lots"`}},
		{"wrong type bool", "tls:\n  require: maybe\n",
			[]string{`t.yaml:2:3: tls.require: must be true or false, not "maybe"`}},
		{"quoted number", "limits:\n  max_client_sessions: '42'\n",
			[]string{`t.yaml:2:3: limits.max_client_sessions: must be a whole number without quotes, not "42"`}},
		{"bad size", "limits:\n  max_message_bytes: 12XB\n",
			[]string{`t.yaml:2:3: limits.max_message_bytes: invalid size "12XB": unknown unit "XB"; use B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)`}},
		{"duration without unit", "limits:\n  connect_timeout: 10\n",
			[]string{`t.yaml:2:3: limits.connect_timeout: invalid duration "10": needs a unit, e.g. "10s" or "10ms"`}},
		{"section is not a mapping", "log: [text]\n",
			[]string{`t.yaml:1:1: log: must be a mapping of settings (key: value), not a list`}},
		{"value is not a scalar", "listen:\n  host: x\n",
			[]string{`t.yaml:1:1: listen: must be a single value, not a mapping`}},
		{"string value is never echoed", "old:\n  dsn: [postgres://u:s3cret@h/db]\n",
			[]string{`t.yaml:2:3: old.dsn: must be a single value, not a list`}},
		{"top level is a list", "- listen\n",
			[]string{`t.yaml:1:1: the config file must be a mapping of settings (key: value), not a list`}},
		{"duplicate key", "limits:\n  max_client_sessions: 5\n  max_client_sessions: 6\n",
			[]string{`t.yaml:3:3: key "max_client_sessions" appears twice in limits (first on line 2)`}},
		{"second document", "listen: a:1\n---\nadmin: b:2\n",
			[]string{`t.yaml:2:1: a second YAML document (after ---); the config file must hold exactly one`}},
		{"syntax error", "listen: [\n",
			[]string{`t.yaml:1: invalid YAML: did not find expected node content`}},
		{"several problems at once", "listn: x\nlimits:\n  max_client_sessions: x\n  drain_timeout: forever\n",
			[]string{
				`t.yaml:1:1: unknown field "listn" (did you mean "listen"?)`,
				`t.yaml:3:3: limits.max_client_sessions: must be a whole number, not "x"`,
				`t.yaml:4:3: limits.drain_timeout: invalid duration "forever": want a number with a unit (ns, us, ms, s, m, h), e.g. "10s" or "1m30s"`,
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, dir, "t.yaml", tt.content)
			t.Chdir(dir)
			cfg, err := Load("t.yaml", nil)
			if err == nil {
				t.Fatalf("Load succeeded: %+v", cfg)
			}
			if cfg != nil {
				t.Errorf("Load returned a config with its error")
			}
			got := problemStrings(problemsOf(t, err))
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Errorf("error leaks the password: %v", err)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"), nil)
	ps := problemsOf(t, err)
	if len(ps) != 1 || !strings.Contains(ps[0].Message, "cannot read config file: no such file or directory") {
		t.Errorf("got %v", err)
	}
}

func TestLoadEmptyAndNullFiles(t *testing.T) {
	for _, content := range []string{"", "# nothing but a comment\n", "---\n", "~\n", "limits:\n", "listen:\nlog: ~\n"} {
		dir := t.TempDir()
		file := writeFile(t, dir, "t.yaml", content)
		cfg, err := Load(file, nil)
		if err != nil {
			t.Errorf("%q: %v", content, err)
			continue
		}
		cfg.src = nil
		if !reflect.DeepEqual(*cfg, Default()) {
			t.Errorf("%q: got %+v, want the defaults", content, *cfg)
		}
	}
}

func TestYAMLFeatures(t *testing.T) {
	// Anchors, aliases and merge keys work as in any YAML; quoted and unquoted scalars are equivalent.
	file := writeFile(t, t.TempDir(), "t.yaml", `
old:
  dsn: &dsn "postgres://app@localhost/app?sslmode=disable"
new:
  dsn: *dsn
limits: &limits
  max_client_sessions: 42
  max_message_bytes: 1048576
  idle_session_timeout: "0"
log: {format: json, level: warn}
`)
	cfg, err := Load(file, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.New.DSN != cfg.Old.DSN || cfg.Limits.MaxClientSessions != 42 || cfg.Limits.MaxMessageBytes != MiB ||
		cfg.Log.Format != "json" || cfg.Log.Level != "warn" {
		t.Errorf("got %+v", *cfg)
	}
}

func TestEnv(t *testing.T) {
	full := map[string]string{
		"TANDEM_LISTEN":                         "127.0.0.1:1",
		"TANDEM_ADMIN":                          "127.0.0.1:2",
		"TANDEM_OLD_DSN":                        "host=old",
		"TANDEM_OLD_PASSWORD_FILE":              "/old.pgpass",
		"TANDEM_NEW_DSN":                        "host=new",
		"TANDEM_NEW_PASSWORD_FILE":              "/new.pgpass",
		"TANDEM_AUTH_METHOD":                    "scram-sha-256",
		"TANDEM_AUTH_USERLIST":                  "/userlist",
		"TANDEM_TLS_CERT":                       "/c.pem",
		"TANDEM_TLS_KEY":                        "/k.pem",
		"TANDEM_TLS_REQUIRE":                    "true",
		"TANDEM_LIMITS_MAX_CLIENT_SESSIONS":     "3",
		"TANDEM_LIMITS_MAX_MESSAGE_BYTES":       "16KiB",
		"TANDEM_LIMITS_CONNECT_TIMEOUT":         "1s",
		"TANDEM_LIMITS_IDLE_SESSION_TIMEOUT":    "1h",
		"TANDEM_LIMITS_DRAIN_TIMEOUT":           "2s",
		"TANDEM_LIMITS_MESSAGE_TIMEOUT":         "5s",
		"TANDEM_LIMITS_MAX_BATCH_BYTES":         "32KiB",
		"TANDEM_LIMITS_MAX_BATCH_MESSAGES":      "7",
		"TANDEM_LIMITS_MAX_BUFFERED_BYTES":      "1MiB",
		"TANDEM_RELAY_ENGINE":                   "goroutines",
		"TANDEM_CONTROL_DSN":                    "host=control",
		"TANDEM_CONTROL_PASSWORD_FILE":          "/control.pgpass",
		"TANDEM_ROUTING_REPLICA_ID":             "replica-7",
		"TANDEM_ROUTING_MIRROR_BUDGET":          "1s",
		"TANDEM_ROUTING_BREAKER_FAILURES":       "9",
		"TANDEM_ROUTING_BREAKER_OPEN":           "30s",
		"TANDEM_ROUTING_POLL":                   "3s",
		"TANDEM_ROUTING_FENCE_TIMEOUT":          "750ms",
		"TANDEM_ROUTING_SEQUENCE_MARGIN":        "0",
		"TANDEM_ROUTING_REPAIR_INTERVAL":        "1m",
		"TANDEM_SHADOW_QUEUE":                   "7",
		"TANDEM_SHADOW_WORKERS":                 "1",
		"TANDEM_SHADOW_MAX_RESULT_BYTES":        "64KiB",
		"TANDEM_SHADOW_TIMEOUT":                 "3s",
		"TANDEM_SHADOW_SETTLE":                  "250ms",
		"TANDEM_SHADOW_FLOAT_TOLERANCE":         "0.5e-6",
		"TANDEM_SHADOW_AA":                      "true",
		"TANDEM_SHADOW_RECORD_VALUES":           "true",
		"TANDEM_ADMIN_API_TOKEN_FILE":           "/admin.token",
		"TANDEM_ADMIN_API_TLS_CERT":             "/admin.pem",
		"TANDEM_ADMIN_API_TLS_KEY":              "/admin.key",
		"TANDEM_ADMIN_API_ALLOWED_HOSTS":        "a,b",
		"TANDEM_ADMIN_API_PPROF":                "true",
		"TANDEM_ADMIN_API_MAX_CONNECTIONS":      "5",
		"TANDEM_OLD_REQUIRE_AUTH":               "md5",
		"TANDEM_NEW_REQUIRE_AUTH":               "password",
		"TANDEM_AUTH_ALLOW_REMOTE_TRUST":        "true",
		"TANDEM_GATES_VERIFY_MAX_AGE":           "2h",
		"TANDEM_GATES_SHADOW_WINDOW":            "5m",
		"TANDEM_GATES_SHADOW_MAX_MISMATCH_RATE": "0.01",
		"TANDEM_FEED_ENABLED":                   "true",
		"TANDEM_FEED_WAL_WARN":                  "2MiB",
		"TANDEM_FEED_WAL_MAX":                   "3GiB",
		"TANDEM_LOG_FORMAT":                     "json",
		"TANDEM_LOG_LEVEL":                      "debug",
	}
	cfg, err := Load("", env(full))
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Listen: "127.0.0.1:1", Admin: "127.0.0.1:2",
		AdminAPI: AdminAPI{TokenFile: "/admin.token", TLSCert: "/admin.pem", TLSKey: "/admin.key", AllowedHosts: "a,b",
			Pprof: true, MaxConnections: 5},
		Old:  Store{DSN: "host=old", PasswordFile: "/old.pgpass", RequireAuth: "md5"},
		New:  Store{DSN: "host=new", PasswordFile: "/new.pgpass", RequireAuth: "password"},
		Auth: Auth{Method: "scram-sha-256", Userlist: "/userlist", AllowRemoteTrust: true},
		TLS:  TLS{Cert: "/c.pem", Key: "/k.pem", Require: true},
		Limits: Limits{MaxClientSessions: 3, MaxMessageBytes: 16 * KiB, ConnectTimeout: Duration(time.Second),
			IdleSessionTimeout: Duration(time.Hour), DrainTimeout: Duration(2 * time.Second),
			MessageTimeout: Duration(5 * time.Second), MaxBatchBytes: 32 * KiB, MaxBatchMessages: 7, MaxBufferedBytes: MiB},
		Relay:   Relay{Engine: "goroutines"},
		Control: Control{DSN: "host=control", PasswordFile: "/control.pgpass"},
		Routing: Routing{ReplicaID: "replica-7", MirrorBudget: Duration(time.Second), BreakerFailures: 9,
			BreakerOpen: Duration(30 * time.Second), Poll: Duration(3 * time.Second), FenceTimeout: Duration(750 * time.Millisecond),
			SequenceMargin: 0, RepairInterval: Duration(time.Minute), RepairBackoffMax: Duration(5 * time.Minute), DriftStuckAttempts: 5,
			FeedWait: Duration(5 * time.Second)},
		Shadow: Shadow{Queue: 7, Workers: 1, MaxResultBytes: 64 * KiB, Timeout: Duration(3 * time.Second),
			Settle: Duration(250 * time.Millisecond), FloatTolerance: 0.5e-6, AA: true, RecordValues: true},
		Gates: Gates{VerifyMaxAge: Duration(2 * time.Hour), ShadowWindow: Duration(5 * time.Minute), ShadowMaxMismatchRate: 0.01,
			FeedMaxLag: Duration(30 * time.Second), FeedMaxLagBytes: 64 * MiB},
		Feed:    Feed{Enabled: true, WALWarn: 2 * MiB, WALMax: 3 * GiB},
		Log:     Log{Format: "json", Level: "debug"},
		Tracing: Tracing{SampleRatio: 0.1},
	}
	cfg.src = nil
	if !reflect.DeepEqual(*cfg, want) {
		t.Errorf("got  %+v\nwant %+v", *cfg, want)
	}

	// An empty variable is set: it clears a string.
	file := writeFile(t, t.TempDir(), "t.yaml", "tls:\n  cert: /c.pem\n")
	cfg, err = Load(file, env(map[string]string{"TANDEM_TLS_CERT": ""}))
	if err != nil || cfg.TLS.Cert != "" {
		t.Errorf("TANDEM_TLS_CERT=\"\" did not clear tls.cert: %v, %q", err, cfg.TLS.Cert)
	}
}

func TestEnvErrors(t *testing.T) {
	tests := []struct {
		name, value, want string
	}{
		{"TANDEM_LIMITS_MAX_CLIENT_SESSIONS", "many",
			`limits.max_client_sessions: environment variable TANDEM_LIMITS_MAX_CLIENT_SESSIONS: invalid integer "many"`},
		{"TANDEM_LIMITS_MAX_CLIENT_SESSIONS", "",
			`limits.max_client_sessions: environment variable TANDEM_LIMITS_MAX_CLIENT_SESSIONS: invalid integer ""`},
		{"TANDEM_TLS_REQUIRE", "yes please",
			`tls.require: environment variable TANDEM_TLS_REQUIRE: invalid boolean "yes please": want true or false`},
		{"TANDEM_LIMITS_MAX_MESSAGE_BYTES", "1.5GiB",
			`limits.max_message_bytes: environment variable TANDEM_LIMITS_MAX_MESSAGE_BYTES: invalid size "1.5GiB": must be a whole number; use a smaller unit instead of a fraction`},
		{"TANDEM_LIMITS_DRAIN_TIMEOUT", "30",
			`limits.drain_timeout: environment variable TANDEM_LIMITS_DRAIN_TIMEOUT: invalid duration "30": needs a unit, e.g. "30s" or "30ms"`},
	}
	for _, tt := range tests {
		t.Run(tt.name+"="+tt.value, func(t *testing.T) {
			_, err := Load("", env(map[string]string{tt.name: tt.value}))
			got := problemStrings(problemsOf(t, err))
			if len(got) != 1 || got[0] != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
	// All malformed variables are reported together.
	_, err := Load("", env(map[string]string{"TANDEM_LIMITS_MAX_CLIENT_SESSIONS": "x", "TANDEM_TLS_REQUIRE": "x"}))
	if ps := problemsOf(t, err); len(ps) != 2 {
		t.Errorf("want 2 problems, got %v", err)
	}
}

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	cert, key := writeKeyPair(t, dir)
	userlist := writeFile(t, dir, "userlist.txt", `"app" "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5"`+"\n")
	garbage := writeFile(t, dir, "garbage.pem", "not PEM\n")
	missing := filepath.Join(dir, "missing")

	tests := []struct {
		name   string
		mutate func(*Config)
		want   []string // "field: message" of each problem; nil = valid
	}{
		{"defaults plus old.dsn", func(c *Config) {}, nil},
		{"everything set and valid", func(c *Config) {
			c.Listen, c.Admin = ":6432", "[::1]:9187"
			c.New.DSN = "host=localhost port=5433 dbname=app sslmode=disable"
			c.Old.PasswordFile = userlist
			c.Auth = Auth{Method: "scram-sha-256", Userlist: userlist}
			c.TLS = TLS{Cert: cert, Key: key, Require: true}
			c.Limits = Limits{MaxClientSessions: 1, MaxMessageBytes: MinMessageBytes, ConnectTimeout: 1,
				IdleSessionTimeout: Duration(time.Minute), DrainTimeout: 0, MaxBatchMessages: 1, MaxBufferedBytes: MinMessageBytes}
			c.Log = Log{Format: "json", Level: "error"}
		}, nil},
		{"largest message size", func(c *Config) { c.Limits.MaxMessageBytes = MaxMessageBytes }, nil},
		{"listen and admin may share port 0", func(c *Config) { c.Listen, c.Admin = "127.0.0.1:0", "127.0.0.1:0" }, nil},
		{"listen empty", func(c *Config) { c.Listen = "" },
			[]string{"listen: required: an address as host:port, e.g. 127.0.0.1:6432"}},
		{"listen without port", func(c *Config) { c.Listen = "localhost" },
			[]string{"listen: must be host:port, e.g. 127.0.0.1:6432 or [::1]:6432 (missing port in address)"}},
		{"listen with named port", func(c *Config) { c.Listen = "localhost:postgres" },
			[]string{`listen: port "postgres" must be a number from 0 to 65535`}},
		{"admin port out of range", func(c *Config) { c.Admin = "127.0.0.1:70000" },
			[]string{`admin: port "70000" must be a number from 0 to 65535`}},
		{"trust off loopback", func(c *Config) { c.Listen = "0.0.0.0:6432" },
			[]string{`auth.method: is trust while listen ("0.0.0.0:6432") is not a loopback address: anyone who reaches that port would use the stores' credentials without a password; use scram-sha-256 with auth.userlist, listen on 127.0.0.1, or set auth.allow_remote_trust: true (--auth-allow-remote-trust) if a network boundary you trust guards the port`}},
		{"trust on all interfaces", func(c *Config) { c.Listen = ":6432" },
			[]string{`auth.method: is trust while listen (":6432") is not a loopback address: anyone who reaches that port would use the stores' credentials without a password; use scram-sha-256 with auth.userlist, listen on 127.0.0.1, or set auth.allow_remote_trust: true (--auth-allow-remote-trust) if a network boundary you trust guards the port`}},
		{"trust off loopback, opted in", func(c *Config) { c.Listen, c.Auth.AllowRemoteTrust = "10.0.0.1:6432", true }, nil},
		{"trust on localhost and ::1", func(c *Config) { c.Listen, c.Admin = "localhost:6432", "[::1]:9187" }, nil},
		{"admin off loopback without a token", func(c *Config) { c.Admin = "0.0.0.0:9187" },
			[]string{`admin: "0.0.0.0:9187" is not a loopback address and the admin API has no token: anyone who reaches it could flip writes or stop mirroring; set admin_api.token_file (--admin-token-file, TANDEM_ADMIN_API_TOKEN_FILE) to a file holding a long random token, e.g. from 'openssl rand -hex 32', or listen on 127.0.0.1`}},
		{"admin off loopback with a token", func(c *Config) {
			c.Admin, c.AdminAPI.TokenFile = "0.0.0.0:9187", writeFile(t, dir, "token", "  0123456789abcdef0123\n")
		}, nil},
		{"admin token too short", func(c *Config) { c.AdminAPI.TokenFile = writeFile(t, dir, "short", "secret\n") },
			[]string{"admin_api.token_file: the token in " + filepath.Join(dir, "short") + " is 6 bytes; use at least 16 (e.g. 'openssl rand -hex 32')"}},
		{"admin token file missing", func(c *Config) { c.AdminAPI.TokenFile = missing },
			[]string{"admin_api.token_file: cannot read " + missing + ": no such file or directory"}},
		{"admin TLS cert without key", func(c *Config) { c.AdminAPI.TLSCert = cert },
			[]string{"admin_api.tls_cert: is set but admin_api.tls_key is not; set both to serve HTTPS, or neither"}},
		{"admin TLS", func(c *Config) { c.AdminAPI.TLSCert, c.AdminAPI.TLSKey = cert, key }, nil},
		{"admin connection cap", func(c *Config) { c.AdminAPI.MaxConnections = 0 },
			[]string{"admin_api.max_connections: must be at least 1, not 0"}},
		{"require_auth", func(c *Config) { c.Old.RequireAuth, c.New.RequireAuth = "scram-sha-256, md5", "kerberos" },
			[]string{`new.require_auth: unknown authentication method "kerberos": use a comma-separated list of "scram-sha-256", "md5", "password" and "none"`}},
		{"self_fence", func(c *Config) { c.Routing.SelfFence = Duration(7 * time.Second) }, nil},
		{"self_fence within a poll", func(c *Config) { c.Routing.SelfFence = Duration(time.Second) },
			[]string{"routing.self_fence: must be more than routing.poll (2s): a replica reads the state once a poll; or 0 for 2 × routing.poll, at least 2s; not 1s"}},
		{"batch caps", func(c *Config) {
			c.Limits.MaxBatchBytes, c.Limits.MaxBatchMessages, c.Limits.MaxBufferedBytes, c.Limits.MessageTimeout = MiB, 0, 1, -1
		}, []string{"limits.message_timeout: must not be negative (0 turns it off)",
			"limits.max_batch_bytes: must be 0 (= limits.max_message_bytes) or at least limits.max_message_bytes (256MiB): a batch holds at least one message, not 1MiB",
			"limits.max_batch_messages: must be at least 1, not 0", "limits.max_buffered_bytes: must be at least 8KiB, not 1B"}},
		{"admin equals listen", func(c *Config) { c.Admin = c.Listen },
			[]string{`admin: must differ from listen (both are "127.0.0.1:6432")`}},
		{"old.dsn missing", func(c *Config) { c.Old.DSN = "" },
			[]string{"old.dsn: required: the DSN of the old store, e.g. postgres://user@host:5432/db?sslmode=require"}},
		{"old.dsn bad URL port", func(c *Config) { c.Old.DSN = "postgres://app:s3cret@localhost:abc/app" },
			[]string{"old.dsn: cannot parse DSN: invalid port"}},
		{"new.dsn bad sslmode", func(c *Config) { c.New.DSN = "host=localhost password='s3 cret' sslmode=sometimes" },
			[]string{"new.dsn: cannot parse DSN: failed to configure TLS (sslmode is invalid)"}},
		{"password file missing", func(c *Config) { c.New.PasswordFile = missing },
			[]string{"new.password_file: cannot read " + missing + ": no such file or directory"}},
		{"password file is a directory", func(c *Config) { c.Old.PasswordFile = dir },
			[]string{"old.password_file: " + dir + " is a directory, not a file"}},
		{"unknown auth method", func(c *Config) { c.Auth.Method = "md5" },
			[]string{`auth.method: must be "trust" or "scram-sha-256", not "md5"`}},
		{"scram without userlist", func(c *Config) { c.Auth.Method = "scram-sha-256" },
			[]string{"auth.userlist: required when auth.method is scram-sha-256: the file with the users' SCRAM secrets"}},
		{"scram with missing userlist", func(c *Config) { c.Auth = Auth{Method: "scram-sha-256", Userlist: missing} },
			[]string{"auth.userlist: cannot read " + missing + ": no such file or directory"}},
		{"cert without key", func(c *Config) { c.TLS.Cert = cert },
			[]string{"tls.cert: is set but tls.key is not; set both to enable TLS, or neither"}},
		{"key without cert", func(c *Config) { c.TLS.Key = key },
			[]string{"tls.key: is set but tls.cert is not; set both to enable TLS, or neither"}},
		{"cert file missing", func(c *Config) { c.TLS.Cert, c.TLS.Key = missing, key },
			[]string{"tls.cert: cannot read " + missing + ": no such file or directory"}},
		{"cert and key do not load", func(c *Config) { c.TLS.Cert, c.TLS.Key = garbage, key },
			[]string{"tls.cert: cannot be loaded with tls.key: failed to find any PEM data in certificate input"}},
		{"key swapped for cert", func(c *Config) { c.TLS.Cert, c.TLS.Key = key, cert },
			[]string{"tls.cert: cannot be loaded with tls.key: failed to find certificate PEM data in certificate input, but did find a private key; PEM inputs may have been switched"}},
		{"require without TLS", func(c *Config) { c.TLS.Require = true },
			[]string{"tls.require: needs tls.cert and tls.key: clients cannot be required to use TLS that is not configured"}},
		{"zero sessions", func(c *Config) { c.Limits.MaxClientSessions = 0 },
			[]string{"limits.max_client_sessions: must be at least 1"}},
		{"message cap too small", func(c *Config) { c.Limits.MaxMessageBytes = 8*KiB - 1 },
			[]string{"limits.max_message_bytes: must be from 8KiB to 2147483647B (2GiB-1), not 8191B"}},
		{"message cap too large", func(c *Config) { c.Limits.MaxMessageBytes = 2 * GiB },
			[]string{"limits.max_message_bytes: must be from 8KiB to 2147483647B (2GiB-1), not 2GiB"}},
		{"connect timeout zero", func(c *Config) { c.Limits.ConnectTimeout = 0 },
			[]string{"limits.connect_timeout: must be greater than 0, e.g. 10s"}},
		{"negative timeouts", func(c *Config) {
			c.Limits.IdleSessionTimeout = Duration(-time.Second)
			c.Limits.DrainTimeout = Duration(-time.Second)
		}, []string{
			"limits.idle_session_timeout: must not be negative (0 turns it off)",
			"limits.drain_timeout: must not be negative (0 means do not wait)",
		}},
		{"control store set and valid", func(c *Config) {
			c.Control = Control{DSN: "host=control port=5434 dbname=tandem sslmode=disable", PasswordFile: userlist}
			c.Routing = Routing{ReplicaID: "a", MirrorBudget: 1, BreakerFailures: 1, BreakerOpen: 1, Poll: 1,
				FenceTimeout: 1, SequenceMargin: 0, RepairInterval: 1, RepairBackoffMax: 1, DriftStuckAttempts: 1, FeedWait: 1}
		}, nil},
		{"feed bounds", func(c *Config) {
			c.Routing.FeedWait, c.Gates.FeedMaxLag, c.Gates.FeedMaxLagBytes = 0, -1, 0
		}, []string{"routing.feed_wait: must be > 0, not 0s", "gates.feed_max_lag: must be > 0, not -1ns", "gates.feed_max_lag_bytes: must be at least 1 byte"}},
		{"control.dsn does not parse", func(c *Config) { c.Control.DSN = "postgres://tandem:s3cret@control:port/tandem" },
			[]string{"control.dsn: cannot parse DSN: invalid port"}},
		{"control.password_file missing", func(c *Config) { c.Control.PasswordFile = missing },
			[]string{"control.password_file: cannot read " + missing + ": no such file or directory"}},
		{"routing durations must be positive", func(c *Config) {
			c.Routing.MirrorBudget = 0
			c.Routing.BreakerOpen = Duration(-time.Second)
			c.Routing.Poll = 0
			c.Routing.FenceTimeout = 0
			c.Routing.RepairInterval = Duration(-time.Millisecond)
		}, []string{
			"routing.mirror_budget: must be > 0, not 0s",
			"routing.breaker_open: must be > 0, not -1s",
			"routing.poll: must be > 0, not 0s",
			"routing.fence_timeout: must be > 0, not 0s",
			"routing.repair_interval: must be > 0, not -1ms",
		}},
		{"repair backoff and stuck bound", func(c *Config) {
			c.Routing.RepairInterval, c.Routing.RepairBackoffMax, c.Routing.DriftStuckAttempts = Duration(time.Minute), Duration(time.Second), 0
		}, []string{
			"routing.repair_backoff_max: must be at least routing.repair_interval (1m0s), not 1s",
			"routing.drift_stuck_attempts: must be at least 1, not 0",
		}},
		{"feed WAL limits", func(c *Config) { c.Feed.WALWarn, c.Feed.WALMax = 2*GiB, 1*GiB },
			[]string{"feed.wal_max: must be at least feed.wal_warn (2GiB), not 1GiB"}},
		{"feed WAL warn zero", func(c *Config) { c.Feed.WALWarn = 0 },
			[]string{"feed.wal_warn: must be at least 1 byte"}},
		{"breaker needs a failure", func(c *Config) { c.Routing.BreakerFailures = 0 },
			[]string{"routing.breaker_failures: must be at least 1, not 0"}},
		{"negative sequence margin", func(c *Config) { c.Routing.SequenceMargin = -1 },
			[]string{"routing.sequence_margin: must be >= 0, not -1"}},
		{"shadow and gates bounds", func(c *Config) {
			c.Shadow.Queue, c.Shadow.Workers, c.Shadow.MaxResultBytes = 0, 0, 0
			c.Shadow.Timeout, c.Shadow.Settle, c.Shadow.FloatTolerance = 0, -1, 1
			c.Gates.VerifyMaxAge, c.Gates.ShadowWindow, c.Gates.ShadowMaxMismatchRate = -1, 0, 1.5
		}, []string{
			"shadow.queue: must be at least 1, not 0",
			"shadow.workers: must be at least 1, not 0",
			"shadow.max_result_bytes: must be at least 1 byte",
			"shadow.timeout: must be > 0",
			"shadow.settle: must be >= 0",
			"shadow.float_tolerance: must be in [0, 1), not 1",
			"gates.verify_max_age: must be >= 0 (0 turns the gate off)",
			"gates.shadow_window: must be > 0",
			"gates.shadow_max_mismatch_rate: must be in [0, 1], not 1.5",
		}},
		{"log format", func(c *Config) { c.Log.Format = "xml" },
			[]string{`log.format: must be "text" or "json", not "xml"`}},
		{"log level", func(c *Config) { c.Log.Level = "INFO" },
			[]string{`log.level: must be "debug", "info", "warn" or "error", not "INFO"`}},
		{"every problem is reported", func(c *Config) {
			c.Listen = "nowhere"
			c.Old.DSN = ""
			c.TLS.Require = true
			c.Limits.MaxClientSessions = -1
			c.Log.Level = "loud"
		}, []string{
			"listen: must be host:port, e.g. 127.0.0.1:6432 or [::1]:6432 (missing port in address)",
			"old.dsn: required: the DSN of the old store, e.g. postgres://user@host:5432/db?sslmode=require",
			"tls.require: needs tls.cert and tls.key: clients cannot be required to use TLS that is not configured",
			"limits.max_client_sessions: must be at least 1",
			`log.level: must be "debug", "info", "warn" or "error", not "loud"`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			c.Old.DSN = validDSN
			tt.mutate(&c)
			err := c.Validate()
			got := problemStrings(problemsOf(t, err))
			if len(got) == 0 {
				got = nil
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
			if err != nil && strings.Contains(err.Error(), "s3") {
				t.Errorf("error leaks a password: %v", err)
			}
		})
	}
}

// TestValidatePositions checks that Validate says where each bad value came from.
func TestValidatePositions(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "tandem.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
auth:
  method: scram-sha-256
limits:
  connect_timeout: 0s
  max_client_sessions: 0
log:
  level: loud
`)
	fs := pflag.NewFlagSet("tandem", pflag.ContinueOnError)
	f := NewFlags(fs)
	if err := fs.Parse([]string{"-c", file, "--log-format=xml"}); err != nil {
		t.Fatal(err)
	}
	_, err := f.Load(env(map[string]string{"TANDEM_LIMITS_MAX_CLIENT_SESSIONS": "-3", "TANDEM_LISTEN": "nowhere"}))
	got := problemStrings(problemsOf(t, err))
	want := []string{
		"listen: must be host:port, e.g. 127.0.0.1:6432 or [::1]:6432 (missing port in address) (set by environment variable TANDEM_LISTEN)",
		file + ":3:1: auth.userlist: required when auth.method is scram-sha-256: the file with the users' SCRAM secrets",
		"limits.max_client_sessions: must be at least 1 (set by environment variable TANDEM_LIMITS_MAX_CLIENT_SESSIONS)",
		file + ":6:3: limits.connect_timeout: must be greater than 0, e.g. 10s",
		`log.format: must be "text" or "json", not "xml" (set by flag --log-format)`,
		file + `:9:3: log.level: must be "debug", "info", "warn" or "error", not "loud"`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

// TestCheckControlAndRouting: problems in the control and routing sections carry their file positions, and a
// control DSN's password never appears.
func TestCheckControlAndRouting(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "tandem.yaml", `old:
  dsn: "postgres://app@localhost/app?sslmode=disable"
control:
  dsn: "postgres://tandem:s3cret@control:notaport/tandem"
  password_file: nope.pgpass
routing:
  poll: 0s
  breaker_failures: 0
  sequence_margin: -5
  fence_timeout: soon
`)
	got := problemStrings(Check(file, nil))
	want := []string{
		file + ":4:3: control.dsn: cannot parse DSN: invalid port",
		file + ":5:3: control.password_file: cannot read " + filepath.Join(dir, "nope.pgpass") + ": no such file or directory",
		file + ":7:3: routing.poll: must be > 0, not 0s",
		file + ":8:3: routing.breaker_failures: must be at least 1, not 0",
		file + ":9:3: routing.sequence_margin: must be >= 0, not -5",
		file + `:10:3: routing.fence_timeout: invalid duration "soon": want a number with a unit (ns, us, ms, s, m, h), e.g. "10s" or "1m30s"`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	for _, p := range got {
		if strings.Contains(p, "s3cret") {
			t.Errorf("problem leaks the password: %s", p)
		}
	}
}

func TestCheck(t *testing.T) {
	file := filepath.Join("testdata", "bad.yaml")
	got := problemStrings(Check(file, nil))
	want := []string{
		file + ":2:1: listen: must be host:port, e.g. 127.0.0.1:6432 or [::1]:6432 (missing port in address)",
		file + ":4:3: old.dsn: cannot parse DSN: invalid port",
		file + ":5:1: auth.userlist: required when auth.method is scram-sha-256: the file with the users' SCRAM secrets",
		file + `:8:3: unknown field "max_sesions" in limits (valid: max_client_sessions, max_message_bytes, connect_timeout, idle_session_timeout, drain_timeout, message_timeout, max_batch_bytes, max_batch_messages, max_buffered_bytes)`,
		file + ":9:3: limits.max_client_sessions: must be at least 1",
		file + `:10:3: limits.connect_timeout: invalid duration "10": needs a unit, e.g. "10s" or "10ms"`,
		file + `:12:3: log.level: must be "debug", "info", "warn" or "error", not "verbose"`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	for _, p := range got {
		if strings.Contains(p, "s3cret") {
			t.Errorf("problem leaks the password: %s", p)
		}
	}
	ps := Check(file, nil)
	if p := ps[0]; p.File != file || p.Line != 2 || p.Column != 1 || p.Field != "listen" {
		t.Errorf("first problem fields = %+v", p)
	}

	// Problems without a position in the file (here from the environment) come after those with one.
	got = problemStrings(Check(file, env(map[string]string{"TANDEM_LOG_FORMAT": "xml", "TANDEM_LISTEN": "127.0.0.1:1"})))
	if n := len(got); n != 7 || got[n-1] != `log.format: must be "text" or "json", not "xml" (set by environment variable TANDEM_LOG_FORMAT)` {
		t.Errorf("with env: got\n  %s", strings.Join(got, "\n  "))
	}

	// A valid file has no problems; an unreadable or unparsable one has one, and nothing is validated.
	if ps := Check(filepath.Join("testdata", "good.yaml"), nil); len(ps) != 0 {
		t.Errorf("good.yaml: %v", ps)
	}
	bad := writeFile(t, t.TempDir(), "t.yaml", "old:\n  dsn: [\n")
	if ps := Check(bad, nil); len(ps) != 1 || ps[0].Line != 2 || !strings.HasPrefix(ps[0].Message, "invalid YAML: ") {
		t.Errorf("syntax error: %v", ps)
	}
	if ps := Check(filepath.Join(t.TempDir(), "missing.yaml"), nil); len(ps) != 1 || ps[0].Field != "" {
		t.Errorf("missing file: %v", ps)
	}
}

func TestProblemString(t *testing.T) {
	tests := []struct {
		p    Problem
		want string
	}{
		{Problem{File: "tandem.yaml", Line: 7, Column: 3, Field: "limits.max_client_sessions", Message: "must be at least 1"},
			"tandem.yaml:7:3: limits.max_client_sessions: must be at least 1"},
		{Problem{File: "tandem.yaml", Line: 7, Message: "invalid YAML: x"}, "tandem.yaml:7: invalid YAML: x"},
		{Problem{File: "tandem.yaml", Message: "cannot read config file: x"}, "tandem.yaml: cannot read config file: x"},
		{Problem{Field: "listen", Message: "m"}, "listen: m"},
	}
	for _, tt := range tests {
		if got := tt.p.String(); got != tt.want {
			t.Errorf("%+v.String() = %q, want %q", tt.p, got, tt.want)
		}
	}
	err := Problems{tests[0].p, tests[3].p}
	if got, want := err.Error(), tests[0].want+"\n"+tests[3].want; got != want {
		t.Errorf("Problems.Error() = %q, want %q", got, want)
	}
}

func TestByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		err  string
	}{
		{"0", 0, ""},
		{"8192", 8192, ""},
		{"1B", 1, ""},
		{"1kB", 1000, ""},
		{"1KB", 1000, ""},
		{"1kb", 1000, ""},
		{"1KiB", 1024, ""},
		{"1kib", 1024, ""},
		{"64 kB", 64000, ""},
		{" 256MiB ", 256 << 20, ""},
		{"256MB", 256e6, ""},
		{"1GB", 1e9, ""},
		{"1GiB", 1 << 30, ""},
		{"2TiB", 2 << 40, ""},
		{"1TB", 1e12, ""},
		{"", 0, `invalid size "": want a whole number of bytes, optionally with a unit such as kB, MB, KiB or MiB`},
		{"MiB", 0, `invalid size "MiB": want a whole number of bytes, optionally with a unit such as kB, MB, KiB or MiB`},
		{"-1", 0, `invalid size "-1": must not be negative`},
		{"1.5GiB", 0, `invalid size "1.5GiB": must be a whole number; use a smaller unit instead of a fraction`},
		{"10 bananas", 0, `invalid size "10 bananas": unknown unit "bananas"; use B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)`},
		{"9223372036854775807", 1<<63 - 1, ""},
		{"9223372036854775808", 0, `invalid size "9223372036854775808": too large`},
		{"9000000TiB", 0, `invalid size "9000000TiB": too large`},
	}
	for _, tt := range tests {
		got, err := ParseByteSize(tt.in)
		if tt.err != "" {
			if err == nil || err.Error() != tt.err {
				t.Errorf("ParseByteSize(%q) error = %v, want %q", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
		// String is exact: it parses back to the same value.
		if back, err := ParseByteSize(got.String()); err != nil || back != got {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d", got.String(), back, err, got)
		}
	}

	strs := []struct {
		b    ByteSize
		want string
	}{
		{0, "0B"}, {1, "1B"}, {1000, "1kB"}, {1024, "1KiB"}, {1536, "1536B"}, {256 * MiB, "256MiB"},
		{3 * GiB, "3GiB"}, {5 * MB, "5MB"}, {1024000, "1000KiB"}, {2 * TiB, "2TiB"}, {-5, "-5B"}, {8*KiB - 1, "8191B"},
	}
	for _, tt := range strs {
		if got := tt.b.String(); got != tt.want {
			t.Errorf("ByteSize(%d).String() = %q, want %q", int64(tt.b), got, tt.want)
		}
	}

	// YAML: integers are bytes, strings carry units; marshalling round-trips.
	for _, tt := range []struct {
		yaml string
		want ByteSize
		err  bool
	}{
		{"v: 1048576", MiB, false}, {"v: 0x100", 256, false}, {"v: 1MiB", MiB, false}, {`v: "1 MB"`, MB, false},
		{"v: -1", 0, true}, {"v: 1.5", 0, true}, {"v: [1]", 0, true}, {"v: ten", 0, true},
	} {
		var out struct{ V ByteSize }
		err := yaml.Unmarshal([]byte(tt.yaml), &out)
		if (err != nil) != tt.err || (!tt.err && out.V != tt.want) {
			t.Errorf("yaml %q: got %d, %v", tt.yaml, out.V, err)
		}
	}
	data, err := yaml.Marshal(struct{ V ByteSize }{64 * KiB})
	if err != nil || string(data) != "v: 64KiB\n" {
		t.Errorf("yaml.Marshal = %q, %v", data, err)
	}
	js, err := json.Marshal(struct{ V ByteSize }{64 * KB})
	if err != nil || string(js) != `{"V":"64kB"}` {
		t.Errorf("json.Marshal = %s, %v", js, err)
	}
	var fromJSON struct{ V ByteSize }
	if err := json.Unmarshal(js, &fromJSON); err != nil || fromJSON.V != 64*KB {
		t.Errorf("json.Unmarshal = %d, %v", fromJSON.V, err)
	}

	// pflag.Value.
	var b ByteSize
	var _ pflag.Value = &b
	if err := b.Set("8KiB"); err != nil || b != 8*KiB || b.Type() != "bytes" {
		t.Errorf("Set(8KiB) = %d, %v", b, err)
	}
	if err := b.Set("x"); err == nil || b != 8*KiB {
		t.Errorf("failed Set changed the value or did not fail: %d, %v", b, err)
	}
}

func TestDuration(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		err  string
	}{
		{"0", 0, ""},
		{"0s", 0, ""},
		{"10s", 10 * time.Second, ""},
		{"1m30s", 90 * time.Second, ""},
		{"250ms", 250 * time.Millisecond, ""},
		{"2h", 2 * time.Hour, ""},
		{" 5s ", 5 * time.Second, ""},
		{"-1s", -time.Second, ""}, // parses; Validate refuses negative timeouts
		{"10", 0, `invalid duration "10": needs a unit, e.g. "10s" or "10ms"`},
		{"1.5", 0, `invalid duration "1.5": needs a unit, e.g. "1.5s" or "1.5ms"`},
		{"10 s", 0, `invalid duration "10 s": want a number with a unit (ns, us, ms, s, m, h), e.g. "10s" or "1m30s"`},
		{"1d", 0, `invalid duration "1d": want a number with a unit (ns, us, ms, s, m, h), e.g. "10s" or "1m30s"`},
		{"", 0, `invalid duration "": want a number with a unit (ns, us, ms, s, m, h), e.g. "10s" or "1m30s"`},
	}
	for _, tt := range tests {
		var d Duration
		err := d.Set(tt.in)
		if tt.err != "" {
			if err == nil || err.Error() != tt.err {
				t.Errorf("Set(%q) error = %v, want %q", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil || d.Duration() != tt.want {
			t.Errorf("Set(%q) = %v, %v; want %v", tt.in, d, err, tt.want)
		}
		var back Duration
		if err := back.Set(d.String()); err != nil || back != d {
			t.Errorf("Set(%q) = %v, %v; want %v", d.String(), back, err, d)
		}
	}
	for _, tt := range []struct {
		d    Duration
		want string
	}{{0, "0s"}, {Duration(90 * time.Second), "1m30s"}, {Duration(10 * time.Second), "10s"}} {
		if got := tt.d.String(); got != tt.want {
			t.Errorf("String() = %q, want %q", got, tt.want)
		}
	}
	for _, tt := range []struct {
		yaml string
		want time.Duration
		err  bool
	}{
		{"v: 10s", 10 * time.Second, false}, {"v: 0", 0, false}, {`v: "1m"`, time.Minute, false},
		{"v: 10", 0, true}, {"v: {s: 1}", 0, true},
	} {
		var out struct{ V Duration }
		err := yaml.Unmarshal([]byte(tt.yaml), &out)
		if (err != nil) != tt.err || (!tt.err && out.V.Duration() != tt.want) {
			t.Errorf("yaml %q: got %v, %v", tt.yaml, out.V, err)
		}
	}
	data, err := yaml.Marshal(struct{ V Duration }{Duration(90 * time.Second)})
	if err != nil || string(data) != "v: 1m30s\n" {
		t.Errorf("yaml.Marshal = %q, %v", data, err)
	}
	var d Duration
	var _ pflag.Value = &d
	if d.Type() != "duration" {
		t.Errorf("Type() = %q", d.Type())
	}
}

func TestRedactDSN(t *testing.T) {
	tests := []struct{ in, want string }{
		// URLs.
		{"postgres://app:s3cret@db:5432/app?sslmode=require", "postgres://app:xxxxx@db:5432/app?sslmode=require"},
		{"postgresql://app:s3cret@db/app", "postgresql://app:xxxxx@db/app"},
		{"postgres://app@db/app", "postgres://app@db/app"},
		{"postgres://db/app", "postgres://db/app"},
		{"postgres://app:p%40ss%2Fw@db/app", "postgres://app:xxxxx@db/app"},
		{"postgres://app:@db/app", "postgres://app:xxxxx@db/app"},
		{"postgres://app@db/app?sslmode=disable&password=s3cret&application_name=x",
			"postgres://app@db/app?sslmode=disable&password=xxxxx&application_name=x"},
		{"postgres://db/app?sslpassword=s3cret", "postgres://db/app?sslpassword=xxxxx"},
		{"postgres://db/app?pass%77ord=s3cret", "postgres://db/app?pass%77ord=xxxxx"},
		{"postgres://app:s3cret@h1:5432,h2:5433/app", "postgres://app:xxxxx@h1:5432,h2:5433/app"},
		{"postgres://db/app?application_name=a@b", "postgres://db/app?application_name=a@b"},
		// URLs that do not parse are redacted conservatively.
		{"postgres://app:s3c ret/x@y@db/app", "postgres://app:xxxxx@db/app"},
		{"postgres://app:s3cret@db:port/app", "postgres://app:xxxxx@db:port/app"},
		// Keyword/value.
		{"host=db user=app password=s3cret dbname=app", "host=db user=app password=xxxxx dbname=app"},
		{"host=db password='s3 cret' sslmode=require", "host=db password=xxxxx sslmode=require"},
		{`host=db password='it\'s secret' port=5432`, "host=db password=xxxxx port=5432"},
		{`password=s3\ cret host=db`, "password=xxxxx host=db"},
		{"host=db password = s3cret", "host=db password = xxxxx"},
		{"  host=db\tpassword=s3cret\n", "  host=db\tpassword=xxxxx\n"},
		{"password='unterminated host=db", "password=xxxxx"},
		{"sslpassword=s3cret sslkey=/k", "sslpassword=xxxxx sslkey=/k"},
		{"host=db user=password", "host=db user=password"},
		{"host=db application_name='password=s3cret'", "host=db application_name='password=s3cret'"},
		{"host=db", "host=db"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := RedactDSN(tt.in); got != tt.want {
			t.Errorf("RedactDSN(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestDSNErrorsHideThePassword feeds malformed DSNs through Validate and checks no password survives.
func TestDSNErrorsHideThePassword(t *testing.T) {
	for _, dsn := range []string{
		"postgres://app:Secr3tPw@db:notaport/app",
		"postgres://app:Secr3tPw@db/app?sslmode=bogus",
		"postgres://app:Secr3t%25Pw@db:99999999/app",
		"postgres://app:Secr3tPw@db/app?connect_timeout=x",
		"host=db password=Secr3tPw port=x",
		"host=db password='Secr3t Pw' sslmode=bogus",
		"host=db password=Secr3tPw connect_timeout=Secr3tPw",
		"password=Secr3tPw junk",
	} {
		c := Default()
		c.Old.DSN = dsn
		err := c.Validate()
		if err == nil {
			t.Errorf("%q: no error", RedactDSN(dsn))
			continue
		}
		if msg := err.Error(); strings.Contains(msg, "Secr3t") || !strings.HasPrefix(msg, "old.dsn: cannot parse DSN: ") {
			t.Errorf("%q: %s", RedactDSN(dsn), msg)
		}
	}
}

// TestFlagsShow: Show hides the flags of other settings from --help, and
// they are still accepted.
func TestFlagsShow(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	f := NewFlags(fs).Show(ToolSettings...)
	for name, hidden := range map[string]bool{"old": false, "control": false, "fence-timeout": false, "listen": true, "tls-cert": true, "relay-engine": true, "config": false} {
		fl := fs.Lookup(name)
		if fl == nil {
			t.Fatalf("--%s not registered", name)
		}
		if fl.Hidden != hidden {
			t.Errorf("--%s hidden %v, want %v", name, fl.Hidden, hidden)
		}
	}
	if err := fs.Parse([]string{"--old", "postgres://u@127.0.0.1:1/d", "--listen", "127.0.0.1:7"}); err != nil {
		t.Fatal(err)
	}
	cfg, err := f.Load(nil)
	if err != nil || cfg.Listen != "127.0.0.1:7" {
		t.Fatalf("a hidden flag is still applied: %v %q", err, cfg.Listen)
	}
}

// The liveness window a flip waits for a silent replica covers the
// replica's self-fence bound plus a poll, whatever the settings.
func TestLivenessWindow(t *testing.T) {
	for _, tc := range []struct{ poll, sf, bound, live time.Duration }{
		{2 * time.Second, 0, 4 * time.Second, 6 * time.Second},
		{200 * time.Millisecond, 0, 2 * time.Second, 2200 * time.Millisecond},
		{time.Second, 5 * time.Second, 5 * time.Second, 6 * time.Second},
		{3 * time.Second, 0, 6 * time.Second, 9 * time.Second},
	} {
		r := Routing{Poll: Duration(tc.poll), SelfFence: Duration(tc.sf)}
		if b, l := r.SelfFenceBound().Duration(), r.LivenessWindow().Duration(); b != tc.bound || l != tc.live || l < b+tc.poll {
			t.Errorf("poll %s self_fence %s: bound %s window %s, want %s and %s", tc.poll, tc.sf, b, l, tc.bound, tc.live)
		}
	}
}
