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
	var file string
	check := &cobra.Command{
		Use:   "check [FILE | -c FILE]",
		Short: "Validate a config file and say what is wrong, and where",
		Long: `Validate a Tandem config file strictly: unknown keys, malformed values and
invalid combinations are all reported with file:line:column and the field's
path. TANDEM_* environment variables are applied as 'tandem proxy' would.
Exit status 0 means the file is valid, 1 that it is not.`,
		Example: "  tandem config check -c deploy/tandem.example.yaml\n  tandem config check deploy/tandem.example.yaml",
		Args:    cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := file
			switch {
			case len(args) == 1 && file != "" && args[0] != file:
				return fmt.Errorf("two config files given (%s and -c %s): check one at a time", args[0], file)
			case len(args) == 1:
				path = args[0]
			case path == "":
				path = os.Getenv("TANDEM_CONFIG")
			}
			if path == "" {
				return fmt.Errorf("no config file: give -c FILE (or FILE, or TANDEM_CONFIG)")
			}
			problems := config.Check(path, os.LookupEnv)
			out := cmd.OutOrStdout()
			if len(problems) == 0 {
				fmt.Fprintf(out, "%s: ok\n", path)
				return nil
			}
			for _, p := range problems {
				fmt.Fprintln(out, p.String())
			}
			fmt.Fprintf(out, "%d problem(s) found\n", len(problems))
			return exitCode(1)
		},
	}
	check.Flags().StringVarP(&file, "config", "c", "", "the config file to check (as every other command takes it)")
	cmd.AddCommand(check)
	return group(cmd)
}
