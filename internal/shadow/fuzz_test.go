package shadow

import (
	"bytes"
	"testing"
)

// FuzzCanonical feeds arbitrary (oid, format, bytes) triples to Canonical,
// which must never panic and must be deterministic.
func FuzzCanonical(f *testing.F) {
	seeds := []struct {
		oid    uint32
		format int16
		v      []byte
	}{
		{oidInt4Array, 0, []byte(`{{1,2},{3,4}}`)},
		{oidTextArray, 0, []byte(`{"a,b","{c}","d\\e","f\"g",NULL,"NULL",plain}`)},
		{oidInt4Array, 0, []byte(`[0:1]={1,2}`)},
		{oidInt4Array, 0, []byte(`[1:2][1:1]={{1},{2}}`)},
		{oidFloat8Array, 0, []byte(`{0.1,NaN,-Infinity,NULL}`)},
		{oidTimestamptzArray, 0, []byte(`{"2024-01-01 10:00:00+02",NULL}`)},
		{oidJSONArray, 0, []byte(`{"{\"b\": 1, \"a\": [1.0]}"}`)},
		{oidTextArray, 0, []byte(`{a\`)},
		{oidTextArray, 0, []byte(`{{{{{{{{{{{{{{{{{{{{}}}}}}}}}}}}}}}}}}}}`)},
		{oidInt4Array, 1, binArray(oidInt4, [][2]int32{{2, 0}}, be32(1), be32(2))},
		{oidInt4Array, 1, binArray(oidInt4, [][2]int32{{2, 1}, {1, 1}}, be32(1), nil)},
		{oidFloat8Array, 1, binArray(oidFloat8, [][2]int32{{1, 1}}, []byte{0x7f, 0xf8, 0, 0, 0, 0, 0, 0})},
		{oidTimestamptz, 0, []byte("2024-01-01 10:00:00.123456+05:30:15")},
		{oidTimestamptz, 0, []byte("0044-03-15 12:00:00+00 BC")},
		{oidTimestamptz, 0, []byte("infinity")},
		{oidTimestamptz, 1, be32(0, 0)},
		{oidTimestamp, 1, be32(-1, -1)},
		{oidDate, 1, be32(-2147483647)},
		{oidNumeric, 0, []byte("-0001.5000")},
		{oidNumeric, 1, be16(2, 0, 0, 2, 1, 5000)},
		{oidNumeric, 1, be16(1, 0x8000, 0x4000, 0, 1)},
		{oidNumeric, 1, be16(0, 0x7fff, 0xC000, 0)},
		{oidJSON, 0, []byte(`{"b": 1.0e400, "a": [1, 2.50, {"d": null}], "a": -0}`)},
		{oidJSONB, 1, []byte("\x01[1e-5, \"x\"]")},
		{oidFloat4, 0, []byte("3.4e39")},
		{oidFloat8, 1, []byte{0, 0, 0, 0, 0, 0, 0, 1}},
		{oidUUID, 1, make([]byte, 16)},
		{oidBpchar, 0, []byte("x  ")},
		{600, 1, []byte{0xff}},
	}
	for _, s := range seeds {
		f.Add(s.oid, s.format, s.v)
	}
	f.Fuzz(func(t *testing.T, oid uint32, format int16, v []byte) {
		orig := bytes.Clone(v)
		a := Canonical(oid, format, v)
		if b := Canonical(oid, format, v); a != b {
			t.Fatalf("not deterministic: %q vs %q", a, b)
		}
		if !bytes.Equal(v, orig) {
			t.Fatal("input modified")
		}
		// Exercise the element rules with the same bytes as a whole array too.
		for _, arr := range []uint32{oidTextArray, oidFloat8Array, oidJSONArray, oidTimestamptzArray, oidNumericArray} {
			Canonical(arr, format, v)
		}
	})
}

// FuzzCompare compares small generated results (int4 key, float8 value) in
// every shape; a result must always match itself and Compare must not panic.
func FuzzCompare(f *testing.F) {
	f.Add([]byte("1,a;2,b"), []byte("2,b;1,a"), uint8(0))
	f.Add([]byte("1,0.3;1,0.1"), []byte("1,0.30000000000000004;1,0.1"), uint8(1))
	f.Add([]byte("1,a;1,b;2,c"), []byte("1,b;1,a;2,d"), uint8(3))
	f.Add([]byte(""), []byte("x"), uint8(7))
	f.Fuzz(func(t *testing.T, a, b []byte, flags uint8) {
		fs := []Field{{Name: "k", OID: oidInt4}, {Name: "x", OID: oidFloat8}}
		parse := func(p []byte) Result {
			var res Result
			res.Fields = fs
			for _, line := range bytes.Split(p, []byte(";")) {
				var row [][]byte
				for _, v := range bytes.Split(line, []byte(",")) {
					if string(v) == "N" {
						v = nil
					}
					row = append(row, v)
				}
				res.Rows = append(res.Rows, row)
			}
			return res
		}
		shape := Shape{
			Ordered:  flags&1 != 0,
			Limited:  flags&2 != 0,
			Offset:   flags&4 != 0,
			SortKeys: []SortKey{{Pos: int(flags>>3) % 3}}, // 0 leaves it unresolvable
		}
		sa, sb := parse(a), parse(b)
		if d := Compare(sa, sa, shape, Options{}); d != nil {
			t.Fatalf("result differs from itself: %+v", d)
		}
		Compare(sa, sb, shape, Options{MaxRows: 2, MaxValue: 3})
	})
}
