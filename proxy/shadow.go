package proxy

import (
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
)

// Shadow reads (design section 5). A sampled read is served as usual; its
// reply is copied as it goes to the client (up to shadow.max_result_bytes)
// and handed, with its statement and parameters, to a bounded queue. A
// small pool of workers runs it on the other store (the same store in A/A
// mode) on connections of their own and compares the two results after
// normalisation. The client never waits for any of it: a full queue drops
// the sample and counts it.
//
// A difference is not yet a mismatch: the two reads ran at different
// moments while writes went on. The worker first re-reads both stores at
// once; if they now agree the difference was a race (transient). If they
// still differ, it confirms under lock (see confirm): with writes to the
// read's tables held on the primary, a secondary that does not come to
// agree within shadow.settle is a mismatch. Re-reading alone cannot tell a
// real difference from a row that went A -> B -> A between the reads; the
// lock can.

// shadowJob is one sampled read waiting for its shadow run.
type shadowJob struct {
	sql         string
	fingerprint string
	tables      []string
	extended    bool
	params      [][]byte
	paramFmts   []int16
	paramOIDs   []uint32
	resultFmts  []int16
	user, db    string
	startup     map[string]string
	gucs        [][2]string // the session's SET values (nil: none)
	served      route.Store // the store whose reply the client got
	shadowOn    route.Store
	primary     route.Store
	result      shadow.Result
	shape       shadow.Shape   // how to compare, from the statement's text
	desc        []shadow.Field // the statement's columns from an earlier Describe, if known
	servedDur   time.Duration
	aa          bool
}

// capture copies a served read's reply as it goes to the client.
type capture struct {
	res   shadow.Result
	size  int
	limit int
	over  bool // bigger than the limit, or a partial (suspended) portal
	cols  [][]byte
}

func (c *capture) reset() {
	c.res, c.size, c.over = shadow.Result{}, 0, false
}

func (c *capture) add(typ byte, body []byte) {
	if c.over {
		return
	}
	switch typ {
	case 'T':
		fs, err := decodeRowDescription(body)
		if err != nil {
			c.over = true
			return
		}
		c.res.Fields = shadowFields(fs)
	case 'D':
		cols, err := splitDataRow(body, c.cols)
		if err != nil {
			c.over = true
			return
		}
		c.cols = cols
		row := make([][]byte, len(cols))
		for i, v := range cols {
			if v != nil {
				row[i] = append([]byte{}, v...)
				c.size += len(v)
			}
		}
		c.size += 8 * len(cols)
		c.res.Rows = append(c.res.Rows, row)
		if c.size > c.limit {
			c.over = true
			c.res.Rows = nil
		}
	case 'E':
		c.res.ErrCode, c.res.ErrMsg = errorFields(body)
	case 's':
		c.over = true // a portal run with a row limit: only part of the result
	}
}

// shadowFields reads each field's type and format from its raw bytes.
func shadowFields(fs []field) []shadow.Field {
	out := make([]shadow.Field, len(fs))
	for i, f := range fs {
		out[i].Name = f.name
		// name\0, table oid int32, attnum int16, type oid int32, typlen
		// int16, typmod int32, format int16.
		rest := f.raw[len(f.name)+1:]
		if len(rest) >= 18 {
			out[i].OID = binary.BigEndian.Uint32(rest[6:10])
			out[i].Format = int16(binary.BigEndian.Uint16(rest[16:18]))
		}
	}
	return out
}

// shadowSample decides whether the read in un is shadowed and, if so,
// prepares its job and starts capturing its reply. It returns nil when it
// is not: not sampled, not one statement, or known to be incomparable.
func (rs *routedSession) shadowSample(un *unit) *shadowJob {
	tables := un.tables
	sh := rs.srv.shadow
	st := rs.state
	if sh == nil || st.Shadow <= 0 || rand.IntN(100) >= st.Shadow {
		return nil
	}
	j := &shadowJob{tables: tables, user: rs.ss.user, db: rs.ss.database, startup: rs.ss.params,
		primary: st.Primary, aa: sh.settings().aa}
	executes := 0
	for i, m := range un.msgs {
		d := &un.dec[i]
		switch m.typ {
		case 'Q':
			p := d.plan
			if p.Err != nil || len(p.Stmts) != 1 {
				return nil
			}
			j.sql, j.fingerprint = p.Stmts[0].SQL, p.Stmts[0].Fingerprint
			executes++
		case 'B':
			if d.err != nil || d.stmt == nil {
				return nil
			}
			// A statement parsed in this unit has no Describe answer or
			// inferred types yet: those fields are nil.
			si, b := d.stmt, d.bind
			oids, inferred := si.oids, si.paramDesc
			j.desc = si.desc
			p := si.plan
			if p.Err != nil || len(p.Stmts) != 1 {
				return nil
			}
			j.extended, j.sql, j.fingerprint = true, si.sql, p.Stmts[0].Fingerprint
			j.params = b.params
			j.paramFmts = int16s(b.paramFormats)
			j.resultFmts = int16s(b.resultFormats)
			// The parameters' types, as the client named them or else as the
			// store inferred them: binary parameters must be read as the
			// same type on the other store, whatever its columns' types.
			j.paramOIDs = make([]uint32, len(b.params))
			copy(j.paramOIDs, oids)
			for i := range j.paramOIDs {
				if j.paramOIDs[i] == 0 && i < len(inferred) {
					j.paramOIDs[i] = inferred[i]
				}
			}
		case 'E':
			if d.maxRows != 0 {
				return nil // a row limit: the result comes in parts
			}
			executes++
		case 'F':
			return nil
		}
	}
	if executes != 1 || j.sql == "" {
		return nil
	}
	if ms := rs.srv.mappings.Load(); ms != nil {
		for _, t := range tables {
			if ms.ForOld(writtenName(t)) == nil {
				sh.count(j.fingerprint, metrics.ShadowSkipped, "outside_scope")
				return nil
			}
		}
	}
	if rs.srv.driftBlocks(tables) {
		sh.count(j.fingerprint, metrics.ShadowSkipped, "open_drift")
		return nil
	}
	if rs.gucDirty {
		rs.gucDirty = false
		rs.gucs = rs.sessionSettings()
	}
	j.gucs = rs.gucs
	rs.capture = &capture{limit: sh.settings().maxResult}
	return j
}

func int16s(v []int) []int16 {
	out := make([]int16, len(v))
	for i, x := range v {
		out[i] = int16(x)
	}
	return out
}

// sessionSettings reads the session's own SET values from its home store,
// for the shadow connections to copy. On failure (nil) the shadow runs
// with the connection's defaults.
func (rs *routedSession) sessionSettings() [][2]string {
	src := rs.home
	if src == nil || src.up == nil || src.dead != nil || rs.txState != 'I' {
		return nil
	}
	sets, err := rs.sessionSETs(src)
	if err != nil {
		return nil
	}
	// The shadow connection names itself (application_name "tandem shadow").
	return slices.DeleteFunc(sets, func(kv [2]string) bool { return kv[0] == "application_name" })
}

// shadowDone hands the captured read to the shadow workers.
func (rs *routedSession) shadowDone(j *shadowJob, start time.Time) {
	c := rs.capture
	rs.capture = nil
	sh := rs.srv.shadow
	if c == nil || sh == nil {
		return
	}
	if c.over {
		sh.count(j.fingerprint, metrics.ShadowSkipped, "result_too_large")
		return
	}
	if rs.servedBy == "" {
		return
	}
	j.served = rs.servedBy
	j.shadowOn = otherStore(j.served)
	if j.aa {
		j.shadowOn = j.served
	}
	j.result = c.res
	if j.extended {
		// A Bind/Execute unit carries no RowDescription when the
		// statement was described before; a statement Describe reports
		// text formats: the Bind's result formats are the truth.
		if j.result.Fields == nil && j.desc != nil {
			j.result.Fields = append([]shadow.Field(nil), j.desc...)
		}
		for i := range j.result.Fields {
			j.result.Fields[i].Format = formatOf(j.resultFmts, i)
		}
	}
	j.servedDur = time.Since(start)
	select {
	case sh.queue <- j:
	default:
		sh.count(j.fingerprint, metrics.ShadowDropped, "")
	}
}

func otherStore(s route.Store) route.Store {
	if s == route.New {
		return route.Old
	}
	return route.New
}
