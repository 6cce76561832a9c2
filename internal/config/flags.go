package config

import (
	"fmt"
	"reflect"
	"strings"

	"github.com/spf13/pflag"
)

// Flags binds every configuration option, plus -c/--config, to a pflag.FlagSet, so that every subcommand accepts
// the same flags. Create it with NewFlags before the flag set is parsed, and call Load after.
type Flags struct {
	fs         *pflag.FlagSet
	configPath string
	values     Config // flag-backed storage; only the flags the user set are copied out of it
}

// NewFlags registers -c/--config and one flag per option on fs. Each flag's help text explains the option, names
// the environment variable that also sets it, and shows its built-in default.
func NewFlags(fs *pflag.FlagSet) *Flags {
	f := &Flags{fs: fs, values: Default()}
	fs.StringVarP(&f.configPath, "config", "c", "",
		"YAML config `file`; environment variables and flags override its settings (env "+EnvConfig+")")
	def := Default()
	for _, o := range options() {
		usage := fmt.Sprintf("%s (env %s)", o.usage, envName(o.path))
		switch p := o.field(&f.values).(type) {
		case *string:
			fs.StringVar(p, o.flag, *o.field(&def).(*string), usage)
		case *bool:
			fs.BoolVar(p, o.flag, *o.field(&def).(*bool), usage)
		case *int:
			fs.IntVar(p, o.flag, *o.field(&def).(*int), usage)
		case *float64:
			fs.Float64Var(p, o.flag, *o.field(&def).(*float64), usage)
		case *ByteSize:
			fs.Var(p, o.flag, usage)
		case *Duration:
			fs.Var(p, o.flag, usage)
		default:
			panic(fmt.Sprintf("config: unsupported field type %T for --%s", p, o.flag))
		}
	}
	return f
}

// Load builds the Config for a parsed flag set: it reads the file named by -c/--config, or by the TANDEM_CONFIG
// environment variable when -c was not given (no file if neither is set), overlays the environment through getenv
// (pass os.LookupEnv; nil means no environment), then overlays the flags the user explicitly set (a flag left at
// its default does not override the file or the environment), and validates the result. A non-nil error is a
// Problems listing everything wrong.
func (f *Flags) Load(getenv func(string) (string, bool)) (*Config, error) {
	path := f.configPath
	if !f.fs.Changed("config") && getenv != nil {
		path, _ = getenv(EnvConfig)
	}
	cfg, err := Load(path, getenv)
	if err != nil {
		return nil, err
	}
	for _, o := range options() {
		if !f.fs.Changed(o.flag) {
			continue
		}
		reflect.ValueOf(o.field(cfg)).Elem().Set(reflect.ValueOf(o.field(&f.values)).Elem())
		cfg.setOrigin(o.path, origin{flag: o.flag})
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// ToolSettings are the settings of the commands that are not the proxy
// itself (route, status, complete, backfill, compare, plan): the stores, the
// control database, logging, and what the gates and the flip read.
var ToolSettings = []string{"old.", "new.", "control.", "log.", "limits.connect_timeout",
	"routing.fence_timeout", "routing.poll", "routing.feed_wait", "routing.sequence_margin", "routing.drift_stuck_attempts", "routing.mirror_budget",
	"gates.", "feed.enabled", "feed.name"}

// Show keeps in the command's --help only the option flags whose setting
// (yaml path) starts with one of prefixes, and -c/--config. The others stay
// accepted, hidden, so a shared script or environment never breaks: every
// command still reads the same configuration.
func (f *Flags) Show(prefixes ...string) *Flags {
	for _, o := range options() {
		shown := false
		for _, p := range prefixes {
			if o.path == p || strings.HasSuffix(p, ".") && strings.HasPrefix(o.path, p) {
				shown = true
				break
			}
		}
		if !shown {
			_ = f.fs.MarkHidden(o.flag)
		}
	}
	return f
}
