package plan

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteText writes the report for people: one table per section, then the
// verdicts with their reasons, worst first.
func (r *Report) WriteText(w io.Writer) error {
	out := textReport{tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)}
	r.writeStores(out)
	r.writeFeed(out)
	r.writeTables(out)
	r.writeDifferences(out)
	r.writeAudit(out)
	r.writeSequences(out)
	r.writeOldWrites(out)
	r.writeExtensions(out)
	r.writeVerdicts(out)
	return out.tw.Flush()
}

// textReport is the text report being written: its tables are aligned by
// tw, one section after the other.
type textReport struct{ tw *tabwriter.Writer }

func (t textReport) p(format string, args ...any) { fmt.Fprintf(t.tw, format, args...) }

// section ends the table before and starts one under title.
func (t textReport) section(title string) { t.tw.Flush(); t.p("\n%s\n", title) }

// writeStores is the STORES table.
func (r *Report) writeStores(out textReport) {
	p := out.p
	p("STORES\n")
	p("STORE\tVERSION\tUSER\tWAL_LEVEL\tMAX_PREPARED_XACTS\tREPLICA MODE\tCONTROL SCHEMA\tVERDICT\n")
	for _, s := range r.Stores {
		control := "-"
		if s.ControlSchema != nil {
			control = yesNo(*s.ControlSchema)
		}
		p("%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", s.Name, s.Version, s.User, s.WALLevel, s.MaxPreparedTransactions,
			yesNo(s.ReplicationRole), control, s.Verdict)
	}
}

// writeFeed is the change feed's prerequisites per store, when the report
// has them.
func (r *Report) writeFeed(out textReport) {
	p, section := out.p, out.section
	if r.Stores != nil && slices.ContainsFunc(r.Stores, func(s Store) bool { return s.Feed != nil }) {
		section("CHANGE FEED PREREQUISITES (either store can be the primary whose WAL the feed reads)")
		p("STORE\tWAL_LEVEL\tFREE SLOTS\tFREE WAL SENDERS\tREPLICATION\tPUBLICATION\n")
		for _, s := range r.Stores {
			f := s.Feed
			if f == nil {
				continue
			}
			slots := strconv.Itoa(f.MaxSlots - f.UsedSlots)
			if f.HasSlot {
				slots = "has its slot"
			}
			repl := yesNo(f.Replication)
			if f.ReplicationVia != "" {
				repl += " (" + f.ReplicationVia + ")"
			}
			pub := "can create"
			switch {
			case f.HasPublication:
				pub = "exists"
			case !f.CreatePublication:
				pub = "cannot create"
			}
			p("%s\t%s\t%s\t%d\t%s\t%s\n", s.Name, f.WALLevel, slots, f.MaxWALSenders-f.UsedWALSenders, repl, pub)
		}
	}
}

// writeTables is the TABLES table.
func (r *Report) writeTables(out textReport) {
	p, section := out.p, out.section
	section("TABLES")
	if len(r.Tables) == 0 {
		p("(no table in scope)\n")
	} else {
		p("TABLE\tMAPS TO\tMAPPING\tSIZE\tROWS\tKEY\tBACKFILL\tVERDICT\n")
		for _, t := range r.Tables {
			rows := "~" + strconv.FormatInt(t.Rows, 10)
			if t.RowsExact {
				rows = strconv.FormatInt(t.Rows, 10)
			}
			p("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.Name, t.NewName, t.Mapping, t.Size, rows,
				orDash(strings.Join(t.Key, ", ")), t.Sample.estimate(), t.Verdict)
		}
	}
}

// writeDifferences lists the schema differences the mapping does not
// explain, if any.
func (r *Report) writeDifferences(out textReport) {
	p, section := out.p, out.section
	var diffs int
	for _, t := range r.Tables {
		diffs += len(t.Differences)
	}
	if diffs > 0 {
		section("SCHEMA DIFFERENCES (not explained by the mapping)")
		p("TABLE\tCOLUMN\tKIND\tOLD\tNEW\tVERDICT\tNOTE\n")
		for _, t := range r.Tables {
			for _, d := range t.Differences {
				kind := d.Kind
				if d.Change != "" {
					kind += " (" + string(d.Change) + ")"
				}
				p("%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.Name, orDash(d.Column), kind, orDash(d.Old), orDash(d.New), d.Verdict, d.Note)
			}
		}
	}
}

// writeAudit lists what the data audit found, when it ran: per table the
// rows scanned, then one line per reject with its examples and fix.
func (r *Report) writeAudit(out textReport) {
	p, section := out.p, out.section
	if !slices.ContainsFunc(r.Tables, func(t Table) bool { return t.Audit != nil }) {
		return
	}
	section("DATA AUDIT (old rows that new's schema will reject; computed on old through the mapping)")
	p("TABLE\tSCANNED\tREASON\tCOLUMN\tCONSTRAINT\tROWS\tEXAMPLES\tFIX\n")
	for _, t := range r.Tables {
		a := t.Audit
		if a == nil {
			continue
		}
		if len(a.Rejects) == 0 {
			p("%s\t%d\t(none)\t-\t-\t0\t-\t-\n", t.Name, a.Rows)
		}
		for _, rj := range a.Rejects {
			p("%s\t%d\t%s\t%s\t%s\t%d\t%s\t%s\n", t.Name, a.Rows, rj.Reason, orDash(rj.Column), orDash(rj.Constraint), rj.Rows,
				orDash(strings.Join(rj.Keys, "; ")), rj.Fix)
		}
	}
}

// writeSequences is the SEQUENCES table.
func (r *Report) writeSequences(out textReport) {
	p, section := out.p, out.section
	section("SEQUENCES (synced to new at the write flip)")
	if len(r.Sequences) == 0 {
		p("(none)\n")
	} else {
		p("SEQUENCE\tOWNED BY\tOLD\tNEW\n")
		for _, s := range r.Sequences {
			nv := seqValue(s.New)
			if !s.OnNew {
				nv = "missing"
			}
			p("%s\t%s\t%s\t%s\n", s.Name, orDash(s.OwnedBy), seqValue(s.Old), nv)
		}
	}
}

// writeOldWrites lists the triggers and the foreign keys on old that
// write, if any: writes the row images do not capture.
func (r *Report) writeOldWrites(out textReport) {
	p, section := out.p, out.section
	if len(r.Triggers) > 0 {
		section("TRIGGERS ON OLD (row images do not capture writes a trigger makes to other tables)")
		p("TABLE\tTRIGGER\tENABLED\tDEFINITION\n")
		for _, tr := range r.Triggers {
			p("%s\t%s\t%s\t%s\n", tr.Table, tr.Name, yesNo(tr.Enabled), tr.Definition)
		}
	}
	if len(r.ForeignKeys) > 0 {
		section("FOREIGN KEYS ON OLD THAT WRITE (cascaded writes are not in row images)")
		p("TABLE\tREFERENCES\tNAME\tON DELETE\tON UPDATE\n")
		for _, fk := range r.ForeignKeys {
			p("%s\t%s\t%s\t%s\t%s\n", fk.Table, fk.References, fk.Name, fk.OnDelete, fk.OnUpdate)
		}
	}
}

// writeExtensions lists the extensions on old missing on new, if any.
func (r *Report) writeExtensions(out textReport) {
	p, section := out.p, out.section
	var missing []Extension
	for _, e := range r.Extensions {
		if !e.OnNew {
			missing = append(missing, e)
		}
	}
	if len(missing) > 0 {
		section("EXTENSIONS ON OLD MISSING ON NEW")
		p("EXTENSION\tVERSION\tUSED BY\n")
		for _, e := range missing {
			p("%s\t%s\t%s\n", e.Name, e.Version, orDash(strings.Join(e.UsedBy, ", ")))
		}
	}
}

// writeVerdicts is the VERDICTS: each reason, worst first, then the
// overall verdict and the tables' counts.
func (r *Report) writeVerdicts(out textReport) {
	p, section := out.p, out.section
	section("VERDICTS")
	var counts [3]int
	for _, v := range []Verdict{Blocked, Attention} {
		for _, s := range r.Stores {
			for _, why := range s.Reasons {
				if why.Verdict == v {
					p("%s\tstore %s\t%s\n", v, s.Name, why.Text)
				}
			}
		}
		for _, t := range r.Tables {
			if t.Verdict != v {
				continue
			}
			for _, why := range t.Reasons {
				if why.Verdict > Ready {
					p("%s\t%s\t%s\n", why.Verdict, t.Name, why.Text)
				}
			}
		}
		for _, f := range r.Findings {
			if f.Verdict == v {
				p("%s\t-\t%s\n", v, f.Text)
			}
		}
	}
	for _, t := range r.Tables {
		counts[t.Verdict]++
	}
	out.tw.Flush()
	fmt.Fprintf(out.tw, "\nverdict: %s (exit status %d): %d table(s) blocked, %d need attention, %d ready\n",
		r.Verdict, int(r.Verdict), counts[Blocked], counts[Attention], counts[Ready])
}

// estimate is the BACKFILL column: the extrapolated time, or why there is none.
func (s *Sample) estimate() string {
	switch {
	case s == nil:
		return "-"
	case s.Error != "":
		return "sample failed"
	}
	return roundDuration(s.Estimate.D())
}

// roundDuration keeps two or three significant figures.
func roundDuration(d time.Duration) string {
	switch {
	case d <= 0:
		return "0s"
	case d < time.Millisecond:
		return "<1ms"
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	case d < time.Hour:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}

func seqValue(v *int64) string {
	if v == nil {
		return "unused"
	}
	return strconv.FormatInt(*v, 10)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
