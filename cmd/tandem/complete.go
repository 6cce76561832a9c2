package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/control"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/route"
)

// completion is what `tandem complete` did.
type completion struct {
	State   route.State `json:"state"`
	Mirror  string      `json:"mirror"`  // "turned off" or "already off"
	Dropped []string    `json:"dropped"` // slots and publications dropped, as "store: name"
	Skipped []string    `json:"skipped"` // what could not be reached, and why
}

func newCompleteCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "complete",
		Short: "Finish a migration after the write flip: stop mirroring to old and drop the change feed's slots",
		Long: `Finish a migration (step 5 of the playbook) once the write flip to new has
soaked: turn mirroring off, so old stops receiving writes and can be retired,
set shadow reads to 0, and drop what Tandem created on the stores for the
change feed: the logical slots tandem_feed_old and tandem_feed_new (a slot
left behind holds WAL on its store for ever) and the publication tandem_feed
(tandem_feed_<name>_old, _new and tandem_feed_<name> with feed.name set).
The routing history, the drift ledger and the migration log stay in the
control schema.

It is refused unless new is the primary: before the flip, old is the store
of record and mirroring is what keeps new complete. Turning mirroring back
on afterwards is refused without --force, since old has missed every write
since. A store that cannot be reached is reported and left alone; run
complete again to finish it.`,
		Example: "  tandem complete -c tandem.yaml --reason \"cutover soaked for 7 days\"",
		Args:    cobra.NoArgs,
	}
	flags := config.NewFlags(cmd.Flags()).Show(config.ToolSettings...)
	reason := cmd.Flags().String("reason", "migration complete", "recorded in the routing history")
	asJSON := cmd.Flags().Bool("json", false, "print what was done as JSON")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := flags.Load(os.LookupEnv)
		if err != nil {
			return err
		}
		log := newLogger(config.Log{Format: cfg.Log.Format, Level: "warn"}, cmd.ErrOrStderr())
		rt, err := control.NewRouting(cfg, log, nil)
		if err != nil {
			return err
		}
		res, err := complete(cmd.Context(), cfg, rt, *reason)
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		if *asJSON {
			return jsonout.Write(out, res)
		}
		printCompletion(out, res)
		return nil
	}
	return cmd
}

// complete turns mirroring off after a write flip and drops the change
// feed's slots and publications on both stores.
func complete(ctx context.Context, cfg *config.Config, rt *control.Routing, reason string) (completion, error) {
	res := completion{Dropped: []string{}, Skipped: []string{}}
	st, err := rt.Status(ctx)
	if err != nil {
		return res, err
	}
	if st.State.Primary != route.New {
		return res, fmt.Errorf("complete refused: the primary is %s; a migration completes after the write flip to new "+
			"(tandem route set --primary new), when old is no longer the store of record", st.State.Primary)
	}
	res.State, res.Mirror = st.State, "already off"
	if st.State.Mirror || st.State.Shadow != 0 {
		off, zero := false, 0
		r, err := rt.Route(ctx, operator(), control.RouteRequest{Mirror: &off, Shadow: &zero, Reason: reason})
		if err != nil {
			return res, err
		}
		res.State = r.State
		if st.State.Mirror {
			res.Mirror = "turned off"
		}
	}
	for _, s := range []route.Store{route.Old, route.New} {
		dropped, err := dropFeed(ctx, cfg, s)
		res.Dropped = append(res.Dropped, dropped...)
		if err != nil {
			res.Skipped = append(res.Skipped, fmt.Sprintf("%s: %v", s, err))
		}
	}
	if conn, err := rt.Connect(ctx); err == nil {
		_, _ = conn.Exec(ctx, "DELETE FROM tandem.feed WHERE to_regclass('tandem.feed') IS NOT NULL")
		conn.Close(context.WithoutCancel(ctx))
	}
	return res, nil
}

// dropFeed drops the feed's slots and publication on store s. A slot still
// streaming (the feed stops once mirroring is off) is given a few seconds,
// then its walsender is ended.
func dropFeed(ctx context.Context, cfg *config.Config, s route.Store) ([]string, error) {
	cc, err := control.StoreConnConfig(cfg, s)
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(cctx, cc)
	if err != nil {
		return nil, fmt.Errorf("not reached, nothing dropped there: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var dropped []string
	names := control.FeedNamesOf(cfg)
	for _, slot := range []string{names.Slot(route.Old), names.Slot(route.New)} {
		deadline := time.Now().Add(5 * time.Second)
		for {
			var exists, active bool
			var pid *int32
			err := conn.QueryRow(cctx, "SELECT true, active, active_pid FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&exists, &active, &pid)
			if errors.Is(err, pgx.ErrNoRows) {
				break
			}
			if err != nil {
				return dropped, fmt.Errorf("reading the slot %s: %w", slot, err)
			}
			if active && time.Now().Before(deadline) {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			if active && pid != nil {
				_, _ = conn.Exec(cctx, "SELECT pg_terminate_backend($1)", *pid)
				time.Sleep(200 * time.Millisecond)
			}
			if _, err := conn.Exec(cctx, "SELECT pg_drop_replication_slot($1)", slot); err != nil {
				if time.Now().Before(deadline.Add(5 * time.Second)) {
					time.Sleep(200 * time.Millisecond)
					continue
				}
				return dropped, fmt.Errorf("dropping the slot %s: %w", slot, err)
			}
			dropped = append(dropped, fmt.Sprintf("%s: slot %s", s, slot))
			break
		}
	}
	var pub bool
	if err := conn.QueryRow(cctx, "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", names.Publication()).Scan(&pub); err != nil {
		return dropped, fmt.Errorf("reading the publications: %w", err)
	}
	if pub {
		if _, err := conn.Exec(cctx, "DROP PUBLICATION IF EXISTS "+names.Publication()); err != nil {
			return dropped, fmt.Errorf("dropping the publication %s: %w", names.Publication(), err)
		}
		dropped = append(dropped, fmt.Sprintf("%s: publication %s", s, names.Publication()))
	}
	return dropped, nil
}

func printCompletion(out io.Writer, c completion) {
	fmt.Fprintf(out, "routing version %d: %s\n", c.State.Version, c.State.Settings)
	fmt.Fprintf(out, "mirroring to old: %s; old no longer receives writes and can be retired\n", c.Mirror)
	if len(c.Dropped) == 0 {
		fmt.Fprintln(out, "change feed: nothing to drop")
	}
	for _, d := range c.Dropped {
		fmt.Fprintf(out, "dropped %s\n", d)
	}
	for _, s := range c.Skipped {
		fmt.Fprintf(out, "NOT done on %s (run tandem complete again)\n", s)
	}
	fmt.Fprintln(out, "the routing history, the drift ledger and the migration log stay in the control schema")
}
