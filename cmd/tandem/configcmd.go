package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/config"
)

func newConfigCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Inspect and validate configuration files",
	}
	check := &cobra.Command{
		Use:   "check FILE",
		Short: "Validate a config file and say what is wrong, and where",
		Long: `Validate a Tandem config file strictly: unknown keys, malformed values and
invalid combinations are all reported with file:line:column and the field's
path. TANDEM_* environment variables are applied as 'tandem proxy' would.
Exit status 0 means the file is valid, 1 that it is not.`,
		Example: "  tandem config check deploy/tandem.example.yaml",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			problems := config.Check(args[0], os.LookupEnv)
			out := cmd.OutOrStdout()
			if len(problems) == 0 {
				fmt.Fprintf(out, "%s: ok\n", args[0])
				return nil
			}
			for _, p := range problems {
				fmt.Fprintln(out, p.String())
			}
			fmt.Fprintf(out, "%d problem(s) found\n", len(problems))
			return exitCode(1)
		},
	}
	cmd.AddCommand(check)
	return cmd
}
