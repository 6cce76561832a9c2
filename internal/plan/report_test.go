package plan

import (
	"bytes"
	"encoding/json"
	"flag"
	"github.com/tandemdb/tandem/internal/jsonout"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemdb/tandem/internal/table"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func rel(schema, name string, key []string, cols ...column) *relation {
	return &relation{name: table.Name{Schema: schema, Table: name}, bytes: 16384, heap: 8192, rows: 1000,
		sel: true, ins: true, upd: true, del: true, key: key, cols: cols}
}

func col(name, typ string) column { return column{name: name, typ: typ} }

func TestWorst(t *testing.T) {
	if Worst() != Ready || Worst(Ready, Attention) != Attention || Worst(Blocked, Attention, Ready) != Blocked {
		t.Fatal("Worst does not pick the worst verdict")
	}
	var v Verdict
	if err := v.UnmarshalText([]byte("attention")); err != nil || v != Attention {
		t.Fatalf("UnmarshalText: %v %v", v, err)
	}
	if err := v.UnmarshalText([]byte("fine")); err == nil {
		t.Fatal("UnmarshalText accepted an unknown verdict")
	}
}

func TestAssessTable(t *testing.T) {
	id := col("id", "integer")
	identity := func(n table.Name) Mapping { return Mapping{New: n} }
	for _, tc := range []struct {
		name     string
		old, new *relation
		m        Mapping
		want     Verdict
		contains string
	}{
		{"same", rel("public", "a", []string{"id"}, id), rel("public", "a", []string{"id"}, id), Mapping{}, Ready, ""},
		{"widening is a note", rel("public", "a", []string{"id"}, id, col("e", "character varying(50)")),
			rel("public", "a", []string{"id"}, id, col("e", "text")), Mapping{}, Ready, ""},
		{"missing table", rel("public", "a", []string{"id"}, id), nil, Mapping{}, Blocked, "missing on new"},
		{"no key on old", rel("public", "a", nil, id), rel("public", "a", nil, id), Mapping{}, Attention, "no primary key on old"},
		{"no key on new", rel("public", "a", []string{"id"}, id), rel("public", "a", nil, id), Mapping{}, Blocked, "no primary key on new"},
		{"narrowing", rel("public", "a", []string{"id"}, col("id", "bigint")), rel("public", "a", []string{"id"}, id), Mapping{}, Attention, "narrows"},
		{"incompatible", rel("public", "a", []string{"id"}, id, col("u", "uuid")),
			rel("public", "a", []string{"id"}, id, col("u", "integer")), Mapping{}, Blocked, "cannot convert"},
		{"missing column", rel("public", "a", []string{"id"}, id, col("x", "text")),
			rel("public", "a", []string{"id"}, id), Mapping{}, Blocked, "column x has no column x"},
		{"dropped by the mapping", rel("public", "a", []string{"id"}, id, col("x", "text")),
			rel("public", "b", []string{"id"}, id), Mapping{New: table.Name{Schema: "public", Table: "b"}, Declared: true, Dropped: []string{"x"}}, Ready, ""},
		{"renamed and computed", rel("public", "a", []string{"id"}, id, col("first", "text"), col("last", "text"), col("mail", "text")),
			rel("public", "b", []string{"id"}, id, column{name: "full_name", typ: "text", notNull: true}, col("email", "text")),
			Mapping{New: table.Name{Schema: "public", Table: "b"}, Declared: true, Dropped: []string{"first", "last"},
				Renames: map[string]string{"mail": "email"}, Computed: map[string]string{"full_name": "first || ' ' || last"}}, Ready, ""},
		{"extra NOT NULL column", rel("public", "a", []string{"id"}, id),
			rel("public", "a", []string{"id"}, id, column{name: "z", typ: "text", notNull: true}), Mapping{}, Blocked, "NOT NULL without a default"},
		{"keys differ", rel("public", "a", []string{"id"}, id, col("k", "integer")),
			rel("public", "a", []string{"k"}, id, col("k", "integer")), Mapping{}, Blocked, "primary keys differ"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.m
			if m.New == (table.Name{}) {
				m = identity(tc.old.name)
			}
			got := assessTable(tc.old, tc.new, m, nil)
			if got.Verdict != tc.want {
				t.Fatalf("verdict %s, want %s: %+v", got.Verdict, tc.want, got.Reasons)
			}
			if tc.contains != "" {
				b, _ := json.Marshal(got.Reasons)
				if !strings.Contains(string(b), tc.contains) {
					t.Fatalf("reasons lack %q: %s", tc.contains, b)
				}
			}
		})
	}
}

func TestExtensionTypeBlocks(t *testing.T) {
	ext := map[string]*Extension{"hstore": {Name: "hstore"}}
	old := rel("public", "g", []string{"id"}, col("id", "integer"), column{name: "attrs", typ: "public.hstore", ext: "hstore"})
	got := assessTable(old, rel("public", "g", []string{"id"}, col("id", "integer"), col("attrs", "jsonb")), Mapping{New: old.name}, ext)
	if got.Verdict != Blocked || !strings.Contains(got.Reasons[0].Text, "extension hstore") {
		t.Fatalf("got %s %+v", got.Verdict, got.Reasons)
	}
	if len(ext["hstore"].UsedBy) != 1 || ext["hstore"].UsedBy[0] != "public.g.attrs" {
		t.Fatalf("UsedBy = %v", ext["hstore"].UsedBy)
	}
	got = assessTable(old, rel("public", "g", []string{"id"}, col("id", "integer"), col("attrs", "text")), Mapping{New: old.name}, ext)
	if got.Verdict != Attention {
		t.Fatalf("to text: got %s %+v", got.Verdict, got.Reasons)
	}
}

// goldenReport is a report with one of each section, built without a store.
func goldenReport() *Report {
	yes := true
	seq := int64(42)
	r := &Report{
		Stores: []Store{
			{Name: "old", Version: "15.8", User: "postgres", WALLevel: "logical", MaxPreparedTransactions: 64, Superuser: true, ReplicationRole: true, ControlSchema: &yes},
			{Name: "new", Version: "16.4", User: "app", WALLevel: "replica", MaxPreparedTransactions: 0},
		},
		Extensions:  []Extension{{Name: "hstore", Version: "1.8", UsedBy: []string{"public.geo.attrs"}}, {Name: "plpgsql", Version: "1.0", OnNew: true}},
		Sequences:   []Sequence{{Name: "public.orders_id_seq", OwnedBy: "public.orders.id", Old: &seq, OnNew: true}, {Name: "public.counter", Old: &seq}},
		Triggers:    []Trigger{{Table: "public.orders", Name: "audit", Enabled: true, Definition: "CREATE TRIGGER audit AFTER INSERT ON public.orders FOR EACH ROW EXECUTE FUNCTION log_order()"}},
		ForeignKeys: []ForeignKey{{Table: "public.lines", References: "public.orders", Name: "lines_order_fkey", OnDelete: "CASCADE", OnUpdate: "NO ACTION"}},
		Findings:    []Reason{{Verdict: Attention, Text: "sequence public.counter exists on old but not on new: the write flip cannot sync it"}},
	}
	r.Stores[1].reason(Attention, "app cannot SET session_replication_role")
	id := col("id", "integer")
	ready := assessTable(rel("public", "users", []string{"id"}, id, col("email", "character varying(50)")),
		rel("public", "users", []string{"id"}, id, col("email", "text")), Mapping{New: table.Name{Schema: "public", Table: "users"}}, nil)
	ready.Sample = &Sample{Rows: 1000, Duration: jsonout.Duration(12 * time.Millisecond), Estimate: jsonout.Duration(12 * time.Millisecond)}
	ready.RowsExact = true
	missing := assessTable(rel("public", "gone", []string{"id"}, id), nil, Mapping{New: table.Name{Schema: "public", Table: "gone"}}, nil)
	nokey := assessTable(rel("public", "log", nil, col("line", "text")), rel("public", "log", nil, col("line", "text")), Mapping{New: table.Name{Schema: "public", Table: "log"}}, nil)
	nokey.Rows, nokey.Bytes, nokey.Size = 2500000, 1<<30, prettyBytes(1<<30)
	nokey.Sample = &Sample{Rows: 1000, Duration: jsonout.Duration(20 * time.Millisecond), Estimate: jsonout.Duration(50 * time.Second)}
	ready.Audit = &Audit{Rows: 1000, Duration: jsonout.Duration(30 * time.Millisecond), Rejects: []Reject{}, Unchecked: []string{}}
	nokey.Audit = &Audit{Rows: 2500000, Duration: jsonout.Duration(4 * time.Second), Unchecked: []string{},
		Rejects: []Reject{{Reason: RejectLength, Column: "line", Rows: 2, Keys: []string{"(0,1)", "(0,7)"}, Fix: "widen new's column line to varchar(90)"}}}
	for _, rj := range nokey.Audit.Rejects {
		nokey.reason(Blocked, "audit: %s", rj.describe())
	}
	r.Tables = []Table{ready, missing, nokey}
	r.finish()
	return r
}

func TestWriteTextGolden(t *testing.T) {
	r := goldenReport()
	if r.Verdict != Blocked {
		t.Fatalf("verdict %s, want blocked", r.Verdict)
	}
	var buf bytes.Buffer
	if err := r.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "report.golden")
	if *update {
		if err := os.WriteFile(golden, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if buf.String() != string(want) {
		t.Errorf("text report differs from %s (go test -update rewrites it):\n%s", golden, buf.String())
	}
}

func TestJSONRoundTrip(t *testing.T) {
	r := goldenReport()
	b, err := r.JSON()
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Verdict != Blocked || len(back.Tables) != 3 || back.Tables[1].Verdict != Blocked || back.Tables[2].Verdict != Blocked ||
		back.Tables[1].Audit != nil || back.Tables[2].Audit == nil || back.Tables[2].Audit.Rejects[0].Reason != RejectLength ||
		!strings.Contains(string(b), `"rejects": []`) || !strings.Contains(string(b), `"unchecked": []`) {
		t.Fatalf("round trip lost verdicts: %s", b)
	}
	if !strings.Contains(string(b), `"verdict": "blocked"`) {
		t.Fatalf("verdicts are not written by name: %s", b)
	}
}

func TestPrettyBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 bytes", 8192: "8192 bytes", 16384: "16 kB", 1 << 30: "1024 MB", 50 << 30: "50 GB"} {
		if got := prettyBytes(n); got != want {
			t.Errorf("prettyBytes(%d) = %q, want %q", n, got, want)
		}
	}
}
