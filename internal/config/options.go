package config

import (
	"fmt"
	"strconv"
	"strings"
)

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
//
// It stays one function over 100 lines on purpose: it is a declarative table, one entry per setting and no logic,
// and the YAML paths, flags, env variables and help texts (tandem --help) are read off it in this order; split by
// section, a new setting's place would be one more thing to find.
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
			usage: "run the change feed: the elected proxy replica reads the primary's WAL (logical slot tandem_feed_<store>, publication tandem_feed; see feed.name) and checks every committed change on the secondary, recording differences as drift; write flips and rollbacks wait for it, a feed that is down or behind refuses a flip, and tandem plan blocks on its prerequisites (wal_level=logical, slots, REPLICATION, replica identity)",
			field: func(c *Config) any { return &c.Feed.Enabled }},
		{path: "feed.name", flag: "feed-name",
			usage: "this deployment's name in the change feed's publication and slots: tandem_feed_<name> and tandem_feed_<name>_<store> instead of tandem_feed and tandem_feed_<store>; lower-case letters, digits and _, at most 40. Required with a discriminator (a consolidation's deployments share the new store), and wherever two deployments' stores share a cluster, since slot names are cluster-wide",
			field: func(c *Config) any { return &c.Feed.Name }},
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
