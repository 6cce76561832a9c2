package config

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// ByteSize is an amount of memory in bytes. In the config file, in environment variables and on the command line
// it is written as a whole number of bytes ("268435456") or a whole number followed by a unit, with or without a
// space ("256MiB", "64 kB"). Units are matched case-insensitively:
//
//	B                         1 byte
//	kB, MB, GB, TB            powers of 1000 (SI):  1kB  = 1000 bytes
//	KiB, MiB, GiB, TiB        powers of 1024 (IEC): 1KiB = 1024 bytes
//
// Note that PostgreSQL's own settings read "MB" as 1024*1024; here "MB" means 1000*1000 and "MiB" means 1024*1024.
// Fractions ("1.5GiB") and negative sizes are rejected.
type ByteSize int64

// Units for ByteSize values.
const (
	Byte ByteSize = 1

	KB ByteSize = 1000 * Byte
	MB ByteSize = 1000 * KB
	GB ByteSize = 1000 * MB
	TB ByteSize = 1000 * GB

	KiB ByteSize = 1024 * Byte
	MiB ByteSize = 1024 * KiB
	GiB ByteSize = 1024 * MiB
	TiB ByteSize = 1024 * GiB
)

// ParseByteSize parses a size such as "256MiB", "64 kB" or "8192" (bytes). See ByteSize for the accepted units.
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	num, unit := t[:i], strings.TrimSpace(t[i:])
	if num == "" {
		if strings.HasPrefix(t, "-") {
			return 0, fmt.Errorf("invalid size %q: must not be negative", s)
		}
		return 0, fmt.Errorf("invalid size %q: want a whole number of bytes, optionally with a unit such as kB, MB, KiB or MiB", s)
	}
	if strings.HasPrefix(unit, ".") || strings.HasPrefix(unit, ",") {
		return 0, fmt.Errorf("invalid size %q: must be a whole number; use a smaller unit instead of a fraction", s)
	}
	mult, ok := byteUnitSize(unit)
	if !ok {
		return 0, fmt.Errorf("invalid size %q: unknown unit %q; use B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)", s, unit)
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n > math.MaxInt64/int64(mult) {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return ByteSize(n) * mult, nil
}

func byteUnitSize(unit string) (ByteSize, bool) {
	switch strings.ToLower(unit) {
	case "", "b":
		return Byte, true
	case "kb":
		return KB, true
	case "mb":
		return MB, true
	case "gb":
		return GB, true
	case "tb":
		return TB, true
	case "kib":
		return KiB, true
	case "mib":
		return MiB, true
	case "gib":
		return GiB, true
	case "tib":
		return TiB, true
	}
	return 0, false
}

// String formats the size exactly, with the largest unit that divides it: binary units are preferred, then decimal
// ones, then plain bytes ("256MiB", "1kB", "1000B"). ParseByteSize(b.String()) == b for every non-negative b.
func (b ByteSize) String() string {
	if b == 0 {
		return "0B"
	}
	if b > 0 {
		// Largest binary unit first, then largest decimal unit, spelled as String prints them.
		units := [...]struct {
			name string
			size ByteSize
		}{
			{"TiB", TiB}, {"GiB", GiB}, {"MiB", MiB}, {"KiB", KiB},
			{"TB", TB}, {"GB", GB}, {"MB", MB}, {"kB", KB},
		}
		for _, u := range units {
			if b%u.size == 0 {
				return strconv.FormatInt(int64(b/u.size), 10) + u.name
			}
		}
	}
	return strconv.FormatInt(int64(b), 10) + "B"
}

// Set parses s with ParseByteSize; it makes *ByteSize a pflag.Value.
func (b *ByteSize) Set(s string) error {
	v, err := ParseByteSize(s)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// Type names the value kind in --help output; part of pflag.Value.
func (b *ByteSize) Type() string { return "bytes" }

// UnmarshalYAML accepts a YAML integer (bytes) or a string with a unit.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return errors.New("must be a size such as 256MiB or a number of bytes")
	}
	if n.ShortTag() == "!!int" {
		var v int64
		if err := n.Decode(&v); err != nil {
			return fmt.Errorf("invalid size %q: %v", n.Value, err)
		}
		if v < 0 {
			return fmt.Errorf("invalid size %q: must not be negative", n.Value)
		}
		*b = ByteSize(v)
		return nil
	}
	return b.Set(n.Value)
}

// MarshalYAML writes the size as String does, so a marshalled config reads back unchanged.
func (b ByteSize) MarshalYAML() (any, error) { return b.String(), nil }

// MarshalText writes the size as String does (used by encoding/json, for example).
func (b ByteSize) MarshalText() ([]byte, error) { return []byte(b.String()), nil }

// UnmarshalText parses text with ParseByteSize.
func (b *ByteSize) UnmarshalText(text []byte) error { return b.Set(string(text)) }

// Duration is a time.Duration that reads and writes Go duration strings: "10s", "1m30s", "250ms", "2h". A bare
// number is rejected because its unit would be a guess, except "0", which means zero (typically "off").
type Duration time.Duration

// Duration returns d as a time.Duration.
func (d Duration) Duration() time.Duration { return time.Duration(d) }

// String formats d like time.Duration.String ("10s", "1m30s", "0s").
func (d Duration) String() string { return time.Duration(d).String() }

// Set parses a Go duration string; it makes *Duration a pflag.Value.
func (d *Duration) Set(s string) error {
	t := strings.TrimSpace(s)
	v, err := time.ParseDuration(t)
	if err != nil {
		if _, numErr := strconv.ParseFloat(t, 64); numErr == nil {
			return fmt.Errorf("invalid duration %q: needs a unit, e.g. %q or %q", s, t+"s", t+"ms")
		}
		return fmt.Errorf("invalid duration %q: want a number with a unit (ns, us, ms, s, m, h), e.g. \"10s\" or \"1m30s\"", s)
	}
	*d = Duration(v)
	return nil
}

// Type names the value kind in --help output; part of pflag.Value.
func (d *Duration) Type() string { return "duration" }

// UnmarshalYAML accepts a scalar holding a Go duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return errors.New(`must be a duration such as "10s" or "1m30s"`)
	}
	return d.Set(n.Value)
}

// MarshalYAML writes the duration as String does, so a marshalled config reads back unchanged.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// MarshalText writes the duration as String does (used by encoding/json, for example).
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText parses text as Set does.
func (d *Duration) UnmarshalText(text []byte) error { return d.Set(string(text)) }
