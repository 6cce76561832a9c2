package main

import (
	"context"
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
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

const compareLong = `Verify that every row of the new store is what the table mapping makes of the
old store's row (playbook step 2, after the backfill, and again in step 4 just
before the write flip), and optionally repair what differs.

Rows are hashed on each store, server-side, with the mapping's hash
expressions (renames, computed columns and dropped columns applied), so only
a row count and a hash per range cross the network: hash_record_extended over
the mapped values, seeded with the row's key and summed, when both stores run
PostgreSQL 14 or later, else the md5 of the rows' text in key order.

When both sides run PostgreSQL 14 or later, each table is first hashed in
1024 to 16384 key buckets (by the low bits of the row hash's key seed), both
stores at once, each store in --workers page ranges (TID range scans) on
connections of their own, all in one exported snapshot per store; the
ranges' sums are added per bucket. A quiet table that agrees is verified in
that pass. When buckets differ (a few differences, or a live write between
the two stores' scans), the rows of those buckets are fetched from both
stores in one more query each, in the same snapshots, and diffed: about one
scan more, and no range walk. On older servers each whole table is hashed in
one query per store instead (PostgreSQL may scan it in parallel). When the
differing buckets hold more than 500000 rows, or the whole-table hashes
disagree on older servers, and with --ranges-only or --rate, the
old table is walked in key order, --batch rows per key range, --workers ranges at a time,
each hashed on both stores at once. A range whose hashes differ is bisected
on its own connections, the window's at once, until it holds at most --leaf
rows, whose keys and row hashes are then fetched from both stores and diffed;
with a one-column key the range is cut into subranges of --leaf rows hashed
in one query per store. Each difference is typed:

  MissingOnNew  the key is on old, not on new
  MissingOnOld  the key is on new, not on old
  ValueDiff     both have the key, the mapped rows differ

Before it is reported, each difference is re-read at one point of the write
stream: the store of record's table is held IN SHARE MODE (its writers wait,
lock_timeout 1s), compare waits until no write to the other store's table is
in flight (at most twice routing.mirror_budget), then reads both. One that
has vanished was a live write and is counted as transient, not reported.
Writers to a table wait during its re-checks only, and only when a range
differed.

--repair fixes each confirmed difference with the backfill's locked-copy unit:
old's rows are locked FOR SHARE, upserted on new through the mapping (or
deleted on new when old has no such key), new commits, then old.

Open drift first. Before a table's walk, the keys of its open entries in
the drift ledger (tandem.drift, entries stale on new) are verified the same
way and counted as drift keys; with --repair each is copied with the
locked-copy unit and its entries are marked repaired. A whole-table entry
needs nothing more: the walk always covers the whole table.

Runs and resuming. Each table's verify is recorded in the control schema, in
tandem.verify_runs (status running, done, failed or interrupted; the counts;
a checkpoint, the last key whose range is verified and repaired, updated
after every range). Ctrl-C marks the run interrupted. --since-checkpoint
continues each table's latest unfinished run from its checkpoint, with its
counts, instead of starting again from the first key. Every repair is logged
in tandem.migration_log with source 'compare' and status 'repaired'.

Throttling. --rate caps the rows hashed per second across the whole verify
(the wait comes after each range, by its row count); it skips the
whole-table pass. --workers 1 keeps one query per store at a time.

Cutover gate. The write flip refuses to run, unless forced, when a table's
latest done run in tandem.verify_runs is stale or not clean (clean: no
unrepaired difference; repaired differences count as clean). Run compare,
with --repair if needed, just before the flip.

A table is verified by key: a table without a primary key, or whose mapping
does not carry the key column for column, is skipped and says so.

Progress: a bar per table when stdout is a terminal, a log line every 10 s
otherwise.

Exit status: 0 every table clean (after --repair: every difference repaired),
1 differences remain or an error (an interrupted run also exits 1; resume it
with --since-checkpoint).`

const compareExamples = `  # Verify every table in scope
  tandem compare -c tandem.yaml
  # Verify two tables and repair what differs, machine-readable
  tandem compare -c tandem.yaml --table users --table orders --repair --json
  # Continue an interrupted verify at 50000 rows/s
  tandem compare -c tandem.yaml --since-checkpoint --rate 50000`

func newCompareCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "compare",
		Short:   "Verify new against old row by row with server-side range hashes; --repair fixes differences",
		Long:    compareLong,
		Example: compareExamples,
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	fs := cmd.Flags()
	f := &compareFlags{}
	f.tables = fs.StringSlice("table", nil, "old table to verify (schema.table or table in public); repeatable; default every table in scope")
	f.repair = fs.Bool("repair", false, "copy each confirmed difference from old to new with the locked-copy unit")
	f.asJSON = fs.Bool("json", false, "print the summaries as JSON")
	f.batch = fs.Int("batch", 10000, "old rows per hashed key range")
	f.rangesOnly = fs.Bool("ranges-only", false, "skip the whole-table pass (key buckets, or one hash per store on servers before PostgreSQL 14) and walk key ranges at once, with a checkpoint after each")
	f.workers = fs.Int("workers", 2, "key ranges hashed at once, each on both stores on a connection pair of its own; also the page ranges per store of the bucketed pass")
	f.leaf = fs.Int("leaf", 1024, "bisect a differing range until it holds at most this many rows, then diff its rows")
	f.rate = fs.Float64("rate", 0, "at most this many rows per second hashed, across every table (0 = unlimited)")
	f.resume = fs.Bool("since-checkpoint", false, "continue each table's latest unfinished run from its checkpoint instead of starting again")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := flags.Load(os.LookupEnv)
		if err != nil {
			return err
		}
		return f.run(cmd, cfg)
	}
	return cmd
}

// compareFlags are tandem compare's own flags.
type compareFlags struct {
	tables                             *[]string
	repair, asJSON, rangesOnly, resume *bool
	batch, workers, leaf               *int
	rate                               *float64
}

// run verifies the tables and prints the summaries; a difference left is
// exit status 1.
func (f *compareFlags) run(cmd *cobra.Command, cfg *config.Config) error {
	ctx := cmd.Context()
	out := cmd.OutOrStdout()
	oldCfg, err := control.StoreConnConfig(cfg, route.Old)
	if err != nil {
		return err
	}
	newCfg, err := control.StoreConnConfig(cfg, route.New)
	if err != nil {
		return err
	}
	ccfg, err := control.ControlConnConfig(cfg)
	if err != nil {
		return err
	}
	ms, err := loadBackfillMappings(ctx, cfg, oldCfg, newCfg)
	if err != nil {
		return err
	}
	maps, err := f.mappings(ms)
	if err != nil {
		return err
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
	if *f.workers < 1 {
		return fmt.Errorf("--workers must be at least 1, not %d", *f.workers)
	}
	opts := compare.Options{Settle: 2 * cfg.Routing.MirrorBudget.Duration(), Batch: *f.batch, Workers: *f.workers, RangesOnly: *f.rangesOnly, Leaf: *f.leaf, Repair: *f.repair, Rate: *f.rate, Control: ccfg, Resume: *f.resume,
		Logger: newLogger(cfg.Log, cmd.ErrOrStderr())}
	if *f.rate > 0 {
		opts.Limiter = compare.NewLimiter(*f.rate, *f.batch)
	}
	// The re-check holds the store of record's table: after a write
	// flip that is new.
	if ctl, err := pgx.ConnectConfig(ctx, ccfg.Copy()); err == nil {
		if st, err := route.Load(ctx, ctl); err == nil {
			opts.PrimaryNew = st.Primary == route.New
		}
		ctl.Close(ctx)
	}
	// With --json, stdout carries only the JSON; the progress goes to stderr.
	progressOut := out
	if *f.asJSON {
		progressOut = cmd.ErrOrStderr()
	}
	sums, runErr := compareWithProgress(ctx, old, nw, maps, opts, progressOut, isTerminal(progressOut))
	clean := runErr == nil
	for _, s := range sums {
		if s.Skipped == "" && !s.Clean() {
			clean = false
		}
	}
	if err := printCompare(out, sums, *f.asJSON); err != nil {
		return err
	}
	if runErr != nil {
		return runErr
	}
	if !clean {
		return exitCode(1)
	}
	return nil
}

// mappings are the tables to verify: --table's, or every table in scope.
func (f *compareFlags) mappings(ms *table.Mappings) ([]*table.Mapping, error) {
	var maps []*table.Mapping
	if len(*f.tables) == 0 {
		maps = ms.All()
	}
	for _, t := range *f.tables {
		parts := ms.PartsOf(parseTable(t)) // a split table: each part's verify
		if parts == nil {
			return nil, fmt.Errorf("--table %s: not in the migration's scope, or its mapping has a problem (see tandem plan)", t)
		}
		maps = append(maps, parts...)
	}
	return maps, nil
}

// compareWithProgress verifies the tables one after the other and shows
// the progress: an mpb bar per table on a terminal, a log line every 10 s
// otherwise. It returns the summaries so far with the first error that is
// not a skipped table.
func compareWithProgress(ctx context.Context, old, nw *pgx.Conn, maps []*table.Mapping, opts compare.Options, out io.Writer, tty bool) ([]compare.TableSummary, error) {
	var p *mpb.Progress
	if tty {
		p = mpb.NewWithContext(ctx, mpb.WithOutput(out), mpb.WithWidth(40))
	}
	var sums []compare.TableSummary
	for _, m := range maps {
		var bar *mpb.Bar
		start, last := time.Now(), time.Now()
		var prev time.Time
		o := opts
		o.Progress = func(pr compare.Progress) {
			now := time.Now()
			if p == nil {
				if now.Sub(last) >= 10*time.Second {
					last = now
					fmt.Fprintf(out, "compare %s: %d/~%d rows, %d ranges, %d differences, %.0f rows/s\n", pr.Table, pr.Rows, pr.Total, pr.Ranges,
						pr.Diffs, float64(pr.Rows)/now.Sub(start).Seconds())
				}
				return
			}
			if bar == nil {
				bar = p.AddBar(max(pr.Total, 1), mpb.PrependDecorators(decor.Name(pr.Table.String(), decor.WCSyncSpaceR),
					decor.CountersNoUnit("%d / %d", decor.WCSyncWidth)),
					mpb.AppendDecorators(decor.EwmaSpeed(0, "%.0f rows/s", 30, decor.WCSyncSpace), decor.Name(" ETA "), decor.EwmaETA(decor.ET_STYLE_GO, 30)))
				bar.SetCurrent(pr.Rows)
				prev = now
				return
			}
			if pr.Rows > pr.Total {
				bar.SetTotal(pr.Rows, false)
			}
			bar.EwmaSetCurrent(pr.Rows, now.Sub(prev))
			prev = now
		}
		s, err := compare.Table(ctx, old, nw, m, o)
		if bar != nil {
			if err == nil {
				bar.SetTotal(-1, true)
			} else {
				bar.Abort(false)
			}
		}
		if err != nil && !errors.Is(err, compare.ErrNotComparable) {
			if p != nil {
				p.Wait()
			}
			return append(sums, s), err
		}
		sums = append(sums, s)
	}
	if p != nil {
		p.Wait()
	}
	return sums, nil
}

func printCompare(out io.Writer, sums []compare.TableSummary, asJSON bool) error {
	if asJSON {
		return jsonout.Write(out, struct {
			Tables []compare.TableSummary `json:"tables"`
		}{sums})
	}
	for _, s := range sums {
		if s.Skipped != "" {
			fmt.Fprintf(out, "%s: skipped: %s\n", s.Table, s.Skipped)
			continue
		}
		state := "clean"
		if n := s.Differences(); n > 0 {
			state = fmt.Sprintf("%d differences (%d MissingOnNew, %d MissingOnOld, %d ValueDiff), %d repaired",
				n, s.Counts[compare.MissingOnNew], s.Counts[compare.MissingOnOld], s.Counts[compare.ValueDiff], s.Repaired)
		}
		resumed := ""
		if s.Resumed {
			resumed = ", resumed"
		}
		fmt.Fprintf(out, "%s -> %s: %d rows, %d ranges, %d drift keys, %s, %d transient, %v (run %d%s)\n", s.Table, s.NewTable, s.Rows, s.Ranges,
			s.DriftKeys, state, s.Transient, s.Duration.D().Round(time.Millisecond), s.RunID, resumed)
		for _, d := range s.Diffs {
			fmt.Fprintf(out, "  %-12s key %s\n", d.Kind, strings.Join(d.Key, ","))
		}
	}
	return nil
}
