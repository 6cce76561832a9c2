package proxy

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/pgtest"
)

// TestUpstreamAuth logs in to a store that requires SCRAM-SHA-256 or MD5
// passwords, with the password from the DSN (same user) or from the store's
// password file (other users), and relays the store's 28P01 when it is wrong.
func TestUpstreamAuth(t *testing.T) {
	c := pgtest.New(t)
	ctx := context.Background()
	if err := c.Exec(ctx, "postgres", `
		SET password_encryption = 'scram-sha-256';
		CREATE ROLE app LOGIN PASSWORD 'app pw';
		CREATE ROLE reporter LOGIN PASSWORD 'r3port';
		SET password_encryption = 'md5';
		CREATE ROLE legacy LOGIN PASSWORD 'old-md5';`); err != nil {
		t.Fatal(err)
	}
	if err := c.Exec(ctx, "postgres", "CREATE DATABASE shop OWNER app"); err != nil {
		t.Fatal(err)
	}
	// Host connections now need passwords: scram for most, md5 for legacy.
	hba := "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all legacy 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 scram-sha-256\n"
	if err := os.WriteFile(filepath.Join(c.DataDir(), "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.Exec(ctx, "postgres", "SELECT pg_reload_conf()"); err != nil {
		t.Fatal(err)
	}
	dir := tempDir(t)
	passfile := filepath.Join(dir, "old.pgpass")
	pass := fmt.Sprintf("127.0.0.1:%d:*:reporter:r3port\n127.0.0.1:%d:*:legacy:old-md5\n*:*:*:intruder:nope\n", c.Port(), c.Port())
	if err := os.WriteFile(passfile, []byte(pass), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, c, "shop", func(cfg *config.Config) {
		cfg.Old.DSN = fmt.Sprintf("postgres://app:app%%20pw@127.0.0.1:%d/shop?sslmode=disable", c.Port())
		cfg.Old.PasswordFile = passfile
	})
	// The readiness probe logs in exactly as sessions do.
	if err := p.srv.Ping(ctx, "old"); err != nil {
		t.Fatalf("Ping with the DSN's password: %v", err)
	}
	wrong := startProxy(t, c, "shop", func(cfg *config.Config) {
		cfg.Old.DSN = fmt.Sprintf("postgres://app:Wrong-Pw@127.0.0.1:%d/shop?sslmode=disable", c.Port())
	})
	if err := wrong.srv.Ping(ctx, "old"); err == nil || !strings.Contains(err.Error(), "28P01") || strings.Contains(err.Error(), "Wrong-Pw") {
		t.Fatalf("Ping with a wrong password: %v, want the store's 28P01 without the password", err)
	}
	// legacy's store asks for MD5 on a connection without TLS: by default
	// the proxy hangs up rather than send the hash (issue 12), saying why.
	_, err := pgconn.Connect(ctx, strings.Replace(p.dsn("shop"), "postgres@", "legacy@", 1))
	if got := sqlState(err); got != "28000" || !strings.Contains(err.Error(), "the old store asked for md5 authentication on a connection without TLS") {
		t.Fatalf("md5 without TLS: %v (SQLSTATE %q), want 28000 naming md5 and TLS", err, got)
	}
	// Allowed explicitly, as libpq's require_auth does.
	legacy := startProxy(t, c, "shop", func(cfg *config.Config) {
		cfg.Old.DSN = fmt.Sprintf("postgres://app:app%%20pw@127.0.0.1:%d/shop?sslmode=disable", c.Port())
		cfg.Old.PasswordFile = passfile
		cfg.Old.RequireAuth = "scram-sha-256,md5"
	})
	conn, err := pgconn.Connect(ctx, strings.Replace(legacy.dsn("shop"), "postgres@", "legacy@", 1))
	if err != nil {
		t.Fatalf("legacy with old.require_auth allowing md5: %v", err)
	}
	conn.Close(ctx)
	// A require_auth without scram refuses even SCRAM.
	onlyMD5 := startProxy(t, c, "shop", func(cfg *config.Config) {
		cfg.Old.DSN = fmt.Sprintf("postgres://app:app%%20pw@127.0.0.1:%d/shop?sslmode=disable", c.Port())
		cfg.Old.RequireAuth = "md5"
	})
	if err := onlyMD5.srv.Ping(ctx, "old"); err == nil || !strings.Contains(err.Error(), "scram-sha-256 authentication and old.require_auth does not list it") {
		t.Fatalf("SCRAM with require_auth md5: %v", err)
	}
	for _, user := range []string{"app", "reporter"} {
		conn, err := pgconn.Connect(ctx, strings.Replace(p.dsn("shop"), "postgres@", user+"@", 1))
		if err != nil {
			t.Fatalf("%s: %v", user, err)
		}
		if got := queryOne(t, conn, "SELECT current_user"); got != user {
			t.Fatalf("logged in as %q, want %q", got, user)
		}
		conn.Close(ctx)
	}
	if err := c.Exec(ctx, "postgres", "CREATE ROLE intruder LOGIN PASSWORD 'other'"); err != nil {
		t.Fatal(err)
	}
	_, err = pgconn.Connect(ctx, strings.Replace(p.dsn("shop"), "postgres@", "intruder@", 1))
	if got := sqlState(err); got != "28P01" {
		t.Fatalf("wrong upstream password: %v (SQLSTATE %q), want the store's 28P01", err, got)
	}
	if strings.Contains(fmt.Sprint(err), "nope") || strings.Contains(fmt.Sprint(err), "app pw") {
		t.Fatalf("error leaks a password: %v", err)
	}
}
