package main

import (
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

const backfillLong = `Copy the rows that existed before mirroring started from the old store to the
new one, while live writes continue (playbook step 2, after mirror is on). It reads the same
configuration as 'tandem proxy' and refuses to start unless the routing state
has mirror on (tandem route set --mirror on), so that every write after the
start reaches both stores. Before the first chunk it waits (up to
--settle-timeout) until every live proxy replica has acknowledged mirror=on
and no transaction that began before that is still open on old: a session
inside a transaction when mirror turned on finishes it on old only.

Each unit locks one chunk of --chunk rows in key order on old (SELECT ... FOR
SHARE), upserts it on new through the table's mapping in one transaction that
also records the chunk's checkpoint, and commits new, then old. While the rows
are locked no write can change them, so a copy never overwrites a newer
mirrored value. Tables are pre-split into chunks by sampling the key; workers
(--workers here, and any other 'tandem backfill' process) claim chunks with
FOR UPDATE SKIP LOCKED from tandem.backfill_chunks.

Resume: run the same command again after a crash or Ctrl-C; chunks resume from
their checkpoints, finished tables are skipped. --restart starts over.
A row the new store or the mapping rejects is logged with its key in
tandem.migration_log, retried with backoff on the next claim, and does not stop
the other rows; --report lists the failures.

Exit status: 0 every row copied, 1 an error, 2 some rows failed (see --report).`

const backfillExamples = `  # Backfill every table in scope with 8 workers, at most 20000 rows/s
  tandem backfill -c tandem.yaml --workers 8 --rate 20000
  # Try a mapping on one real row, then on one key range
  tandem backfill -c tandem.yaml --table users --key 42
  tandem backfill -c tandem.yaml --table users --range 1000:1999
  # Composite keys: the values comma-separated, in key order
  tandem backfill -c tandem.yaml --table order_lines --key 1042,3
  # What would be copied, and what failed
  tandem backfill -c tandem.yaml --dry-run
  tandem backfill -c tandem.yaml --report`

func newBackfillCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "backfill",
		Short:   "Copy existing rows old -> new under live writes: locked, resumable, throttled",
		Long:    backfillLong,
		Example: backfillExamples,
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	fs := cmd.Flags()
	f := &backfillFlags{
		tables:    fs.StringSlice("table", nil, "old table to backfill (schema.table or table in public); repeatable; default every table in scope"),
		key:       fs.String("key", "", "copy only the row with this key (values comma-separated in key order); needs one --table"),
		rng:       fs.String("range", "", "copy only the keys LO:HI, both inclusive; needs one --table"),
		workers:   fs.Int("workers", 4, "workers in this process"),
		rate:      fs.Float64("rate", 0, "at most this many rows per second (0 = unlimited)"),
		chunk:     fs.Int("chunk", 1000, "rows per locked-copy unit"),
		latency:   fs.Duration("max-latency", 0, "pause while a SELECT 1 on old takes longer than this (0 = no latency guard)"),
		dryRun:    fs.Bool("dry-run", false, "plan and print what would be copied, write nothing"),
		restart:   fs.Bool("restart", false, "forget the tables' checkpoints and copy them again from the start"),
		report:    fs.Bool("report", false, "summarise the failures in the migration log and exit"),
		path:      fs.String("path", "auto", "how chunks are copied: snapshot (COPY from one exported snapshot of old, then the keys changed since reconciled under lock), locked (the locked-copy unit), or auto (snapshot where old has wal_level=logical and the slot can be made; the choice and its reason are printed)"),
		deferIdx:  fs.Bool("defer-indexes", false, "drop the new tables' non-key indexes (never a primary key, unique, exclusion, replica identity or constraint index) before the copy, their definitions saved in the control schema, and rebuild them with CREATE INDEX CONCURRENTLY (up to --workers at once) once the tables are finished; a crashed run's indexes are rebuilt by the next run"),
		rangeRows: fs.Int("range-rows", 50000, "rows per claimed chunk (the snapshot path copies a chunk in one COPY)"),
		asJSON:    fs.Bool("json", false, "print the summary (with --report, the failures) as one JSON document; progress goes to stderr"),
		settle:    fs.Duration("settle-timeout", 5*time.Minute, "wait at most this long for the proxy replicas to acknowledge mirror=on and older transactions on old to end"),
	}
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := flags.Load(os.LookupEnv)
		if err != nil {
			return err
		}
		return f.run(cmd, cfg)
	}
	return cmd
}

// backfillFlags are tandem backfill's own flags.
type backfillFlags struct {
	tables                    *[]string
	key, rng, path            *string
	workers, chunk, rangeRows *int
	rate                      *float64
	latency, settle           *time.Duration
	dryRun, restart, report   *bool
	deferIdx, asJSON          *bool
}

// run copies the tables (or prints the failure report) and the summary;
// rows that failed are exit status 2.
func (f *backfillFlags) run(cmd *cobra.Command, cfg *config.Config) error {
	if *f.key != "" && *f.rng != "" {
		return errors.New("--key and --range exclude each other")
	}
	bpath, err := backfill.ParsePath(*f.path)
	if err != nil {
		return fmt.Errorf("--path: %w", err)
	}
	ctx := cmd.Context()
	out := cmd.OutOrStdout()
	ccfg, err := control.ControlConnConfig(cfg)
	if err != nil {
		return err
	}
	if *f.report {
		return printBackfillReport(ctx, ccfg, out, *f.asJSON)
	}
	opts, err := f.options(ctx, cmd, cfg, ccfg, bpath)
	if err != nil {
		return err
	}
	eng, err := backfill.New(opts)
	if err != nil {
		return err
	}
	progress := out
	if *f.asJSON {
		progress = cmd.ErrOrStderr()
	}
	sum, err := runWithProgress(ctx, eng, progress, isTerminal(progress))
	if err != nil {
		return err
	}
	if p, why := eng.Path(); p != "" && !*f.asJSON {
		fmt.Fprintf(out, "path: %s (%s)\n", p, why)
	}
	if *f.asJSON {
		p, why := eng.Path()
		if err := jsonout.Write(out, backfillSummary{Tables: sum.Tables, Duration: jsonout.Duration(sum.Duration), Failed: sum.Failed, DryRun: *f.dryRun, Path: string(p), PathReason: why,
			IndexesDeferred: sum.IndexesDeferred, IndexesRebuilt: sum.IndexesRebuilt}); err != nil {
			return err
		}
	} else {
		printSummary(out, sum, *f.dryRun)
	}
	if sum.Failed {
		return exitCode(2)
	}
	return nil
}

// options builds the engine's options from the flags, the stores' and the
// control database's connection configs and the mappings.
func (f *backfillFlags) options(ctx context.Context, cmd *cobra.Command, cfg *config.Config, ccfg *pgx.ConnConfig, bpath backfill.Path) (backfill.Options, error) {
	oldCfg, err := control.StoreConnConfig(cfg, route.Old)
	if err != nil {
		return backfill.Options{}, err
	}
	newCfg, err := control.StoreConnConfig(cfg, route.New)
	if err != nil {
		return backfill.Options{}, err
	}
	opts := backfill.Options{Control: ccfg, Primary: oldCfg, Secondary: newCfg, Workers: *f.workers, Rate: *f.rate, Chunk: *f.chunk, RangeRows: *f.rangeRows, Path: bpath, DeferIndexes: *f.deferIdx,
		Restart: *f.restart, DryRun: *f.dryRun, LatencyBound: *f.latency, Logger: newLogger(cfg.Log, cmd.ErrOrStderr()),
		Live: 3 * cfg.Routing.Poll.Duration(), SettleTimeout: *f.settle, Feed: cfg.Feed.Enabled, FeedNames: control.FeedNamesOf(cfg)}
	for _, t := range *f.tables {
		opts.Tables = append(opts.Tables, parseTable(t))
	}
	if *f.key != "" {
		if opts.Key, err = parseKey(*f.key); err != nil {
			return opts, fmt.Errorf("--key: %w", err)
		}
	}
	if *f.rng != "" {
		lo, hi, ok := strings.Cut(*f.rng, ":")
		if !ok || strings.Contains(hi, ":") {
			return opts, fmt.Errorf("--range %q: want LO:HI with one colon", *f.rng)
		}
		if opts.RangeLo, err = parseKey(lo); err != nil {
			return opts, fmt.Errorf("--range: %w", err)
		}
		if opts.RangeHi, err = parseKey(hi); err != nil {
			return opts, fmt.Errorf("--range: %w", err)
		}
	}
	if opts.Mappings, err = loadBackfillMappings(ctx, cfg, oldCfg, newCfg); err != nil {
		return opts, err
	}
	return opts, nil
}

func parseTable(s string) table.Name {
	if sch, t, ok := strings.Cut(s, "."); ok {
		return table.Name{Schema: sch, Table: t}
	}
	return table.Name{Schema: "public", Table: s}
}

// parseKey reads one key: its values comma-separated (CSV quoting allowed).
func parseKey(s string) ([]string, error) {
	r := csv.NewReader(strings.NewReader(s))
	rec, err := r.Read()
	if err != nil {
		return nil, fmt.Errorf("key %q: %w", s, err)
	}
	return rec, nil
}

func loadBackfillMappings(ctx context.Context, cfg *config.Config, oldCfg, newCfg *pgx.ConnConfig) (*table.Mappings, error) {
	o, err := pgx.ConnectConfig(ctx, oldCfg.Copy())
	if err != nil {
		return nil, fmt.Errorf("connecting to the old store %s: %w", config.RedactDSN(oldCfg.ConnString()), err)
	}
	defer o.Close(context.WithoutCancel(ctx))
	n, err := pgx.ConnectConfig(ctx, newCfg.Copy())
	if err != nil {
		return nil, fmt.Errorf("connecting to the new store %s: %w", config.RedactDSN(newCfg.ConnString()), err)
	}
	defer n.Close(context.WithoutCancel(ctx))
	ms, _, err := table.LoadMappings(ctx, cfg.Tables, o, n)
	return ms, err
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && (isatty.IsTerminal(f.Fd()) || isatty.IsCygwinTerminal(f.Fd()))
}

// runWithProgress runs the engine and shows its progress: an mpb bar per
// table on a terminal, a log line every 10 s otherwise.
func runWithProgress(ctx context.Context, eng *backfill.Engine, out io.Writer, tty bool) (backfill.Summary, error) {
	type result struct {
		s   backfill.Summary
		err error
	}
	done := make(chan result, 1)
	go func() {
		s, err := eng.Run(ctx)
		done <- result{s, err}
	}()
	every := 10 * time.Second
	var p *mpb.Progress
	bars := map[table.Name]*mpb.Bar{}
	if tty {
		every = 200 * time.Millisecond
		p = mpb.NewWithContext(ctx, mpb.WithOutput(out), mpb.WithWidth(40))
	}
	t := time.NewTicker(every)
	defer t.Stop()
	start := time.Now()
	update := func(final bool) {
		for _, tp := range eng.Progress() {
			if tp.Skipped != "" {
				continue
			}
			if p == nil {
				if !final {
					fmt.Fprintf(out, "backfill %s: %d/%d rows, %d/%d chunks, %.0f rows/s\n", tp.Table, tp.Done, tp.Total,
						tp.ChunksDone, tp.Chunks, float64(tp.Done)/time.Since(start).Seconds())
				}
				continue
			}
			b, ok := bars[tp.Table]
			if !ok {
				b = p.AddBar(max(tp.Total, 1), mpb.PrependDecorators(decor.Name(tp.Table.String(), decor.WCSyncSpaceR),
					decor.CountersNoUnit("%d / %d", decor.WCSyncWidth)),
					mpb.AppendDecorators(decor.EwmaSpeed(0, "%.0f rows/s", 30, decor.WCSyncSpace), decor.Name(" ETA "), decor.EwmaETA(decor.ET_STYLE_GO, 30)))
				bars[tp.Table] = b
			}
			if tp.Done > tp.Total {
				b.SetTotal(tp.Done, false)
			}
			b.EwmaSetCurrent(tp.Done, every)
			if final {
				b.SetTotal(-1, true)
			}
		}
	}
	for {
		select {
		case r := <-done:
			update(true)
			if p != nil {
				for _, b := range bars {
					b.Abort(false)
				}
				p.Wait()
			}
			return r.s, r.err
		case <-t.C:
			update(false)
		}
	}
}

// backfillSummary is what tandem backfill --json prints.
type backfillSummary struct {
	Tables   []backfill.TableProgress `json:"tables"`
	Duration jsonout.Duration         `json:"duration"`
	Failed   bool                     `json:"failed"` // some rows failed: see tandem backfill --report
	DryRun   bool                     `json:"dry_run"`
	// Path is the copy path taken (snapshot or locked) and PathReason why;
	// empty for a dry run.
	Path       string `json:"path"`
	PathReason string `json:"path_reason"`
	// IndexesDeferred and IndexesRebuilt count the new store's indexes
	// dropped for the copy (--defer-indexes) and built again.
	IndexesDeferred int `json:"indexes_deferred"`
	IndexesRebuilt  int `json:"indexes_rebuilt"`
}

// backfillReport is what tandem backfill --report --json prints.
type backfillReport struct {
	Failures []backfill.Failure `json:"failures"` // newest first
	Failing  int                `json:"failing"`  // not fixed by a later unit
}

func printSummary(out io.Writer, s backfill.Summary, dry bool) {
	for _, t := range s.Tables {
		switch {
		case t.Skipped != "":
			fmt.Fprintf(out, "%s: skipped: %s\n", t.Table, t.Skipped)
		case dry:
			fmt.Fprintf(out, "%s: would copy ~%d rows in %d chunks\n", t.Table, t.Total, t.Chunks)
		default:
			fmt.Fprintf(out, "%s: %d rows, %d/%d chunks done, %d failed chunks, %d failed keys\n", t.Table, t.Done, t.ChunksDone, t.Chunks, t.ChunksFailed, t.FailedKeys)
		}
	}
	if s.IndexesDeferred > 0 || s.IndexesRebuilt > 0 {
		fmt.Fprintf(out, "indexes on new: %d dropped for the copy, %d rebuilt\n", s.IndexesDeferred, s.IndexesRebuilt)
	}
	if !dry {
		fmt.Fprintf(out, "took %v\n", s.Duration.Round(time.Millisecond))
	}
	if s.Failed {
		fmt.Fprintln(out, "some rows failed: see tandem backfill --report")
	}
}

func printBackfillReport(ctx context.Context, ccfg *pgx.ConnConfig, out io.Writer, asJSON bool) error {
	c, err := pgx.ConnectConfig(ctx, ccfg.Copy())
	if err != nil {
		return fmt.Errorf("connecting to the control database: %w", err)
	}
	defer c.Close(context.WithoutCancel(ctx))
	fs, err := backfill.Report(ctx, c)
	if err != nil {
		return err
	}
	open := 0
	for _, f := range fs {
		if !f.Fixed {
			open++
		}
	}
	if asJSON {
		if err := jsonout.Write(out, backfillReport{Failures: fs, Failing: open}); err != nil {
			return err
		}
		if open > 0 {
			return exitCode(2)
		}
		return nil
	}
	for _, f := range fs {
		state := "FAILING"
		if f.Fixed {
			state = "fixed"
		}
		fmt.Fprintf(out, "%-8s %s key %s..%s: %d attempts, last %s: %s\n", state, f.Table, strings.Join(f.Lo, ","), strings.Join(f.Hi, ","),
			f.Attempts, f.Last.Format(time.RFC3339), f.Error)
	}
	fmt.Fprintf(out, "%d failed units, %d still failing\n", len(fs), open)
	if open > 0 {
		return exitCode(2)
	}
	return nil
}
