package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/backfill"
	"github.com/tandemdb/tandem/compare"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/route"
)

// migrationStatus is `tandem status --json`. The schema is stable: fields
// are added, never renamed or removed; lists are [] when empty, times are
// RFC 3339, durations are strings ("1m30s").
type migrationStatus struct {
	GeneratedAt time.Time          `json:"generated_at"`
	Routing     control.Status     `json:"routing"`  // state, replicas, history, drift (as GET /api/v1/state)
	Backfill    []backfillProgress `json:"backfill"` // per table in the backfill's plan
	Verify      []verifyResult     `json:"verify"`   // per table in scope
	Shadow      shadowSummary      `json:"shadow"`
	// NextFlip is the write flip the gates were checked for ("old -> new").
	NextFlip string       `json:"next_flip"`
	Gates    []gateStatus `json:"gates"`
	// Errors names the sections that could not be read, and why.
	Errors map[string]string `json:"errors"`
}

type backfillProgress struct {
	Table         string  `json:"table"`
	RowsCopied    int64   `json:"rows_copied"`
	RowsTotal     int64   `json:"rows_total"` // estimated when planned
	Percent       float64 `json:"percent"`
	ChunksDone    int     `json:"chunks_done"`
	ChunksFailed  int     `json:"chunks_failed"`
	ChunksRunning int     `json:"chunks_running"`
	Finished      bool    `json:"finished"`
}

type verifyResult struct {
	Table       string     `json:"table"`
	Verified    bool       `json:"verified"` // a finished verify exists
	LastRun     *time.Time `json:"last_run"`
	Age         string     `json:"age"`
	Clean       bool       `json:"clean"`
	Differences int        `json:"differences"`
	Repaired    int        `json:"repaired"`
}

type shadowSummary struct {
	Window       string                 `json:"window"`
	Compared     int64                  `json:"compared"`
	Mismatched   int64                  `json:"mismatched"`
	MismatchRate float64                `json:"mismatch_rate"`
	Skipped      int64                  `json:"skipped"`
	Dropped      int64                  `json:"dropped"`
	Top          []shadowFingerprintTop `json:"top"` // mismatching fingerprints first, at most 5
}

type shadowFingerprintTop struct {
	Fingerprint string `json:"fingerprint"`
	Statement   string `json:"statement"`
	Compared    int64  `json:"compared"`
	Mismatched  int64  `json:"mismatched"`
}

type gateStatus struct {
	Name   string `json:"name"`
	Ready  bool   `json:"ready"`
	Reason string `json:"reason"` // why it refuses; "" when ready
}

func newStatusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show where the whole migration stands: routing, replicas, backfill, verify, shadow reads, drift and each cutover gate",
		Long: `Show the whole migration on one screen, read from the control database:

  routing    the state and its version, the write fence, recent changes
  replicas   live or not, the version and fence each acknowledged, breaker, writers
  drift      open entries by table and stale store, stuck entries
  backfill   per table: rows copied of the estimate, chunks done, failed, running
  verify     per table in scope: the last finished tandem compare, clean or not, its age
  shadow     reads compared over gates.shadow_window, the mismatch rate, top fingerprints
  gates      each cutover gate of the next write flip: ready, or blocked and why

--json prints the same as one JSON document with a stable schema (lists are
[] when empty, durations are strings). --watch 2s refreshes in place until
interrupted.`,
		Example: "  tandem status -c tandem.yaml\n  tandem status -c tandem.yaml --json\n  tandem status -c tandem.yaml --watch 2s",
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	asJSON := cmd.Flags().Bool("json", false, "print one JSON document (stable schema)")
	watch := cmd.Flags().Duration("watch", 0, "refresh every interval until interrupted (0 = print once)")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := flags.Load(os.LookupEnv)
		if err != nil {
			return err
		}
		if cfg.New.DSN == "" {
			return errors.New("status needs new.dsn: without a new store there is no migration to show")
		}
		log := newLogger(config.Log{Format: cfg.Log.Format, Level: "warn"}, cmd.ErrOrStderr())
		rt, err := control.NewRouting(cfg, log, nil)
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		clear := *watch > 0 && !*asJSON
		if f, ok := out.(*os.File); !ok || !isatty.IsTerminal(f.Fd()) {
			clear = false
		}
		for {
			st, err := collectStatus(cmd.Context(), cfg, rt)
			if err != nil {
				return err
			}
			if clear {
				fmt.Fprint(out, "\033[H\033[2J")
			}
			if *asJSON {
				if err := jsonout.Write(out, st); err != nil {
					return err
				}
			} else {
				printMigration(out, st, rt.Options.Live)
			}
			if *watch <= 0 {
				return nil
			}
			select {
			case <-cmd.Context().Done():
				return nil
			case <-time.After(*watch):
			}
		}
	}
	return cmd
}

// collectStatus reads every section. A section that cannot be read is
// named in Errors and left empty; only an unreachable control database is
// an error.
func collectStatus(ctx context.Context, cfg *config.Config, rt *control.Routing) (migrationStatus, error) {
	st := migrationStatus{GeneratedAt: time.Now().UTC(), Backfill: []backfillProgress{}, Verify: []verifyResult{},
		Gates: []gateStatus{}, Errors: map[string]string{}}
	st.Shadow.Top = []shadowFingerprintTop{}
	rs, err := rt.Status(ctx)
	if err != nil {
		return st, err
	}
	st.Routing = rs
	conn, err := rt.Connect(ctx)
	if err != nil {
		return st, err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	if bs, err := backfill.Status(ctx, conn); err != nil {
		st.Errors["backfill"] = err.Error()
	} else {
		for _, t := range bs.Tables {
			p := backfillProgress{Table: t.Table.String(), RowsCopied: t.DoneRows, RowsTotal: t.TotalRows, ChunksDone: t.ChunksDone,
				ChunksFailed: t.ChunksFailed, ChunksRunning: t.ChunksRunning, Finished: t.Finished}
			switch {
			case t.Finished:
				p.Percent = 100
			case t.TotalRows > 0:
				p.Percent = min(100, 100*float64(t.DoneRows)/float64(t.TotalRows))
			}
			st.Backfill = append(st.Backfill, p)
		}
	}

	if runs, err := compare.LastRuns(ctx, conn); err != nil {
		st.Errors["verify"] = err.Error()
	} else if ms, _, err := control.LoadMappings(ctx, cfg); err != nil {
		st.Errors["verify"] = err.Error()
	} else {
		for _, m := range ms.All() {
			n := m.Old.Name
			if !ms.InScope(n) || !m.Old.HasKey() {
				continue
			}
			v := verifyResult{Table: m.UnitName().String()}
			if r, ok := runs[m.UnitName()]; ok {
				fin := r.Finished
				v.Verified, v.LastRun, v.Clean, v.Differences, v.Repaired = true, &fin, r.Clean, r.Diffs, r.Repaired
				v.Age = st.GeneratedAt.Sub(fin).Round(time.Second).String()
			}
			st.Verify = append(st.Verify, v)
		}
		slices.SortFunc(st.Verify, func(a, b verifyResult) int { return strings.Compare(a.Table, b.Table) })
	}

	window := cfg.Gates.ShadowWindow.Duration()
	st.Shadow.Window = window.String()
	if rate, err := mismatch.WindowRate(ctx, conn, window); err != nil {
		st.Errors["shadow"] = err.Error()
	} else {
		t := rate.Total
		st.Shadow.Compared, st.Shadow.Mismatched, st.Shadow.MismatchRate = t.Compared(), t.Mismatched, t.MismatchRate()
		st.Shadow.Skipped, st.Shadow.Dropped = t.Skipped, t.Dropped
		for _, f := range rate.Fingerprints {
			if len(st.Shadow.Top) == 5 {
				break
			}
			st.Shadow.Top = append(st.Shadow.Top, shadowFingerprintTop{Fingerprint: f.Fingerprint, Statement: control.Truncate(f.Statement, 120),
				Compared: f.Compared(), Mismatched: f.Mismatched})
		}
	}

	st.Gates, st.NextFlip, err = checkGates(ctx, conn, rt, rs.State)
	if err != nil {
		st.Errors["gates"] = err.Error()
	}
	return st, nil
}

// checkGates evaluates each cutover gate of the next write flip (to the
// store that is not primary now) as route.Set would, without flipping: the
// gates of rt, the list its flips check.
func checkGates(ctx context.Context, conn *pgx.Conn, rt *control.Routing, cur route.State) ([]gateStatus, string, error) {
	next := cur.Settings
	next.Primary, next.Mirror = cur.Secondary(), true
	next.Reads = 0
	if next.Primary == route.New {
		next.Reads = 100
	}
	flip := fmt.Sprintf("%s -> %s", cur.Primary, next.Primary)
	out := []gateStatus{}
	for _, g := range rt.Gates() {
		gs := gateStatus{Name: g.Name, Ready: true}
		err := g.Check(ctx, conn, cur.Settings, next)
		var ie *route.IllegalError
		switch {
		case err == nil:
		case errors.As(err, &ie):
			gs.Ready, gs.Reason = false, ie.Reason
		default:
			gs.Ready, gs.Reason = false, "could not be checked: "+err.Error()
		}
		out = append(out, gs)
	}
	builtin, err := route.BuiltinRefusals(ctx, conn, cur, rt.Options.Live)
	if err != nil {
		return out, flip, err
	}
	out = append(out, gateStatus{Name: "replicas", Ready: len(builtin) == 0, Reason: strings.Join(builtin, "; ")})
	return out, flip, nil
}

func printMigration(out io.Writer, st migrationStatus, live time.Duration) {
	printStatus(out, st.Routing, live)

	fmt.Fprintln(out, "\nbackfill:")
	tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	if len(st.Backfill) == 0 {
		fmt.Fprintln(tw, "  (not started: tandem backfill -c FILE)")
	} else {
		fmt.Fprintln(tw, "  TABLE\tCOPIED\tOF ~\t%\tCHUNKS DONE\tFAILED\tRUNNING")
	}
	for _, b := range st.Backfill {
		fmt.Fprintf(tw, "  %s\t%d\t%d\t%.1f\t%d\t%d\t%d\n", b.Table, b.RowsCopied, b.RowsTotal, b.Percent, b.ChunksDone, b.ChunksFailed, b.ChunksRunning)
	}
	tw.Flush()

	fmt.Fprintln(out, "\nverify (last finished tandem compare):")
	tw = tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	if len(st.Verify) > 0 {
		fmt.Fprintln(tw, "  TABLE\tRESULT\tAGE\tDIFFERENCES\tREPAIRED")
	} else if st.Errors["verify"] == "" {
		fmt.Fprintln(tw, "  (no table in scope)")
	}
	for _, v := range st.Verify {
		if !v.Verified {
			fmt.Fprintf(tw, "  %s\tnever verified\t\t\t\n", v.Table)
			continue
		}
		result := "clean"
		if !v.Clean {
			result = "NOT CLEAN"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%d\n", v.Table, result, v.Age, v.Differences, v.Repaired)
	}
	tw.Flush()

	s := st.Shadow
	fmt.Fprintf(out, "\nshadow reads over %s: %d compared, %d mismatched (%.4g%%), %d skipped, %d dropped\n",
		s.Window, s.Compared, s.Mismatched, 100*s.MismatchRate, s.Skipped, s.Dropped)
	for _, f := range s.Top {
		fmt.Fprintf(out, "  %s: %d of %d mismatched  %s\n", f.Fingerprint, f.Mismatched, f.Compared, f.Statement)
	}

	fmt.Fprintf(out, "\ncutover gates of the next write flip (%s):\n", st.NextFlip)
	for _, g := range st.Gates {
		if g.Ready {
			fmt.Fprintf(out, "  %-12s ready\n", g.Name)
		} else {
			fmt.Fprintf(out, "  %-12s BLOCKED: %s\n", g.Name, g.Reason)
		}
	}
	if len(st.Errors) > 0 {
		fmt.Fprintln(out, "\nnot read:")
		for _, k := range slices.Sorted(maps.Keys(st.Errors)) {
			fmt.Fprintf(out, "  %s: %s\n", k, st.Errors[k])
		}
	}
}
