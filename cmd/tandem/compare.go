package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/compare"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

const compareLong = `Verify that every row of the new store is what the table mapping makes of the
old store's row (playbook step 3, after the backfill, and again just before
the write flip), and optionally repair what differs.

The old table is walked in key order, --batch rows per key range. Each range
is hashed on both stores, server-side, with the mapping's hash expressions
(renames, computed columns and dropped columns applied), so only a row count
and an md5 per range cross the network. A range whose hashes differ is
bisected until it holds at most --leaf rows, whose keys and row hashes are
then fetched from both stores and diffed. Each difference is typed:

  MissingOnNew  the key is on old, not on new
  MissingOnOld  the key is on new, not on old
  ValueDiff     both have the key, the mapped rows differ

Before it is reported, each difference is re-read on both stores (old's row
under FOR SHARE); one that has vanished was a live write between the reads
and is counted as transient, not reported.

--repair fixes each confirmed difference with the backfill's locked-copy unit:
old's rows are locked FOR SHARE, upserted on new through the mapping (or
deleted on new when old has no such key), new commits, then old.

A table is verified by key: a table without a primary key, or whose mapping
does not carry the key column for column, is skipped and says so.

Exit status: 0 every table clean (after --repair: every difference repaired),
1 differences remain or an error.`

const compareExamples = `  # Verify every table in scope
  tandem compare -c tandem.yaml
  # Verify two tables and repair what differs, machine-readable
  tandem compare -c tandem.yaml --table users --table orders --repair --json`

func newCompareCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "compare",
		Short:   "Verify new against old row by row with server-side range hashes; --repair fixes differences",
		Long:    compareLong,
		Example: compareExamples,
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags())
	fs := cmd.Flags()
	tables := fs.StringSlice("table", nil, "old table to verify (schema.table or table in public); repeatable; default every table in scope")
	repair := fs.Bool("repair", false, "copy each confirmed difference from old to new with the locked-copy unit")
	asJSON := fs.Bool("json", false, "print the summaries as JSON")
	batch := fs.Int("batch", 10000, "old rows per hashed key range")
	leaf := fs.Int("leaf", 64, "bisect a differing range until it holds at most this many rows, then diff its rows")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := flags.Load(os.LookupEnv)
		if err != nil {
			return err
		}
		ctx := cmd.Context()
		out := cmd.OutOrStdout()
		oldCfg, err := storeConnConfig(cfg, route.Old)
		if err != nil {
			return err
		}
		newCfg, err := storeConnConfig(cfg, route.New)
		if err != nil {
			return err
		}
		ms, err := loadBackfillMappings(ctx, cfg, oldCfg, newCfg)
		if err != nil {
			return err
		}
		var maps []*table.Mapping
		if len(*tables) == 0 {
			maps = ms.All()
		}
		for _, t := range *tables {
			m := ms.ForOld(parseTable(t))
			if m == nil {
				return fmt.Errorf("--table %s: not in the migration's scope, or its mapping has a problem (see tandem plan)", t)
			}
			maps = append(maps, m)
		}
		old, err := pgx.ConnectConfig(ctx, oldCfg.Copy())
		if err != nil {
			return fmt.Errorf("connecting to the old store %s: %w", config.RedactDSN(oldCfg.ConnString()), err)
		}
		defer old.Close(ctx)
		nw, err := pgx.ConnectConfig(ctx, newCfg.Copy())
		if err != nil {
			return fmt.Errorf("connecting to the new store %s: %w", config.RedactDSN(newCfg.ConnString()), err)
		}
		defer nw.Close(ctx)
		opts := compare.Options{Batch: *batch, Leaf: *leaf, Repair: *repair, Logger: newLogger(cfg.Log, cmd.ErrOrStderr())}
		var sums []compare.TableSummary
		clean := true
		for _, m := range maps {
			s, err := compare.Table(ctx, old, nw, m, opts)
			if err != nil && !errors.Is(err, compare.ErrNotComparable) {
				return err
			}
			if s.Skipped == "" && !s.Clean() {
				clean = false
			}
			sums = append(sums, s)
		}
		if err := printCompare(out, sums, *asJSON); err != nil {
			return err
		}
		if !clean {
			return exitCode(1)
		}
		return nil
	}
	return cmd
}

func printCompare(out io.Writer, sums []compare.TableSummary, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Tables []compare.TableSummary `json:"tables"`
		}{sums})
	}
	for _, s := range sums {
		if s.Skipped != "" {
			fmt.Fprintf(out, "%s: skipped: %s\n", s.Table, s.Skipped)
			continue
		}
		state := "clean"
		if len(s.Diffs) > 0 {
			state = fmt.Sprintf("%d differences (%d MissingOnNew, %d MissingOnOld, %d ValueDiff), %d repaired",
				len(s.Diffs), s.Counts[compare.MissingOnNew], s.Counts[compare.MissingOnOld], s.Counts[compare.ValueDiff], s.Repaired)
		}
		fmt.Fprintf(out, "%s -> %s: %d rows, %d ranges, %s, %d transient, %v\n", s.Table, s.NewTable, s.Rows, s.Ranges, state, s.Transient,
			s.Duration.Round(time.Millisecond))
		for _, d := range s.Diffs {
			fmt.Fprintf(out, "  %-12s key %s\n", d.Kind, strings.Join(d.Key, ","))
		}
	}
	return nil
}
