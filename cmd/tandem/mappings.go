package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// loadMappings reads both stores' catalogs and builds the table mappings
// (tables: in the config; undeclared tables map to themselves), checking
// each on the servers. Problems are returned, not errors: a table with a
// problem is not mirrored by row image until they are fixed.
func loadMappings(ctx context.Context, cfg *config.Config) (*table.Mappings, []table.Problem, error) {
	var conns []*pgx.Conn
	defer func() {
		for _, c := range conns {
			c.Close(context.WithoutCancel(ctx))
		}
	}()
	for _, s := range []route.Store{route.Old, route.New} {
		cc, err := storeConnConfig(cfg, s)
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

// logProblems reports mapping problems once per load.
func logProblems(log *slog.Logger, probs []table.Problem) {
	for _, p := range probs {
		if p.FlipOnly {
			log.Warn("table mapping: this blocks the write flip", "problem", p.String())
		} else {
			log.Warn("table mapping: this table is mirrored by statement (and recorded as drift) until fixed", "problem", p.String())
		}
	}
}

// mappingGate refuses a write flip to new while a table in scope has a
// mapping problem: after the flip, writes are mirrored back to old through
// the reverse expressions, so a computed column without one would lose
// data on old.
func mappingGate(cfg *config.Config) route.Gate {
	return func(ctx context.Context, _ *pgx.Conn, cur, next route.Settings) error {
		if cur.Primary == next.Primary || next.Primary != route.New {
			return nil
		}
		_, probs, err := loadMappings(ctx, cfg)
		if err != nil {
			return &route.IllegalError{Gate: true, Reason: "table mappings could not be checked: " + err.Error()}
		}
		if len(probs) == 0 {
			return nil
		}
		var reasons []string
		for _, p := range probs {
			reasons = append(reasons, p.String())
		}
		return &route.IllegalError{Gate: true, Reason: fmt.Sprintf("%d table mapping problem(s): %s", len(probs), strings.Join(reasons, "; "))}
	}
}
