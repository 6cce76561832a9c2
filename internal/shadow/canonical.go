package shadow

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Built-in PostgreSQL type OIDs the comparison knows about.
const (
	oidBool        = 16
	oidBytea       = 17
	oidName        = 19
	oidInt8        = 20
	oidInt2        = 21
	oidInt4        = 23
	oidText        = 25
	oidOID         = 26
	oidJSON        = 114
	oidFloat4      = 700
	oidFloat8      = 701
	oidBpchar      = 1042
	oidVarchar     = 1043
	oidDate        = 1082
	oidTimestamp   = 1114
	oidTimestamptz = 1184
	oidNumeric     = 1700
	oidUUID        = 2950
	oidJSONB       = 3802

	oidJSONArray        = 199
	oidBoolArray        = 1000
	oidByteaArray       = 1001
	oidNameArray        = 1003
	oidInt2Array        = 1005
	oidInt4Array        = 1007
	oidTextArray        = 1009
	oidBpcharArray      = 1014
	oidVarcharArray     = 1015
	oidInt8Array        = 1016
	oidFloat4Array      = 1021
	oidFloat8Array      = 1022
	oidOIDArray         = 1028
	oidTimestampArray   = 1115
	oidDateArray        = 1182
	oidTimestamptzArray = 1185
	oidNumericArray     = 1231
	oidUUIDArray        = 2951
	oidJSONBArray       = 3807
)

// Limits that keep canonicalisation of malformed or hostile input bounded.
const (
	maxArrayDepth   = 16   // nesting accepted in array literals / binary arrays (PostgreSQL allows 6)
	maxExponentAbs  = 1000 // largest |exponent| expanded when normalising a decimal
	binaryEpochUnix = 946684800
)

// elemOf returns the element type of a known array type.
func elemOf(oid uint32) (uint32, bool) {
	switch oid {
	case oidJSONArray:
		return oidJSON, true
	case oidBoolArray:
		return oidBool, true
	case oidByteaArray:
		return oidBytea, true
	case oidNameArray:
		return oidName, true
	case oidInt2Array:
		return oidInt2, true
	case oidInt4Array:
		return oidInt4, true
	case oidTextArray:
		return oidText, true
	case oidBpcharArray:
		return oidBpchar, true
	case oidVarcharArray:
		return oidVarchar, true
	case oidInt8Array:
		return oidInt8, true
	case oidFloat4Array:
		return oidFloat4, true
	case oidFloat8Array:
		return oidFloat8, true
	case oidOIDArray:
		return oidOID, true
	case oidTimestampArray:
		return oidTimestamp, true
	case oidDateArray:
		return oidDate, true
	case oidTimestamptzArray:
		return oidTimestamptz, true
	case oidNumericArray:
		return oidNumeric, true
	case oidUUIDArray:
		return oidUUID, true
	case oidJSONBArray:
		return oidJSONB, true
	}
	return 0, false
}

// baseName names a non-array type for display.
func baseName(oid uint32) string {
	switch oid {
	case oidBool:
		return "bool"
	case oidBytea:
		return "bytea"
	case oidName:
		return "name"
	case oidInt8:
		return "int8"
	case oidInt2:
		return "int2"
	case oidInt4:
		return "int4"
	case oidText:
		return "text"
	case oidOID:
		return "oid"
	case oidJSON:
		return "json"
	case oidFloat4:
		return "float4"
	case oidFloat8:
		return "float8"
	case oidBpchar:
		return "bpchar"
	case oidVarchar:
		return "varchar"
	case oidDate:
		return "date"
	case oidTimestamp:
		return "timestamp"
	case oidTimestamptz:
		return "timestamptz"
	case oidNumeric:
		return "numeric"
	case oidUUID:
		return "uuid"
	case oidJSONB:
		return "jsonb"
	}
	return "oid" + strconv.FormatUint(uint64(oid), 10)
}

// typeName names a type for display: "int4", "text[]", "oid12345".
func typeName(oid uint32) string {
	if elem, ok := elemOf(oid); ok {
		return baseName(elem) + "[]"
	}
	return baseName(oid)
}

// baseFamily groups non-array types whose values compare across a
// legitimate migration (int4 -> int8, json -> jsonb, varchar -> text).
func baseFamily(oid uint32) string {
	switch oid {
	case oidInt2, oidInt4, oidInt8, oidOID:
		return "int"
	case oidFloat4, oidFloat8:
		return "float"
	case oidNumeric:
		return "numeric"
	case oidText, oidVarchar, oidBpchar, oidName:
		return "text"
	case oidJSON, oidJSONB:
		return "json"
	case oidTimestamptz:
		return "timestamptz"
	case oidTimestamp:
		return "timestamp"
	case oidDate:
		return "date"
	}
	return "oid" + strconv.FormatUint(uint64(oid), 10)
}

// family is the comparison family of a column type; arrays are "array of"
// their element family.
func family(oid uint32) string {
	if oid >= firstUserOID {
		// User-defined and extension types have store-specific OIDs: the
		// same type is numbered differently on the two stores.
		return "user-defined"
	}
	if elem, ok := elemOf(oid); ok {
		return "array of " + baseFamily(elem)
	}
	return baseFamily(oid)
}

// firstUserOID is PostgreSQL's FirstNormalObjectId.
const firstUserOID = 16384

// Canonical renders one wire value of type oid, sent in format (0 text,
// 1 binary), as the string that is compared: two values that PostgreSQL
// considers the same datum render equally whatever their format, their type
// within a family (see [Compare]) or the session settings that shaped their
// text. Values that cannot be parsed are rendered raw (text) or as
// "\x"-prefixed hex (binary). NULL is handled by the caller.
func Canonical(oid uint32, format int16, v []byte) string {
	bin := format == 1
	if elem, ok := elemOf(oid); ok {
		if s, ok := canonicalArray(elem, bin, v); ok {
			return s
		}
		return raw(bin, v)
	}
	var (
		s  string
		ok bool
	)
	switch oid {
	case oidInt2, oidInt4, oidInt8, oidOID:
		s, ok = canonicalInt(oid, bin, v)
	case oidFloat4, oidFloat8:
		s, ok = canonicalFloat(oid, bin, v)
	case oidNumeric:
		s, ok = canonicalNumeric(bin, v)
	case oidTimestamptz:
		s, ok = canonicalTimestamptz(bin, v)
	case oidTimestamp:
		s, ok = canonicalTimestamp(bin, v)
	case oidDate:
		s, ok = canonicalDate(bin, v)
	case oidJSON, oidJSONB:
		s, ok = canonicalJSON(oid, bin, v)
	case oidBpchar:
		s, ok = strings.TrimRight(string(v), " "), true
	case oidText, oidVarchar, oidName:
		s, ok = string(v), true
	case oidBool:
		s, ok = canonicalBool(bin, v)
	case oidUUID:
		s, ok = canonicalUUID(bin, v)
	}
	if ok {
		return s
	}
	return raw(bin, v)
}

// raw is the fallback rendering: text as is, binary as hex (the same form as
// bytea's hex output).
func raw(bin bool, v []byte) string {
	if !bin {
		return string(v)
	}
	return `\x` + hex.EncodeToString(v)
}

func canonicalInt(oid uint32, bin bool, v []byte) (string, bool) {
	if !bin {
		s := strings.TrimSpace(string(v))
		if oid == oidOID {
			if n, err := strconv.ParseUint(s, 10, 32); err == nil {
				return strconv.FormatUint(n, 10), true
			}
			return "", false
		}
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			return strconv.FormatInt(n, 10), true
		}
		return "", false
	}
	switch {
	case oid == oidInt2 && len(v) == 2:
		return strconv.FormatInt(int64(int16(binary.BigEndian.Uint16(v))), 10), true
	case oid == oidInt4 && len(v) == 4:
		return strconv.FormatInt(int64(int32(binary.BigEndian.Uint32(v))), 10), true
	case oid == oidOID && len(v) == 4:
		return strconv.FormatUint(uint64(binary.BigEndian.Uint32(v)), 10), true
	case oid == oidInt8 && len(v) == 8:
		return strconv.FormatInt(int64(binary.BigEndian.Uint64(v)), 10), true
	}
	return "", false
}

func canonicalFloat(oid uint32, bin bool, v []byte) (string, bool) {
	var f float64
	switch {
	case bin && oid == oidFloat4 && len(v) == 4:
		f = float64(math.Float32frombits(binary.BigEndian.Uint32(v)))
	case bin && oid == oidFloat8 && len(v) == 8:
		f = math.Float64frombits(binary.BigEndian.Uint64(v))
	case bin:
		return "", false
	default:
		bits := 64
		if oid == oidFloat4 {
			bits = 32
		}
		p, err := strconv.ParseFloat(strings.TrimSpace(string(v)), bits)
		if err != nil {
			return "", false
		}
		f = p
		if bits == 32 {
			f = float64(float32(p))
		}
	}
	return formatFloat(f), true
}

// formatFloat renders a float64 exactly (shortest round-trip form), with
// PostgreSQL's spellings of the special values and -0 folded into 0.
func formatFloat(f float64) string {
	switch {
	case math.IsNaN(f):
		return "NaN"
	case math.IsInf(f, 1):
		return "Infinity"
	case math.IsInf(f, -1):
		return "-Infinity"
	case f == 0:
		return "0"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

func canonicalNumeric(bin bool, v []byte) (string, bool) {
	if bin {
		s, ok := decodeNumeric(v)
		if !ok {
			return "", false
		}
		if d, ok := normDecimal(s); ok {
			return d, true
		}
		return s, true
	}
	s := strings.TrimSpace(string(v))
	switch s {
	case "NaN", "Infinity", "-Infinity":
		return s, true
	}
	return normDecimal(s)
}

// decodeNumeric turns PostgreSQL's binary numeric (base-10000 digits) into a
// plain decimal string (not yet normalised).
func decodeNumeric(v []byte) (string, bool) {
	if len(v) < 8 {
		return "", false
	}
	ndigits := int(int16(binary.BigEndian.Uint16(v[0:])))
	weight := int(int16(binary.BigEndian.Uint16(v[2:])))
	sign := binary.BigEndian.Uint16(v[4:])
	if ndigits < 0 || len(v) != 8+2*ndigits {
		return "", false
	}
	switch sign {
	case 0xC000:
		return "NaN", true
	case 0xD000:
		return "Infinity", true
	case 0xF000:
		return "-Infinity", true
	case 0x0000, 0x4000:
	default:
		return "", false
	}
	digits := make([]int, ndigits)
	for i := range digits {
		d := int(binary.BigEndian.Uint16(v[8+2*i:]))
		if d > 9999 {
			return "", false
		}
		digits[i] = d
	}
	digit := func(p int) int { // the base-10000 digit at power p
		if i := weight - p; i >= 0 && i < ndigits {
			return digits[i]
		}
		return 0
	}
	var b strings.Builder
	if sign == 0x4000 {
		b.WriteByte('-')
	}
	b.WriteByte('0')
	for p := weight; p >= 0; p-- {
		writeGroup(&b, digit(p))
	}
	if lowest := weight - (ndigits - 1); lowest < 0 {
		b.WriteByte('.')
		for p := -1; p >= lowest; p-- {
			writeGroup(&b, digit(p))
		}
	}
	return b.String(), true
}

func writeGroup(b *strings.Builder, d int) {
	b.WriteByte(byte('0' + d/1000))
	b.WriteByte(byte('0' + d/100%10))
	b.WriteByte(byte('0' + d/10%10))
	b.WriteByte(byte('0' + d%10))
}

// normDecimal normalises a decimal number (optionally signed, optionally with
// a fraction and an exponent): no leading zeros, no trailing fractional
// zeros, no trailing '.', no exponent, "-0" as "0". It reports false when s is
// not such a number or its exponent is too large to expand.
func normDecimal(s string) (string, bool) {
	i := 0
	neg := false
	if i < len(s) && (s[i] == '-' || s[i] == '+') {
		neg = s[i] == '-'
		i++
	}
	start := i
	for i < len(s) && isDigit(s[i]) {
		i++
	}
	intPart := s[start:i]
	fracPart := ""
	if i < len(s) && s[i] == '.' {
		i++
		fs := i
		for i < len(s) && isDigit(s[i]) {
			i++
		}
		fracPart = s[fs:i]
	}
	if intPart == "" && fracPart == "" {
		return "", false
	}
	exp := 0
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		es := i
		if i < len(s) && (s[i] == '-' || s[i] == '+') {
			i++
		}
		ds := i
		for i < len(s) && isDigit(s[i]) {
			i++
		}
		if ds == i || i-ds > 6 {
			return "", false
		}
		e, err := strconv.Atoi(s[es:i])
		if err != nil || e > maxExponentAbs || e < -maxExponentAbs {
			return "", false
		}
		exp = e
	}
	if i != len(s) {
		return "", false
	}
	digits := intPart + fracPart
	point := len(intPart) + exp
	if point < 0 {
		digits = strings.Repeat("0", -point) + digits
		point = 0
	}
	if point > len(digits) {
		digits += strings.Repeat("0", point-len(digits))
	}
	ip := strings.TrimLeft(digits[:point], "0")
	fp := strings.TrimRight(digits[point:], "0")
	if ip == "" {
		ip = "0"
	}
	out := ip
	if fp != "" {
		out += "." + fp
	}
	if neg && out != "0" {
		out = "-" + out
	}
	return out, true
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// binaryTime converts PostgreSQL's binary timestamp (microseconds since
// 2000-01-01 00:00:00 UTC) to a time; ok is false for ±infinity, whose
// rendering is returned instead.
func binaryTime(v []byte) (t time.Time, special string, ok bool) {
	if len(v) != 8 {
		return time.Time{}, "", false
	}
	us := int64(binary.BigEndian.Uint64(v))
	switch us {
	case math.MaxInt64:
		return time.Time{}, "infinity", true
	case math.MinInt64:
		return time.Time{}, "-infinity", true
	}
	sec := us / 1e6
	rem := us % 1e6
	if rem < 0 {
		rem += 1e6
		sec--
	}
	return time.Unix(binaryEpochUnix+sec, rem*1e3).UTC(), "", true
}

func canonicalTimestamptz(bin bool, v []byte) (string, bool) {
	if bin {
		t, special, ok := binaryTime(v)
		if !ok {
			return "", false
		}
		if special != "" {
			return special, true
		}
		return t.Format(time.RFC3339Nano), true
	}
	s := strings.TrimSpace(string(v))
	if s == "infinity" || s == "-infinity" {
		return s, true
	}
	t, ok := parseTimestamp(s, true)
	if !ok {
		return s, true // unparseable (another DateStyle?): compare raw
	}
	return t.UTC().Format(time.RFC3339Nano), true
}

func canonicalTimestamp(bin bool, v []byte) (string, bool) {
	if !bin {
		return string(v), true
	}
	t, special, ok := binaryTime(v)
	if !ok {
		return "", false
	}
	if special != "" {
		return special, true
	}
	return formatTimestamp(t), true
}

// formatTimestamp renders a timestamp without time zone the way PostgreSQL's
// ISO DateStyle does: "2006-01-02 15:04:05.999999", years before 1 as " BC".
func formatTimestamp(t time.Time) string {
	var b strings.Builder
	b.WriteString(formatDate(t, false))
	b.WriteByte(' ')
	b.WriteString(pad2(t.Hour()))
	b.WriteByte(':')
	b.WriteString(pad2(t.Minute()))
	b.WriteByte(':')
	b.WriteString(pad2(t.Second()))
	if us := t.Nanosecond() / 1000; us != 0 {
		frac := strconv.Itoa(us + 1e6)[1:] // six digits, zero padded
		b.WriteByte('.')
		b.WriteString(strings.TrimRight(frac, "0"))
	}
	if t.Year() <= 0 {
		b.WriteString(" BC")
	}
	return b.String()
}

// formatDate renders the date part "2006-01-02" (years before 1 as their BC
// number; bc appends the " BC" suffix for them).
func formatDate(t time.Time, bc bool) string {
	y := t.Year()
	isBC := y <= 0
	if isBC {
		y = 1 - y
	}
	ys := strconv.Itoa(y)
	if len(ys) < 4 {
		ys = strings.Repeat("0", 4-len(ys)) + ys
	}
	s := ys + "-" + pad2(int(t.Month())) + "-" + pad2(t.Day())
	if bc && isBC {
		s += " BC"
	}
	return s
}

func pad2(n int) string {
	if n < 10 {
		return "0" + strconv.Itoa(n)
	}
	return strconv.Itoa(n)
}

func canonicalDate(bin bool, v []byte) (string, bool) {
	if !bin {
		return string(v), true
	}
	if len(v) != 4 {
		return "", false
	}
	days := int32(binary.BigEndian.Uint32(v))
	switch days {
	case math.MaxInt32:
		return "infinity", true
	case math.MinInt32:
		return "-infinity", true
	}
	t := time.Date(2000, time.January, 1+int(days), 0, 0, 0, 0, time.UTC)
	return formatDate(t, true), true
}

// parseTimestamp parses PostgreSQL's ISO DateStyle output:
// "YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]][ BC]". withZone requires the
// offset (timestamptz).
func parseTimestamp(s string, withZone bool) (time.Time, bool) {
	bc := false
	if rest, ok := strings.CutSuffix(s, " BC"); ok {
		bc, s = true, rest
	}
	p := tsParser{s: s, ok: true}
	year := p.num(1, 9)
	p.lit('-')
	month := p.num(2, 2)
	p.lit('-')
	day := p.num(2, 2)
	if p.ok && p.i < len(s) && (s[p.i] == ' ' || s[p.i] == 'T') {
		p.i++
	} else {
		p.ok = false
	}
	hour := p.num(2, 2)
	p.lit(':')
	minute := p.num(2, 2)
	p.lit(':')
	sec := p.num(2, 2)
	nsec := 0
	if p.ok && p.i < len(s) && s[p.i] == '.' {
		p.i++
		fs := p.i
		f := p.num(1, 9)
		for n := p.i - fs; n < 9; n++ {
			f *= 10
		}
		nsec = f
	}
	offset := 0
	if p.ok && p.i < len(s) && (s[p.i] == '+' || s[p.i] == '-') {
		sign := 1
		if s[p.i] == '-' {
			sign = -1
		}
		p.i++
		oh := p.num(2, 2)
		om, os := 0, 0
		if p.ok && p.i < len(s) && s[p.i] == ':' {
			p.i++
			om = p.num(2, 2)
			if p.ok && p.i < len(s) && s[p.i] == ':' {
				p.i++
				os = p.num(2, 2)
			}
		}
		if om > 59 || os > 59 {
			p.ok = false
		}
		offset = sign * (oh*3600 + om*60 + os)
	} else if withZone {
		p.ok = false
	}
	if !p.ok || p.i != len(s) || month < 1 || month > 12 || day < 1 || day > 31 ||
		hour > 24 || minute > 59 || sec > 60 {
		return time.Time{}, false
	}
	if bc {
		year = 1 - year
	}
	return time.Date(year, time.Month(month), day, hour, minute, sec, nsec, time.FixedZone("", offset)), true
}

// tsParser is a tiny cursor over a timestamp string; once ok is false every
// further step is a no-op.
type tsParser struct {
	s  string
	i  int
	ok bool
}

func (p *tsParser) num(minDigits, maxDigits int) int {
	if !p.ok {
		return 0
	}
	n, start := 0, p.i
	for p.i < len(p.s) && isDigit(p.s[p.i]) && p.i-start < maxDigits {
		n = n*10 + int(p.s[p.i]-'0')
		p.i++
	}
	if p.i-start < minDigits {
		p.ok = false
	}
	return n
}

func (p *tsParser) lit(c byte) {
	if p.ok && p.i < len(p.s) && p.s[p.i] == c {
		p.i++
		return
	}
	p.ok = false
}

func canonicalJSON(oid uint32, bin bool, v []byte) (string, bool) {
	if bin && oid == oidJSONB {
		if len(v) == 0 || v[0] != 1 {
			return "", false
		}
		v = v[1:]
	}
	dec := json.NewDecoder(bytes.NewReader(v))
	dec.UseNumber()
	var x any
	if err := dec.Decode(&x); err != nil {
		return string(v), true
	}
	if _, err := dec.Token(); err == nil { // trailing data: not one JSON value
		return string(v), true
	}
	x = normJSON(x)
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(x); err != nil {
		return string(v), true
	}
	return strings.TrimSuffix(buf.String(), "\n"), true
}

// normJSON canonicalises the numbers of a decoded JSON value (objects are
// re-marshalled with sorted keys by encoding/json; duplicate keys were
// already resolved last-wins by the decoder).
func normJSON(x any) any {
	switch t := x.(type) {
	case map[string]any:
		for k, v := range t {
			t[k] = normJSON(v)
		}
	case []any:
		for i, v := range t {
			t[i] = normJSON(v)
		}
	case json.Number:
		if d, ok := normDecimal(string(t)); ok {
			return json.Number(d)
		}
	}
	return x
}

func canonicalBool(bin bool, v []byte) (string, bool) {
	if !bin {
		return string(v), true
	}
	if len(v) != 1 {
		return "", false
	}
	if v[0] != 0 {
		return "t", true
	}
	return "f", true
}

func canonicalUUID(bin bool, v []byte) (string, bool) {
	if !bin {
		return strings.ToLower(strings.TrimSpace(string(v))), true
	}
	if len(v) != 16 {
		return "", false
	}
	h := hex.EncodeToString(v)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32], true
}

// truncate cuts s to at most max bytes (on a rune boundary) and appends "…"
// when it cut.
func truncate(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}
