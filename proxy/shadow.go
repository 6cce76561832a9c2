package proxy

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/pgwire"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
	"github.com/tandemdb/tandem/internal/shadowpool"
)

// Shadow reads (design section 5). A sampled read is served as usual; its
// reply is copied as it goes to the client (up to shadow.max_result_bytes)
// and handed, with its statement and parameters, to a bounded queue. A
// small pool of workers (internal/shadowpool) runs it on the other store (the same store in A/A
// mode) on connections of their own and compares the two results after
// normalisation. The client never waits for any of it: a full queue drops
// the sample and counts it.
//
// A difference is not yet a mismatch: the two reads ran at different
// moments while writes went on. The worker first re-reads both stores at
// once; if they now agree the difference was a race (transient). If they
// still differ, it confirms under lock (shadowpool's confirm): with writes to the
// read's tables held on the primary, a secondary that does not come to
// agree within shadow.settle is a mismatch. Re-reading alone cannot tell a
// real difference from a row that went A -> B -> A between the reads; the
// lock can. This file holds the proxy's side: the sample, the capture
// and the hand-off (shadowDone).

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
	case pgwire.ServerRowDescription:
		fs, err := decodeRowDescription(body)
		if err != nil {
			c.over = true
			return
		}
		c.res.Fields = shadowFields(fs)
	case pgwire.ServerDataRow:
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
	case pgwire.ServerErrorResponse:
		c.res.ErrCode, c.res.ErrMsg = pgwire.ErrorFields(body)
	case pgwire.ServerPortalSuspended:
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
func (rs *routedSession) shadowSample(un *unit) *shadowpool.Job {
	tables := un.tables
	sh := rs.srv.shadow
	st := rs.state
	if sh == nil || st.Shadow <= 0 || rand.IntN(100) >= st.Shadow {
		return nil
	}
	j := &shadowpool.Job{User: rs.ss.user, DB: rs.ss.database, Startup: rs.ss.params,
		Primary: st.Primary, Secondary: st.Secondary(), AA: sh.Settings().AA}
	executes := 0
	for i, m := range un.msgs {
		d := &un.dec[i]
		switch m.typ {
		case pgwire.ClientQuery:
			p := d.plan
			if p.Err != nil || len(p.Stmts) != 1 {
				return nil
			}
			j.SQL, j.Fingerprint = p.Stmts[0].SQL, p.Stmts[0].Fingerprint
			executes++
		case pgwire.ClientBind:
			if d.err != nil || d.stmt == nil {
				return nil
			}
			// A statement parsed in this unit has no Describe answer or
			// inferred types yet: those fields are nil.
			si, b := d.stmt, d.bind
			oids, inferred := si.oids, si.paramDesc
			j.Desc = si.desc
			p := si.plan
			if p.Err != nil || len(p.Stmts) != 1 {
				return nil
			}
			j.Extended, j.SQL, j.Fingerprint = true, si.sql, p.Stmts[0].Fingerprint
			j.Params = b.params
			j.ParamFmts = int16s(b.paramFormats)
			j.ResultFmts = int16s(b.resultFormats)
			// The parameters' types, as the client named them or else as the
			// store inferred them: binary parameters must be read as the
			// same type on the other store, whatever its columns' types.
			j.ParamOIDs = make([]uint32, len(b.params))
			copy(j.ParamOIDs, oids)
			for i := range j.ParamOIDs {
				if j.ParamOIDs[i] == 0 && i < len(inferred) {
					j.ParamOIDs[i] = inferred[i]
				}
			}
		case pgwire.ClientExecute:
			if d.maxRows != 0 {
				return nil // a row limit: the result comes in parts
			}
			executes++
		case pgwire.ClientFunctionCall:
			return nil
		}
	}
	if executes != 1 || j.SQL == "" {
		return nil
	}
	if ms := rs.srv.mappings.Load(); ms != nil {
		for _, t := range tables {
			if ms.ForOld(writtenName(t)) == nil {
				sh.Count(j.Fingerprint, metrics.ShadowSkipped, "outside_scope")
				return nil
			}
		}
	}
	if rs.srv.driftBlocks(tables) {
		sh.Count(j.Fingerprint, metrics.ShadowSkipped, "open_drift")
		return nil
	}
	for _, t := range tables {
		j.Tables = append(j.Tables, writtenName(t))
	}
	if rs.gucDirty {
		rs.gucDirty = false
		rs.gucs = rs.sessionSettings()
	}
	j.GUCs = rs.gucs
	rs.capture = &capture{limit: sh.Settings().MaxResult}
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
	if src == nil || src.up == nil || src.dead != nil || rs.txState != pgwire.TxIdle {
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
func (rs *routedSession) shadowDone(j *shadowpool.Job, start time.Time) {
	c := rs.capture
	rs.capture = nil
	sh := rs.srv.shadow
	if c == nil || sh == nil {
		return
	}
	if c.over {
		sh.Count(j.Fingerprint, metrics.ShadowSkipped, "result_too_large")
		return
	}
	if rs.servedBy == "" {
		return
	}
	j.Served = rs.servedBy
	j.ShadowOn = otherStore(j.Served)
	if j.AA {
		j.ShadowOn = j.Served
	}
	j.Result = c.res
	if j.Extended {
		// A Bind/Execute unit carries no RowDescription when the
		// statement was described before; a statement Describe reports
		// text formats: the Bind's result formats are the truth.
		if j.Result.Fields == nil && j.Desc != nil {
			j.Result.Fields = append([]shadow.Field(nil), j.Desc...)
		}
		for i := range j.Result.Fields {
			j.Result.Fields[i].Format = shadowpool.FormatOf(j.ResultFmts, i)
		}
	}
	j.ServedDur = time.Since(start)
	sh.Submit(j)
}

func otherStore(s route.Store) route.Store {
	if s == route.New {
		return route.Old
	}
	return route.New
}

// newShadowPool starts the shadow workers, with the server's stores,
// mappings, metrics and settings.
func (s *Server) newShadowPool() *shadowpool.Pool {
	c := s.config().Shadow
	return shadowpool.New(shadowpool.Options{
		Workers:  c.Workers,
		Queue:    c.Queue,
		Settings: shadowSettingsOf(s.config()),
		Config: func(name route.Store, user, db string) *pgconn.Config {
			st := s.old
			if name == route.New {
				st = s.new
			}
			if st == nil {
				return nil
			}
			cfg := st.cfg.Copy()
			cfg.User, cfg.Database, cfg.Password = st.login(user, db)
			if cfg.Password == "" && st.passfile != nil {
				cfg.Password = st.passfile.FindPassword(cfg.Host, fmt.Sprint(cfg.Port), cfg.Database, cfg.User)
			}
			return cfg
		},
		Mappings: s.mappings.Load,
		Record: func(ctx context.Context, r mismatch.Record) error {
			if s.recordMismatch == nil {
				return nil
			}
			return s.recordMismatch(ctx, r)
		},
		BeforeRun: func() {
			if k := s.knobs.BeforeShadow; k != nil {
				k()
			}
		},
		Metrics: s.metrics.R(),
		Log:     s.log,
	})
}

// shadowSettingsOf is the shadow section's reloadable settings.
func shadowSettingsOf(cfg *config.Config) *shadowpool.Settings {
	c := cfg.Shadow
	settle := c.Settle.Duration()
	if settle <= 0 {
		settle = cfg.Routing.MirrorBudget.Duration()
	}
	return &shadowpool.Settings{AA: c.AA, MaxResult: int(c.MaxResultBytes), Timeout: c.Timeout.Duration(), Settle: settle,
		Redact: !c.RecordValues, Compare: shadow.Options{FloatTolerance: c.FloatTolerance}}
}

// TakeShadowCounts returns the shadow-read outcomes per fingerprint since
// the last call, for the control plane to store.
func (s *Server) TakeShadowCounts() map[string]mismatch.Counts {
	if s.shadow == nil {
		return nil
	}
	return s.shadow.TakeCounts()
}
