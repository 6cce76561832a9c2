package main

import (
	"fmt"

	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/jsonout"
	"github.com/tandemdb/tandem/internal/version"
)

func newVersionCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print Tandem's version, commit and Go version",
		Long: `Print which build of Tandem this is: the release version (stamped at link
time with -ldflags "-X main.release=..."; "dev" otherwise), the VCS commit the
Go toolchain recorded (with "+modified" when the work tree had changes), and the
Go version. The same labels are on the tandem_build_info metric.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			in := version.Get(release)
			if asJSON {
				return jsonout.Write(cmd.OutOrStdout(), in)
			}
			commit := in.Short()
			if in.Modified {
				commit += "+modified"
			}
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "tandem %s (commit %s, %s)\n", in.Version, commit, in.GoVersion)
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON: version, commit, modified, go_version")
	return cmd
}
