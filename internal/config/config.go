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
	Enabled bool `yaml:"enabled"`
	// Name names this deployment's publication and slots (tandem_feed_<name>,
	// tandem_feed_<name>_<store>); empty = tandem_feed, tandem_feed_<store>.
	// Deployments that share a store need names of their own: a
	// consolidation's (a mapping with a discriminator) must set it.
	Name    string   `yaml:"name"`
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
