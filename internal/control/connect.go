package control

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/jackc/pgpassfile"
	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// connConfig parses dsn for pgx. When the DSN carries no password, it comes
// from passfile (pgpass format), as the proxy's own upstream logins do.
func connConfig(field, dsn, passfile string, connectTimeout time.Duration) (*pgx.ConnConfig, error) {
	cc, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	cc.ConnectTimeout = connectTimeout
	if cc.Password == "" && passfile != "" {
		pf, err := pgpassfile.ReadPassfile(passfile)
		if err != nil {
			return nil, fmt.Errorf("%s password file: %w", field, err)
		}
		cc.Password = pf.FindPassword(cc.Host, strconv.Itoa(int(cc.Port)), cc.Database, cc.User)
	}
	return cc, nil
}

// ControlDSN is where the control schema lives: control.dsn, else the old
// store (with old.password_file unless control.password_file is set).
func ControlDSN(cfg *config.Config) (dsn, passfile string) {
	if cfg.Control.DSN != "" {
		return cfg.Control.DSN, cfg.Control.PasswordFile
	}
	passfile = cfg.Control.PasswordFile
	if passfile == "" {
		passfile = cfg.Old.PasswordFile
	}
	return cfg.Old.DSN, passfile
}

func ControlConnConfig(cfg *config.Config) (*pgx.ConnConfig, error) {
	dsn, pf := ControlDSN(cfg)
	return connConfig("control.dsn", dsn, pf, cfg.Limits.ConnectTimeout.Duration())
}

// StoreConnConfig is the connection config of store s, as the DSN's user.
func StoreConnConfig(cfg *config.Config, s route.Store) (*pgx.ConnConfig, error) {
	sc := cfg.Old
	if s == route.New {
		sc = cfg.New
		if sc.DSN == "" {
			return nil, fmt.Errorf("new.dsn is not configured")
		}
	}
	return connConfig(string(s)+".dsn", sc.DSN, sc.PasswordFile, cfg.Limits.ConnectTimeout.Duration())
}

// LoadMappings reads both stores' catalogs and builds the table mappings
// (tables: in the config; undeclared tables map to themselves), checking
// each on the servers. Problems are returned, not errors: a table with a
// problem is not mirrored by row image until they are fixed.
func LoadMappings(ctx context.Context, cfg *config.Config) (*table.Mappings, []table.Problem, error) {
	var conns []*pgx.Conn
	defer func() {
		for _, c := range conns {
			c.Close(context.WithoutCancel(ctx))
		}
	}()
	for _, s := range []route.Store{route.Old, route.New} {
		cc, err := StoreConnConfig(cfg, s)
		if err != nil {
			return nil, nil, err
		}
		c, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			return nil, nil, fmt.Errorf("connecting to the %s store: %w", s, err)
		}
		conns = append(conns, c)
	}
	return table.LoadMappings(ctx, cfg.Tables, conns[0], conns[1])
}

// LogProblems reports mapping problems once per load.
func LogProblems(log *slog.Logger, probs []table.Problem) {
	for _, p := range probs {
		if p.FlipOnly {
			log.Warn("table mapping: this blocks the write flip", "problem", p.String())
		} else {
			log.Warn("table mapping: this table is mirrored by statement (and recorded as drift) until fixed", "problem", p.String())
		}
	}
}
