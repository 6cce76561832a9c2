package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// origin says where a value came from: a position in the config file, an environment variable, or a flag.
type origin struct {
	line, column int    // position of the key in the file, when the value came from the file
	env          string // name of the environment variable that set the value
	flag         string // name of the flag that set the value
}

// sources records, per YAML path, where the current value of each setting came from.
type sources struct {
	file    string
	origins map[string]origin
}

// originOf returns where the value at path came from; s may be nil.
func (s *sources) originOf(path string) (origin, bool) {
	if s == nil {
		return origin{}, false
	}
	o, ok := s.origins[path]
	return o, ok
}

// Position returns the file, line and column of the key that set the YAML path field (for example
// "tables.map[orders].where"), or of its nearest enclosing key in the file; ok is false when neither came from the
// file. It lets checks made outside this package (a mapping checked against the stores' catalogs) say where the
// declaration at fault is.
func (c *Config) Position(field string) (file string, line, column int, ok bool) {
	if c == nil || c.src == nil {
		return "", 0, 0, false
	}
	for at := field; ; {
		if o, found := c.src.origins[at]; found && o.line > 0 {
			return c.src.file, o.line, o.column, true
		}
		i := strings.LastIndexAny(at, ".[")
		if i <= 0 {
			return "", 0, 0, false
		}
		at = at[:i]
	}
}

func (c *Config) setOrigin(path string, o origin) {
	if c.src == nil {
		c.src = &sources{}
	}
	if c.src.origins == nil {
		c.src.origins = make(map[string]origin)
	}
	c.src.origins[path] = o
}

// Load builds a Config: the defaults, then the YAML file at path (skipped when path is ""), then the TANDEM_*
// environment variables looked up through getenv (pass os.LookupEnv; nil means no environment). It does not call
// Validate. The file is read strictly: unknown keys, values of the wrong type and a second YAML document are
// errors. An empty file (or one with only comments) leaves the defaults in place. A set but malformed environment
// variable is an error naming the variable; a set but empty one sets a string option to "".
//
// A non-nil error is a Problems listing everything wrong, each with its position.
func Load(path string, getenv func(string) (string, bool)) (*Config, error) {
	cfg, probs, _ := load(path, getenv)
	if len(probs) > 0 {
		return nil, probs
	}
	return cfg, nil
}

// load does the work of Load, but returns what it could build alongside the problems it found, so Check can
// validate the rest of a file that has, say, an unknown key. usable is false when the file could not be read or
// is not valid YAML, so that the returned Config says nothing about it.
func load(path string, getenv func(string) (string, bool)) (cfg *Config, probs Problems, usable bool) {
	c := Default()
	c.src = &sources{file: path, origins: make(map[string]origin)}
	usable = true
	if path != "" {
		var fileProbs Problems
		fileProbs, usable = c.loadFile(path)
		probs = append(probs, fileProbs...)
	}
	if getenv != nil {
		probs = append(probs, c.loadEnv(getenv)...)
	}
	return &c, probs, usable
}

// loadFile overlays the YAML file at path onto c. usable is false when the file could not be read or parsed.
func (c *Config) loadFile(path string) (probs Problems, usable bool) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Problems{{File: path, Message: "cannot read config file: " + describeFileError(err)}}, false
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, true // empty file: all defaults
		}
		return Problems{yamlSyntaxProblem(path, err)}, false
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		probs = append(probs, Problem{File: path, Line: extra.Line, Column: extra.Column,
			Message: "a second YAML document (after ---); the config file must hold exactly one"})
	} else if !errors.Is(err, io.EOF) {
		return Problems{yamlSyntaxProblem(path, err)}, false
	}

	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return probs, true // only comments
		}
		root = root.Content[0]
	}
	w := walker{cfg: c, file: path, opts: make(map[string]option)}
	for _, o := range options() {
		w.opts[o.path] = o
	}
	w.walk(nil, root, "")
	probs = append(probs, w.probs...)

	if len(probs) == 0 {
		// The walk above gives positions and precise messages; the strict yaml.v3 decode is the authority on the
		// values themselves, and a backstop that no key escaped the walk.
		strict := Default()
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(&strict); err != nil {
			return Problems{yamlSyntaxProblem(path, err)}, true
		}
		strict.src = c.src
		*c = strict
	}

	dir := filepath.Dir(path)
	for _, o := range options() {
		if _, fromFile := c.src.origins[o.path]; !fromFile || !o.isFile {
			continue
		}
		if p := o.field(c).(*string); *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	return probs, true
}

// loadEnv overlays the TANDEM_* environment variables onto c.
func (c *Config) loadEnv(getenv func(string) (string, bool)) Problems {
	var probs Problems
	for _, o := range options() {
		name := envName(o.path)
		v, ok := getenv(name)
		if !ok {
			continue
		}
		if err := setFromString(o.field(c), v); err != nil {
			probs = append(probs, Problem{Field: o.path, Message: fmt.Sprintf("environment variable %s: %v", name, err)})
			continue
		}
		c.setOrigin(o.path, origin{env: name})
	}
	return probs
}

// yamlLineRE finds the line number yaml.v3 puts in its error messages.
func yamlLineRE() *regexp.Regexp { return regexp.MustCompile(`^(?:yaml: )?line (\d+): `) }

// yamlSyntaxProblem turns a yaml.v3 error into a Problem, moving its line number into the position.
func yamlSyntaxProblem(file string, err error) Problem {
	msg := err.Error()
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = strings.Join(te.Errors, "; ")
	}
	p := Problem{File: file}
	if m := yamlLineRE().FindStringSubmatch(msg); m != nil {
		p.Line, _ = strconv.Atoi(m[1])
		msg = msg[len(m[0]):]
	}
	p.Message = "invalid YAML: " + strings.TrimPrefix(msg, "yaml: ")
	return p
}

// describeFileError shortens an os error to its cause; the path is already in the Problem.
func describeFileError(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
