package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/xdg-go/scram"
)

func tempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tandem-auth-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// scramVerifier builds a pg_authid-style SCRAM-SHA-256 verifier.
func scramVerifier(t *testing.T, password string) string {
	t.Helper()
	client, err := scram.SHA256.NewClient("", password, "")
	if err != nil {
		t.Fatal(err)
	}
	salt := []byte("0123456789abcdef")
	cred := client.GetStoredCredentials(scram.KeyFactors{Salt: string(salt), Iters: 4096})
	return fmt.Sprintf("SCRAM-SHA-256$4096:%s$%s:%s", base64.StdEncoding.EncodeToString(salt),
		base64.StdEncoding.EncodeToString(cred.StoredKey), base64.StdEncoding.EncodeToString(cred.ServerKey))
}

// TestSCRAM authenticates clients at the proxy against a userlist holding
// a plain password and a SCRAM verifier.
func TestSCRAM(t *testing.T) {
	db := newDB(t)
	ctx := context.Background()
	for _, role := range []string{"alice", "bob", "carol"} {
		_ = shared.Exec(ctx, db, fmt.Sprintf("CREATE ROLE %s LOGIN", role)) // roles are cluster-wide; may exist already
	}
	dir := tempDir(t)
	userlist := filepath.Join(dir, "userlist.txt")
	content := fmt.Sprintf("; tandem test users\n\"alice\" \"s3cret \"\"quoted\"\"\"\n\"bob\" \"%s\"\n", scramVerifier(t, "hunter2"))
	if err := os.WriteFile(userlist, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, shared, db, func(c *config.Config) {
		c.Auth.Method = "scram-sha-256"
		c.Auth.Userlist = userlist
	})
	host, port, _ := net.SplitHostPort(p.addr)
	connect := func(user, password string) error {
		cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=%s dbname=%s sslmode=disable", host, port, db))
		if err != nil {
			t.Fatal(err)
		}
		cfg.User, cfg.Password = user, password
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			return err
		}
		defer c.Close(ctx)
		if got := queryOne(t, c, "SELECT current_user"); got != user {
			t.Fatalf("logged in upstream as %q, want %q", got, user)
		}
		return nil
	}
	cases := []struct {
		user, password, code string
	}{
		{"alice", `s3cret "quoted"`, ""},
		{"bob", "hunter2", ""},
		{"alice", "wrong", "28P01"},
		{"bob", "Hunter2", "28P01"},
		{"carol", "anything", "28P01"}, // exists upstream but not in the userlist
		{"mallory", "x", "28P01"},
	}
	for _, tc := range cases {
		err := connect(tc.user, tc.password)
		if got := sqlState(err); got != tc.code {
			t.Errorf("%s/%s: got %v (SQLSTATE %q), want %q", tc.user, tc.password, err, got, tc.code)
		}
	}
}

// writeCert writes a self-signed certificate for 127.0.0.1.
func writeCert(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "tandem-test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// TestTLS terminates TLS at the proxy; with tls.require a plaintext client
// is refused with 28000, and SCRAM works over TLS.
func TestTLS(t *testing.T) {
	db := newDB(t)
	ctx := context.Background()
	certFile, keyFile := writeCert(t, tempDir(t))
	p := startProxy(t, shared, db, func(c *config.Config) {
		c.TLS.Cert, c.TLS.Key, c.TLS.Require = certFile, keyFile, true
	})
	_, err := pgconn.Connect(ctx, p.dsn(db))
	if got := sqlState(err); got != "28000" {
		t.Fatalf("plaintext client with tls.require: %v (SQLSTATE %q), want 28000", err, got)
	}
	host, port, _ := net.SplitHostPort(p.addr)
	c, err := pgconn.Connect(ctx, fmt.Sprintf("postgres://postgres@%s:%s/%s?sslmode=require", host, port, db))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	if _, ok := c.Conn().(*tls.Conn); !ok {
		t.Fatalf("client connection is %T, want *tls.Conn", c.Conn())
	}
	if got := queryOne(t, c, "SELECT 'over tls'"); got != "over tls" {
		t.Fatal(got)
	}

	// Without a certificate the proxy answers SSLRequest with 'N'.
	plain := startProxy(t, shared, db)
	host, port, _ = net.SplitHostPort(plain.addr)
	if _, err := pgconn.Connect(ctx, fmt.Sprintf("postgres://postgres@%s:%s/%s?sslmode=require", host, port, db)); err == nil {
		t.Fatal("sslmode=require succeeded against a proxy without TLS")
	}
	pc, err := pgconn.Connect(ctx, fmt.Sprintf("postgres://postgres@%s:%s/%s?sslmode=prefer", host, port, db))
	if err != nil {
		t.Fatal(err)
	}
	pc.Close(ctx)
}

// TestSCRAMUnknownUserSalt: the salt the proxy offers an unknown user is
// its own and the same at every attempt, as PostgreSQL's mock salt is, so
// comparing salts does not tell which user names exist.
func TestSCRAMUnknownUserSalt(t *testing.T) {
	dir := tempDir(t)
	userlist := filepath.Join(dir, "userlist.txt")
	if err := os.WriteFile(userlist, []byte(fmt.Sprintf("\"bob\" \"%s\"\n", scramVerifier(t, "hunter2"))), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, shared, "postgres", func(c *config.Config) {
		c.Auth.Method = "scram-sha-256"
		c.Auth.Userlist = userlist
	})
	// serverFirst returns the salt and iteration count the proxy offers user.
	serverFirst := func(user string) string {
		t.Helper()
		conn, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		fe := pgproto3.NewFrontend(conn, conn)
		fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: map[string]string{"user": user, "database": "postgres"}})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		msg, err := fe.Receive()
		if _, ok := msg.(*pgproto3.AuthenticationSASL); err != nil || !ok {
			t.Fatalf("%s: want AuthenticationSASL, got %T %v", user, msg, err)
		}
		fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte("n,,n=,r=clientnonce0123456789")})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		msg, err = fe.Receive()
		cont, ok := msg.(*pgproto3.AuthenticationSASLContinue)
		if err != nil || !ok {
			t.Fatalf("%s: want AuthenticationSASLContinue, got %T %v", user, msg, err)
		}
		_, rest, _ := strings.Cut(string(cont.Data), ",s=")
		return rest // salt, then the iteration count
	}
	ghost1, again, ghost2, bob := serverFirst("ghost1"), serverFirst("ghost1"), serverFirst("ghost2"), serverFirst("bob")
	if ghost1 != again {
		t.Errorf("an unknown user got two salts: %q, then %q", ghost1, again)
	}
	if ghost1 == ghost2 {
		t.Errorf("two unknown users share the salt %q", ghost1)
	}
	if want := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef")) + ",i=4096"; bob != want {
		t.Errorf("bob is offered %q, want his verifier's %q", bob, want)
	}
	if !strings.HasSuffix(ghost1, ",i=4096") {
		t.Errorf("an unknown user is offered %q: the iteration count differs from a real user's", ghost1)
	}
}
