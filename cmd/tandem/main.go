// Command tandem is the Tandem migration proxy and its operator tools.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// release is set at build time with -ldflags "-X main.release=...".
var release = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := newRoot().ExecuteContext(ctx); err != nil {
		var ec exitCode
		if errors.As(err, &ec) {
			os.Exit(int(ec))
		}
		fmt.Fprintln(os.Stderr, "tandem:", err)
		os.Exit(1)
	}
}

// exitCode is returned by commands that have already printed their result
// and only need a specific exit status.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "tandem",
		Short: "Tandem turns a live PostgreSQL migration into a routing flip",
		Long: `Tandem is a PostgreSQL wire-protocol proxy for zero-downtime migrations.

Point your application's connection string at 'tandem proxy' once. From then on
the old store stays the store of record while you mirror writes to the new
store, backfill and verify, shift reads, flip writes and roll back, without
touching the application again.

Every subcommand reads the same configuration: a YAML file (-c FILE or
TANDEM_CONFIG), TANDEM_* environment variables, and flags, in that order of
precedence (flags win).`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       release,
	}
	root.AddCommand(newProxyCmd(), newPlanCmd(), newConfigCmd(), newRouteCmd(), newRollbackCmd(), newDemoCmd(), newBackfillCmd(), newCompareCmd(), newStatusCmd(), newCompleteCmd(), newHealthCmd(), newVersionCmd())
	return root
}

// group makes cmd a command that only groups subcommands: run alone it
// prints its help; run with an unknown subcommand it fails (exit status 1)
// and suggests the nearest one, where cobra would print help and exit 0.
func group(cmd *cobra.Command) *cobra.Command {
	cmd.Args = cobra.ArbitraryArgs
	if cmd.SuggestionsMinimumDistance <= 0 {
		cmd.SuggestionsMinimumDistance = 2
	}
	cmd.RunE = func(c *cobra.Command, args []string) error {
		if len(args) == 0 {
			return c.Help()
		}
		msg := fmt.Sprintf("unknown command %q for %q", args[0], c.CommandPath())
		if s := c.SuggestionsFor(args[0]); len(s) > 0 {
			msg += fmt.Sprintf("; did you mean %q?", s[0])
		}
		return fmt.Errorf("%s (run '%s --help' for the list)", msg, c.CommandPath())
	}
	return cmd
}
