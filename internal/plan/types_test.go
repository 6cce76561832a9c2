package plan

import "testing"

func TestClassifyType(t *testing.T) {
	for _, tc := range []struct {
		old, new string
		want     Change
	}{
		{"integer", "integer", Same},
		{"character varying(50)", "text", Widening},
		{"character varying(50)", "character varying(100)", Widening},
		{"character varying(50)", "character varying", Widening},
		{"character varying(100)", "character varying(50)", Narrowing},
		{"text", "character varying(20)", Narrowing},
		{"character(5)", "text", Conversion},
		{"smallint", "integer", Widening},
		{"integer", "bigint", Widening},
		{"bigint", "integer", Narrowing},
		{"real", "double precision", Widening},
		{"double precision", "real", Narrowing},
		{"numeric(10,2)", "numeric(12,2)", Widening},
		{"numeric(10,2)", "numeric", Widening},
		{"numeric(10,2)", "numeric(10,1)", Narrowing},
		{"numeric", "numeric(10,2)", Narrowing},
		{"numeric(10)", "numeric(12,2)", Widening},
		{"integer", "numeric", Widening},
		{"bigint", "numeric(10,0)", Narrowing},
		{"integer", "double precision", Widening},
		{"bigint", "double precision", Narrowing},
		{"numeric(10,2)", "integer", Narrowing},
		{"date", "timestamp with time zone", Widening},
		{"timestamp without time zone", "timestamp with time zone", Conversion},
		{"timestamp with time zone", "date", Narrowing},
		{"timestamp(3) without time zone", "timestamp without time zone", Widening},
		{"timestamp without time zone", "timestamp(3) without time zone", Narrowing},
		{"json", "jsonb", Conversion},
		{"integer", "text", Conversion},
		{"uuid", "character varying(10)", Narrowing},
		{"text", "uuid", Narrowing},
		{"uuid", "integer", Incompatible},
		{"boolean", "timestamp with time zone", Incompatible},
		{"public.hstore", "jsonb", Incompatible},
		{"public.citext", "text", Conversion},
		{"public.mood", "public.feeling", Conversion},
		{"integer[]", "bigint[]", Widening},
		{"bigint[]", "integer[]", Narrowing},
		{"integer[]", "integer", Incompatible},
		{"integer[]", "text", Conversion},
		{"bit(3)", "bit(5)", Narrowing},
		{"bit(3)", "bit", Widening},
	} {
		got, note := ClassifyType(tc.old, tc.new)
		if got != tc.want {
			t.Errorf("ClassifyType(%q, %q) = %s (%s), want %s", tc.old, tc.new, got, note, tc.want)
		}
		if got != Same && note == "" {
			t.Errorf("ClassifyType(%q, %q): no note", tc.old, tc.new)
		}
	}
}

func TestChangeVerdict(t *testing.T) {
	for c, want := range map[Change]Verdict{Same: Ready, Widening: Ready, Conversion: Attention, Narrowing: Attention, Incompatible: Blocked} {
		if got := c.Verdict(); got != want {
			t.Errorf("%s.Verdict() = %s, want %s", c, got, want)
		}
	}
}

func TestParseType(t *testing.T) {
	for in, want := range map[string]string{
		"timestamp(3) with time zone": "timestamp with time zone(3)",
		"numeric(10,2)[]":             "numeric(10,2)[]",
		"character varying":           "character varying",
	} {
		if got := parseType(in).String(); got != want {
			t.Errorf("parseType(%q) = %q, want %q", in, got, want)
		}
	}
}
