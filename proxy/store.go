package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/md5"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgpassfile"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/xdg-go/scram"
)

// store is one PostgreSQL store (old or new) as the proxy connects to it. The
// DSN is parsed once; each session copies the parsed config.
type store struct {
	name     string
	cfg      *pgconn.Config
	passfile *pgpassfile.Passfile
	// allowed is the store's require_auth set; nil = the default: SCRAM
	// and no authentication always, MD5 and cleartext only over TLS.
	allowed map[string]bool
	// peerDB is the other store's DSN database, when it is not this
	// store's: a session on that database opens this store's DSN database
	// instead (databaseFor). Consolidation needs it: each service's
	// database (shop, billing) moves into one new database.
	peerDB string
}

// pairStores lets sessions on the DSN database of one store open the DSN
// database of the other (see store.peerDB).
func pairStores(old, new *store) {
	if old == nil || new == nil || old.cfg.Database == new.cfg.Database {
		return
	}
	old.peerDB, new.peerDB = new.cfg.Database, old.cfg.Database
}

// databaseFor is the database a session asking for database opens on st:
// st's DSN database when database is the other store's, else database.
func (st *store) databaseFor(database string) string {
	if st.peerDB != "" && database == st.peerDB {
		return st.cfg.Database
	}
	return database
}

func newStore(name string, sc config.Store, connectTimeout time.Duration) (*store, error) {
	cfg, err := pgconn.ParseConfig(sc.DSN)
	if err != nil {
		return nil, fmt.Errorf("%s.dsn: %w", name, err)
	}
	cfg.ConnectTimeout = connectTimeout
	st := &store{name: name, cfg: cfg}
	if st.allowed, err = config.ParseRequireAuth(sc.RequireAuth); err != nil {
		return nil, fmt.Errorf("%s.require_auth: %w", name, err)
	}
	if sc.PasswordFile != "" {
		if st.passfile, err = pgpassfile.ReadPassfile(sc.PasswordFile); err != nil {
			return nil, fmt.Errorf("%s.password_file: %w", name, err)
		}
	}
	return st, nil
}

// upstream is one session's connection to a store. The proxy runs the
// startup itself (not through pgconn) so that it owns every byte read from
// the socket once the session is relayed.
type upstream struct {
	store     *store
	conn      net.Conn
	reader    io.Reader // conn, preceded by any bytes read past ReadyForQuery
	pid       uint32
	secret    []byte
	params    []paramStatus // in the order the store sent them
	txStatus  byte
	network   string
	addr      string
	dialer    net.Dialer
	connectTO time.Duration
}

type paramStatus struct{ name, value string }

// rejectedError is a store's ErrorResponse during startup.
type rejectedError struct{ resp *pgproto3.ErrorResponse }

func (e *rejectedError) Error() string {
	return fmt.Sprintf("%s: %s (SQLSTATE %s)", e.resp.Severity, e.resp.Message, e.resp.Code)
}

// connect opens a session on the store as user on database, with the
// client's other startup parameters. The password comes from the DSN when
// user is the DSN's user, otherwise from the store's password file. Hosts
// are tried in the DSN's order, and with sslmode=prefer or allow, with and
// without TLS, as libpq does.
func (st *store) connect(ctx context.Context, user, database string, params map[string]string) (*upstream, error) {
	cfg := st.cfg
	user, database, password := st.login(user, database)
	rp := maps.Clone(cfg.RuntimeParams)
	if rp == nil {
		rp = map[string]string{}
	}
	maps.Copy(rp, params)
	rp["user"], rp["database"] = user, database

	targets := append([]*pgconn.FallbackConfig{{Host: cfg.Host, Port: cfg.Port, TLSConfig: cfg.TLSConfig}}, cfg.Fallbacks...)
	var errs []error
	for _, tg := range targets {
		pw := password
		if pw == "" && st.passfile != nil {
			pw = st.passfile.FindPassword(tg.Host, fmt.Sprint(tg.Port), database, user)
		}
		up, err := st.connectOne(ctx, tg, user, pw, rp)
		if err == nil {
			return up, nil
		}
		var rej *rejectedError
		if errors.As(err, &rej) {
			return nil, err // the store answered: trying another address would not change that
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// login returns the user and database a session for user and database
// opens on st (the DSN's when empty) and the DSN's password when the user
// is the DSN's (otherwise "": the password file is asked per host).
func (st *store) login(user, database string) (string, string, string) {
	password := st.cfg.Password
	if user == "" {
		user = st.cfg.User
	}
	if user != st.cfg.User {
		password = ""
	}
	if database == "" {
		database = st.cfg.Database
	}
	return user, st.databaseFor(database), password
}

func (st *store) connectOne(ctx context.Context, tg *pgconn.FallbackConfig, user, password string, params map[string]string) (*upstream, error) {
	network, addr := "tcp", net.JoinHostPort(tg.Host, fmt.Sprint(tg.Port))
	if strings.HasPrefix(tg.Host, "/") {
		network, addr = "unix", fmt.Sprintf("%s/.s.PGSQL.%d", tg.Host, tg.Port)
	}
	up := &upstream{store: st, network: network, addr: addr, connectTO: st.cfg.ConnectTimeout, dialer: net.Dialer{KeepAlive: 5 * time.Minute}}
	conn, err := up.dialer.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			conn.Close()
		}
	}()
	sconn, br, err := startup(ctx, conn, tg, params)
	if err != nil {
		return nil, err
	}
	conn = sconn
	var sc *scram.ClientConversation
	_, overTLS := conn.(*tls.Conn)
	asked := false // the store asked for a password
	for {
		typ, body, err := pgwire.ReadMessage(br, 1<<20)
		if err != nil {
			return nil, err
		}
		switch typ {
		case pgwire.ServerAuthentication:
			if len(body) < 4 {
				return nil, errors.New("malformed authentication request from the store")
			}
			kind := binary.BigEndian.Uint32(body)
			if err := st.allow(kind, asked, overTLS); err != nil {
				return nil, err
			}
			asked = asked || kind != 0
			reply, err := authReply(kind, body, user, password, &sc)
			if err != nil {
				return nil, err
			}
			if reply != nil {
				if _, err := conn.Write(reply); err != nil {
					return nil, err
				}
			}
		case pgwire.ServerParameterStatus:
			var ps pgproto3.ParameterStatus
			if err := ps.Decode(body); err != nil {
				return nil, err
			}
			up.params = append(up.params, paramStatus{ps.Name, ps.Value})
		case pgwire.ServerBackendKeyData:
			var k pgproto3.BackendKeyData
			if err := k.Decode(body); err != nil {
				return nil, err
			}
			up.pid, up.secret = k.ProcessID, k.SecretKey
		case pgwire.ServerErrorResponse:
			er := &pgproto3.ErrorResponse{}
			if err := er.Decode(body); err != nil {
				return nil, err
			}
			return nil, &rejectedError{resp: er}
		case pgwire.ServerReadyForQuery:
			if len(body) != 1 {
				return nil, errors.New("malformed ReadyForQuery from the store")
			}
			up.txStatus = body[0]
			_ = conn.SetDeadline(time.Time{})
			up.conn, up.reader = conn, conn
			if n := br.Buffered(); n > 0 {
				rest, _ := br.Peek(n)
				up.reader = io.MultiReader(bytes.NewReader(bytes.Clone(rest)), conn)
			}
			ok = true
			return up, nil
		case pgwire.ServerNoticeResponse, pgwire.ServerNegotiateProtocol: // notices and NegotiateProtocolVersion during startup: nothing to do
		default:
			return nil, fmt.Errorf("unexpected message %q from the store during startup", typ)
		}
	}
}

// AuthProbe is what a store asks of Tandem when it logs in, as ProbeAuth
// finds it.
type AuthProbe struct {
	Method string // config.UpstreamSCRAM, UpstreamMD5, UpstreamPassword or UpstreamNone
	TLS    bool   // the connection used TLS
	// Refused is the error a session would get: the method is not allowed
	// by the store's require_auth (or the default); nil = allowed.
	Refused error
}

// ProbeAuth opens a connection to the store sc describes (named name, "old"
// or "new") as its DSN's user and database, the way sessions do, reads the
// store's first authentication request and hangs up without answering it:
// no password is sent. It is for `tandem plan`.
func ProbeAuth(ctx context.Context, name string, sc config.Store, connectTimeout time.Duration) (AuthProbe, error) {
	st, err := newStore(name, sc, connectTimeout)
	if err != nil {
		return AuthProbe{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	user, database, _ := st.login("", "")
	params := maps.Clone(st.cfg.RuntimeParams)
	if params == nil {
		params = map[string]string{}
	}
	params["user"], params["database"] = user, database
	targets := append([]*pgconn.FallbackConfig{{Host: st.cfg.Host, Port: st.cfg.Port, TLSConfig: st.cfg.TLSConfig}}, st.cfg.Fallbacks...)
	var errs []error
	for _, tg := range targets {
		p, err := st.probeOne(ctx, tg, params)
		if err == nil {
			return p, nil
		}
		errs = append(errs, err)
	}
	return AuthProbe{}, errors.Join(errs...)
}

func (st *store) probeOne(ctx context.Context, tg *pgconn.FallbackConfig, params map[string]string) (AuthProbe, error) {
	network, addr := "tcp", net.JoinHostPort(tg.Host, fmt.Sprint(tg.Port))
	if strings.HasPrefix(tg.Host, "/") {
		network, addr = "unix", fmt.Sprintf("%s/.s.PGSQL.%d", tg.Host, tg.Port)
	}
	var d net.Dialer
	raw, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return AuthProbe{}, err
	}
	defer raw.Close()
	conn, br, err := startup(ctx, raw, tg, params)
	if err != nil {
		return AuthProbe{}, err
	}
	defer conn.Close()
	_, overTLS := conn.(*tls.Conn)
	typ, body, err := pgwire.ReadMessage(br, 1<<20)
	if err != nil {
		return AuthProbe{}, err
	}
	switch {
	case typ == pgwire.ServerErrorResponse:
		er := &pgproto3.ErrorResponse{}
		if err := er.Decode(body); err != nil {
			return AuthProbe{}, err
		}
		return AuthProbe{}, &rejectedError{resp: er}
	case typ != pgwire.ServerAuthentication || len(body) < 4:
		return AuthProbe{}, fmt.Errorf("unexpected message %q from the store during startup", typ)
	}
	kind := binary.BigEndian.Uint32(body)
	p := AuthProbe{TLS: overTLS, Refused: st.allow(kind, false, overTLS)}
	switch kind {
	case 0:
		p.Method = config.UpstreamNone
	case 3:
		p.Method = config.UpstreamPassword
	case 5:
		p.Method = config.UpstreamMD5
	case 10:
		p.Method = config.UpstreamSCRAM
	default:
		p.Method = fmt.Sprintf("method %d", kind)
	}
	return p, nil
}

// startup sends the StartupMessage for params on conn, after an SSLRequest
// and the TLS handshake when tg asks for TLS, and returns the connection to
// use from then on and a reader over it. It sets conn's deadline from ctx.
func startup(ctx context.Context, conn net.Conn, tg *pgconn.FallbackConfig, params map[string]string) (net.Conn, *bufio.Reader, error) {
	if dl, has := ctx.Deadline(); has {
		_ = conn.SetDeadline(dl)
	}
	if tg.TLSConfig != nil {
		if _, err := conn.Write([]byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f}); err != nil { // SSLRequest
			return nil, nil, err
		}
		var b [1]byte
		if _, err := io.ReadFull(conn, b[:]); err != nil {
			return nil, nil, err
		}
		if b[0] != 'S' {
			return nil, nil, errors.New("the store refused TLS")
		}
		tc := tls.Client(conn, tg.TLSConfig)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, nil, err
		}
		conn = tc
	}
	startup := &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: params}
	buf, err := startup.Encode(nil)
	if err != nil {
		return nil, nil, err
	}
	if _, err := conn.Write(buf); err != nil {
		return nil, nil, err
	}
	br := bufio.NewReaderSize(conn, 4096)
	return conn, br, nil
}

// authRefusedError is a store asking for an authentication method its
// require_auth does not allow: Tandem hangs up rather than send the
// password that way.
type authRefusedError struct {
	store, method, why string
}

func (e *authRefusedError) Error() string {
	return fmt.Sprintf("the %s store asked for %s authentication%s; Tandem does not send the password that way", e.store, e.method, e.why)
}

// allow checks the authentication request kind (an AuthenticationXXX
// code; 0 = AuthenticationOk) against st's require_auth, as libpq's
// require_auth does, with Tandem's default when none is set.
func (st *store) allow(kind uint32, asked, overTLS bool) error {
	method := ""
	switch kind {
	case 0:
		if asked {
			return nil // the end of an exchange that was allowed
		}
		method = config.UpstreamNone
	case 3:
		method = config.UpstreamPassword
	case 5:
		method = config.UpstreamMD5
	case 10, 11, 12:
		method = config.UpstreamSCRAM
	default:
		return nil // authReply refuses the methods Tandem does not speak
	}
	if st.allowed != nil {
		if st.allowed[method] {
			return nil
		}
		return &authRefusedError{store: st.name, method: method, why: fmt.Sprintf(" and %s.require_auth does not list it", st.name)}
	}
	if (method == config.UpstreamPassword || method == config.UpstreamMD5) && !overTLS {
		return &authRefusedError{store: st.name, method: method, why: " on a connection without TLS"}
	}
	return nil
}

// authReply answers one authentication request from a store.
func authReply(kind uint32, body []byte, user, password string, sc **scram.ClientConversation) ([]byte, error) {
	switch kind {
	case 0: // AuthenticationOk
		return nil, nil
	case 3: // cleartext
		return (&pgproto3.PasswordMessage{Password: password}).Encode(nil)
	case 5: // MD5
		if len(body) < 8 {
			return nil, errors.New("malformed MD5 request from the store")
		}
		inner := md5.Sum([]byte(password + user))
		outer := md5.Sum(append([]byte(hex.EncodeToString(inner[:])), body[4:8]...))
		return (&pgproto3.PasswordMessage{Password: "md5" + hex.EncodeToString(outer[:])}).Encode(nil)
	case 10: // SASL
		var m pgproto3.AuthenticationSASL
		if err := m.Decode(body); err != nil {
			return nil, err
		}
		if !slices.Contains(m.AuthMechanisms, "SCRAM-SHA-256") {
			return nil, fmt.Errorf("the store offers SASL mechanisms %v; Tandem supports SCRAM-SHA-256", m.AuthMechanisms)
		}
		client, err := scram.SHA256.NewClient("", password, "")
		if err != nil {
			return nil, err
		}
		*sc = client.NewConversation()
		first, err := (*sc).Step("")
		if err != nil {
			return nil, err
		}
		return (&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte(first)}).Encode(nil)
	case 11: // SASL continue
		if *sc == nil {
			return nil, errors.New("SASL continue without a SASL exchange")
		}
		out, err := (*sc).Step(string(body[4:]))
		if err != nil {
			return nil, err
		}
		return (&pgproto3.SASLResponse{Data: []byte(out)}).Encode(nil)
	case 12: // SASL final
		if *sc == nil {
			return nil, errors.New("SASL final without a SASL exchange")
		}
		if _, err := (*sc).Step(string(body[4:])); err != nil || !(*sc).Valid() {
			return nil, errors.New("the store's SCRAM signature did not verify")
		}
		return nil, nil
	}
	return nil, fmt.Errorf("the store asks for authentication method %d, which Tandem does not support (use scram-sha-256, md5, password or trust)", kind)
}

// cancel sends a CancelRequest for this upstream session to its server, on a
// new connection, as libpq does.
func (u *upstream) cancel(ctx context.Context) error {
	ctx, stop := context.WithTimeout(ctx, u.connectTO)
	defer stop()
	c, err := u.dialer.DialContext(ctx, u.network, u.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	buf := make([]byte, 0, 16+len(u.secret))
	buf = binary.BigEndian.AppendUint32(buf, uint32(12+len(u.secret)))
	buf = binary.BigEndian.AppendUint32(buf, 80877102)
	buf = binary.BigEndian.AppendUint32(buf, u.pid)
	buf = append(buf, u.secret...)
	if _, err := c.Write(buf); err != nil {
		return err
	}
	// The server closes the connection once it has read the request.
	_, err = io.Copy(io.Discard, c)
	return err
}

// upstreamError turns a failed upstream connect into what the client sees:
// the store's own ErrorResponse when it sent one (bad password, unknown
// database, too many connections...), else 08006 naming the store.
func upstreamError(storeName string, err error) *pgproto3.ErrorResponse {
	var rej *rejectedError
	if errors.As(err, &rej) {
		return rej.resp
	}
	var ar *authRefusedError
	if errors.As(err, &ar) {
		return pgwire.Fatal(pgwire.CodeInvalidAuthSpec, "%s", ar.Error()).
			WithHint("Use TLS to the store (sslmode=require or verify-full in %s.dsn), give the role a SCRAM-SHA-256 password, or allow the method explicitly in %s.require_auth.", ar.store, ar.store).Response()
	}
	return pgwire.Fatal(pgwire.CodeConnectionFailure, "could not connect to the %s store", storeName).
		WithHint("Check that the %s store is up and that its DSN is right; see the proxy's log.", storeName).Response()
}
