package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// Problem is one thing wrong with a configuration.
type Problem struct {
	File   string // config file the value came from; "" when it came from defaults, the environment or a flag
	Line   int    // 1-based line in File, 0 if unknown
	Column int    // 1-based column in File, 0 if unknown
	Field  string // YAML path of the setting, e.g. "limits.max_client_sessions"; "" if the problem is not about one setting
	// Message says what is wrong, without the field or position. It never contains a password.
	Message string
}

// String formats the problem as "file:line:column: field: message", leaving out the parts that are unknown, e.g.
// "tandem.yaml:7:3: limits.max_client_sessions: must be at least 1".
func (p Problem) String() string {
	var b strings.Builder
	if p.File != "" {
		b.WriteString(p.File)
		if p.Line > 0 {
			b.WriteString(":" + strconv.Itoa(p.Line))
			if p.Column > 0 {
				b.WriteString(":" + strconv.Itoa(p.Column))
			}
		}
		b.WriteString(": ")
	}
	if p.Field != "" {
		b.WriteString(p.Field + ": ")
	}
	b.WriteString(p.Message)
	return b.String()
}

// Problems is the error returned by Load, Validate and Flags.Load: every problem found, in the order found.
// Use errors.As to get at the individual problems.
type Problems []Problem

// Error lists the problems one per line.
func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Validate checks every setting and every combination of settings and returns nil or a Problems listing all that is
// wrong. Each problem names the setting's YAML path and, when Load read the value from the file, its position;
// values from the environment or a flag are named in the message instead. Validate reads the files the config
// names (userlist, TLS certificate and key, password files) to check that they are usable, and parses the DSNs
// the way the stores will be dialed (pgconn.ParseConfig, which also consults PG* environment variables).
func (c *Config) Validate() error {
	if ps := c.problems(); len(ps) > 0 {
		return ps
	}
	return nil
}

// problems checks every setting and combination of settings for Validate and Check, in one fixed order.
//
// It stays one function over 100 lines on purpose: it is a flat list of rules, a few lines per setting with no
// steps between them (the longer checks are validator methods already: adminAPI, dsn, readable, validateTables), so
// each setting's rule is found by its YAML path in one place and the problems keep the order they are reported in.
func (c *Config) problems() Problems {
	v := validator{c: c}

	v.address("listen", c.Listen)
	v.address("admin", c.Admin)
	if c.Listen != "" && c.Listen == c.Admin && !strings.HasSuffix(c.Admin, ":0") {
		v.add("admin", fmt.Sprintf("must differ from listen (both are %q)", c.Admin))
	}

	v.adminAPI()

	if strings.TrimSpace(c.Old.DSN) == "" {
		v.add("old.dsn", "required: the DSN of the old store, e.g. postgres://user@host:5432/db?sslmode=require")
	} else {
		v.dsn("old.dsn", c.Old.DSN)
	}
	if strings.TrimSpace(c.New.DSN) != "" {
		v.dsn("new.dsn", c.New.DSN)
	}
	v.readable("old.password_file", c.Old.PasswordFile)
	v.readable("new.password_file", c.New.PasswordFile)
	v.requireAuth("old.require_auth", c.Old.RequireAuth)
	v.requireAuth("new.require_auth", c.New.RequireAuth)
	if strings.TrimSpace(c.Control.DSN) != "" {
		v.dsn("control.dsn", c.Control.DSN)
	}
	v.readable("control.password_file", c.Control.PasswordFile)

	switch c.Auth.Method {
	case AuthTrust:
		if _, _, err := net.SplitHostPort(c.Listen); err == nil && !IsLoopback(c.Listen) && !c.Auth.AllowRemoteTrust {
			v.add("auth.method", fmt.Sprintf("is trust while listen (%q) is not a loopback address: anyone who reaches that port would "+
				"use the stores' credentials without a password; use scram-sha-256 with auth.userlist, listen on 127.0.0.1, "+
				"or set auth.allow_remote_trust: true (--auth-allow-remote-trust) if a network boundary you trust guards the port", c.Listen))
		}
	case AuthSCRAMSHA256:
		if c.Auth.Userlist == "" {
			v.add("auth.userlist", "required when auth.method is scram-sha-256: the file with the users' SCRAM secrets")
		}
	default:
		v.add("auth.method", fmt.Sprintf("must be %q or %q, not %q", AuthTrust, AuthSCRAMSHA256, c.Auth.Method))
	}
	v.readable("auth.userlist", c.Auth.Userlist)

	certOK := v.readable("tls.cert", c.TLS.Cert)
	keyOK := v.readable("tls.key", c.TLS.Key)
	switch {
	case c.TLS.Cert != "" && c.TLS.Key == "":
		v.add("tls.cert", "is set but tls.key is not; set both to enable TLS, or neither")
	case c.TLS.Cert == "" && c.TLS.Key != "":
		v.add("tls.key", "is set but tls.cert is not; set both to enable TLS, or neither")
	case c.TLS.Cert != "" && certOK && keyOK:
		if _, err := tls.LoadX509KeyPair(c.TLS.Cert, c.TLS.Key); err != nil {
			v.add("tls.cert", "cannot be loaded with tls.key: "+strings.TrimPrefix(err.Error(), "tls: "))
		}
	}
	if c.TLS.Require && (c.TLS.Cert == "" || c.TLS.Key == "") {
		v.add("tls.require", "needs tls.cert and tls.key: clients cannot be required to use TLS that is not configured")
	}

	if c.Limits.MaxClientSessions < 1 {
		v.add("limits.max_client_sessions", "must be at least 1")
	}
	if m := c.Limits.MaxMessageBytes; m < MinMessageBytes || m > MaxMessageBytes {
		v.add("limits.max_message_bytes", fmt.Sprintf("must be from %s to %s (2GiB-1), not %s", MinMessageBytes, ByteSize(MaxMessageBytes), m))
	}
	if c.Limits.ConnectTimeout <= 0 {
		v.add("limits.connect_timeout", "must be greater than 0, e.g. 10s")
	}
	if c.Limits.IdleSessionTimeout < 0 {
		v.add("limits.idle_session_timeout", "must not be negative (0 turns it off)")
	}
	if c.Limits.DrainTimeout < 0 {
		v.add("limits.drain_timeout", "must not be negative (0 means do not wait)")
	}
	if c.Limits.MessageTimeout < 0 {
		v.add("limits.message_timeout", "must not be negative (0 turns it off)")
	}
	if c.Limits.MaxBatchBytes != 0 && c.Limits.MaxBatchBytes < c.Limits.MaxMessageBytes {
		v.add("limits.max_batch_bytes", fmt.Sprintf("must be 0 (= limits.max_message_bytes) or at least limits.max_message_bytes (%s): a batch holds at least one message, not %s", c.Limits.MaxMessageBytes, c.Limits.MaxBatchBytes))
	}
	if c.Limits.MaxBatchMessages < 1 {
		v.add("limits.max_batch_messages", fmt.Sprintf("must be at least 1, not %d", c.Limits.MaxBatchMessages))
	}
	if c.Limits.MaxBufferedBytes < MinMessageBytes {
		v.add("limits.max_buffered_bytes", fmt.Sprintf("must be at least %s, not %s", MinMessageBytes, c.Limits.MaxBufferedBytes))
	}

	for _, d := range []struct {
		path string
		v    Duration
	}{{"routing.mirror_budget", c.Routing.MirrorBudget}, {"routing.breaker_open", c.Routing.BreakerOpen},
		{"routing.poll", c.Routing.Poll}, {"routing.fence_timeout", c.Routing.FenceTimeout},
		{"routing.repair_interval", c.Routing.RepairInterval}, {"routing.feed_wait", c.Routing.FeedWait},
		{"gates.feed_max_lag", c.Gates.FeedMaxLag}} {
		if d.v <= 0 {
			v.add(d.path, fmt.Sprintf("must be > 0, not %s", d.v))
		}
	}
	if sf := c.Routing.SelfFence; sf < 0 || (sf != 0 && sf <= c.Routing.Poll) {
		v.add("routing.self_fence", fmt.Sprintf("must be more than routing.poll (%s): a replica reads the state once a poll; or 0 for 2 × routing.poll, at least 2s; not %s",
			c.Routing.Poll, sf))
	}
	if c.Routing.RepairBackoffMax < c.Routing.RepairInterval {
		v.add("routing.repair_backoff_max", fmt.Sprintf("must be at least routing.repair_interval (%s), not %s", c.Routing.RepairInterval, c.Routing.RepairBackoffMax))
	}
	if c.Routing.DriftStuckAttempts < 1 {
		v.add("routing.drift_stuck_attempts", fmt.Sprintf("must be at least 1, not %d", c.Routing.DriftStuckAttempts))
	}
	if c.Routing.BreakerFailures < 1 {
		v.add("routing.breaker_failures", fmt.Sprintf("must be at least 1, not %d", c.Routing.BreakerFailures))
	}
	if c.Shadow.Queue < 1 {
		v.add("shadow.queue", fmt.Sprintf("must be at least 1, not %d", c.Shadow.Queue))
	}
	if c.Shadow.Workers < 1 {
		v.add("shadow.workers", fmt.Sprintf("must be at least 1, not %d", c.Shadow.Workers))
	}
	if r := c.Tracing.SampleRatio; r < 0 || r > 1 {
		v.add("tracing.sample_ratio", fmt.Sprintf("must be between 0 and 1, not %v", r))
	}
	if c.Tracing.Headers != "" {
		for kv := range strings.SplitSeq(c.Tracing.Headers, ",") {
			if k, _, ok := strings.Cut(kv, "="); !ok || strings.TrimSpace(k) == "" {
				v.add("tracing.headers", "want key=value pairs separated by commas")
				break
			}
		}
	}
	if n := c.Feed.Name; n != "" && !feedName.MatchString(n) {
		v.add("feed.name", fmt.Sprintf("%q: want lower-case letters, digits and _, at most 40 (it goes into replication slot names), e.g. shop", n))
	}
	if c.Feed.WALWarn < 1 {
		v.add("feed.wal_warn", "must be at least 1 byte")
	}
	if c.Feed.WALMax < c.Feed.WALWarn {
		v.add("feed.wal_max", fmt.Sprintf("must be at least feed.wal_warn (%s), not %s", c.Feed.WALWarn, c.Feed.WALMax))
	}
	if c.Shadow.MaxResultBytes < 1 {
		v.add("shadow.max_result_bytes", "must be at least 1 byte")
	}
	if c.Shadow.Timeout <= 0 {
		v.add("shadow.timeout", "must be > 0")
	}
	if c.Shadow.Settle < 0 {
		v.add("shadow.settle", "must be >= 0")
	}
	if !(c.Shadow.FloatTolerance >= 0 && c.Shadow.FloatTolerance < 1) {
		v.add("shadow.float_tolerance", fmt.Sprintf("must be in [0, 1), not %g", c.Shadow.FloatTolerance))
	}
	if c.Gates.VerifyMaxAge < 0 {
		v.add("gates.verify_max_age", "must be >= 0 (0 turns the gate off)")
	}
	if c.Gates.ShadowWindow <= 0 {
		v.add("gates.shadow_window", "must be > 0")
	}
	if !(c.Gates.ShadowMaxMismatchRate >= 0 && c.Gates.ShadowMaxMismatchRate <= 1) {
		v.add("gates.shadow_max_mismatch_rate", fmt.Sprintf("must be in [0, 1], not %g", c.Gates.ShadowMaxMismatchRate))
	}
	if c.Gates.FeedMaxLagBytes < 1 {
		v.add("gates.feed_max_lag_bytes", "must be at least 1 byte")
	}
	if c.Routing.SequenceMargin < 0 {
		v.add("routing.sequence_margin", fmt.Sprintf("must be >= 0, not %d", c.Routing.SequenceMargin))
	}
	if !slices.Contains([]string{RelayGoroutines, RelayEpoll}, c.Relay.Engine) {
		v.add("relay.engine", fmt.Sprintf("must be %q or %q, not %q", RelayGoroutines, RelayEpoll, c.Relay.Engine))
	}
	if !slices.Contains([]string{LogText, LogJSON}, c.Log.Format) {
		v.add("log.format", fmt.Sprintf("must be %q or %q, not %q", LogText, LogJSON, c.Log.Format))
	}
	if !slices.Contains([]string{LogDebug, LogInfo, LogWarn, LogError}, c.Log.Level) {
		v.add("log.level", fmt.Sprintf("must be %q, %q, %q or %q, not %q", LogDebug, LogInfo, LogWarn, LogError, c.Log.Level))
	}
	v.validateTables(c.Tables)
	return v.probs
}

// validator collects problems, attaching to each the origin of the value.
type validator struct {
	c     *Config
	probs Problems
}

func (v *validator) add(field, msg string) {
	p := Problem{Field: field, Message: msg}
	if s := v.c.src; s != nil {
		o, ok := s.origins[field]
		for at := field; !ok; {
			// A setting missing from a section that is in the file: point at the nearest enclosing key that is.
			i := strings.LastIndexByte(at, '.')
			if i < 0 {
				break
			}
			at = at[:i]
			o, ok = s.origins[at]
		}
		switch {
		case !ok:
		case o.flag != "":
			p.Message += " (set by flag --" + o.flag + ")"
		case o.env != "":
			p.Message += " (set by environment variable " + o.env + ")"
		case o.line > 0:
			p.File, p.Line, p.Column = s.file, o.line, o.column
		}
	}
	v.probs = append(v.probs, p)
}

// adminAPI checks the admin server's token, TLS and limits.
func (v *validator) adminAPI() {
	a := v.c.AdminAPI
	if v.readable("admin_api.token_file", a.TokenFile) && a.TokenFile != "" {
		if _, err := ReadToken(a.TokenFile); err != nil {
			v.add("admin_api.token_file", err.Error())
		}
	}
	if _, _, err := net.SplitHostPort(v.c.Admin); err == nil && a.TokenFile == "" && !IsLoopback(v.c.Admin) {
		v.add("admin", fmt.Sprintf("%q is not a loopback address and the admin API has no token: anyone who reaches it could flip "+
			"writes or stop mirroring; set admin_api.token_file (--admin-token-file, TANDEM_ADMIN_API_TOKEN_FILE) to a file "+
			"holding a long random token, e.g. from 'openssl rand -hex 32', or listen on 127.0.0.1", v.c.Admin))
	}
	certOK := v.readable("admin_api.tls_cert", a.TLSCert)
	keyOK := v.readable("admin_api.tls_key", a.TLSKey)
	switch {
	case a.TLSCert != "" && a.TLSKey == "":
		v.add("admin_api.tls_cert", "is set but admin_api.tls_key is not; set both to serve HTTPS, or neither")
	case a.TLSCert == "" && a.TLSKey != "":
		v.add("admin_api.tls_key", "is set but admin_api.tls_cert is not; set both to serve HTTPS, or neither")
	case a.TLSCert != "" && certOK && keyOK:
		if _, err := tls.LoadX509KeyPair(a.TLSCert, a.TLSKey); err != nil {
			v.add("admin_api.tls_cert", "cannot be loaded with admin_api.tls_key: "+strings.TrimPrefix(err.Error(), "tls: "))
		}
	}
	if a.MaxConnections < 1 {
		v.add("admin_api.max_connections", fmt.Sprintf("must be at least 1, not %d", a.MaxConnections))
	}
}

// requireAuth checks a store's require_auth list.
func (v *validator) requireAuth(field, list string) {
	if _, err := ParseRequireAuth(list); err != nil {
		v.add(field, err.Error())
	}
}

// ParseRequireAuth parses a Store.RequireAuth list into the set of methods it allows. An empty list returns nil:
// the default (scram-sha-256 and none always, md5 and password only over TLS).
func ParseRequireAuth(list string) (map[string]bool, error) {
	if strings.TrimSpace(list) == "" {
		return nil, nil
	}
	set := map[string]bool{}
	for m := range strings.SplitSeq(list, ",") {
		m = strings.TrimSpace(m)
		switch m {
		case UpstreamSCRAM, UpstreamMD5, UpstreamPassword, UpstreamNone:
			set[m] = true
		default:
			return nil, fmt.Errorf("unknown authentication method %q: use a comma-separated list of %q, %q, %q and %q",
				m, UpstreamSCRAM, UpstreamMD5, UpstreamPassword, UpstreamNone)
		}
	}
	return set, nil
}

// ReadToken reads an admin token file: its content without surrounding whitespace, which must be at least 16
// bytes. The error never contains the file's content.
func ReadToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("cannot read %s: %s", path, describeFileError(err))
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < 16 {
		return "", fmt.Errorf("the token in %s is %d bytes; use at least 16 (e.g. 'openssl rand -hex 32')", path, len(tok))
	}
	if strings.ContainsAny(tok, " \t\r\n") {
		return "", fmt.Errorf("the token in %s holds whitespace; use one line of printable characters", path)
	}
	return tok, nil
}

// IsLoopback reports whether the host of the host:port address addr is a loopback address or "localhost". An
// empty host (all interfaces) is not.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// address checks a host:port listen address.
func (v *validator) address(field, addr string) {
	if addr == "" {
		v.add(field, "required: an address as host:port, e.g. 127.0.0.1:6432")
		return
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		msg := err.Error()
		var ae *net.AddrError
		if errors.As(err, &ae) {
			msg = ae.Err
		}
		v.add(field, fmt.Sprintf("must be host:port, e.g. 127.0.0.1:6432 or [::1]:6432 (%s)", msg))
		return
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n > 65535 {
		v.add(field, fmt.Sprintf("port %q must be a number from 0 to 65535", port))
	}
}

// dsn checks that a DSN parses as the stores will be dialed, reporting the parser's complaint without the password.
func (v *validator) dsn(field, dsn string) {
	if _, err := pgconn.ParseConfig(dsn); err != nil {
		v.add(field, "cannot parse DSN: "+redactError(err.Error(), dsn))
	}
}

// readable checks that a file named by the config, if any, can be opened for reading. It reports whether the
// file is usable (true also when path is empty, as there is nothing wrong with it).
func (v *validator) readable(field, path string) bool {
	if path == "" {
		return true
	}
	f, err := os.Open(path)
	if err != nil {
		v.add(field, fmt.Sprintf("cannot read %s: %s", path, describeFileError(err)))
		return false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		v.add(field, fmt.Sprintf("cannot read %s: %s", path, describeFileError(err)))
		return false
	}
	if st.IsDir() {
		v.add(field, fmt.Sprintf("%s is a directory, not a file", path))
		return false
	}
	return true
}

// Check reads the config file at path strictly, overlays the environment (through getenv, as Load does) and
// validates the result, returning every problem found with its position, ordered by position in the file, then
// the problems not tied to a place in the file. It is the implementation of `tandem config check FILE`; an empty
// result means the configuration is usable. Unlike Load, Check carries on past unknown keys and bad values, so
// one run shows everything that needs fixing.
func Check(path string, getenv func(string) (string, bool)) []Problem {
	cfg, probs, usable := load(path, getenv)
	if usable {
		probs = append(probs, cfg.problems()...)
	}
	slices.SortStableFunc(probs, func(a, b Problem) int {
		if (a.Line == 0) != (b.Line == 0) {
			if a.Line == 0 {
				return 1
			}
			return -1
		}
		if a.Line != b.Line {
			return a.Line - b.Line
		}
		return a.Column - b.Column
	})
	return probs
}

// feedName is what feed.name may be: it goes into the names of replication
// slots (lower-case letters, digits and _, at most 63 bytes with
// tandem_feed_ and _<store> around it).
var feedName = regexp.MustCompile(`^[a-z0-9_]{1,40}$`)
