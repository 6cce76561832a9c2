package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/controlschema"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/route"
)

const routeLong = `Show and change the routing state that every proxy replica follows.

The state has four settings, kept in the control schema "tandem" (control.dsn,
else the old store) with a version and a history:
  primary  old|new  the store of record: each write runs there first
  mirror   on|off   writes are applied to the other store as well
  reads    0..100   percent of eligible reads served by the new store
  shadow   0..100   percent of eligible reads also run on the other store (the
                    same one with shadow.aa) and compared, off the client's path;
                    GET /api/v1/mismatches shows the outcome

A change is refused, with the reason and exit status 1, when it would leave a
store that serves reads incomplete (e.g. primary=new while mirror is off).
A write flip to new is also refused while a cutover gate fails: a table
mapping has problems; the backfill of a table in scope is unfinished; a
table's last verify (tandem compare) is missing, not clean, or older than
gates.verify_max_age; the confirmed shadow mismatch rate over
gates.shadow_window is above gates.shadow_max_mismatch_rate; drift is open;
drift is stuck (entries the repairer failed on routing.drift_stuck_attempts
times, named with their last error); a replica's breaker is open or it has
not acknowledged the current version; with feed.enabled, the change feed is
down (no holder, or a heartbeat older than 5s) or behind (it last advanced
longer ago than gates.feed_max_lag, or lags the primary's WAL by more than
gates.feed_max_lag_bytes).
Each refusal names the tables or fingerprints and the numbers. --force
overrides gates, never the rules above, and is recorded in the history. A flip raises a write fence: new write
transactions wait, in-flight ones get routing.fence_timeout to end (else the
flip is abandoned and the fence released), sequences are synced to the new
primary, every live replica acknowledges the new version, and the fence is
released. With feed.enabled, a flip or rollback first creates the publication
tandem_feed and the slot tandem_feed_<store> (tandem_feed_<name>, _<name>_<store>
with feed.name) on the store becoming primary,
then, writes fenced, waits up to routing.feed_wait until the change feed has
checked the primary's WAL up to the fence and the drift it found is repaired;
else the fence is released, nothing changes, and the error names the change
feed (--force goes on without it, on the record). The same operations are
served by the admin API (/api/v1/state, /api/v1/route, /api/v1/rollback).`

// routeExamples walks the README's playbook; TestPlaybookStepsAgree keeps
// the step names and numbers the same as the README's table.
const routeExamples = `  # The playbook, step by step (tandem status shows where you are):
  # 1. assess, then passthrough: swap the connection string
  tandem plan -c tandem.yaml
  tandem route show -c tandem.yaml
  # 2. dual-write, backfill, verify
  tandem route set -c tandem.yaml --mirror on --reason "start dual-write"
  tandem backfill -c tandem.yaml
  tandem compare -c tandem.yaml
  # 3. shadow reads, read shift
  tandem route set -c tandem.yaml --shadow 10
  tandem route set -c tandem.yaml --reads 10
  tandem route set -c tandem.yaml --reads 100
  # 4. write flip (fenced; old still receives every write), after a fresh verify
  tandem compare -c tandem.yaml
  tandem route set -c tandem.yaml --primary new --reads 100 --reason "cutover"
  # 5. finish: mirror off, shadow 0, the change feed's slots dropped; old can be retired
  tandem complete -c tandem.yaml
  # Roll back from any step: primary=old, reads=0
  tandem rollback -c tandem.yaml --reason "p99 regression"`

func newRouteCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "route",
		Short:   "Show or change the routing state (primary, mirror, reads, shadow)",
		Long:    routeLong,
		Example: routeExamples,
	}
	cmd.AddCommand(newRouteShowCmd(), newRouteSetCmd(), newRollbackCmd(), newRoutePruneCmd())
	return group(cmd)
}

// routing loads the configuration and builds the routing control plane
// that the admin API uses too.
func routing(flags *config.Flags, w io.Writer) (*control.Routing, error) {
	cfg, err := flags.Load(os.LookupEnv)
	if err != nil {
		return nil, err
	}
	log := newLogger(config.Log{Format: cfg.Log.Format, Level: "warn"}, w)
	return control.NewRouting(cfg, log, nil)
}

// ensureSchema creates the control schema when it is missing, so the
// routing can be set before any proxy has run.
func ensureSchema(ctx context.Context, rt *control.Routing) error {
	conn, err := rt.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return controlschema.Apply(ctx, conn)
}

func newRouteShowCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "show",
		Short: "Show the routing state, its history, the replicas and the open drift",
		Long: `Show the routing state (version, settings, write fence), the last changes, every
proxy replica with the version and fence it acknowledged, its heartbeat, its
breaker and its writers, and the open drift, with the entries the repairer
keeps failing on (stuck: at least routing.drift_stuck_attempts failed
attempts; they refuse a write flip) and their last error. The change feed's
section shows, per store, its slot (and whether it is active), the replica
holding the feed, the checked LSN, the lag (bytes: the store's WAL position
minus the checked LSN; seconds: since the checked LSN last moved), the WAL the
slot retains and the feed's last error. --json prints the same as the admin
API's GET /api/v1/state.`,
		Example: "  tandem route show -c tandem.yaml\n  tandem route show -c tandem.yaml --json",
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	asJSON := cmd.Flags().Bool("json", false, "print JSON (as GET /api/v1/state)")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		rt, err := routing(flags, cmd.ErrOrStderr())
		if err != nil {
			return err
		}
		st, err := rt.Status(cmd.Context())
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		if *asJSON {
			return jsonout.Write(out, st)
		}
		printStatus(out, st, rt.Options.Live)
		return nil
	}
	return cmd
}

func printStatus(out io.Writer, st control.Status, live time.Duration) {
	s := st.State
	fmt.Fprintf(out, "routing version %d: %s\n", s.Version, s.Settings)
	fmt.Fprintf(out, "changed %s by %s\n", s.ChangedAt.Local().Format(time.RFC3339), s.ChangedBy)
	if s.Fence != 0 {
		fmt.Fprintf(out, "write fence: RAISED (token %d): a write flip is in progress, new writes wait\n", s.Fence)
	} else {
		fmt.Fprintln(out, "write fence: none")
	}
	switch d := st.Drift; {
	case d == nil:
		fmt.Fprintln(out, "open drift: no drift ledger yet (created when a proxy with a new store starts)")
	case d.Open == 0:
		fmt.Fprintln(out, "open drift: none")
	default:
		names := make([]string, 0, len(d.Tables))
		for n, c := range d.Tables {
			names = append(names, fmt.Sprintf("%s (%d)", n, c))
		}
		slices.Sort(names)
		fmt.Fprintf(out, "open drift: %d entries on %d tables: %s\n", d.Open, len(d.Tables), strings.Join(names, ", "))
		for _, store := range []route.Store{route.Old, route.New} {
			if n := d.Stale[string(store)]; n > 0 {
				fmt.Fprintf(out, "  %d missed by the %s store\n", n, store)
			}
		}
	}
	if d := st.Drift; d != nil && d.Stuck > 0 {
		fmt.Fprintf(out, "stuck drift: %d entries failed to repair at least %d times (routing.drift_stuck_attempts); a write flip is refused until they are repaired:\n",
			d.Stuck, d.StuckAttempts)
		for _, e := range d.StuckEntries {
			fmt.Fprintf(out, "  %s; next attempt %s\n", e, e.NextAttempt.Local().Format(time.RFC3339))
		}
		if n := d.Stuck - int64(len(d.StuckEntries)); n > 0 {
			fmt.Fprintf(out, "  and %d more (SELECT * FROM tandem.drift WHERE repaired_at IS NULL AND attempts >= %d)\n", n, d.StuckAttempts)
		}
	}

	printFeed(out, st.Feed)

	fmt.Fprintf(out, "\nreplicas (live: heartbeat within %s):\n", live)
	tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  REPLICA\tLIVE\tACKED\tFENCE ACKED\tHEARTBEAT\tBREAKER\tWRITERS")
	if len(st.Replicas) == 0 {
		fmt.Fprintln(tw, "  (none)\t\t\t\t\t\t")
	}
	for _, r := range st.Replicas {
		ack := fmt.Sprint(r.AckedVersion)
		if r.AckedVersion < s.Version {
			ack += " (behind)"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%s ago\t%s\t%d\n", r.ID, yesNo(r.Live), ack, r.FenceAcked,
			time.Since(r.HeartbeatAt).Round(time.Millisecond), r.Breaker, r.Writers)
	}
	tw.Flush()

	fmt.Fprintf(out, "\nhistory (last %d):\n", len(st.History))
	tw = tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  VERSION\tCHANGED\tBY\tSETTINGS\tFENCE\tFORCED\tREASON")
	for _, h := range st.History {
		fence := "-"
		if h.FenceMS != nil {
			fence = fmt.Sprintf("%.1fms", *h.FenceMS)
		}
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\t%s\t%s\t%s\n", h.Version, h.ChangedAt.Local().Format(time.RFC3339), h.ChangedBy,
			h.Settings, fence, yesNo(h.Forced), h.Reason)
	}
	tw.Flush()
}

// printFeed prints the change feed's section of route show.
func printFeed(out io.Writer, f *control.Feed) {
	if f == nil {
		return
	}
	switch {
	case !f.Enabled && len(f.Stores) == 0:
		fmt.Fprintln(out, "change feed: off (feed.enabled is false)")
		return
	case !f.Enabled:
		fmt.Fprintln(out, "change feed: off (feed.enabled is false), but its state or slots remain:")
	default:
		fmt.Fprintln(out, "change feed: on (write flips and rollbacks wait for it)")
	}
	tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  STORE\tSLOT\tHOLDER\tCHECKED LSN\tLAG\tRETAINED WAL\tHEARTBEAT\tLAST ERROR")
	for _, fs := range f.Stores {
		store := fs.Store
		if fs.Primary {
			store += " (primary)"
		}
		slot := fs.Slot
		switch {
		case fs.StoreError != "":
			slot += " (store unreadable)"
		case !fs.SlotExists:
			slot += " (missing)"
		case fs.SlotActive:
			slot += " (active)"
		default:
			slot += " (inactive)"
		}
		holder := fs.Holder
		switch {
		case fs.HeartbeatAt == nil:
			holder = "(never ran)"
		case holder == "":
			holder = "(nobody)"
		case !fs.Live:
			holder += " (DOWN)"
		}
		checked, lag, retained, hb := "-", "-", "-", "-"
		if fs.CheckedLSN != "" {
			checked = fs.CheckedLSN
		}
		if fs.LagBytes != nil || fs.LagSeconds != nil {
			var parts []string
			if fs.LagBytes != nil {
				parts = append(parts, fmt.Sprintf("%d bytes", *fs.LagBytes))
			}
			if fs.LagSeconds != nil {
				parts = append(parts, fmt.Sprintf("%.1fs", *fs.LagSeconds))
			}
			lag = strings.Join(parts, ", ")
		}
		if fs.Retained != nil {
			retained = fmt.Sprintf("%d bytes", *fs.Retained)
		}
		if fs.HeartbeatAt != nil {
			hb = time.Since(*fs.HeartbeatAt).Round(time.Millisecond).String() + " ago"
		}
		lastErr := fs.LastError
		if fs.StoreError != "" {
			lastErr = strings.TrimSpace(lastErr + " " + fs.StoreError)
		}
		if lastErr == "" {
			lastErr = "-"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", store, slot, holder, checked, lag, retained, hb, lastErr)
	}
	tw.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// operator names who runs the CLI, for the history.
func operator() string {
	name := os.Getenv("USER")
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return fmt.Sprintf("%s@%s (tandem cli)", name, host)
}

func newRouteSetCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "set",
		Short: "Change the routing: --primary, --mirror, --reads, --shadow",
		Long: `Change one or more routing settings; the ones not given keep their current value.
It prints the new state, the write fence's duration on a flip, and which
replicas acknowledged the new version.

` + routeLong,
		Example: routeExamples,
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	fs := cmd.Flags()
	primary := fs.String("primary", "", "the store of record: old or new (changing it is a write flip)")
	mirror := fs.String("mirror", "", "apply writes to the other store as well: on or off")
	reads := fs.Int("reads", 0, "percent of eligible reads served by the new store, 0..100")
	shadow := fs.Int("shadow", 0, "percent of eligible reads also run on the other store and compared off the client's path, 0..100 (playbook step 3; outcomes in GET /api/v1/mismatches and tandem status)")
	force := fs.Bool("force", false, "override failing cutover gates (open or stuck drift, open breaker, lagging replica, change feed down or behind) and a change feed that does not catch up within routing.feed_wait; recorded in the history")
	reason := fs.String("reason", "", "why, for the history")
	asJSON := fs.Bool("json", false, "print the result as JSON (as POST /api/v1/route answers); a refusal is {\"error\": reason} with exit status 1")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		var req control.RouteRequest
		if fs.Changed("primary") {
			req.Primary = primary
		}
		if fs.Changed("mirror") {
			var on bool
			switch strings.ToLower(*mirror) {
			case "on", "true":
				on = true
			case "off", "false":
			default:
				return fmt.Errorf("--mirror must be on or off, not %q", *mirror)
			}
			req.Mirror = &on
		}
		if fs.Changed("reads") {
			req.Reads = reads
		}
		if fs.Changed("shadow") {
			req.Shadow = shadow
		}
		req.Force, req.Reason = *force, *reason
		if err := req.Check(); err != nil {
			return fmt.Errorf("%w (see tandem route set --help)", err)
		}
		rt, err := routing(flags, cmd.ErrOrStderr())
		if err != nil {
			return err
		}
		if err := ensureSchema(cmd.Context(), rt); err != nil {
			return err
		}
		res, err := rt.Route(cmd.Context(), operator(), req)
		return printResult(cmd.OutOrStdout(), cmd.ErrOrStderr(), res, err, *asJSON)
	}
	return cmd
}

func newRollbackCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rollback",
		Short: "Roll back: primary=old, reads=0 (mirroring stays on)",
		Long: `Roll back from any step of the playbook: old becomes the primary and serves
every read. Mirroring stays on, so new keeps receiving writes and the migration
can resume. Moving the primary back is a write flip (fenced, sequences synced
new -> old), but the cutover gates that guard moving forward, such as open
drift, do not hold a rollback back. With feed.enabled a rollback waits for the
change feed like a flip (so that it loses no write the mirror missed), and is
refused if the feed does not catch up within routing.feed_wait: --force
then rolls back without it, and the output says so. The same as
'tandem route rollback' and POST /api/v1/rollback.`,
		Example: `  tandem rollback -c tandem.yaml --reason "p99 regression after the flip"`,
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	force := cmd.Flags().Bool("force", false, "override the built-in gates (open breaker, lagging replica) and a change feed that does not catch up within routing.feed_wait; recorded in the history")
	reason := cmd.Flags().String("reason", "", "why, for the history")
	asJSON := cmd.Flags().Bool("json", false, "print the result as JSON (as POST /api/v1/rollback answers); a refusal is {\"error\": reason} with exit status 1")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		rt, err := routing(flags, cmd.ErrOrStderr())
		if err != nil {
			return err
		}
		if err := ensureSchema(cmd.Context(), rt); err != nil {
			return err
		}
		res, err := rt.Rollback(cmd.Context(), operator(), *reason, *force)
		return printResult(cmd.OutOrStdout(), cmd.ErrOrStderr(), res, err, *asJSON)
	}
	return cmd
}

// printResult prints what a change did to out. A refusal is printed to
// errOut with its reason and exits with status 1 (with asJSON, to out as
// {"error": reason}, as the admin API's 409); other errors are returned.
func printResult(out, errOut io.Writer, res control.Result, err error, asJSON bool) error {
	if err != nil {
		if route.IsIllegal(err) {
			if asJSON {
				var ie *route.IllegalError
				reason := err.Error()
				if errors.As(err, &ie) {
					reason = ie.Reason
				}
				if werr := jsonout.Write(out, refusal{Error: reason, Refused: true}); werr != nil {
					return werr
				}
			} else {
				fmt.Fprintln(errOut, "tandem:", err)
			}
			return exitCode(1)
		}
		return fmt.Errorf("routing change failed: %w", err)
	}
	if asJSON {
		return jsonout.Write(out, res)
	}
	st, rep := res.State, res.Report
	if rep.ToVersion == rep.FromVersion {
		fmt.Fprintf(out, "routing unchanged at version %d: %s\n", st.Version, st.Settings)
		return nil
	}
	fmt.Fprintf(out, "routing version %d (was %d): %s\n", st.Version, rep.FromVersion, st.Settings)
	if rep.Flip {
		fmt.Fprintf(out, "write flip: fence held %s (drained by: %s)\n", rep.Fence.Round(10*time.Microsecond), listOrNone(rep.Drained))
		if s := rep.Sequences; s != nil {
			fmt.Fprintf(out, "sequences synced to %s: %d", st.Primary, s.Synced)
			if len(s.Missing) > 0 {
				fmt.Fprintf(out, " (missing there, not synced: %s)", strings.Join(s.Missing, ", "))
			}
			fmt.Fprintln(out)
		}
		if f := rep.Feed; f != nil {
			if f.CaughtUp {
				fmt.Fprintf(out, "change feed: checked the %s store's WAL up to %s (fence position %s) after %.1fms of waiting\n", f.Store, f.CheckedLSN, f.FenceLSN, f.WaitedMS)
			} else {
				fmt.Fprintf(out, "change feed: NOT caught up with the %s store's fence position %s (checked %s) after %.1fms; forced past it\n", f.Store, f.FenceLSN, orDash(f.CheckedLSN), f.WaitedMS)
			}
		}
	}
	if len(rep.Forced) > 0 {
		fmt.Fprintf(out, "forced past: %s\n", strings.Join(rep.Forced, "; "))
	}
	fmt.Fprintf(out, "acknowledged by: %s\n", listOrNone(rep.Acked))
	if len(rep.NotAcked) > 0 {
		fmt.Fprintf(out, "NOT acknowledged in time by: %s (they apply it when they next reach the control database)\n", strings.Join(rep.NotAcked, ", "))
	}
	return nil
}

// refusal is what route set, rollback and complete print with --json when
// the change is refused: the same body as the admin API's 409.
type refusal struct {
	Error   string `json:"error"`
	Refused bool   `json:"refused"`
}

// pruned is what route prune --json prints.
type pruned struct {
	Pruned    []string         `json:"pruned"` // replica ids removed
	OlderThan jsonout.Duration `json:"older_than"`
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func listOrNone(s []string) string {
	if len(s) == 0 {
		return "no live replicas"
	}
	return strings.Join(s, ", ")
}

func newRoutePruneCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Remove replicas not heard from for a while from tandem.replicas",
		Long: `Remove the rows of proxy replicas not heard from for --older-than (default
1h) from tandem.replicas: pods that were replaced, processes that were killed.
Only live replicas count for a flip's acknowledgements, so stale rows do no
harm there, but they clutter 'tandem route show' and 'tandem status'.
--older-than must be at least the liveness window (3 x routing.poll), so a
live replica is never removed; a pruned replica that comes back registers
again with its next heartbeat.`,
		Example: "  tandem route prune -c tandem.yaml --older-than 30m",
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	older := cmd.Flags().Duration("older-than", time.Hour, "remove replicas whose last heartbeat is older than this")
	asJSON := cmd.Flags().Bool("json", false, `print {"pruned": [ids]}`)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		rt, err := routing(flags, cmd.ErrOrStderr())
		if err != nil {
			return err
		}
		conn, err := rt.Connect(cmd.Context())
		if err != nil {
			return err
		}
		defer conn.Close(context.WithoutCancel(cmd.Context()))
		ids, err := route.PruneReplicas(cmd.Context(), conn, *older, rt.Options.Live)
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		if *asJSON {
			return jsonout.Write(out, pruned{Pruned: ids, OlderThan: jsonout.Duration(*older)})
		}
		if len(ids) == 0 {
			fmt.Fprintf(out, "no replica was silent for longer than %s\n", *older)
			return nil
		}
		fmt.Fprintf(out, "pruned %d replica(s) silent for longer than %s: %s\n", len(ids), *older, strings.Join(ids, ", "))
		return nil
	}
	return cmd
}
