package config_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/tandemdb/tandem/internal/config"
)

// Load reads the defaults, then a YAML file, then TANDEM_* environment variables; Validate checks the result.
func ExampleLoad() {
	dir, err := os.MkdirTemp("", "tandem-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	path := filepath.Join(dir, "tandem.yaml")
	yaml := `
listen: "0.0.0.0:6432"
auth:
  method: trust
  allow_remote_trust: true # a private network only this proxy's clients reach
old:
  dsn: "postgres://app:s3cret@old.internal:5432/app?sslmode=disable"
new:
  dsn: "host=new.internal port=5432 dbname=app user=app sslmode=disable"
limits:
  max_message_bytes: 64MiB
  idle_session_timeout: 15m
routing:
  fence_timeout: 2s
`
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		log.Fatal(err)
	}

	// In a program, pass os.LookupEnv; here a fixed environment overrides one setting from the file.
	getenv := func(name string) (string, bool) {
		if name == "TANDEM_LIMITS_MAX_CLIENT_SESSIONS" {
			return "200", true
		}
		return "", false
	}
	cfg, err := config.Load(path, getenv)
	if err != nil {
		log.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		log.Fatal(err)
	}

	fmt.Println("listen:", cfg.Listen)
	fmt.Println("old:", config.RedactDSN(cfg.Old.DSN))
	fmt.Println("max client sessions:", cfg.Limits.MaxClientSessions)
	fmt.Println("max message bytes:", cfg.Limits.MaxMessageBytes, int64(cfg.Limits.MaxMessageBytes))
	fmt.Println("connect timeout:", cfg.Limits.ConnectTimeout)
	fmt.Println("idle session timeout:", cfg.Limits.IdleSessionTimeout.Duration())
	fmt.Println("control schema in the old store:", cfg.Control.DSN == "")
	fmt.Println("fence timeout:", cfg.Routing.FenceTimeout, "state poll:", cfg.Routing.Poll)
	// Output:
	// listen: 0.0.0.0:6432
	// old: postgres://app:xxxxx@old.internal:5432/app?sslmode=disable
	// max client sessions: 200
	// max message bytes: 64MiB 67108864
	// connect timeout: 10s
	// idle session timeout: 15m0s
	// control schema in the old store: true
	// fence timeout: 2s state poll: 2s
}
