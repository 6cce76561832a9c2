package config

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"

	"github.com/agnivade/levenshtein"
	"go.yaml.in/yaml/v3"
)

// walker checks a YAML node tree against the options, decoding each value into cfg and recording its position.
type walker struct {
	cfg   *Config
	file  string
	opts  map[string]option
	probs Problems
}

func (w *walker) problem(n *yaml.Node, field, msg string) {
	w.probs = append(w.probs, Problem{File: w.file, Line: n.Line, Column: n.Column, Field: field, Message: msg})
}

// walk checks the mapping n, found at the YAML path prefix ("" for the top level, else a section like "limits")
// under the key node at (nil for the top level), which gives the position of problems with n as a whole.
func (w *walker) walk(at, n *yaml.Node, prefix string) {
	n = resolveAlias(n)
	if at == nil {
		at = n
	}
	where := "the top level of the file"
	if prefix != "" {
		where = prefix
	}
	if n.ShortTag() == "!!null" {
		return
	}
	if n.Kind != yaml.MappingNode {
		if prefix == "" {
			w.problem(at, "", "the config file must be a mapping of settings (key: value), not "+nodeKind(n))
		} else {
			w.problem(at, prefix, "must be a mapping of settings (key: value), not "+nodeKind(n))
		}
		return
	}
	// Merge keys (<<) first, so that explicit keys override merged ones, as in YAML.
	for i := 0; i+1 < len(n.Content); i += 2 {
		if k := n.Content[i]; k.ShortTag() == "!!merge" {
			v := resolveAlias(n.Content[i+1])
			if v.Kind == yaml.SequenceNode {
				for _, m := range v.Content {
					w.walk(k, m, prefix)
				}
			} else {
				w.walk(k, v, prefix)
			}
		}
	}
	seen := make(map[string]*yaml.Node)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.ShortTag() == "!!merge" {
			continue
		}
		if first, dup := seen[k.Value]; dup {
			w.problem(k, "", fmt.Sprintf("key %q appears twice in %s (first on line %d)", k.Value, where, first.Line))
			continue
		}
		seen[k.Value] = k
		path := k.Value
		if prefix != "" {
			path = prefix + "." + k.Value
		}
		if o, ok := w.opts[path]; ok {
			w.leaf(k, v, o)
			continue
		}
		if prefix == "" && k.Value == "tables" {
			w.walkTables(k, v)
			continue
		}
		if prefix == "" && w.isSection(k.Value) {
			w.cfg.setOrigin(k.Value, origin{line: k.Line, column: k.Column})
			w.walk(k, v, k.Value)
			continue
		}
		w.problem(k, "", w.unknownField(k.Value, prefix))
	}
}

func (w *walker) isSection(name string) bool {
	for p := range w.opts {
		if strings.HasPrefix(p, name+".") {
			return true
		}
	}
	return false
}

// unknownField describes an unknown key, suggesting the nearest known one or listing the valid ones.
func (w *walker) unknownField(key, prefix string) string {
	var valid []string
	for _, o := range options() {
		name := o.path
		if prefix != "" {
			rest, ok := strings.CutPrefix(o.path, prefix+".")
			if !ok {
				continue
			}
			name = rest
		} else if sec, _, ok := strings.Cut(o.path, "."); ok {
			name = sec
		}
		if len(valid) == 0 || valid[len(valid)-1] != name {
			valid = append(valid, name)
		}
	}
	if prefix == "" {
		valid = append(valid, "tables")
	}
	msg := fmt.Sprintf("unknown field %q", key)
	if prefix != "" {
		msg += " in " + prefix
	}
	return withSuggestion(msg, key, valid)
}

// leaf decodes the value v of key k into the option o, recording where it came from.
func (w *walker) leaf(k, v *yaml.Node, o option) {
	v = resolveAlias(v)
	if v.ShortTag() == "!!null" {
		return // "key:" with no value keeps the default
	}
	p := o.field(w.cfg)
	if v.Kind != yaml.ScalarNode {
		w.problem(k, o.path, "must be a single value, not "+nodeKind(v))
		return
	}
	tmp := reflect.New(reflect.TypeOf(p).Elem())
	if err := v.Decode(tmp.Interface()); err != nil {
		var msg string
		quoted := ""
		if v.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0 {
			quoted = " without quotes"
		}
		switch p.(type) {
		case *int:
			msg = fmt.Sprintf("must be a whole number%s, not %s", quoted, strconv.Quote(v.Value))
		case *bool:
			msg = fmt.Sprintf("must be true or false%s, not %s", quoted, strconv.Quote(v.Value))
		case *float64:
			msg = fmt.Sprintf("must be a number%s, not %s", quoted, strconv.Quote(v.Value))
		case *string:
			msg = "must be a string" // never quote the value: it may be a DSN with a password
		default:
			msg = err.Error()
		}
		w.problem(k, o.path, msg)
		return
	}
	reflect.ValueOf(p).Elem().Set(tmp.Elem())
	w.cfg.setOrigin(o.path, origin{line: k.Line, column: k.Column})
}

func resolveAlias(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func nodeKind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	default:
		return "a single value"
	}
}

// withSuggestion completes the message msg about the unknown key: the nearest
// valid key as a suggestion, or, when none is near, the list of the valid ones.
func withSuggestion(msg, key string, valid []string) string {
	best, bestDist := "", len(key)/3+2
	for _, v := range valid {
		if d := levenshtein.ComputeDistance(strings.ToLower(key), v); d < bestDist {
			best, bestDist = v, d
		}
	}
	if best != "" {
		return msg + fmt.Sprintf(" (did you mean %q?)", best)
	}
	return msg + " (valid: " + strings.Join(valid, ", ") + ")"
}
