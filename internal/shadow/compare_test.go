package shadow

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"
)

// null marks a NULL in row literals.
const null = "\x00NULL"

func fields(spec ...string) []Field {
	out := make([]Field, len(spec))
	for i, s := range spec {
		name, typ, _ := strings.Cut(s, ":")
		oid := uint32(oidText)
		switch typ {
		case "int4":
			oid = oidInt4
		case "int8":
			oid = oidInt8
		case "float8":
			oid = oidFloat8
		case "json":
			oid = oidJSON
		case "jsonb":
			oid = oidJSONB
		}
		out[i] = Field{Name: name, OID: oid}
	}
	return out
}

func rows(rs ...[]string) [][][]byte {
	out := make([][][]byte, len(rs))
	for i, r := range rs {
		out[i] = make([][]byte, len(r))
		for j, v := range r {
			if v != null {
				out[i][j] = []byte(v)
			}
		}
	}
	return out
}

func r(vs ...string) []string { return vs }

func str(s string) *string { return &s }

func TestCompare(t *testing.T) {
	gn := fields("grp:int4", "note")
	many := func(n int, prefix string) [][]string {
		var out [][]string
		for i := range n {
			out = append(out, r(strconv.Itoa(i), prefix+strconv.Itoa(i)))
		}
		return out
	}
	floatRows := func(n int, v string) [][]string {
		var out [][]string
		for i := range n {
			out = append(out, r(strconv.Itoa(i), v))
		}
		return out
	}
	tests := []struct {
		name           string
		served, shadow Result
		shape          Shape
		opts           Options
		wantKind       string // "" = match
		check          func(t *testing.T, d *Diff)
	}{
		{
			name:   "multiset reordered rows equal",
			served: Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"), r("3", null))},
			shadow: Result{Fields: gn, Rows: rows(r("3", null), r("1", "a"), r("2", "b"))},
		},
		{
			name:     "duplicates counted",
			served:   Result{Fields: gn, Rows: rows(r("1", "a"), r("1", "a"), r("2", "b"))},
			shadow:   Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"))},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if d.ServedRows != 3 || d.ShadowRows != 2 || len(d.OnlyServed) != 1 || len(d.OnlyShadow) != 0 || len(d.Changed) != 0 {
					t.Errorf("unexpected diff %+v", d)
				}
				if *d.OnlyServed[0][1] != "a" {
					t.Errorf("only served = %v", *d.OnlyServed[0][1])
				}
				if want := "served 3 rows, shadow 2; 1 row only on served"; d.Summary != want {
					t.Errorf("summary %q, want %q", d.Summary, want)
				}
			},
		},
		{
			name:     "NULL differs from empty",
			served:   Result{Fields: gn, Rows: rows(r("1", null))},
			shadow:   Result{Fields: gn, Rows: rows(r("1", ""))},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if len(d.Changed) != 1 || d.Changed[0].Columns["note"][0] != nil || *d.Changed[0].Columns["note"][1] != "" {
					t.Errorf("changed = %+v", d.Changed)
				}
			},
		},
		{
			name:   "ordered ties in different order equal",
			served: Result{Fields: gn, Rows: rows(r("1", "a"), r("1", "b"), r("2", "c"), r("3", "d"))},
			shadow: Result{Fields: gn, Rows: rows(r("1", "b"), r("1", "a"), r("2", "c"), r("3", "d"))},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Name: "grp"}}},
		},
		{
			name:     "ordered key order differs",
			served:   Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"), r("3", "c"))},
			shadow:   Result{Fields: gn, Rows: rows(r("1", "a"), r("3", "c"), r("2", "b"))},
			shape:    Shape{Ordered: true, SortKeys: []SortKey{{Pos: 1}}},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if !d.OrderDiffers || len(d.OnlyServed)+len(d.OnlyShadow)+len(d.Changed) != 0 {
					t.Errorf("unexpected diff %+v", d)
				}
				if !strings.Contains(d.Summary, "row 2") {
					t.Errorf("summary %q does not name row 2", d.Summary)
				}
			},
		},
		{
			name:     "ordered by text collation differs",
			served:   Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "B"))},
			shadow:   Result{Fields: gn, Rows: rows(r("2", "B"), r("1", "a"))},
			shape:    Shape{Ordered: true, SortKeys: []SortKey{{Name: "note"}}},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if !d.OrderDiffers {
					t.Errorf("OrderDiffers not set: %+v", d)
				}
			},
		},
		{
			name:   "limited last tie group membership tolerated",
			served: Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"), r("2", "c"))},
			shadow: Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"), r("2", "d"))},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Name: "grp"}}, Limited: true},
		},
		{
			name:     "last tie group membership without limit differs",
			served:   Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"), r("2", "c"))},
			shadow:   Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"), r("2", "d"))},
			shape:    Shape{Ordered: true, SortKeys: []SortKey{{Name: "grp"}}},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if len(d.Changed) != 1 || d.Changed[0].Key != "2" || *d.Changed[0].Columns["note"][0] != "c" || *d.Changed[0].Columns["note"][1] != "d" {
					t.Errorf("changed = %+v", d.Changed)
				}
			},
		},
		{
			name:     "limited last tie group length still compared",
			served:   Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"))},
			shadow:   Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"), r("2", "c"))},
			shape:    Shape{Ordered: true, SortKeys: []SortKey{{Name: "grp"}}, Limited: true},
			wantKind: KindRows,
		},
		{
			name:     "limited earlier group membership differs",
			served:   Result{Fields: gn, Rows: rows(r("1", "a"), r("1", "x"), r("2", "b"))},
			shadow:   Result{Fields: gn, Rows: rows(r("1", "a"), r("1", "y"), r("2", "b"))},
			shape:    Shape{Ordered: true, SortKeys: []SortKey{{Name: "grp"}}, Limited: true},
			wantKind: KindRows,
		},
		{
			name:   "offset first tie group membership tolerated",
			served: Result{Fields: gn, Rows: rows(r("1", "x"), r("1", "y"), r("2", "c"))},
			shadow: Result{Fields: gn, Rows: rows(r("1", "p"), r("1", "q"), r("2", "c"))},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Pos: 1}}, Offset: true},
		},
		{
			name:     "offset last group membership differs",
			served:   Result{Fields: gn, Rows: rows(r("1", "x"), r("2", "c"), r("2", "d"))},
			shadow:   Result{Fields: gn, Rows: rows(r("1", "x"), r("2", "c"), r("2", "e"))},
			shape:    Shape{Ordered: true, SortKeys: []SortKey{{Pos: 1}}, Offset: true},
			wantKind: KindRows,
		},
		{
			name:   "offset and limit on a single tie group",
			served: Result{Fields: gn, Rows: rows(r("1", "x"), r("1", "y"))},
			shadow: Result{Fields: gn, Rows: rows(r("1", "p"), r("1", "q"))},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Pos: 1}}, Offset: true, Limited: true},
		},
		{
			name:   "unresolvable name falls back to multiset",
			served: Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"))},
			shadow: Result{Fields: gn, Rows: rows(r("2", "b"), r("1", "a"))},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Name: "GRP"}}},
		},
		{
			name:   "position out of range falls back to multiset",
			served: Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"))},
			shadow: Result{Fields: gn, Rows: rows(r("2", "b"), r("1", "a"))},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Pos: 3}}},
		},
		{
			name:   "ambiguous name falls back to multiset",
			served: Result{Fields: fields("a:int4", "a"), Rows: rows(r("1", "a"), r("2", "b"))},
			shadow: Result{Fields: fields("a:int4", "a"), Rows: rows(r("2", "b"), r("1", "a"))},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Name: "a"}}},
		},
		{
			name:   "ordered without keys falls back to multiset",
			served: Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"))},
			shadow: Result{Fields: gn, Rows: rows(r("2", "b"), r("1", "a"))},
			shape:  Shape{Ordered: true},
		},
		{
			name:     "column name differs",
			served:   Result{Fields: fields("id:int4", "note")},
			shadow:   Result{Fields: fields("id:int4", "notes")},
			wantKind: KindColumns,
			check: func(t *testing.T, d *Diff) {
				if d.Columns == nil || d.Columns.Served[1] != "note:text" || d.Columns.Shadow[1] != "notes:text" {
					t.Errorf("columns = %+v", d.Columns)
				}
			},
		},
		{
			name:     "column count differs",
			served:   Result{Fields: fields("id:int4", "note")},
			shadow:   Result{Fields: fields("id:int4")},
			wantKind: KindColumns,
		},
		{
			name:     "column family differs",
			served:   Result{Fields: fields("id:int4")},
			shadow:   Result{Fields: fields("id")},
			wantKind: KindColumns,
			check: func(t *testing.T, d *Diff) {
				if want := "column id is int4 on served, text on shadow"; d.Summary != want {
					t.Errorf("summary %q, want %q", d.Summary, want)
				}
			},
		},
		{
			name:   "int4 to int8 and json to jsonb are legitimate",
			served: Result{Fields: fields("id:int4", "doc:json"), Rows: rows(r("1", `{"b": 1, "a": 2}`))},
			shadow: Result{Fields: []Field{{Name: "id", OID: oidInt8, Format: 1}, {Name: "doc", OID: oidJSONB, Format: 1}},
				Rows: [][][]byte{{{0, 0, 0, 0, 0, 0, 0, 1}, []byte("\x01{\"a\":2,\"b\":1}")}}},
		},
		{
			name:   "both failed with the same SQLSTATE",
			served: Result{ErrCode: "42P01", ErrMsg: `relation "t" does not exist`},
			shadow: Result{ErrCode: "42P01", ErrMsg: `relation "public.t" does not exist`},
		},
		{
			name:     "one side failed",
			served:   Result{Fields: gn, Rows: rows(r("1", "a"))},
			shadow:   Result{ErrCode: "57014", ErrMsg: "canceling statement due to statement timeout"},
			wantKind: KindError,
			check: func(t *testing.T, d *Diff) {
				want := "served succeeded with 1 row; shadow failed with 57014: canceling statement due to statement timeout"
				if d.Summary != want || d.ShadowError == "" || d.ServedError != "" {
					t.Errorf("diff %+v, want summary %q", d, want)
				}
			},
		},
		{
			name:     "different SQLSTATEs",
			served:   Result{ErrCode: "22012", ErrMsg: "division by zero"},
			shadow:   Result{ErrCode: "22003", ErrMsg: "numeric field overflow"},
			wantKind: KindError,
			check: func(t *testing.T, d *Diff) {
				for _, s := range []string{"22012", "22003", "division by zero", "numeric field overflow"} {
					if !strings.Contains(d.Summary, s) {
						t.Errorf("summary %q lacks %q", d.Summary, s)
					}
				}
			},
		},
		{
			name:     "changed pairing by first column",
			served:   Result{Fields: fields("id:int4", "note", "qty:int4"), Rows: rows(r("1", "a", "1"), r("2", "b", "2"), r("3", "c", "3"), r("5", "e", "5"))},
			shadow:   Result{Fields: fields("id:int4", "note", "qty:int4"), Rows: rows(r("1", "a", "1"), r("2", "B", "2"), r("3", "C", "30"), r("4", "d", "4"))},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if len(d.Changed) != 2 || d.ChangedCount != 2 || len(d.OnlyServed) != 1 || len(d.OnlyShadow) != 1 {
					t.Fatalf("diff %+v", d)
				}
				c := d.Changed[1]
				if c.Key != "3" || len(c.Columns) != 2 || *c.Columns["qty"][0] != "3" || *c.Columns["qty"][1] != "30" {
					t.Errorf("change %+v", c)
				}
				if len(d.Changed[0].Columns) != 1 {
					t.Errorf("change lists equal columns: %+v", d.Changed[0])
				}
				if want := "1 row only on served, 1 only on shadow; column note differs in 2 rows; column qty differs in 1 row"; d.Summary != want {
					t.Errorf("summary %q, want %q", d.Summary, want)
				}
				if *d.OnlyServed[0][0] != "5" || *d.OnlyShadow[0][0] != "4" {
					t.Errorf("only lists %v %v", d.OnlyServed, d.OnlyShadow)
				}
			},
		},
		{
			name:     "truncation of rows and values",
			served:   Result{Fields: gn, Rows: rows(append([][]string{r("x", strings.Repeat("é", 10))}, many(10, "s")...)...)},
			shadow:   Result{Fields: gn, Rows: rows(many(7, "t")...)},
			opts:     Options{MaxRows: 3, MaxValue: 5},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if !d.Truncated || len(d.Changed) != 3 || d.ChangedCount != 7 || len(d.OnlyServed) != 3 || d.OnlyServedCount != 4 {
					t.Fatalf("diff %+v", d)
				}
				if got := *d.OnlyServed[0][1]; got != "éé…" {
					t.Errorf("truncated value %q", got)
				}
			},
		},
		{
			name:   "float tolerance in rows",
			served: Result{Fields: fields("id:int4", "x:float8"), Rows: rows(r("1", "0.30000000000000004"), r("2", "1"))},
			shadow: Result{Fields: fields("id:int4", "x:float8"), Rows: rows(r("2", "1.0000000000001"), r("1", "0.3"))},
		},
		{
			name:     "float beyond tolerance",
			served:   Result{Fields: fields("id:int4", "x:float8"), Rows: rows(r("1", "1.0"))},
			shadow:   Result{Fields: fields("id:int4", "x:float8"), Rows: rows(r("1", "1.001"))},
			wantKind: KindRows,
		},
		{
			name:     "negative tolerance is exact",
			served:   Result{Fields: fields("id:int4", "x:float8"), Rows: rows(r("1", "0.30000000000000004"))},
			shadow:   Result{Fields: fields("id:int4", "x:float8"), Rows: rows(r("1", "0.3"))},
			opts:     Options{FloatTolerance: -1},
			wantKind: KindRows,
		},
		{
			name:     "tolerant pass skipped for many leftovers",
			served:   Result{Fields: fields("id:int4", "x:float8"), Rows: rows(floatRows(1001, "0.30000000000000004")...)},
			shadow:   Result{Fields: fields("id:int4", "x:float8"), Rows: rows(floatRows(1001, "0.3")...)},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if d.ChangedCount != 1001 || len(d.Changed) != 5 || !d.Truncated {
					t.Errorf("diff %+v", d)
				}
			},
		},
		{
			name:   "ordered float keys within tolerance",
			served: Result{Fields: fields("x:float8", "note"), Rows: rows(r("0.30000000000000004", "a"), r("1", "b"))},
			shadow: Result{Fields: fields("x:float8", "note"), Rows: rows(r("0.3", "a"), r("1", "b"))},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Name: "x"}}},
		},
		{
			name:     "ordered row count differs",
			served:   Result{Fields: gn, Rows: rows(r("1", "a"), r("2", "b"))},
			shadow:   Result{Fields: gn, Rows: rows(r("1", "a"))},
			shape:    Shape{Ordered: true, SortKeys: []SortKey{{Pos: 1}}, Limited: true},
			wantKind: KindRows,
			check: func(t *testing.T, d *Diff) {
				if d.OrderDiffers || len(d.OnlyServed) != 1 {
					t.Errorf("diff %+v", d)
				}
			},
		},
		{
			name:   "no rows on either side",
			served: Result{Fields: gn},
			shadow: Result{Fields: gn},
			shape:  Shape{Ordered: true, SortKeys: []SortKey{{Pos: 1}}, Limited: true, Offset: true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := Compare(tt.served, tt.shadow, tt.shape, tt.opts)
			switch {
			case tt.wantKind == "" && d != nil:
				t.Fatalf("want match, got %+v", d)
			case tt.wantKind != "" && d == nil:
				t.Fatalf("want %s diff, got match", tt.wantKind)
			case d != nil && d.Kind != tt.wantKind:
				t.Fatalf("kind %q, want %q (%+v)", d.Kind, tt.wantKind, d)
			}
			if d != nil && d.Summary == "" {
				t.Errorf("empty summary: %+v", d)
			}
			if tt.check != nil && d != nil {
				tt.check(t, d)
			}
		})
	}
}

func TestDiffJSON(t *testing.T) {
	d := Compare(
		Result{Fields: fields("id:int4", "note"), Rows: rows(r("1", "a"), r("2", null))},
		Result{Fields: fields("id:int4", "note"), Rows: rows(r("1", "b"))},
		Shape{}, Options{})
	if d == nil {
		t.Fatal("want diff")
	}
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"kind":"rows","summary":"served 2 rows, shadow 1; 1 row only on served; column note differs in 1 row",` +
		`"served_rows":2,"shadow_rows":1,"only_served":[["2",null]],"only_served_count":1,` +
		`"changed":[{"key":"1","columns":{"note":["a","b"]}}],"changed_count":1}`
	if string(b) != want {
		t.Errorf("json\n got %s\nwant %s", b, want)
	}
	var back Diff
	if err := json.Unmarshal(b, &back); err != nil || back.Changed[0].Columns["note"][1] == nil || *back.Changed[0].Columns["note"][1] != *str("b") {
		t.Errorf("round trip: %v %+v", err, back)
	}
}

// A redacted Diff keeps where the difference is (counts, column names,
// SQLSTATEs) and none of the values.
func TestDiffRedact(t *testing.T) {
	d := Compare(
		Result{Fields: fields("id:int4", "note"), Rows: rows(r("1", "secret-a"), r("2", "secret-only"))},
		Result{Fields: fields("id:int4", "note"), Rows: rows(r("1", "secret-b"))},
		Shape{}, Options{})
	d.Redact()
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"kind":"rows","summary":"served 2 rows, shadow 1; 1 row only on served; column note differs in 1 row",` +
		`"served_rows":2,"shadow_rows":1,"only_served_count":1,` +
		`"changed":[{"key":"","columns":{"note":[null,null]}}],"changed_count":1,"redacted":true}`
	if string(b) != want {
		t.Errorf("json\n got %s\nwant %s", b, want)
	}
	e := Compare(Result{ErrCode: "23505", ErrMsg: `duplicate key value violates unique constraint "t_pkey": Key (id)=(secret-7)`},
		Result{Rows: rows(r("1"))}, Shape{}, Options{})
	e.Redact()
	if b, _ := json.Marshal(e); strings.Contains(string(b), "secret") || e.ServedError != "23505" ||
		e.Summary != "served failed with 23505; shadow succeeded with 1 row" {
		t.Errorf("redacted error diff %s", b)
	}
}
