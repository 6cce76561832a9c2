package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"time"

	"github.com/jackc/pgpassfile"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgwire"
)

// store is one PostgreSQL store (old or new) as the proxy connects to it. The
// DSN is parsed once; each session copies the parsed config.
type store struct {
	name     string
	cfg      *pgconn.Config
	passfile *pgpassfile.Passfile
}

func newStore(name string, sc config.Store, connectTimeout time.Duration) (*store, error) {
	cfg, err := pgconn.ParseConfig(sc.DSN)
	if err != nil {
		return nil, fmt.Errorf("%s.dsn: %w", name, err)
	}
	cfg.ConnectTimeout = connectTimeout
	st := &store{name: name, cfg: cfg}
	if sc.PasswordFile != "" {
		if st.passfile, err = pgpassfile.ReadPassfile(sc.PasswordFile); err != nil {
			return nil, fmt.Errorf("%s.password_file: %w", name, err)
		}
	}
	return st, nil
}

// upstream is one session's connection to a store, taken over from pgconn
// after startup so that the proxy relays raw bytes.
type upstream struct {
	store     *store
	conn      net.Conn
	pid       uint32
	secret    []byte
	params    map[string]string
	txStatus  byte
	addr      string
	dialer    net.Dialer
	connectTO time.Duration
}

// connect opens a session on the store as user on database, with the
// client's other startup parameters. The password comes from the DSN when
// user is the DSN's user, otherwise from the store's password file.
func (st *store) connect(ctx context.Context, user, database string, params map[string]string) (*upstream, error) {
	cfg := st.cfg.Copy()
	if user != "" && user != cfg.User {
		cfg.User = user
		cfg.Password = ""
	}
	if database != "" {
		cfg.Database = database
	}
	if cfg.Password == "" && st.passfile != nil {
		cfg.Password = st.passfile.FindPassword(cfg.Host, fmt.Sprint(cfg.Port), cfg.Database, cfg.User)
	}
	rp := maps.Clone(cfg.RuntimeParams)
	if rp == nil {
		rp = map[string]string{}
	}
	maps.Copy(rp, params)
	cfg.RuntimeParams = rp
	cfg.OnNotice = nil
	cfg.OnNotification = nil

	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	hj, err := pc.Hijack()
	if err != nil {
		pc.Close(ctx)
		return nil, err
	}
	return &upstream{
		store:     st,
		conn:      hj.Conn,
		pid:       hj.PID,
		secret:    hj.SecretKey,
		params:    hj.ParameterStatuses,
		txStatus:  hj.TxStatus,
		addr:      hj.Conn.RemoteAddr().String(),
		connectTO: st.cfg.ConnectTimeout,
	}, nil
}

// cancel sends a CancelRequest for this upstream session to its server, on a
// new connection, as libpq does.
func (u *upstream) cancel(ctx context.Context) error {
	ctx, stop := context.WithTimeout(ctx, u.connectTO)
	defer stop()
	c, err := u.dialer.DialContext(ctx, "tcp", u.addr)
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
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return &pgproto3.ErrorResponse{
			Severity: pgErr.Severity, SeverityUnlocalized: pgErr.SeverityUnlocalized,
			Code: pgErr.Code, Message: pgErr.Message, Detail: pgErr.Detail, Hint: pgErr.Hint,
			Where: pgErr.Where, File: pgErr.File, Line: pgErr.Line, Routine: pgErr.Routine,
		}
	}
	return pgwire.Fatal(pgwire.CodeConnectionFailure, "could not connect to the %s store", storeName).
		WithHint("Check that the %s store is up and that its DSN is right; see the proxy's log.", storeName).Response()
}
