package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/jsonout"
)

// configCheck is what tandem config check --json prints.
type configCheck struct {
	File     string          `json:"file"`
	Valid    bool            `json:"valid"`
	Problems []configProblem `json:"problems"`
}

type configProblem struct {
	File    string `json:"file"` // "" when the value came from defaults, the environment or a flag
	Line    int    `json:"line"` // 0 when unknown
	Column  int    `json:"column"`
	Field   string `json:"field"`
	Message string `json:"message"`
	Text    string `json:"text"` // as the text output prints it
}

func newConfigCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Inspect and validate configuration files",
	}
	var file string
	var asJSON bool
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
			if asJSON {
				res := configCheck{File: path, Valid: len(problems) == 0, Problems: []configProblem{}}
				for _, p := range problems {
					res.Problems = append(res.Problems, configProblem{File: p.File, Line: p.Line, Column: p.Column, Field: p.Field, Message: p.Message, Text: p.String()})
				}
				if err := jsonout.Write(out, res); err != nil {
					return err
				}
				if !res.Valid {
					return exitCode(1)
				}
				return nil
			}
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
	check.Flags().BoolVar(&asJSON, "json", false, `print {"file", "valid", "problems": [{file, line, column, field, message, text}]}`)
	check.Flags().StringVarP(&file, "config", "c", "", "the config file to check (as every other command takes it)")
	cmd.AddCommand(check)
	return group(cmd)
}
