package config

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
)

// reloadable are the settings (yaml paths, or a section followed by a dot)
// that a running proxy can take from a reloaded file (SIGHUP). Every other
// setting, including any added later, needs a restart until it is listed
// here: its change is refused by RestartOnly, never silently ignored.
var reloadable = []string{
	"auth.", "tls.", "limits.", "routing.mirror_budget",
	"shadow.max_result_bytes", "shadow.timeout", "shadow.settle", "shadow.float_tolerance", "shadow.aa", "shadow.record_values",
	"log.level",
}

// Reloadable reports whether the setting at path (e.g. "limits.drain_timeout")
// takes effect on a reload.
func Reloadable(path string) bool {
	for _, r := range reloadable {
		if path == r || strings.HasSuffix(r, ".") && strings.HasPrefix(path, r) {
			return true
		}
	}
	return false
}

// RestartOnly returns the settings that differ between running and next
// and that only a restart can change (listen addresses, stores, the control
// database, the relay engine, the replica id, ...), by yaml path, sorted.
func RestartOnly(running, next *Config) []string {
	var out []string
	for _, p := range Changed(running, next) {
		if !Reloadable(p) {
			out = append(out, p)
		}
	}
	return out
}

// Changed returns the yaml paths of the settings that differ between a and
// b, sorted. A list or map (tables.include, tables.map) counts as one
// setting.
func Changed(a, b *Config) []string {
	va, vb := map[string]string{}, map[string]string{}
	flatten("", reflect.ValueOf(*a), va)
	flatten("", reflect.ValueOf(*b), vb)
	var out []string
	for k, v := range va {
		if vb[k] != v {
			out = append(out, k)
		}
	}
	for k := range vb {
		if _, ok := va[k]; !ok {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func flatten(prefix string, v reflect.Value, out map[string]string) {
	if v.Kind() == reflect.Struct {
		t := v.Type()
		for i := range t.NumField() {
			f := t.Field(i)
			if !f.IsExported() {
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name == "-" {
				continue
			}
			if name == "" {
				name = strings.ToLower(f.Name)
			}
			flatten(prefix+name+".", v.Field(i), out)
		}
		return
	}
	out[strings.TrimSuffix(prefix, ".")] = fmt.Sprintf("%#v", v.Interface())
}

// TakeReloadable returns a copy of running with next's reloadable settings:
// what a running proxy puts in force on SIGHUP. The settings that need a
// restart keep their running values (RestartOnly names them).
func TakeReloadable(running, next *Config) *Config {
	cp := *running // shallow: a loaded Config is never modified, so sharing its maps is safe
	c := &cp
	c.Auth, c.TLS, c.Limits = next.Auth, next.TLS, next.Limits
	c.Routing.MirrorBudget = next.Routing.MirrorBudget
	c.Shadow.MaxResultBytes = next.Shadow.MaxResultBytes
	c.Shadow.Timeout = next.Shadow.Timeout
	c.Shadow.Settle = next.Shadow.Settle
	c.Shadow.FloatTolerance = next.Shadow.FloatTolerance
	c.Shadow.AA = next.Shadow.AA
	c.Shadow.RecordValues = next.Shadow.RecordValues
	c.Log.Level = next.Log.Level
	return c
}
