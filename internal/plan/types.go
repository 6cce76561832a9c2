package plan

import (
	"fmt"
	"strconv"
	"strings"
)

// Change classifies how a column's type changes from the old store to the
// new one, as the rows travel: row images, the backfill and repair send
// each value in its text form and the new store parses it as its own type.
type Change string

// Type changes, from harmless to impossible.
const (
	Same       Change = "same"       // identical types
	Widening   Change = "widening"   // every old value fits (varchar(50) -> text, int4 -> int8): noted, ready
	Conversion Change = "conversion" // every value converts, but its meaning or form changes (timestamp -> timestamptz, int -> text): attention
	Narrowing  Change = "narrowing"  // some old values may not fit (int8 -> int4, text -> varchar(20)): attention
	// Incompatible: the new type cannot take the old type's values (uuid -> integer): blocked.
	Incompatible Change = "incompatible"
)

// Verdict returns what a change means for a table's verdict.
func (c Change) Verdict() Verdict {
	switch c {
	case Same, Widening:
		return Ready
	case Conversion, Narrowing:
		return Attention
	default:
		return Blocked
	}
}

// sqlType is a type as format_type prints it, taken apart: base name,
// modifiers and array dimensions.
type sqlType struct {
	base string // "character varying", "timestamp with time zone", "public.citext"
	mods []int  // (50) -> [50]; numeric(10,2) -> [10 2]; none -> nil
	dims int    // number of trailing []
}

// parseType takes apart a format_type string. Time types carry their
// precision in the middle ("timestamp(3) with time zone").
func parseType(s string) sqlType {
	var t sqlType
	s = strings.TrimSpace(s)
	for strings.HasSuffix(s, "[]") {
		t.dims++
		s = strings.TrimSpace(strings.TrimSuffix(s, "[]"))
	}
	if i := strings.IndexByte(s, '('); i >= 0 {
		if j := strings.IndexByte(s[i:], ')'); j > 0 {
			for _, p := range strings.Split(s[i+1:i+j], ",") {
				if n, err := strconv.Atoi(strings.TrimSpace(p)); err == nil {
					t.mods = append(t.mods, n)
				}
			}
			s = strings.TrimSpace(s[:i]) + s[i+j+1:]
		}
	}
	t.base = s
	return t
}

func (t sqlType) String() string {
	s := t.base
	if len(t.mods) > 0 {
		parts := make([]string, len(t.mods))
		for i, m := range t.mods {
			parts[i] = strconv.Itoa(m)
		}
		s += "(" + strings.Join(parts, ",") + ")"
	}
	return s + strings.Repeat("[]", t.dims)
}

// mod returns modifier i, or -1 (unbounded) when there is none.
func (t sqlType) mod(i int) int {
	if i < len(t.mods) {
		return t.mods[i]
	}
	return -1
}

// Families of built-in types whose members convert into each other.
var (
	intBytes   = map[string]int{"smallint": 2, "integer": 4, "bigint": 8}
	intDigits  = map[string]int{"smallint": 5, "integer": 10, "bigint": 19}
	floatBytes = map[string]int{"real": 4, "double precision": 8}
	stringType = map[string]bool{"text": true, "character varying": true, "character": true, "name": true}
	timeRank   = map[string]int{"date": 1, "timestamp without time zone": 2, "timestamp with time zone": 2}
)

// stringLimit is the most characters a string type holds, -1 for no limit.
func stringLimit(t sqlType) int {
	switch t.base {
	case "text":
		return -1
	case "name":
		return 63
	case "character":
		if len(t.mods) == 0 {
			return 1 // character without a length is character(1)
		}
	}
	return t.mod(0)
}

// ClassifyType says how a column of type old (format_type on the old store)
// converts to type new (format_type on the new store), with a short note
// for anything but Same. It is pure: types it does not know are judged by
// name only, and the measured sample copy is the check that counts.
func ClassifyType(old, new string) (Change, string) {
	if old == new {
		return Same, ""
	}
	o, n := parseType(old), parseType(new)
	if o.dims != n.dims {
		if n.dims == 0 && stringType[n.base] {
			return Conversion, fmt.Sprintf("stored as the array's text form in %s", new)
		}
		return Incompatible, fmt.Sprintf("cannot convert %s to %s: array dimensions differ", old, new)
	}
	if o.dims > 0 {
		o.dims, n.dims = 0, 0
		c, note := ClassifyType(o.String(), n.String())
		if note != "" {
			note = "elements: " + note
		}
		return c, note
	}
	return classifyScalar(o, n)
}

func classifyScalar(o, n sqlType) (Change, string) {
	old, new := o.String(), n.String()
	narrow := func(why string) (Change, string) {
		return Narrowing, fmt.Sprintf("%s -> %s narrows: %s", old, new, why)
	}
	widen := func() (Change, string) { return Widening, fmt.Sprintf("%s -> %s widens: every value fits", old, new) }
	convert := func(why string) (Change, string) {
		return Conversion, fmt.Sprintf("%s -> %s converts: %s", old, new, why)
	}
	switch {
	case o.base == n.base && stringType[o.base]:
		return compareLimits(o, n, widen, narrow)
	case stringType[o.base] && stringType[n.base]:
		if n.base == "character" || o.base == "character" {
			c, note := compareLimits(o, n, widen, narrow)
			if c == Widening {
				return convert("character(n) pads with spaces and the other types keep or drop them")
			}
			return c, note
		}
		return compareLimits(o, n, widen, narrow)
	case intBytes[o.base] > 0 && intBytes[n.base] > 0:
		if intBytes[n.base] >= intBytes[o.base] {
			return widen()
		}
		return narrow("values outside the " + n.base + " range fail")
	case floatBytes[o.base] > 0 && floatBytes[n.base] > 0:
		if floatBytes[n.base] >= floatBytes[o.base] {
			return widen()
		}
		return narrow("precision is lost")
	case o.base == "numeric" && n.base == "numeric":
		if len(n.mods) == 0 {
			return widen()
		}
		if len(o.mods) == 0 {
			return narrow("values with more digits than numeric" + fmtMods(n) + " allows fail or round")
		}
		if scale(n) >= scale(o) && n.mod(0)-scale(n) >= o.mod(0)-scale(o) {
			return widen()
		}
		return narrow("values with more digits than the new precision fail or round")
	case intBytes[o.base] > 0 && n.base == "numeric":
		if len(n.mods) == 0 || n.mod(0)-scale(n) >= intDigits[o.base] {
			return widen()
		}
		return narrow("large values do not fit numeric" + fmtMods(n))
	case intBytes[o.base] > 0 && floatBytes[n.base] > 0:
		if floatBytes[n.base] == 8 && intBytes[o.base] <= 4 {
			return widen()
		}
		return narrow("large integers lose precision")
	case (o.base == "numeric" || floatBytes[o.base] > 0) && (intBytes[n.base] > 0 || floatBytes[n.base] > 0 || n.base == "numeric"):
		return narrow("fractions round and large values may not fit")
	case timeRank[o.base] > 0 && timeRank[n.base] > 0:
		switch {
		case timeRank[n.base] < timeRank[o.base]:
			return narrow("the time of day is dropped")
		case o.base == "date":
			return widen()
		case o.base != n.base:
			return convert("the instant depends on the session's TimeZone")
		case n.mod(0) >= 0 && (o.mod(0) < 0 || n.mod(0) < o.mod(0)):
			return narrow("fractional seconds round to the new precision")
		}
		return widen()
	case o.base == n.base:
		if len(n.mods) == 0 {
			return widen()
		}
		return narrow("the type modifier changes")
	case o.base == "json" && n.base == "jsonb":
		return convert("jsonb drops duplicate keys and reorders them")
	case o.base == "jsonb" && n.base == "json":
		return convert("json keeps the text that jsonb normalised")
	case stringType[n.base]:
		if stringLimit(n) >= 0 {
			return narrow("values are stored as text and longer ones fail")
		}
		return convert("values are stored as their text form")
	case stringType[o.base]:
		return narrow("every value must parse as " + new)
	case strings.Contains(o.base, ".") && strings.Contains(n.base, "."):
		return convert("user-defined types differ; values travel in their text form")
	}
	return Incompatible, fmt.Sprintf("cannot convert %s to %s", old, new)
}

func compareLimits(o, n sqlType, widen func() (Change, string), narrow func(string) (Change, string)) (Change, string) {
	ol, nl := stringLimit(o), stringLimit(n)
	if nl < 0 || ol >= 0 && nl >= ol {
		return widen()
	}
	return narrow("longer values fail")
}

// scale is a numeric type's scale: numeric(p) is numeric(p,0).
func scale(t sqlType) int {
	if len(t.mods) < 2 {
		return 0
	}
	return t.mods[1]
}

func fmtMods(t sqlType) string {
	return strings.TrimPrefix(t.String(), t.base)
}
