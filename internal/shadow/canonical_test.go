package shadow

import (
	"encoding/binary"
	"math"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
)

// enc encodes v as PostgreSQL's binary form of oid with pgtype's encoders.
func enc(t testing.TB, oid uint32, v any) []byte {
	t.Helper()
	b, err := pgtype.NewMap().Encode(oid, 1, v, nil)
	if err != nil {
		t.Fatalf("encode %T as %d: %v", v, oid, err)
	}
	return b
}

func numeric(t testing.TB, s string) pgtype.Numeric {
	t.Helper()
	var n pgtype.Numeric
	if err := n.Scan(s); err != nil {
		t.Fatalf("numeric %q: %v", s, err)
	}
	return n
}

func be16(v ...uint16) []byte {
	var b []byte
	for _, x := range v {
		b = binary.BigEndian.AppendUint16(b, x)
	}
	return b
}

func be32(v ...int32) []byte {
	var b []byte
	for _, x := range v {
		b = binary.BigEndian.AppendUint32(b, uint32(x))
	}
	return b
}

// binArray builds a binary array by hand: dims as (size, lower bound) pairs,
// elements nil for NULL.
func binArray(elemOID uint32, dims [][2]int32, elems ...[]byte) []byte {
	b := be32(int32(len(dims)), 0, int32(elemOID))
	for _, d := range dims {
		b = append(b, be32(d[0], d[1])...)
	}
	for _, e := range elems {
		if e == nil {
			b = append(b, be32(-1)...)
			continue
		}
		b = append(b, be32(int32(len(e)))...)
		b = append(b, e...)
	}
	return b
}

func TestCanonical(t *testing.T) {
	ts := time.Date(2024, 1, 1, 8, 0, 0, 123456000, time.UTC)
	tests := []struct {
		name   string
		oid    uint32
		format int16
		v      []byte
		want   string
	}{
		// int family
		{"int2 text", oidInt2, 0, []byte("42"), "42"},
		{"int4 text spaces", oidInt4, 0, []byte(" -7 "), "-7"},
		{"int2 binary", oidInt2, 1, enc(t, oidInt2, int16(-5)), "-5"},
		{"int4 binary", oidInt4, 1, enc(t, oidInt4, int32(123456)), "123456"},
		{"int8 binary", oidInt8, 1, enc(t, oidInt8, int64(math.MinInt64)), "-9223372036854775808"},
		{"oid binary unsigned", oidOID, 1, be32(-1), "4294967295"},
		{"int4 binary wrong length", oidInt4, 1, []byte{1, 2}, `\x0102`},
		{"int text garbage kept", oidInt4, 0, []byte("x1"), "x1"},

		// floats
		{"float8 text", oidFloat8, 0, []byte("0.1"), "0.1"},
		{"float8 exponent", oidFloat8, 0, []byte("1e+20"), "1e+20"},
		{"float4 text widened", oidFloat4, 0, []byte("0.1"), "0.10000000149011612"},
		{"float4 binary widened", oidFloat4, 1, enc(t, oidFloat4, float32(0.1)), "0.10000000149011612"},
		{"float8 binary", oidFloat8, 1, enc(t, oidFloat8, 0.30000000000000004), "0.30000000000000004"},
		{"float NaN", oidFloat8, 0, []byte("NaN"), "NaN"},
		{"float Infinity", oidFloat8, 0, []byte("Infinity"), "Infinity"},
		{"float -Infinity", oidFloat4, 0, []byte("-Infinity"), "-Infinity"},
		{"float binary NaN", oidFloat8, 1, enc(t, oidFloat8, math.NaN()), "NaN"},
		{"float binary -Inf", oidFloat8, 1, enc(t, oidFloat8, math.Inf(-1)), "-Infinity"},
		{"float4 binary Inf", oidFloat4, 1, enc(t, oidFloat4, float32(math.Inf(1))), "Infinity"},
		{"float negative zero", oidFloat8, 0, []byte("-0"), "0"},

		// numeric
		{"numeric trailing zeros", oidNumeric, 0, []byte("1.50"), "1.5"},
		{"numeric integral fraction", oidNumeric, 0, []byte("1.000"), "1"},
		{"numeric negative zero", oidNumeric, 0, []byte("-0.00"), "0"},
		{"numeric integer kept", oidNumeric, 0, []byte("100"), "100"},
		{"numeric small", oidNumeric, 0, []byte("0.0100"), "0.01"},
		{"numeric NaN", oidNumeric, 0, []byte("NaN"), "NaN"},
		{"numeric -Infinity", oidNumeric, 0, []byte("-Infinity"), "-Infinity"},
		{"numeric binary 1.50", oidNumeric, 1, enc(t, oidNumeric, numeric(t, "1.50")), "1.5"},
		{"numeric binary big", oidNumeric, 1, enc(t, oidNumeric, numeric(t, "-123456789.000100")), "-123456789.0001"},
		{"numeric binary tiny", oidNumeric, 1, enc(t, oidNumeric, numeric(t, "0.00001")), "0.00001"},
		{"numeric binary 1e8", oidNumeric, 1, enc(t, oidNumeric, numeric(t, "100000000")), "100000000"},
		{"numeric binary NaN", oidNumeric, 1, enc(t, oidNumeric, pgtype.Numeric{NaN: true, Valid: true}), "NaN"},
		// 1.50 by hand: ndigits 2, weight 0, sign +, dscale 2, digits 1, 5000
		{"numeric binary by hand", oidNumeric, 1, be16(2, 0, 0, 2, 1, 5000), "1.5"},
		{"numeric binary zero", oidNumeric, 1, be16(0, 0, 0, 2), "0"},
		{"numeric binary -0.0012", oidNumeric, 1, be16(1, 0xFFFF, 0x4000, 4, 12), "-0.0012"},
		{"numeric binary bad digit", oidNumeric, 1, be16(1, 0, 0, 0, 10000), `\x00010000000000002710`},
		{"numeric binary short", oidNumeric, 1, []byte{0, 1}, `\x0001`},

		// timestamptz
		{"timestamptz +02", oidTimestamptz, 0, []byte("2024-01-01 10:00:00+02"), "2024-01-01T08:00:00Z"},
		{"timestamptz +00", oidTimestamptz, 0, []byte("2024-01-01 08:00:00+00"), "2024-01-01T08:00:00Z"},
		{"timestamptz -07", oidTimestamptz, 0, []byte("2024-01-01 01:00:00-07"), "2024-01-01T08:00:00Z"},
		{"timestamptz +05:30", oidTimestamptz, 0, []byte("2024-01-01 13:30:00.5+05:30"), "2024-01-01T08:00:00.5Z"},
		{"timestamptz +05:30:15", oidTimestamptz, 0, []byte("2024-01-01 13:30:15+05:30:15"), "2024-01-01T08:00:00Z"},
		{"timestamptz fraction", oidTimestamptz, 0, []byte("2024-01-01 08:00:00.123456+00"), "2024-01-01T08:00:00.123456Z"},
		{"timestamptz BC", oidTimestamptz, 0, []byte("0044-03-15 12:00:00+00 BC"), "-0043-03-15T12:00:00Z"},
		{"timestamptz infinity", oidTimestamptz, 0, []byte("infinity"), "infinity"},
		{"timestamptz -infinity", oidTimestamptz, 0, []byte("-infinity"), "-infinity"},
		{"timestamptz unparseable kept", oidTimestamptz, 0, []byte("Mon Jan 01 08:00:00 2024 UTC"), "Mon Jan 01 08:00:00 2024 UTC"},
		{"timestamptz binary", oidTimestamptz, 1, enc(t, oidTimestamptz, ts), "2024-01-01T08:00:00.123456Z"},
		{"timestamptz binary infinity", oidTimestamptz, 1, enc(t, oidTimestamptz, pgtype.Timestamptz{InfinityModifier: pgtype.Infinity, Valid: true}), "infinity"},
		{"timestamptz binary BC", oidTimestamptz, 1, enc(t, oidTimestamptz, time.Date(-43, 3, 15, 12, 0, 0, 0, time.UTC)), "-0043-03-15T12:00:00Z"},

		// timestamp, date
		{"timestamp text as is", oidTimestamp, 0, []byte("2024-01-01 10:00:00.5"), "2024-01-01 10:00:00.5"},
		{"timestamp binary", oidTimestamp, 1, enc(t, oidTimestamp, time.Date(2024, 1, 1, 10, 0, 0, 500000000, time.UTC)), "2024-01-01 10:00:00.5"},
		{"timestamp binary whole", oidTimestamp, 1, enc(t, oidTimestamp, time.Date(1999, 12, 31, 23, 59, 59, 0, time.UTC)), "1999-12-31 23:59:59"},
		{"timestamp binary BC", oidTimestamp, 1, enc(t, oidTimestamp, time.Date(-43, 3, 15, 12, 0, 0, 0, time.UTC)), "0044-03-15 12:00:00 BC"},
		{"timestamp binary -infinity", oidTimestamp, 1, enc(t, oidTimestamp, pgtype.Timestamp{InfinityModifier: pgtype.NegativeInfinity, Valid: true}), "-infinity"},
		{"date binary", oidDate, 1, enc(t, oidDate, time.Date(2024, 2, 29, 0, 0, 0, 0, time.UTC)), "2024-02-29"},
		{"date binary before epoch", oidDate, 1, be32(-1), "1999-12-31"},
		{"date binary BC", oidDate, 1, enc(t, oidDate, time.Date(-43, 3, 15, 0, 0, 0, 0, time.UTC)), "0044-03-15 BC"},
		{"date binary infinity", oidDate, 1, be32(math.MaxInt32), "infinity"},
		{"date text", oidDate, 0, []byte("2024-02-29"), "2024-02-29"},

		// json
		{"json key order and spaces", oidJSON, 0, []byte(`{ "b": 1.0, "a": [1, 2.50, {"d": null, "c": true}] }`), `{"a":[1,2.5,{"c":true,"d":null}],"b":1}`},
		{"json duplicate keys last wins", oidJSON, 0, []byte(`{"a":1,"a":2}`), `{"a":2}`},
		{"json numbers", oidJSON, 0, []byte(`[1e2, -0.0, 0.10, 12345678901234567890.50, 1E-2]`), `[100,0,0.1,12345678901234567890.5,0.01]`},
		{"json html not escaped", oidJSON, 0, []byte(`{"a":"<&>"}`), `{"a":"<&>"}`},
		{"jsonb text", oidJSONB, 0, []byte(`{"b": 2, "a": 1}`), `{"a":1,"b":2}`},
		{"jsonb binary", oidJSONB, 1, []byte("\x01{\"b\": 2, \"a\": 1}"), `{"a":1,"b":2}`},
		{"jsonb binary bad version", oidJSONB, 1, []byte("\x02{}"), `\x027b7d`},
		{"json binary", oidJSON, 1, []byte(`{"b": 2, "a": 1}`), `{"a":1,"b":2}`},
		{"json invalid kept", oidJSON, 0, []byte(`{"a":`), `{"a":`},
		{"json trailing data kept", oidJSON, 0, []byte(`{} {}`), `{} {}`},

		// text family, bool, uuid, other
		{"bpchar padding", oidBpchar, 0, []byte("ab   "), "ab"},
		{"bpchar binary padding", oidBpchar, 1, []byte("ab  "), "ab"},
		{"text keeps spaces", oidText, 0, []byte("ab  "), "ab  "},
		{"varchar binary", oidVarchar, 1, []byte("héllo"), "héllo"},
		{"name binary", oidName, 1, []byte("pg_class"), "pg_class"},
		{"bool binary true", oidBool, 1, []byte{1}, "t"},
		{"bool binary false", oidBool, 1, []byte{0}, "f"},
		{"bool text", oidBool, 0, []byte("t"), "t"},
		{"uuid binary", oidUUID, 1, []byte{0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a, 0x11}, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"},
		{"uuid text upper", oidUUID, 0, []byte("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"},
		{"bytea binary hex", oidBytea, 1, []byte{0xde, 0xad}, `\xdead`},
		{"bytea text", oidBytea, 0, []byte(`\xdead`), `\xdead`},
		{"unknown text raw", 600, 0, []byte("(1,2)"), "(1,2)"},
		{"unknown binary hex", 600, 1, []byte{0, 1, 0xff}, `\x0001ff`},
		{"empty text", oidText, 0, []byte{}, ""},

		// arrays, text format
		{"numeric array", oidNumericArray, 0, []byte("{1.50,2.0,NULL}"), `{"1.5","2",NULL}`},
		{"float8 array", oidFloat8Array, 0, []byte("{0.1,NaN,Infinity,-0}"), `{"0.1","NaN","Infinity","0"}`},
		{"float4 array", oidFloat4Array, 0, []byte("{0.1}"), `{"0.10000000149011612"}`},
		{"timestamptz array", oidTimestamptzArray, 0, []byte(`{"2024-01-01 10:00:00+02","2024-01-01 08:00:00+00",NULL}`), `{"2024-01-01T08:00:00Z","2024-01-01T08:00:00Z",NULL}`},
		{"json array", oidJSONArray, 0, []byte(`{"{\"b\": 1, \"a\": 2}",NULL,"[1.0]"}`), `{"{\"a\":2,\"b\":1}",NULL,"[1]"}`},
		{"jsonb array", oidJSONBArray, 0, []byte(`{"{\"b\": 1, \"a\": 2}"}`), `{"{\"a\":2,\"b\":1}"}`},
		{"nested int array", oidInt4Array, 0, []byte("{{1,2},{3,4}}"), `{{"1","2"},{"3","4"}}`},
		{"nested with spaces", oidInt4Array, 0, []byte(" { { 1 , 2 } , { 3 , 4 } } "), `{{"1","2"},{"3","4"}}`},
		{"quoted elements", oidTextArray, 0, []byte(`{"a,b","{c}","d\\e","f\"g",NULL,"NULL",null,plain," sp "}`), `{"a,b","{c}","d\\e","f\"g",NULL,"NULL",NULL,"plain"," sp "}`},
		{"unquoted escapes", oidTextArray, 0, []byte(`{a\,b,c\ }`), `{"a,b","c "}`},
		{"empty array", oidInt4Array, 0, []byte("{}"), "{}"},
		{"empty string element", oidTextArray, 0, []byte(`{""}`), `{""}`},
		{"decoration kept", oidInt4Array, 0, []byte("[0:1]={1,2}"), `[0:1]={"1","2"}`},
		{"bpchar array padding", oidBpcharArray, 0, []byte(`{"a  ",b}`), `{"a","b"}`},
		{"bool array", oidBoolArray, 0, []byte(`{t,f}`), `{"t","f"}`},
		{"malformed array kept", oidInt4Array, 0, []byte("{1,2"), "{1,2"},
		{"malformed array quote kept", oidTextArray, 0, []byte(`{"a}`), `{"a}`},
		{"malformed trailing kept", oidInt4Array, 0, []byte("{1}x"), "{1}x"},
		{"malformed empty element kept", oidInt4Array, 0, []byte("{1,,2}"), "{1,,2}"},

		// arrays, binary format
		{"float8 array binary", oidFloat8Array, 1, enc(t, oidFloat8Array, []float64{0.1, math.NaN(), math.Inf(1)}), `{"0.1","NaN","Infinity"}`},
		{"float4 array binary", oidFloat4Array, 1, enc(t, oidFloat4Array, []float32{0.1}), `{"0.10000000149011612"}`},
		{"timestamptz array binary", oidTimestamptzArray, 1, enc(t, oidTimestamptzArray, []time.Time{ts}), `{"2024-01-01T08:00:00.123456Z"}`},
		{"nested int array binary", oidInt4Array, 1, enc(t, oidInt4Array, [][]int32{{1, 2}, {3, 4}}), `{{"1","2"},{"3","4"}}`},
		{"text array binary", oidTextArray, 1, binArray(oidText, [][2]int32{{3, 1}}, []byte(`a"b`), nil, []byte("c,d")), `{"a\"b",NULL,"c,d"}`},
		{"decorated binary", oidInt4Array, 1, binArray(oidInt4, [][2]int32{{2, 0}}, be32(1), be32(2)), `[0:1]={"1","2"}`},
		{"empty binary", oidInt4Array, 1, binArray(oidInt4, nil), "{}"},
		{"jsonb array binary", oidJSONBArray, 1, binArray(oidJSONB, [][2]int32{{1, 1}}, []byte("\x01{\"b\":1,\"a\":2}")), `{"{\"a\":2,\"b\":1}"}`},
		{"numeric array binary", oidNumericArray, 1, enc(t, oidNumericArray, []pgtype.Numeric{numeric(t, "1.50"), numeric(t, "2.0")}), `{"1.5","2"}`},
		{"binary array truncated", oidInt4Array, 1, binArray(oidInt4, [][2]int32{{2, 1}}, be32(1)), hexOf(binArray(oidInt4, [][2]int32{{2, 1}}, be32(1)))},
		{"binary array huge dims", oidInt4Array, 1, binArray(oidInt4, [][2]int32{{math.MaxInt32, 1}}), hexOf(binArray(oidInt4, [][2]int32{{math.MaxInt32, 1}}))},
		{"binary array negative length", oidInt4Array, 1, append(binArray(oidInt4, [][2]int32{{1, 1}}), be32(-2)...), hexOf(append(binArray(oidInt4, [][2]int32{{1, 1}}), be32(-2)...))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Canonical(tt.oid, tt.format, tt.v); got != tt.want {
				t.Errorf("Canonical(%d, %d, %q) = %q, want %q", tt.oid, tt.format, tt.v, got, tt.want)
			}
		})
	}
}

func hexOf(b []byte) string { return raw(true, b) }

// TestCanonicalEquivalence checks pairs of wire values (possibly of other
// types of the family and other formats) through Compare, so that the float
// tolerance applies.
func TestCanonicalEquivalence(t *testing.T) {
	type val struct {
		oid    uint32
		format int16
		v      []byte
	}
	txt := func(oid uint32, s string) val { return val{oid, 0, []byte(s)} }
	bin := func(oid uint32, b []byte) val { return val{oid, 1, b} }
	null := func(oid uint32) val { return val{oid, 0, nil} }
	tests := []struct {
		name  string
		a, b  val
		equal bool
	}{
		{"timestamptz offsets", txt(oidTimestamptz, "2024-01-01 10:00:00+02"), txt(oidTimestamptz, "2024-01-01 08:00:00+00"), true},
		{"timestamptz text vs binary", txt(oidTimestamptz, "2024-01-01 13:30:00.123456+05:30"), bin(oidTimestamptz, enc(t, oidTimestamptz, time.Date(2024, 1, 1, 8, 0, 0, 123456000, time.UTC))), true},
		{"timestamptz differ", txt(oidTimestamptz, "2024-01-01 10:00:00+02"), txt(oidTimestamptz, "2024-01-01 10:00:00+00"), false},
		{"timestamp text vs binary", txt(oidTimestamp, "2024-01-01 10:00:00.25"), bin(oidTimestamp, enc(t, oidTimestamp, time.Date(2024, 1, 1, 10, 0, 0, 250000000, time.UTC))), true},
		{"date text vs binary", txt(oidDate, "2024-02-29"), bin(oidDate, enc(t, oidDate, time.Date(2024, 2, 29, 0, 0, 0, 0, time.UTC))), true},
		{"numeric 1.50 vs 1.5", txt(oidNumeric, "1.50"), txt(oidNumeric, "1.5"), true},
		{"numeric text vs binary", txt(oidNumeric, "-42.4200"), bin(oidNumeric, enc(t, oidNumeric, numeric(t, "-42.42"))), true},
		{"numeric differ", txt(oidNumeric, "1.5"), txt(oidNumeric, "1.05"), false},
		{"int4 vs int8 binary", txt(oidInt4, "7"), bin(oidInt8, enc(t, oidInt8, int64(7))), true},
		{"int2 binary vs int4 binary", bin(oidInt2, enc(t, oidInt2, int16(-3))), bin(oidInt4, enc(t, oidInt4, int32(-3))), true},
		{"json key order and whitespace", txt(oidJSON, `{"a": 1, "b": [1, 2]}`), txt(oidJSON, `{"b":[1,2],"a":1}`), true},
		{"json vs jsonb binary", txt(oidJSON, `{"a": 1.0}`), bin(oidJSONB, []byte("\x01{\"a\": 1}")), true},
		{"json values differ", txt(oidJSON, `{"a": 1}`), txt(oidJSONB, `{"a": 2}`), false},
		{"json string vs number", txt(oidJSON, `{"a": "1"}`), txt(oidJSONB, `{"a": 1}`), false},
		{"float 0.1+0.2 vs 0.3", txt(oidFloat8, "0.30000000000000004"), txt(oidFloat8, "0.3"), true},
		{"float 1.0 vs 1.001", txt(oidFloat8, "1.0"), txt(oidFloat8, "1.001"), false},
		{"float text vs binary", txt(oidFloat8, "0.3"), bin(oidFloat8, enc(t, oidFloat8, 0.1+0.2)), true},
		{"float4 text vs binary", txt(oidFloat4, "1.1"), bin(oidFloat4, enc(t, oidFloat4, float32(1.1))), true},
		{"float NaN equal", txt(oidFloat8, "NaN"), bin(oidFloat8, enc(t, oidFloat8, math.NaN())), true},
		{"float Infinity vs large", txt(oidFloat8, "Infinity"), txt(oidFloat8, "1e308"), false},
		{"float Infinity vs -Infinity", txt(oidFloat8, "Infinity"), txt(oidFloat8, "-Infinity"), false},
		{"float zero vs tiny", txt(oidFloat8, "0"), txt(oidFloat8, "1e-300"), false},
		{"float NULL vs NULL", null(oidFloat8), null(oidFloat8), true},
		{"float NULL vs value", null(oidFloat8), txt(oidFloat8, "0"), false},
		{"text NULL vs empty", null(oidText), txt(oidText, ""), false},
		{"bpchar vs text", txt(oidBpchar, "ab   "), txt(oidText, "ab"), true},
		{"varchar vs text binary", txt(oidVarchar, "x"), bin(oidText, []byte("x")), true},
		{"float array tolerance", txt(oidFloat8Array, "{0.3,NULL,NaN}"), bin(oidFloat8Array, binArray(oidFloat8, [][2]int32{{3, 1}}, enc(t, oidFloat8, 0.1+0.2), nil, enc(t, oidFloat8, math.NaN()))), true},
		{"float array differ", txt(oidFloat8Array, "{1.0}"), txt(oidFloat8Array, "{1.001}"), false},
		{"float array shape differs", txt(oidFloat8Array, "{{1},{2}}"), txt(oidFloat8Array, "{1,2}"), false},
		{"float4 array vs float8 array", txt(oidFloat4Array, "{0.5}"), txt(oidFloat8Array, "{0.5}"), true},
		{"timestamptz array offsets", txt(oidTimestamptzArray, `{"2024-01-01 10:00:00+02"}`), bin(oidTimestamptzArray, enc(t, oidTimestamptzArray, []time.Time{time.Date(2024, 1, 1, 8, 0, 0, 0, time.UTC)})), true},
		{"int array text vs binary", txt(oidInt4Array, "{{1,2},{3,NULL}}"), bin(oidInt8Array, binArray(oidInt8, [][2]int32{{2, 1}, {2, 1}}, enc(t, oidInt8, int64(1)), enc(t, oidInt8, int64(2)), enc(t, oidInt8, int64(3)), nil)), true},
		{"decorated text vs binary", txt(oidInt4Array, "[0:1]={1,2}"), bin(oidInt4Array, binArray(oidInt4, [][2]int32{{2, 0}}, be32(1), be32(2))), true},
		{"decorated vs plain", txt(oidInt4Array, "[0:1]={1,2}"), txt(oidInt4Array, "{1,2}"), false},
		{"json array text vs jsonb array binary", txt(oidJSONArray, `{"{\"a\": 1.0}"}`), bin(oidJSONBArray, binArray(oidJSONB, [][2]int32{{1, 1}}, []byte("\x01{\"a\":1}"))), true},
		{"text array quoting styles", txt(oidTextArray, `{a,"b c"}`), bin(oidTextArray, enc(t, oidTextArray, []string{"a", "b c"})), true},
		{"uuid text vs binary", txt(oidUUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), bin(oidUUID, []byte{0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a, 0x11}), true},
		{"bool text vs binary", txt(oidBool, "f"), bin(oidBool, []byte{0}), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := func(x val) Result {
				return Result{Fields: []Field{{Name: "c", OID: x.oid, Format: x.format}}, Rows: [][][]byte{{x.v}}}
			}
			d := Compare(res(tt.a), res(tt.b), Shape{}, Options{})
			if got := d == nil; got != tt.equal {
				t.Errorf("equal = %v, want %v (a %q, b %q, diff %+v)", got, tt.equal,
					Canonical(tt.a.oid, tt.a.format, tt.a.v), Canonical(tt.b.oid, tt.b.format, tt.b.v), d)
			}
		})
	}
}

func TestFamily(t *testing.T) {
	tests := []struct {
		a, b uint32
		same bool
	}{
		{oidInt4, oidInt8, true},
		{oidInt2, oidOID, true},
		{oidFloat4, oidFloat8, true},
		{oidText, oidBpchar, true},
		{oidVarchar, oidName, true},
		{oidJSON, oidJSONB, true},
		{oidInt4Array, oidInt8Array, true},
		{oidJSONArray, oidJSONBArray, true},
		{oidInt4, oidNumeric, false},
		{oidInt4, oidFloat8, false},
		{oidTimestamp, oidTimestamptz, false},
		{oidInt4, oidInt4Array, false},
		{oidUUID, oidText, false},
		{600, 600, true},
		{600, 601, false},
	}
	for _, tt := range tests {
		if got := family(tt.a) == family(tt.b); got != tt.same {
			t.Errorf("family(%d)=%q family(%d)=%q: same = %v, want %v", tt.a, family(tt.a), tt.b, family(tt.b), got, tt.same)
		}
	}
}
