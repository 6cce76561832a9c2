package main

import (
	"context"
	"fmt"
	"os"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/plan"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
	"github.com/tandemdb/tandem/proxy"
)

const planLong = `Assess a migration before it starts (playbook step 1). tandem plan connects to
both stores with the same settings as 'tandem proxy' (old.dsn, new.dsn, their
password files, control.dsn) and only reads them: the sample copy goes into a
temporary table on new, in a transaction that is rolled back.

Sections of the report:
  STORES       per store: version, user, wal_level, max_prepared_transactions,
               REPLICA MODE (can Tandem SET session_replication_role: superuser,
               or GRANT SET ON PARAMETER on PostgreSQL 15+; without it row images
               are applied with the store's triggers and foreign keys active) and
               CONTROL SCHEMA (can it create or use the schema "tandem" there).
  CHANGE FEED PREREQUISITES  per store (either can be the primary whose WAL
               the change feed reads): wal_level (logical needed), free
               replication slots and WAL senders, the REPLICATION privilege (or
               rds_replication, cloudsqlsuperuser, azure_pg_admin), whether the
               publication tandem_feed (tandem_feed_<name> with feed.name) can
               be created (CREATE on the database).
               Each table in scope also needs a replica identity on both stores
               (a primary key, or REPLICA IDENTITY USING INDEX; NOTHING, or
               DEFAULT without a key, does not name the row) and an owner that
               can add it to the publication. A missing prerequisite blocks
               with feed.enabled and needs attention otherwise; each reason
               gives the statement that fixes it.
  TABLES       each user table in scope (tables.include / tables.exclude; the
               schemas tandem, pg_catalog and information_schema never are): the
               new table it maps to (identity, or declared under tables.map), its
               size, its rows (~ = the planner's estimate), its primary key, and
               BACKFILL: the time to copy it, extrapolated from a measured sample
               copy of --sample-rows rows in key order (COPY out of old, COPY into
               a temporary table on new). It is a lower bound: the real backfill
               also locks, upserts and throttles.
  SCHEMA DIFFERENCES  what differs between the stores and the mapping does not
               explain: a table or column missing on new, a column only on new, a
               type change (widening such as varchar(50) -> text is noted;
               narrowing such as bigint -> integer or a changed meaning such as
               timestamp -> timestamptz needs attention; a type that cannot take
               the old values, such as uuid -> integer, blocks), a key change.
  DATA AUDIT   with --audit only (off by default: it reads every table in scope on
               old in full): per table, the rows new's schema will reject, computed on
               old without copying, through the mapping (renamed columns under their
               new names, computed columns evaluated, values typed as on new), by
               reason: length (too long for varchar(n)/char(n), too many digits for
               numeric(p,s)), null (NULL into NOT NULL), fk_orphan (no parent for a
               foreign key new declares, its parent mapped from old too),
               unique_duplicate (a unique key new declares and old does not enforce),
               check (a CHECK new declares, evaluated over old's rows), type_cast
               (text '12a' into integer, a bigint out of integer's range). Each
               reject blocks, with up to 5 example keys and the fix (the width to
               widen to, the UPDATE or DELETE, the duplicated values). What it cannot
               check (on PostgreSQL 15: casts into dates, json, arrays, enums, floats,
               ... from another type) is listed and needs attention.
               Cost: one scan per table for every per-row reason (foreign keys by a
               hash join with the parent's keys), plus one GROUP BY per unique key
               old does not enforce; work_mem is raised to 64MB for the audit's
               session. See docs/benchmarks.md for its time against a count(*).
  SEQUENCES    sequences synced to new at the write flip, with their values.
  TRIGGERS ON OLD  row images carry what a trigger did to the row written, not
               the writes it makes to other tables: those tables rely on verify
               and repair.
  FOREIGN KEYS ON OLD THAT WRITE  ON DELETE/UPDATE CASCADE, SET NULL or SET
               DEFAULT: the cascaded writes to the child table are not in the
               parent's row images.
  EXTENSIONS ON OLD MISSING ON NEW  with the columns whose types they provide.
  VERDICTS     every reason, worst first. A table is ready, needs attention
               (the migration can run; read the reason), or is blocked (fix the
               reason first: the table is missing on new, has no key on new, a
               column is missing or cannot take the old values, a privilege
               is missing, ...).

Exit status: 0 everything is ready, 1 something needs attention, 2 something
is blocked (and 1 with a message on stderr when a store cannot be read).`

const planExamples = `  # Assess, as text
  tandem plan -c tandem.yaml
  # For a script: JSON on stdout, the verdict in the exit status
  tandem plan -c tandem.yaml --json > plan.json; echo "exit $?"
  # Before the backfill: which old rows will new reject, and why (scans old)
  tandem plan -c tandem.yaml --audit
  # Without a config file, with a bigger sample
  tandem plan --old postgres://app@old-db/shop --new postgres://app@new-db/shop --sample-rows 10000`

func newPlanCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "plan",
		Short:   "Assess a migration: tables, keys, schema differences, privileges, backfill estimate",
		Long:    planLong,
		Example: planExamples,
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	asJSON := cmd.Flags().Bool("json", false, "print the report as JSON")
	audit := cmd.Flags().Bool("audit", false, "also scan every table in scope on old for the rows new's schema will reject (length, NULL, foreign key orphan, unique duplicate, CHECK, type cast): a full read of each table on old, plus one GROUP BY per unique key old does not enforce; off by default")
	sampleRows := cmd.Flags().Int("sample-rows", 1000, "rows per table in the measured sample copy that the backfill estimate extrapolates from; 0 skips it")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if *sampleRows < 0 {
			return fmt.Errorf("--sample-rows must be >= 0, got %d", *sampleRows)
		}
		cfg, err := flags.Load(os.LookupEnv)
		if err != nil {
			return err
		}
		rep, err := runPlan(cmd.Context(), cfg, *sampleRows, *audit)
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		if *asJSON {
			if err := jsonout.Write(out, rep); err != nil {
				return err
			}
		} else if err := rep.WriteText(out); err != nil {
			return err
		}
		if rep.Verdict != plan.Ready {
			return exitCode(rep.Verdict)
		}
		return nil
	}
	return cmd
}

// runPlan connects to the stores (and a separate control database) and
// runs the assessment with the config's scope and mapping.
func runPlan(ctx context.Context, cfg *config.Config, sampleRows int, audit bool) (*plan.Report, error) {
	mapping, err := planMapping(cfg.Tables)
	if err != nil {
		return nil, err
	}
	opts := plan.Options{SampleRows: sampleRows, Map: mapping, Feed: cfg.Feed.Enabled, FeedName: cfg.Feed.Name, Audit: audit}
	var conns []*pgx.Conn
	defer func() {
		for _, c := range conns {
			c.Close(context.WithoutCancel(ctx))
		}
	}()
	for _, s := range []route.Store{route.Old, route.New} {
		cc, err := control.StoreConnConfig(cfg, s)
		if err != nil {
			return nil, err
		}
		c, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			return nil, fmt.Errorf("connecting to the %s store %s: %w", s, config.RedactDSN(cc.ConnString()), err)
		}
		conns = append(conns, c)
	}
	opts.Old, opts.New = conns[0], conns[1]
	if cfg.Control.DSN != "" {
		cc, err := control.ControlConnConfig(cfg)
		if err != nil {
			return nil, err
		}
		c, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			return nil, fmt.Errorf("connecting to the control database %s: %w", config.RedactDSN(cc.ConnString()), err)
		}
		conns = append(conns, c)
		opts.Control = c
	}
	// The scope and the server-side checks of each declared mapping come
	// from internal/table, as the proxy loads them, so the plan and the
	// proxy cannot disagree about which tables are in the migration.
	ms, probs, err := table.LoadMappings(ctx, cfg.Tables, opts.Old, opts.New)
	if err != nil {
		return nil, fmt.Errorf("loading the table mappings: %w", err)
	}
	opts.InScope = ms.InScope
	opts.Map = splitPlanMapping(ms, mapping)
	opts.StoreReasons = upstreamAuthReasons(ctx, cfg)
	opts.Problems = map[table.Name][]plan.Reason{}
	for _, p := range probs {
		if !declaredAs(cfg.Tables, p.Table) {
			continue // identity mappings: the plan's own comparison reports the same differences
		}
		v := plan.Blocked
		if p.FlipOnly {
			v = plan.Attention
		}
		text := "mapping: " + p.String()
		if key := declaredKey(cfg.Tables, p.Table); key != "" && p.Field != "" {
			// A check against the catalogs of one key of the declaration
			// (where, discriminator): say where it is in the file.
			if file, line, col, ok := cfg.Position("tables.map[" + key + "]." + p.Field); ok {
				text = fmt.Sprintf("mapping: %s:%d:%d: tables.map[%s].%s: %s", file, line, col, key, p.Field, p.String())
			}
		} else if key != "" && merged(cfg.Tables, key) {
			// A table of a merge: several entries share one new table, so
			// say which entry the problem is about.
			if file, line, col, ok := cfg.Position("tables.map[" + key + "]"); ok {
				text = fmt.Sprintf("mapping: %s:%d:%d: tables.map[%s]: %s", file, line, col, key, p.String())
			}
		}
		opts.Problems[p.Table] = append(opts.Problems[p.Table], plan.Reason{Verdict: v, Text: text})
	}
	return plan.Run(ctx, opts)
}

// upstreamAuthReasons says, per store, how the proxy's logins there would
// go: a store that asks for an MD5 or cleartext password without TLS gets
// no password (sessions fail with 28000) unless require_auth allows it, in
// which case the password crosses the network unprotected. It probes as
// the DSN's user and sends no password.
func upstreamAuthReasons(ctx context.Context, cfg *config.Config) map[string][]plan.Reason {
	out := map[string][]plan.Reason{}
	for name, sc := range map[string]config.Store{"old": cfg.Old, "new": cfg.New} {
		p, err := proxy.ProbeAuth(ctx, name, sc, cfg.Limits.ConnectTimeout.Duration())
		switch {
		case err != nil:
			out[name] = append(out[name], plan.Reason{Verdict: plan.Attention, Text: "could not see how the store asks the proxy to log in: " + err.Error()})
		case p.Refused != nil:
			out[name] = append(out[name], plan.Reason{Verdict: plan.Blocked, Text: p.Refused.Error() +
				fmt.Sprintf(": sessions through the proxy would fail with 28000; use TLS (sslmode=require or verify-full in %s.dsn), a SCRAM-SHA-256 password for the role, or allow it in %s.require_auth", name, name)})
		case (p.Method == config.UpstreamMD5 || p.Method == config.UpstreamPassword) && !p.TLS:
			out[name] = append(out[name], plan.Reason{Verdict: plan.Attention, Text: fmt.Sprintf(
				"the store asks for %s authentication without TLS and %s.require_auth allows it: the proxy will send the password (or its MD5 hash) unprotected", p.Method, name)})
		}
	}
	return out
}

// declaredAs reports whether tables.map declares the old table n under any
// spelling of its name.
func declaredAs(t config.Tables, n table.Name) bool { return declaredKey(t, n) != "" }

// merged reports whether the entry key of tables.map is a table of a
// merge: a member (merge_into) or the owner another entry names.
func merged(t config.Tables, key string) bool {
	if t.Map[key].MergeInto != "" {
		return true
	}
	s, n, err := config.ParseTableName(key)
	if err != nil {
		return false
	}
	for _, tm := range t.Map {
		if os, on, err := config.ParseTableName(tm.MergeInto); err == nil && tm.MergeInto != "" && os == s && on == n {
			return true
		}
	}
	return false
}

// declaredKey returns the key under which tables.map declares the old table
// n, or "".
func declaredKey(t config.Tables, n table.Name) string {
	for key := range t.Map {
		if s, tb, err := config.ParseTableName(key); err == nil && s == n.Schema && tb == n.Table {
			return key
		}
	}
	return ""
}

// splitPlanMapping is mapping with a split table seen as its owner part
// and a merged table with the new columns the other tables of its merge
// fill:
// the plan compares one old table with one new table, so it compares the
// old table with the owner's, the columns other parts carry taken as not
// the owner's (each part is checked against both catalogs by LoadMappings,
// whose problems the plan reports).
func splitPlanMapping(ms *table.Mappings, mapping func(table.Name) plan.Mapping) func(table.Name) plan.Mapping {
	return func(n table.Name) plan.Mapping {
		pm := mapping(n)
		m := ms.ForOld(n)
		if m != nil && m.Merged() {
			// A table of a merge fills some of the new table's columns;
			// the other tables of the merge fill the rest.
			pm.FilledElsewhere = map[string]table.Name{}
			for _, o := range m.Members() {
				if o != m {
					for _, c := range o.NewColumns() {
						pm.FilledElsewhere[c] = o.Old.Name
					}
				}
			}
			return pm
		}
		if m == nil || !m.Split() {
			return pm
		}
		d := m.Decl()
		pm.New, pm.Renames, pm.Computed, pm.Dropped = m.New.Name, d.Rename, d.Compute, nil
		pm.Consumed = map[string]bool{}
		for _, c := range m.Old.Columns {
			if !m.Carries(c.Name) {
				pm.Dropped = append(pm.Dropped, c.Name)
			} else if _, renamed := d.Rename[c.Name]; !renamed {
				if _, same := m.New.Column(c.Name); !same {
					pm.Consumed[c.Name] = true // read by a computed column
				}
			}
		}
		return pm
	}
}

// planMapping turns tables.map into the plan's view of each table's mapping;
// a table without a declaration maps to itself.
func planMapping(t config.Tables) (func(table.Name) plan.Mapping, error) {
	declared := map[table.Name]plan.Mapping{}
	for key, tm := range t.Map {
		s, n, err := config.ParseTableName(key)
		if err != nil {
			return nil, fmt.Errorf("tables.map[%s]: %w", key, err)
		}
		old := table.Name{Schema: s, Table: n}
		m := plan.Mapping{New: old, Declared: true, Renames: tm.Rename, Dropped: tm.Drop, Computed: tm.Compute, Consumed: map[string]bool{},
			Discriminator: tm.Discriminator, Where: tm.Where}
		for _, expr := range tm.Compute {
			cols, err := table.ExprColumns(expr)
			if err != nil {
				continue // LoadMappings reports the expression itself
			}
			for _, c := range cols {
				m.Consumed[c] = true
			}
		}
		to := tm.To
		if to == "" && tm.MergeInto != "" {
			// A merge's member writes its owner's new table (or, when the
			// owner's to is left out, the table named as the owner).
			to = tm.MergeInto
			if os, on, err := config.ParseTableName(tm.MergeInto); err == nil {
				if owner := t.Map[declaredKey(t, table.Name{Schema: os, Table: on})]; owner.To != "" {
					to = owner.To
				}
			}
		}
		if to != "" {
			ts, tn, err := config.ParseTableName(to)
			if err != nil {
				return nil, fmt.Errorf("tables.map[%s].to: %w", key, err)
			}
			m.New = table.Name{Schema: ts, Table: tn}
		}
		declared[old] = m
	}
	return func(n table.Name) plan.Mapping {
		if m, ok := declared[n]; ok {
			return m
		}
		return plan.Mapping{New: n}
	}, nil
}
