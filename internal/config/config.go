// Package config defines tandem's configuration and builds it from four layers, each overriding the one before:
// built-in defaults, a YAML file, TANDEM_* environment variables, and the command-line flags the user explicitly set.
// Every subcommand uses the same options, so one file or one set of flags drives them all.
//
// A Config is built only through Load (or Flags.Load) and checked with Validate; the package keeps no mutable state.
// Problems are reported with the YAML path of the setting ("limits.max_client_sessions") and, when the value came
// from the file, its line and column; values from the environment or flags name the variable or flag instead.
// Passwords (inside DSNs) never appear in errors; use RedactDSN to log a DSN.
//
// Relative file paths given in the YAML file (password_file, userlist, tls.cert, tls.key) are resolved against the
// directory of that file, so a config file and the files it names can move together; relative paths from
// environment variables or flags are left as they are, i.e. relative to the working directory.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"github.com/agnivade/levenshtein"
	"go.yaml.in/yaml/v3"
)

// Config is the complete configuration of a tandem process.
type Config struct {
	Listen string `yaml:"listen"` // address (host:port) where clients connect; default "127.0.0.1:6432"
	Admin  string `yaml:"admin"`  // address (host:port) of the admin HTTP server; default "127.0.0.1:9187"
	// AdminAPI secures the admin HTTP server: its token, TLS, allowed Host names, pprof and connection cap.
	AdminAPI AdminAPI `yaml:"admin_api"`
	Old      Store    `yaml:"old"`     // the store being migrated from
	New      Store    `yaml:"new"`     // the store being migrated to
	Auth     Auth     `yaml:"auth"`    // how clients authenticate to tandem
	TLS      TLS      `yaml:"tls"`     // client-facing TLS
	Limits   Limits   `yaml:"limits"`  // resource limits and timeouts
	Relay    Relay    `yaml:"relay"`   // how bytes are relayed
	Control  Control  `yaml:"control"` // where the control schema (routing state, drift ledger) lives
	Routing  Routing  `yaml:"routing"` // mirroring, breaker and write-flip behaviour
	Shadow   Shadow   `yaml:"shadow"`  // how shadow reads run and are compared
	Gates    Gates    `yaml:"gates"`   // the write-flip gates built on verify and shadow reads
	Feed     Feed     `yaml:"feed"`    // the change feed: the primary's WAL checked against the secondary (design section 10)
	Tracing  Tracing  `yaml:"tracing"` // OpenTelemetry spans of client units, exported over OTLP/HTTP; off by default
	Log      Log      `yaml:"log"`     // log output
	Tables   Tables   `yaml:"tables"`  // the migration's scope and table mappings (YAML only)

	// src records where Load found each value, for error positions. It is nil for a Config not built by Load.
	src *sources
}

// AdminAPI secures the admin HTTP server (the address is Config.Admin).
type AdminAPI struct {
	// TokenFile holds the bearer token every admin request but /healthz, /readyz and /metrics must carry
	// ("Authorization: Bearer TOKEN"); surrounding whitespace is ignored. Empty = no token, which is allowed only
	// while Admin is a loopback address. The CLI commands that call the admin API read the same file.
	TokenFile string `yaml:"token_file"`
	TLSCert   string `yaml:"tls_cert"` // PEM certificate (chain) for HTTPS on the admin address; set together with TLSKey
	TLSKey    string `yaml:"tls_key"`  // PEM private key of TLSCert
	// AllowedHosts lists, comma-separated, the host names (without port) a state-changing request may name in
	// its Host header besides the loopback names and Admin's own host: a guard against DNS rebinding.
	AllowedHosts   string `yaml:"allowed_hosts"`
	Pprof          bool   `yaml:"pprof"`           // serve /debug/pprof/ (behind the token; never cmdline); default false
	MaxConnections int    `yaml:"max_connections"` // concurrent admin connections; more wait to be accepted; default 64
}

// Store describes how to reach one PostgreSQL store.
type Store struct {
	// DSN is a libpq connection URL ("postgres://user@host:5432/db?sslmode=require") or keyword/value string
	// ("host=h port=5432 sslmode=require user=u dbname=db"): host, port, sslmode, the default user and database,
	// and optionally a password. It is secret if it holds a password: log it only through RedactDSN.
	DSN string `yaml:"dsn"`
	// PasswordFile is an optional pgpass-format file ("host:port:db:user:password" lines) that supplies the
	// passwords tandem uses upstream.
	PasswordFile string `yaml:"password_file"`
	// RequireAuth lists, comma-separated, the authentication methods the store may ask of Tandem, as libpq's
	// require_auth: "scram-sha-256", "md5", "password", "none". Empty (the default) allows scram-sha-256 and none
	// always, and md5 and password only over TLS, so a password never crosses the network in cleartext or as
	// an MD5 hash an eavesdropper can replay against other servers.
	RequireAuth string `yaml:"require_auth"`
}

// Upstream authentication methods accepted in Store.RequireAuth.
const (
	UpstreamSCRAM    = "scram-sha-256"
	UpstreamMD5      = "md5"
	UpstreamPassword = "password"
	UpstreamNone     = "none"
)

// Auth methods accepted in Auth.Method.
const (
	AuthTrust       = "trust"         // clients are not asked for a password
	AuthSCRAMSHA256 = "scram-sha-256" // clients prove a password listed in Auth.Userlist
)

// Auth configures how clients authenticate to tandem.
type Auth struct {
	Method string `yaml:"method"` // AuthTrust (default) or AuthSCRAMSHA256
	// Userlist is a pgbouncer-style userlist file: one `"user" "secret"` line per user, where the secret is a plain password or a SCRAM-SHA-256 verifier.
	// Required when Method is AuthSCRAMSHA256.
	Userlist string `yaml:"userlist"`
	// AllowRemoteTrust lets Method be AuthTrust while Listen is not a loopback address: anyone who reaches the
	// port logs in upstream with the stores' credentials. Off by default; Validate refuses the combination.
	AllowRemoteTrust bool `yaml:"allow_remote_trust"`
}

// TLS configures TLS between clients and tandem.
type TLS struct {
	Cert    string `yaml:"cert"`    // PEM certificate (chain); empty = no TLS, an SSLRequest is answered 'N'
	Key     string `yaml:"key"`     // PEM private key of Cert; set together with Cert
	Require bool   `yaml:"require"` // refuse clients that do not use TLS; needs Cert and Key
}

// Bounds for Limits.MaxMessageBytes.
const (
	// MinMessageBytes is the smallest allowed message cap: any less and ordinary startup and query messages fail.
	MinMessageBytes = 8 * KiB
	// MaxMessageBytes is the largest allowed message cap: the largest length the protocol's int32 length field can
	// express (2GiB-1), which is room for PostgreSQL's 1GiB maximum field value plus the message around it.
	MaxMessageBytes ByteSize = 1<<31 - 1
)

// Limits bounds the resources tandem uses and how long it waits.
type Limits struct {
	MaxClientSessions  int      `yaml:"max_client_sessions"`  // concurrent client sessions; default 1000; >= 1
	MaxMessageBytes    ByteSize `yaml:"max_message_bytes"`    // cap on one protocol message in either direction; default 256MiB
	ConnectTimeout     Duration `yaml:"connect_timeout"`      // client startup+auth and upstream dial; default 10s; > 0
	IdleSessionTimeout Duration `yaml:"idle_session_timeout"` // close sessions idle outside a transaction this long; 0 (default) = off
	DrainTimeout       Duration `yaml:"drain_timeout"`        // on SIGTERM, how long open transactions may finish; default 30s
	// MessageTimeout bounds how long the rest of a client message may take to arrive once its header has (in
	// routed mode); past it the session ends with 08P01. Default 60s; 0 = off.
	MessageTimeout Duration `yaml:"message_timeout"`
	// MaxBatchBytes and MaxBatchMessages cap what one session's extended-protocol batch may buffer in the proxy
	// before its Sync (routed mode); past either the session ends with 54000. MaxBatchBytes 0 (the default)
	// is MaxMessageBytes; MaxBatchMessages defaults to 10000.
	MaxBatchBytes    ByteSize `yaml:"max_batch_bytes"`
	MaxBatchMessages int      `yaml:"max_batch_messages"`
	// MaxBufferedBytes caps the batch bytes held for all sessions together; a batch that would pass it ends its
	// session with 54000. Default 1GiB.
	MaxBufferedBytes ByteSize `yaml:"max_buffered_bytes"`
}

// Relay engines accepted in Relay.Engine.
const (
	RelayGoroutines = "goroutines" // two goroutines per session, blocking reads through the Go runtime
	RelayEpoll      = "epoll"      // plaintext sessions on epoll loops that own their sockets (Linux)
)

// Relay chooses how sessions' bytes are moved once they are authenticated.
type Relay struct {
	Engine string `yaml:"engine"` // RelayEpoll (default) or RelayGoroutines
}

// Control says where the control schema "tandem" lives.
type Control struct {
	// DSN of the database holding the control schema; empty = the old store's DSN (and password file).
	DSN          string `yaml:"dsn"`
	PasswordFile string `yaml:"password_file"` // pgpass-format file for DSN; empty = old.password_file when DSN is empty
}

// Routing configures the write path while mirroring, and the write flip.
type Routing struct {
	ReplicaID          string   `yaml:"replica_id"`           // this proxy's id in tandem.replicas; default host:pid
	MirrorBudget       Duration `yaml:"mirror_budget"`        // per-statement latency budget on the secondary; default 500ms
	BreakerFailures    int      `yaml:"breaker_failures"`     // consecutive secondary failures that open the breaker; default 5
	BreakerOpen        Duration `yaml:"breaker_open"`         // how long the breaker stays open before a trial; default 5s
	Poll               Duration `yaml:"poll"`                 // state poll fallback and heartbeat interval; default 2s
	FenceTimeout       Duration `yaml:"fence_timeout"`        // how long a write flip waits for in-flight writes; default 5s
	SequenceMargin     int      `yaml:"sequence_margin"`      // added to each sequence when synced at a flip; default 1000
	RepairInterval     Duration `yaml:"repair_interval"`      // how often the drift repairer looks at the ledger; default 1s
	RepairBackoffMax   Duration `yaml:"repair_backoff_max"`   // the longest wait before a failing drift entry is retried; default 5m
	DriftStuckAttempts int      `yaml:"drift_stuck_attempts"` // failed repair attempts after which a drift entry is stuck (refuses a write flip); default 5
	FeedWait           Duration `yaml:"feed_wait"`            // with feed.enabled, how long a write flip waits under the fence for the change feed; default 5s

	// SelfFence is how long a replica may go without reading the routing state before it refuses writes (40001)
	// until it reads it again; 0 (default) = 2 × Poll, at least 2s. More than Poll. A flip stops waiting for a
	// replica it has not heard from for LivenessWindow, which is at least SelfFence + Poll.
	SelfFence Duration `yaml:"self_fence"`
}

// Shadow configures shadow reads: the routing state's shadow percentage
// says how many eligible reads also run on the other store; these settings
// say how they run and are compared.
type Shadow struct {
	Queue          int      `yaml:"queue"`            // reads waiting for a shadow run; when full a sample is dropped and counted; default 1000
	Workers        int      `yaml:"workers"`          // shadow runs at once (each holds one connection per store); default 4
	MaxResultBytes ByteSize `yaml:"max_result_bytes"` // a served result larger than this is not shadowed; default 1MiB
	Timeout        Duration `yaml:"timeout"`          // one shadow run on one store; default 5s
	Settle         Duration `yaml:"settle"`           // the re-read waits this long for in-flight mirrored writes; 0 (default) = routing.mirror_budget
	FloatTolerance float64  `yaml:"float_tolerance"`  // relative difference under which two floats are equal; default 1e-9
	AA             bool     `yaml:"aa"`               // A/A mode: shadow on the store that served, to measure the noise floor
	// RecordValues stores mismatches with their parameter values and the differing rows' values (and the
	// stores' error messages); off by default, when a record keeps only the statement text, column names,
	// counts and SQLSTATEs, as values may be personal data.
	RecordValues bool `yaml:"record_values"`
}

// Feed configures the change feed (docs/change-feed.md): one elected proxy
// replica reads the primary's WAL through a logical replication slot and
// checks every committed change on the secondary.
type Feed struct {
	// Enabled runs the feed in tandem proxy, makes write flips and
	// rollbacks wait for it, adds its cutover gate, and makes tandem plan
	// block on its prerequisites. Off by default: it needs wal_level=logical
	// and a replication slot on the primary, and a slot retains WAL on the
	// primary's disk until the feed has checked it.
	Enabled bool     `yaml:"enabled"`
	WALWarn ByteSize `yaml:"wal_warn"` // retained WAL past which the feed warns; default 1GiB
	WALMax  ByteSize `yaml:"wal_max"`  // retained WAL past which the slot is dropped and every table recorded as drift; default 8GiB
}

// Tracing configures the proxy's OpenTelemetry spans: one per client unit,
// with children for the primary, the secondary, the drift ledger and a
// write-fence wait, exported over OTLP/HTTP. It is off while Endpoint is
// empty, and changes only with a restart.
type Tracing struct {
	// Endpoint is the OTLP/HTTP collector: a URL ("https://otel:4318", the
	// path /v1/traces is added when it has none) or host:port. Empty = off.
	Endpoint string `yaml:"endpoint"`
	// SampleRatio is the share of units traced that carry no sampled
	// traceparent (0..1); a unit whose sqlcommenter traceparent is sampled
	// is always traced, one whose traceparent is not sampled never is.
	// Default 0.1.
	SampleRatio float64 `yaml:"sample_ratio"`
	Insecure    bool    `yaml:"insecure"` // plain HTTP to a host:port Endpoint (a URL says so by its scheme)
	// Headers are sent with every export, comma-separated key=value pairs
	// as OTEL_EXPORTER_OTLP_HEADERS takes them ("authorization=Bearer x").
	// They may be secret: they are never logged.
	Headers string `yaml:"headers"`
}

// Gates configures the write-flip gates that need evidence from compare
// and from shadow reads (the backfill, drift, mapping and breaker gates
// need no settings).
type Gates struct {
	VerifyMaxAge          Duration `yaml:"verify_max_age"`           // each table's last clean verify must be younger than this; 0 = gate off; default 24h
	ShadowWindow          Duration `yaml:"shadow_window"`            // the window the shadow mismatch rate is measured over; default 15m
	ShadowMaxMismatchRate float64  `yaml:"shadow_max_mismatch_rate"` // confirmed mismatches / compared reads above which a flip is refused; default 0
	FeedMaxLag            Duration `yaml:"feed_max_lag"`             // with feed.enabled, a write flip is refused when the change feed last advanced longer ago than this; default 30s
	FeedMaxLagBytes       ByteSize `yaml:"feed_max_lag_bytes"`       // ... or is this far behind the primary's WAL; default 64MiB
}

// Log formats and levels accepted in Log.
const (
	LogText  = "text"
	LogJSON  = "json"
	LogDebug = "debug"
	LogInfo  = "info"
	LogWarn  = "warn"
	LogError = "error"
)

// Log configures log output.
type Log struct {
	Format string `yaml:"format"` // LogText (default) or LogJSON
	Level  string `yaml:"level"`  // LogDebug, LogInfo (default), LogWarn or LogError
}

// SelfFenceBound is Routing.SelfFence with its default applied: when 0, 2 × Poll but at least 2s, so that a
// replica under load does not fence itself between two reads.
func (r Routing) SelfFenceBound() Duration {
	if r.SelfFence == 0 {
		return max(2*r.Poll, Duration(2e9))
	}
	return r.SelfFence
}

// LivenessWindow is how recent a replica's heartbeat must be for a write flip to wait for it: 3 × Poll, and at
// least SelfFenceBound + Poll, so that a replica a flip stops waiting for has fenced itself (its bound counts
// from a read that started before its last heartbeat) with a poll interval to spare for a statement in flight.
func (r Routing) LivenessWindow() Duration {
	return max(3*r.Poll, r.SelfFenceBound()+r.Poll)
}

// Default returns the built-in defaults. Old.DSN is empty and must be supplied before the config validates.
func Default() Config {
	return Config{
		Listen:   "127.0.0.1:6432",
		Admin:    "127.0.0.1:9187",
		AdminAPI: AdminAPI{MaxConnections: 64},
		Auth:     Auth{Method: AuthTrust},
		Limits: Limits{
			MaxClientSessions:  1000,
			MaxMessageBytes:    256 * MiB,
			ConnectTimeout:     Duration(10e9),
			IdleSessionTimeout: 0,
			DrainTimeout:       Duration(30e9),
			MessageTimeout:     Duration(60e9),
			MaxBatchMessages:   10000,
			MaxBufferedBytes:   1 * GiB,
		},
		Relay: Relay{Engine: RelayEpoll},
		Routing: Routing{
			MirrorBudget:       Duration(500e6),
			BreakerFailures:    5,
			BreakerOpen:        Duration(5e9),
			Poll:               Duration(2e9),
			FenceTimeout:       Duration(5e9),
			SequenceMargin:     1000,
			RepairInterval:     Duration(1e9),
			RepairBackoffMax:   Duration(300e9),
			DriftStuckAttempts: 5,
			FeedWait:           Duration(5e9),
		},
		Shadow: Shadow{
			Queue:          1000,
			Workers:        4,
			MaxResultBytes: 1 * MiB,
			Timeout:        Duration(5e9),
			FloatTolerance: 1e-9,
		},
		Feed: Feed{WALWarn: 1 * GiB, WALMax: 8 * GiB},
		Gates: Gates{
			VerifyMaxAge:    Duration(24 * 3600e9),
			ShadowWindow:    Duration(15 * 60e9),
			FeedMaxLag:      Duration(30e9),
			FeedMaxLagBytes: 64 * MiB,
		},
		Log:     Log{Format: LogText, Level: LogInfo},
		Tracing: Tracing{SampleRatio: 0.1},
	}
}

// origin says where a value came from: a position in the config file, an environment variable, or a flag.
type origin struct {
	line, column int    // position of the key in the file, when the value came from the file
	env          string // name of the environment variable that set the value
	flag         string // name of the flag that set the value
}

// sources records, per YAML path, where the current value of each setting came from.
type sources struct {
	file    string
	origins map[string]origin
}

func (c *Config) setOrigin(path string, o origin) {
	if c.src == nil {
		c.src = &sources{}
	}
	if c.src.origins == nil {
		c.src.origins = make(map[string]origin)
	}
	c.src.origins[path] = o
}

// option describes one setting: its YAML path, its flag, its help text and how to reach it in a Config.
type option struct {
	path   string            // YAML path, e.g. "limits.max_client_sessions"; the env var is derived from it
	flag   string            // long flag name
	usage  string            // flag help; the env var name is appended
	isFile bool              // a file path: relative values from the YAML file resolve against the file's directory
	field  func(*Config) any // pointer to the field (*string, *bool, *int, *ByteSize or *Duration)
}

// envName is the environment variable that overrides the setting at the YAML path: TANDEM_ + the path upper-cased,
// with dots as underscores ("limits.max_client_sessions" -> "TANDEM_LIMITS_MAX_CLIENT_SESSIONS").
func envName(path string) string {
	return "TANDEM_" + strings.ToUpper(strings.ReplaceAll(path, ".", "_"))
}

// EnvConfig names the environment variable that supplies the config file path when -c/--config is not given.
const EnvConfig = "TANDEM_CONFIG"

// options lists every setting, in the order of the Config struct.
func options() []option {
	return []option{
		{path: "listen", flag: "listen",
			usage: "address (host:port) where clients connect with the PostgreSQL protocol; an empty host listens on all interfaces, port 0 picks a free port",
			field: func(c *Config) any { return &c.Listen }},
		{path: "admin", flag: "admin",
			usage: "address (host:port) of the admin HTTP server; keep it on a private interface",
			field: func(c *Config) any { return &c.Admin }},
		{path: "admin_api.token_file", flag: "admin-token-file", isFile: true,
			usage: "`file` holding the bearer token the admin API requires on every request but /healthz, /readyz and /metrics; required when --admin is not a loopback address; CLI commands that call the admin API send it",
			field: func(c *Config) any { return &c.AdminAPI.TokenFile }},
		{path: "admin_api.tls_cert", flag: "admin-tls-cert", isFile: true,
			usage: "PEM certificate `file`: serve the admin API over HTTPS; needs --admin-tls-key",
			field: func(c *Config) any { return &c.AdminAPI.TLSCert }},
		{path: "admin_api.tls_key", flag: "admin-tls-key", isFile: true,
			usage: "PEM private key `file` of --admin-tls-cert",
			field: func(c *Config) any { return &c.AdminAPI.TLSKey }},
		{path: "admin_api.allowed_hosts", flag: "admin-allowed-hosts",
			usage: "comma-separated host names a state-changing admin request may carry in its Host header, besides localhost, 127.0.0.1, ::1 and the --admin host (a guard against DNS rebinding)",
			field: func(c *Config) any { return &c.AdminAPI.AllowedHosts }},
		{path: "admin_api.pprof", flag: "admin-pprof",
			usage: "serve Go profiles at /debug/pprof/ on the admin address, behind the token (/debug/pprof/cmdline is never served)",
			field: func(c *Config) any { return &c.AdminAPI.Pprof }},
		{path: "admin_api.max_connections", flag: "admin-max-connections",
			usage: "concurrent connections the admin server holds; further ones wait to be accepted (at least 1)",
			field: func(c *Config) any { return &c.AdminAPI.MaxConnections }},
		{path: "old.dsn", flag: "old",
			usage: "`DSN` of the old store (required): a postgres:// URL or keyword/value string with host, port, sslmode, default user and dbname, and optionally password",
			field: func(c *Config) any { return &c.Old.DSN }},
		{path: "old.password_file", flag: "old-password-file", isFile: true,
			usage: "pgpass-format `file` (host:port:db:user:password lines) with passwords for connecting to the old store",
			field: func(c *Config) any { return &c.Old.PasswordFile }},
		{path: "old.require_auth", flag: "old-require-auth",
			usage: `comma-separated authentication methods the old store may ask for ("scram-sha-256", "md5", "password", "none", as libpq's require_auth); empty = scram-sha-256 and none, and md5 and password only over TLS`,
			field: func(c *Config) any { return &c.Old.RequireAuth }},
		{path: "new.dsn", flag: "new",
			usage: "`DSN` of the new store, the migration target; same forms as --old",
			field: func(c *Config) any { return &c.New.DSN }},
		{path: "new.password_file", flag: "new-password-file", isFile: true,
			usage: "pgpass-format `file` (host:port:db:user:password lines) with passwords for connecting to the new store",
			field: func(c *Config) any { return &c.New.PasswordFile }},
		{path: "new.require_auth", flag: "new-require-auth",
			usage: "authentication methods the new store may ask for; same forms as --old-require-auth",
			field: func(c *Config) any { return &c.New.RequireAuth }},
		{path: "auth.method", flag: "auth-method",
			usage: `how clients authenticate to tandem: "trust" (no password asked) or "scram-sha-256" (passwords from --auth-userlist)`,
			field: func(c *Config) any { return &c.Auth.Method }},
		{path: "auth.userlist", flag: "auth-userlist", isFile: true,
			usage: "pgbouncer-style userlist `file`: one \"user\" \"secret\" line per user, the secret a plain password or a SCRAM-SHA-256$... verifier; required with --auth-method=scram-sha-256",
			field: func(c *Config) any { return &c.Auth.Userlist }},
		{path: "auth.allow_remote_trust", flag: "auth-allow-remote-trust",
			usage: "allow --auth-method=trust while --listen is not a loopback address (anyone who reaches the port then uses the stores' credentials); refused without it",
			field: func(c *Config) any { return &c.Auth.AllowRemoteTrust }},
		{path: "tls.cert", flag: "tls-cert", isFile: true,
			usage: "PEM certificate `file` for TLS with clients; empty = no TLS (SSLRequest is answered 'N'); needs --tls-key",
			field: func(c *Config) any { return &c.TLS.Cert }},
		{path: "tls.key", flag: "tls-key", isFile: true,
			usage: "PEM private key `file` matching --tls-cert",
			field: func(c *Config) any { return &c.TLS.Key }},
		{path: "tls.require", flag: "require-tls",
			usage: "refuse clients that do not use TLS; needs --tls-cert and --tls-key",
			field: func(c *Config) any { return &c.TLS.Require }},
		{path: "limits.max_client_sessions", flag: "max-client-sessions",
			usage: "maximum concurrent client sessions; connections beyond it are refused (at least 1)",
			field: func(c *Config) any { return &c.Limits.MaxClientSessions }},
		{path: "limits.max_message_bytes", flag: "max-message-bytes",
			usage: "largest protocol message accepted in either direction, in bytes or with a unit: kB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024); from 8KiB to 2GiB-1",
			field: func(c *Config) any { return &c.Limits.MaxMessageBytes }},
		{path: "limits.connect_timeout", flag: "connect-timeout",
			usage: "time allowed for a client's startup and authentication, and for dialing a store, e.g. 10s or 1m (must be > 0)",
			field: func(c *Config) any { return &c.Limits.ConnectTimeout }},
		{path: "limits.idle_session_timeout", flag: "idle-session-timeout",
			usage: "close client sessions that stay idle outside a transaction longer than this, e.g. 15m; 0 = off",
			field: func(c *Config) any { return &c.Limits.IdleSessionTimeout }},
		{path: "limits.drain_timeout", flag: "drain-timeout",
			usage: "on SIGTERM, how long open transactions may run to completion before their sessions are closed, e.g. 30s; 0 = do not wait",
			field: func(c *Config) any { return &c.Limits.DrainTimeout }},
		{path: "limits.message_timeout", flag: "message-timeout",
			usage: "once a client message's header has arrived, how long the rest may take (routed mode); past it the session ends with 08P01, e.g. 60s; 0 = off",
			field: func(c *Config) any { return &c.Limits.MessageTimeout }},
		{path: "limits.max_batch_bytes", flag: "max-batch-bytes",
			usage: "bytes of one session's extended-protocol batch the proxy buffers before its Sync (routed mode); past it the session ends with 54000; 0 = --max-message-bytes",
			field: func(c *Config) any { return &c.Limits.MaxBatchBytes }},
		{path: "limits.max_batch_messages", flag: "max-batch-messages",
			usage: "messages of one session's extended-protocol batch the proxy buffers before its Sync (routed mode); past it the session ends with 54000 (at least 1)",
			field: func(c *Config) any { return &c.Limits.MaxBatchMessages }},
		{path: "limits.max_buffered_bytes", flag: "max-buffered-bytes",
			usage: "batch bytes the proxy buffers for all sessions together; a batch that would pass it ends its session with 54000, e.g. 1GiB",
			field: func(c *Config) any { return &c.Limits.MaxBufferedBytes }},
		{path: "relay.engine", flag: "relay-engine",
			usage: `how authenticated sessions are relayed: "epoll" (plaintext sessions on event loops that own their sockets: about 30% less CPU per transaction; TLS sessions and non-Linux systems use goroutines) or "goroutines" (two per session, through the Go runtime)`,
			field: func(c *Config) any { return &c.Relay.Engine }},
		{path: "control.dsn", flag: "control",
			usage: "`DSN` of the database that holds the control schema \"tandem\" (routing state, replicas, drift ledger); empty = the old store",
			field: func(c *Config) any { return &c.Control.DSN }},
		{path: "control.password_file", flag: "control-password-file", isFile: true,
			usage: "pgpass-format `file` with the password for --control",
			field: func(c *Config) any { return &c.Control.PasswordFile }},
		{path: "routing.replica_id", flag: "replica-id",
			usage: "this proxy replica's id in tandem.replicas, where it acknowledges each routing version; default host:pid",
			field: func(c *Config) any { return &c.Routing.ReplicaID }},
		{path: "routing.mirror_budget", flag: "mirror-budget",
			usage: "latency budget for each mirrored statement on the secondary store, e.g. 500ms; past it the secondary is abandoned for that transaction and its keys go to the drift ledger (must be > 0)",
			field: func(c *Config) any { return &c.Routing.MirrorBudget }},
		{path: "routing.breaker_failures", flag: "breaker-failures",
			usage: "consecutive secondary failures that open the circuit breaker; while open, mirroring is skipped and every write is recorded as drift (at least 1)",
			field: func(c *Config) any { return &c.Routing.BreakerFailures }},
		{path: "routing.breaker_open", flag: "breaker-open",
			usage: "how long the breaker stays open before it lets one trial write through, e.g. 5s (must be > 0)",
			field: func(c *Config) any { return &c.Routing.BreakerOpen }},
		{path: "routing.poll", flag: "state-poll",
			usage: "how often a replica re-reads the routing state when no NOTIFY arrives, and sends its heartbeat, e.g. 2s (must be > 0)",
			field: func(c *Config) any { return &c.Routing.Poll }},
		{path: "routing.fence_timeout", flag: "fence-timeout",
			usage: "how long a write flip waits for in-flight write transactions to end before it gives up and releases the fence, e.g. 5s (must be > 0)",
			field: func(c *Config) any { return &c.Routing.FenceTimeout }},
		{path: "routing.sequence_margin", flag: "sequence-margin",
			usage: "added to every sequence's value when sequences are synced at a write flip (>= 0)",
			field: func(c *Config) any { return &c.Routing.SequenceMargin }},
		{path: "routing.repair_interval", flag: "repair-interval",
			usage: "how often the drift repairer re-copies the keys in the drift ledger, e.g. 1s (must be > 0)",
			field: func(c *Config) any { return &c.Routing.RepairInterval }},
		{path: "routing.repair_backoff_max", flag: "repair-backoff-max",
			usage: "a drift entry the repairer fails on waits 2, 4, 8... times routing.repair_interval before its next attempt, at most this, e.g. 5m (must be >= routing.repair_interval)",
			field: func(c *Config) any { return &c.Routing.RepairBackoffMax }},
		{path: "routing.drift_stuck_attempts", flag: "drift-stuck-attempts",
			usage: "failed repair attempts after which a drift entry counts as stuck: shown by tandem route show and the tandem_drift_stuck metric, and a write flip is refused (at least 1)",
			field: func(c *Config) any { return &c.Routing.DriftStuckAttempts }},
		{path: "routing.feed_wait", flag: "feed-wait",
			usage: "with feed.enabled, how long a write flip or rollback waits, writes fenced, for the change feed to check the primary's WAL up to the fence, e.g. 5s; past it the flip is refused and the fence released (--force goes on without it) (must be > 0)",
			field: func(c *Config) any { return &c.Routing.FeedWait }},
		{path: "routing.self_fence", flag: "self-fence",
			usage: "a replica that has not read the routing state for this long refuses writes (40001) until it reads it again, e.g. 4s (more than routing.poll); a flip waits for a silent replica until max(3 × routing.poll, this + routing.poll) after its last heartbeat; 0 = 2 × routing.poll, at least 2s",
			field: func(c *Config) any { return &c.Routing.SelfFence }},
		{path: "shadow.queue", flag: "shadow-queue",
			usage: "reads waiting for their shadow run; when the queue is full a sample is dropped and counted, never waited for (at least 1)",
			field: func(c *Config) any { return &c.Shadow.Queue }},
		{path: "shadow.workers", flag: "shadow-workers",
			usage: "shadow runs at once; each holds at most one connection per store and database (at least 1)",
			field: func(c *Config) any { return &c.Shadow.Workers }},
		{path: "shadow.max_result_bytes", flag: "shadow-max-result",
			usage: "a served result larger than this is not shadowed (counted as skipped), e.g. 1MiB",
			field: func(c *Config) any { return &c.Shadow.MaxResultBytes }},
		{path: "shadow.timeout", flag: "shadow-timeout",
			usage: "time allowed for one shadow run on one store, e.g. 5s (must be > 0)",
			field: func(c *Config) any { return &c.Shadow.Timeout }},
		{path: "shadow.settle", flag: "shadow-settle",
			usage: "before a difference counts, the secondary is re-read this long after the primary so that in-flight mirrored writes have landed; 0 = routing.mirror_budget",
			field: func(c *Config) any { return &c.Shadow.Settle }},
		{path: "shadow.float_tolerance", flag: "shadow-float-tolerance",
			usage: "relative difference under which two float values compare equal, e.g. 1e-9 (0..1)",
			field: func(c *Config) any { return &c.Shadow.FloatTolerance }},
		{path: "shadow.aa", flag: "shadow-aa",
			usage: "A/A mode: run each shadow read on the store that served it, to measure the comparison's noise floor",
			field: func(c *Config) any { return &c.Shadow.AA }},
		{path: "shadow.record_values", flag: "shadow-record-values",
			usage: "store shadow mismatches with their parameter values, the differing rows' values and the stores' error messages; off = only statement text, column names, counts and SQLSTATEs",
			field: func(c *Config) any { return &c.Shadow.RecordValues }},
		{path: "gates.verify_max_age", flag: "gate-verify-max-age",
			usage: "a write flip to new needs every table in scope verified clean (tandem compare) within this long, e.g. 24h; 0 = gate off",
			field: func(c *Config) any { return &c.Gates.VerifyMaxAge }},
		{path: "gates.shadow_window", flag: "gate-shadow-window",
			usage: "the window over which the shadow mismatch rate is measured for the write-flip gate, e.g. 15m (must be > 0)",
			field: func(c *Config) any { return &c.Gates.ShadowWindow }},
		{path: "gates.shadow_max_mismatch_rate", flag: "gate-shadow-max-mismatch-rate",
			usage: "a write flip to new is refused when confirmed shadow mismatches / compared reads over the window is above this (0..1; 0 = any mismatch refuses)",
			field: func(c *Config) any { return &c.Gates.ShadowMaxMismatchRate }},
		{path: "gates.feed_max_lag", flag: "gate-feed-max-lag",
			usage: "with feed.enabled, a write flip is refused when the change feed's checked position last advanced longer ago than this, e.g. 30s (must be > 0)",
			field: func(c *Config) any { return &c.Gates.FeedMaxLag }},
		{path: "gates.feed_max_lag_bytes", flag: "gate-feed-max-lag-bytes",
			usage: "with feed.enabled, a write flip is refused when the change feed is this far behind the primary's WAL, e.g. 64MiB (at least 1 byte)",
			field: func(c *Config) any { return &c.Gates.FeedMaxLagBytes }},
		{path: "feed.enabled", flag: "feed",
			usage: "run the change feed: the elected proxy replica reads the primary's WAL (logical slot tandem_feed_<store>, publication tandem_feed) and checks every committed change on the secondary, recording differences as drift; write flips and rollbacks wait for it, a feed that is down or behind refuses a flip, and tandem plan blocks on its prerequisites (wal_level=logical, slots, REPLICATION, replica identity)",
			field: func(c *Config) any { return &c.Feed.Enabled }},
		{path: "feed.wal_warn", flag: "feed-wal-warn",
			usage: "WAL retained by the change feed's slot on the primary past which it warns (log and tandem_feed_retained_bytes), in bytes or with a unit, e.g. 1GiB (>= 1)",
			field: func(c *Config) any { return &c.Feed.WALWarn }},
		{path: "feed.wal_max", flag: "feed-wal-max",
			usage: "WAL retained by the change feed's slot past which the slot is dropped and every table in scope recorded as drift, rather than fill the primary's disk, e.g. 8GiB (must be >= feed.wal_warn)",
			field: func(c *Config) any { return &c.Feed.WALMax }},
		{path: "tracing.endpoint", flag: "tracing-endpoint",
			usage: "OTLP/HTTP collector to export spans to (a URL, or host:port); empty = no tracing. A span per client unit, with children for the primary, the secondary, the drift ledger and a write-fence wait; a sqlcommenter traceparent joins the application's trace",
			field: func(c *Config) any { return &c.Tracing.Endpoint }},
		{path: "tracing.sample_ratio", flag: "tracing-sample-ratio",
			usage: "share of client units traced (0..1) when the statement carries no traceparent; a traceparent's sampled flag decides for the units that carry one",
			field: func(c *Config) any { return &c.Tracing.SampleRatio }},
		{path: "tracing.insecure", flag: "tracing-insecure",
			usage: "export over plain HTTP to a host:port tracing.endpoint",
			field: func(c *Config) any { return &c.Tracing.Insecure }},
		{path: "tracing.headers", flag: "tracing-headers",
			usage: `headers sent with every export, "key=value,key2=value2" (may be secret: never logged)`,
			field: func(c *Config) any { return &c.Tracing.Headers }},
		{path: "log.format", flag: "log-format",
			usage: `log output format: "text" or "json"`,
			field: func(c *Config) any { return &c.Log.Format }},
		{path: "log.level", flag: "log-level",
			usage: `least severe messages logged: "debug", "info", "warn" or "error"`,
			field: func(c *Config) any { return &c.Log.Level }},
	}
}

// setFromString parses s into the field p points to, as an environment variable or flag value.
func setFromString(p any, s string) error {
	switch v := p.(type) {
	case *string:
		*v = s
	case *bool:
		b, err := strconv.ParseBool(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("invalid boolean %q: want true or false", s)
		}
		*v = b
	case *int:
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("invalid integer %q", s)
		}
		*v = n
	case *float64:
		f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
		if err != nil {
			return fmt.Errorf("invalid number %q", s)
		}
		*v = f
	case *ByteSize:
		return v.Set(s)
	case *Duration:
		return v.Set(s)
	default:
		panic(fmt.Sprintf("config: unsupported field type %T", p))
	}
	return nil
}

// Load builds a Config: the defaults, then the YAML file at path (skipped when path is ""), then the TANDEM_*
// environment variables looked up through getenv (pass os.LookupEnv; nil means no environment). It does not call
// Validate. The file is read strictly: unknown keys, values of the wrong type and a second YAML document are
// errors. An empty file (or one with only comments) leaves the defaults in place. A set but malformed environment
// variable is an error naming the variable; a set but empty one sets a string option to "".
//
// A non-nil error is a Problems listing everything wrong, each with its position.
func Load(path string, getenv func(string) (string, bool)) (*Config, error) {
	cfg, probs, _ := load(path, getenv)
	if len(probs) > 0 {
		return nil, probs
	}
	return cfg, nil
}

// load does the work of Load, but returns what it could build alongside the problems it found, so Check can
// validate the rest of a file that has, say, an unknown key. usable is false when the file could not be read or
// is not valid YAML, so that the returned Config says nothing about it.
func load(path string, getenv func(string) (string, bool)) (cfg *Config, probs Problems, usable bool) {
	c := Default()
	c.src = &sources{file: path, origins: make(map[string]origin)}
	usable = true
	if path != "" {
		var fileProbs Problems
		fileProbs, usable = c.loadFile(path)
		probs = append(probs, fileProbs...)
	}
	if getenv != nil {
		probs = append(probs, c.loadEnv(getenv)...)
	}
	return &c, probs, usable
}

// loadFile overlays the YAML file at path onto c. usable is false when the file could not be read or parsed.
func (c *Config) loadFile(path string) (probs Problems, usable bool) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Problems{{File: path, Message: "cannot read config file: " + describeFileError(err)}}, false
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, true // empty file: all defaults
		}
		return Problems{yamlSyntaxProblem(path, err)}, false
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		probs = append(probs, Problem{File: path, Line: extra.Line, Column: extra.Column,
			Message: "a second YAML document (after ---); the config file must hold exactly one"})
	} else if !errors.Is(err, io.EOF) {
		return Problems{yamlSyntaxProblem(path, err)}, false
	}

	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return probs, true // only comments
		}
		root = root.Content[0]
	}
	w := walker{cfg: c, file: path, opts: make(map[string]option)}
	for _, o := range options() {
		w.opts[o.path] = o
	}
	w.walk(nil, root, "")
	probs = append(probs, w.probs...)

	if len(probs) == 0 {
		// The walk above gives positions and precise messages; the strict yaml.v3 decode is the authority on the
		// values themselves, and a backstop that no key escaped the walk.
		strict := Default()
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(&strict); err != nil {
			return Problems{yamlSyntaxProblem(path, err)}, true
		}
		strict.src = c.src
		*c = strict
	}

	dir := filepath.Dir(path)
	for _, o := range options() {
		if _, fromFile := c.src.origins[o.path]; !fromFile || !o.isFile {
			continue
		}
		if p := o.field(c).(*string); *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	return probs, true
}

// loadEnv overlays the TANDEM_* environment variables onto c.
func (c *Config) loadEnv(getenv func(string) (string, bool)) Problems {
	var probs Problems
	for _, o := range options() {
		name := envName(o.path)
		v, ok := getenv(name)
		if !ok {
			continue
		}
		if err := setFromString(o.field(c), v); err != nil {
			probs = append(probs, Problem{Field: o.path, Message: fmt.Sprintf("environment variable %s: %v", name, err)})
			continue
		}
		c.setOrigin(o.path, origin{env: name})
	}
	return probs
}

// yamlLineRE finds the line number yaml.v3 puts in its error messages.
func yamlLineRE() *regexp.Regexp { return regexp.MustCompile(`^(?:yaml: )?line (\d+): `) }

// yamlSyntaxProblem turns a yaml.v3 error into a Problem, moving its line number into the position.
func yamlSyntaxProblem(file string, err error) Problem {
	msg := err.Error()
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = strings.Join(te.Errors, "; ")
	}
	p := Problem{File: file}
	if m := yamlLineRE().FindStringSubmatch(msg); m != nil {
		p.Line, _ = strconv.Atoi(m[1])
		msg = msg[len(m[0]):]
	}
	p.Message = "invalid YAML: " + strings.TrimPrefix(msg, "yaml: ")
	return p
}

// describeFileError shortens an os error to its cause; the path is already in the Problem.
func describeFileError(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// walker checks a YAML node tree against the options, decoding each value into cfg and recording its position.
type walker struct {
	cfg   *Config
	file  string
	opts  map[string]option
	probs Problems
}

func (w *walker) problem(n *yaml.Node, field, msg string) {
	w.probs = append(w.probs, Problem{File: w.file, Line: n.Line, Column: n.Column, Field: field, Message: msg})
}

// walk checks the mapping n, found at the YAML path prefix ("" for the top level, else a section like "limits")
// under the key node at (nil for the top level), which gives the position of problems with n as a whole.
func (w *walker) walk(at, n *yaml.Node, prefix string) {
	n = resolveAlias(n)
	if at == nil {
		at = n
	}
	where := "the top level of the file"
	if prefix != "" {
		where = prefix
	}
	if n.ShortTag() == "!!null" {
		return
	}
	if n.Kind != yaml.MappingNode {
		if prefix == "" {
			w.problem(at, "", "the config file must be a mapping of settings (key: value), not "+nodeKind(n))
		} else {
			w.problem(at, prefix, "must be a mapping of settings (key: value), not "+nodeKind(n))
		}
		return
	}
	// Merge keys (<<) first, so that explicit keys override merged ones, as in YAML.
	for i := 0; i+1 < len(n.Content); i += 2 {
		if k := n.Content[i]; k.ShortTag() == "!!merge" {
			v := resolveAlias(n.Content[i+1])
			if v.Kind == yaml.SequenceNode {
				for _, m := range v.Content {
					w.walk(k, m, prefix)
				}
			} else {
				w.walk(k, v, prefix)
			}
		}
	}
	seen := make(map[string]*yaml.Node)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.ShortTag() == "!!merge" {
			continue
		}
		if first, dup := seen[k.Value]; dup {
			w.problem(k, "", fmt.Sprintf("key %q appears twice in %s (first on line %d)", k.Value, where, first.Line))
			continue
		}
		seen[k.Value] = k
		path := k.Value
		if prefix != "" {
			path = prefix + "." + k.Value
		}
		if o, ok := w.opts[path]; ok {
			w.leaf(k, v, o)
			continue
		}
		if prefix == "" && k.Value == "tables" {
			w.walkTables(k, v)
			continue
		}
		if prefix == "" && w.isSection(k.Value) {
			w.cfg.setOrigin(k.Value, origin{line: k.Line, column: k.Column})
			w.walk(k, v, k.Value)
			continue
		}
		w.problem(k, "", w.unknownField(k.Value, prefix))
	}
}

func (w *walker) isSection(name string) bool {
	for p := range w.opts {
		if strings.HasPrefix(p, name+".") {
			return true
		}
	}
	return false
}

// unknownField describes an unknown key, suggesting the nearest known one or listing the valid ones.
func (w *walker) unknownField(key, prefix string) string {
	var valid []string
	for _, o := range options() {
		name := o.path
		if prefix != "" {
			rest, ok := strings.CutPrefix(o.path, prefix+".")
			if !ok {
				continue
			}
			name = rest
		} else if sec, _, ok := strings.Cut(o.path, "."); ok {
			name = sec
		}
		if len(valid) == 0 || valid[len(valid)-1] != name {
			valid = append(valid, name)
		}
	}
	if prefix == "" {
		valid = append(valid, "tables")
	}
	msg := fmt.Sprintf("unknown field %q", key)
	if prefix != "" {
		msg += " in " + prefix
	}
	best, bestDist := "", len(key)/3+2
	for _, v := range valid {
		if d := levenshtein.ComputeDistance(strings.ToLower(key), v); d < bestDist {
			best, bestDist = v, d
		}
	}
	if best != "" {
		return msg + fmt.Sprintf(" (did you mean %q?)", best)
	}
	return msg + " (valid: " + strings.Join(valid, ", ") + ")"
}

// leaf decodes the value v of key k into the option o, recording where it came from.
func (w *walker) leaf(k, v *yaml.Node, o option) {
	v = resolveAlias(v)
	if v.ShortTag() == "!!null" {
		return // "key:" with no value keeps the default
	}
	p := o.field(w.cfg)
	if v.Kind != yaml.ScalarNode {
		w.problem(k, o.path, "must be a single value, not "+nodeKind(v))
		return
	}
	tmp := reflect.New(reflect.TypeOf(p).Elem())
	if err := v.Decode(tmp.Interface()); err != nil {
		var msg string
		quoted := ""
		if v.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0 {
			quoted = " without quotes"
		}
		switch p.(type) {
		case *int:
			msg = fmt.Sprintf("must be a whole number%s, not %s", quoted, strconv.Quote(v.Value))
		case *bool:
			msg = fmt.Sprintf("must be true or false%s, not %s", quoted, strconv.Quote(v.Value))
		case *float64:
			msg = fmt.Sprintf("must be a number%s, not %s", quoted, strconv.Quote(v.Value))
		case *string:
			msg = "must be a string" // never quote the value: it may be a DSN with a password
		default:
			msg = err.Error()
		}
		w.problem(k, o.path, msg)
		return
	}
	reflect.ValueOf(p).Elem().Set(tmp.Elem())
	w.cfg.setOrigin(o.path, origin{line: k.Line, column: k.Column})
}

func resolveAlias(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func nodeKind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	default:
		return "a single value"
	}
}
