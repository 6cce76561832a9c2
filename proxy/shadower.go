package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/time/rate"
)

// The shadow worker pool: sampled reads (shadow.go captures and hands them
// off) are run again on the other store, compared, confirmed under lock
// when they differ, and counted or recorded as mismatches.

// shadower runs the shadow workers.
type shadower struct {
	srv      *Server
	set      atomic.Pointer[shadowSettings] // replaced whole by a reload
	queue    chan *shadowJob
	record   func(ctx context.Context, r mismatch.Record) error
	confirms *rate.Limiter // locked confirmations: they make writers wait
	rewrites rewriteCache

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once

	mu       sync.Mutex
	idle     map[shadowConnKey][]*shadowConn
	counts   map[string]*mismatch.Counts // since the last TakeShadowCounts
	recorded map[string]*recordBudget
	fps      map[string]bool // fingerprints with their own metric series
}

type shadowConnKey struct {
	store    string
	user, db string
	gucs     string // for grouping a batch only: a connection takes any settings
}

type shadowConn struct {
	pc   *pgconn.PgConn
	gucs string // the settings applied, as a key
}

// recordBudget caps stored mismatches per fingerprint per minute.
type recordBudget struct {
	minute time.Time
	n      int
}

const (
	recordsPerMinute = 20  // mismatch records stored per fingerprint per minute (all are counted)
	metricFPs        = 500 // fingerprints with their own metric series; the rest are "other"
)

// shadowSettings are the shadow section's settings that a reload can
// change; workers and the queue's length keep their values until a restart.
type shadowSettings struct {
	aa        bool
	maxResult int
	timeout   time.Duration
	settle    time.Duration
	redact    bool
	opts      shadow.Options
}

func shadowSettingsOf(cfg *config.Config) *shadowSettings {
	c := cfg.Shadow
	settle := c.Settle.Duration()
	if settle <= 0 {
		settle = cfg.Routing.MirrorBudget.Duration()
	}
	return &shadowSettings{aa: c.AA, maxResult: int(c.MaxResultBytes), timeout: c.Timeout.Duration(), settle: settle,
		redact: !c.RecordValues, opts: shadow.Options{FloatTolerance: c.FloatTolerance}}
}

// settings returns the settings in force now.
func (sh *shadower) settings() *shadowSettings { return sh.set.Load() }

func newShadower(s *Server, record func(context.Context, mismatch.Record) error) *shadower {
	c := s.config().Shadow
	sh := &shadower{srv: s,
		queue: make(chan *shadowJob, c.Queue), record: record, confirms: rate.NewLimiter(2, 4),
		idle: map[shadowConnKey][]*shadowConn{}, counts: map[string]*mismatch.Counts{},
		recorded: map[string]*recordBudget{}, fps: map[string]bool{}}
	sh.set.Store(shadowSettingsOf(s.config()))
	sh.ctx, sh.cancel = context.WithCancel(context.Background())
	for range c.Workers {
		sh.wg.Add(1)
		go func() {
			defer sh.wg.Done()
			for {
				select {
				case <-sh.ctx.Done():
					return
				case j := <-sh.queue:
					// Take what else is waiting: the batch's shadow runs go
					// to each store in one pipeline, one write and one
					// wake-up for all of them.
					jobs := []*shadowJob{j}
				more:
					for len(jobs) < maxShadowBatch {
						select {
						case j := <-sh.queue:
							jobs = append(jobs, j)
						default:
							break more
						}
					}
					sh.processBatch(jobs)
				}
			}
		}()
	}
	return sh
}

// stop ends the workers and closes their connections.
func (sh *shadower) stop() {
	sh.stopOnce.Do(sh.stopNow)
}

func (sh *shadower) stopNow() {
	sh.cancel()
	sh.wg.Wait()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	for k, cs := range sh.idle {
		for _, c := range cs {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_ = c.pc.Close(ctx)
			cancel()
		}
		delete(sh.idle, k)
	}
}

// count records one outcome, in the metrics and in the counters flushed
// to the control schema.
func (sh *shadower) count(fp, outcome, reason string) {
	sh.mu.Lock()
	c := sh.countsOf(fp)
	switch outcome {
	case metrics.ShadowMatched:
		c.Matched++
	case metrics.ShadowMismatched:
		c.Mismatched++
	case metrics.ShadowTransient:
		c.Transient++
	case metrics.ShadowDropped:
		c.Dropped++
	case metrics.ShadowSkipped:
		c.Skipped++
	}
	mfp := fp
	if !sh.fps[fp] {
		if len(sh.fps) < metricFPs {
			sh.fps[fp] = true
		} else {
			mfp = "other"
		}
	}
	sh.mu.Unlock()
	sh.srv.metrics.R().Shadow(sh.ctx, mfp, outcome, reason)
}

// latency adds one compared read's served and shadow time to fp's counters.
func (sh *shadower) latency(fp string, served, shadowDur time.Duration) {
	sh.mu.Lock()
	c := sh.countsOf(fp)
	c.ServedSeconds += served.Seconds()
	c.ShadowSeconds += shadowDur.Seconds()
	sh.mu.Unlock()
}

// countsOf returns fp's counters since the last TakeShadowCounts; sh.mu
// must be held.
func (sh *shadower) countsOf(fp string) *mismatch.Counts {
	c := sh.counts[fp]
	if c == nil {
		c = &mismatch.Counts{}
		sh.counts[fp] = c
	}
	return c
}

// TakeShadowCounts returns the shadow-read outcomes per fingerprint since
// the last call, for the control plane to store.
func (s *Server) TakeShadowCounts() map[string]mismatch.Counts {
	sh := s.shadow
	if sh == nil {
		return nil
	}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	out := make(map[string]mismatch.Counts, len(sh.counts))
	for fp, c := range sh.counts {
		out[fp] = *c
	}
	clear(sh.counts)
	return out
}

// errSkip is a shadow run that cannot be compared; its text is the reason.
type errSkip string

func (e errSkip) Error() string { return string(e) }

// process runs one job to its outcome.
// maxShadowBatch bounds the samples a worker runs in one pipeline.
const maxShadowBatch = 32

// processBatch runs jobs to their outcomes: the first shadow run of the
// jobs that share a connection (store, user, database, settings) goes in
// one pipeline, each query with its own Sync so that one failing does not
// touch the others; the rest of each job runs on its own.
func (sh *shadower) processBatch(jobs []*shadowJob) {
	type group struct {
		jobs []*shadowJob
		sqls []string
	}
	groups := map[shadowConnKey]*group{}
	var order []shadowConnKey
	for _, j := range jobs {
		if !sh.prepare(j) {
			continue
		}
		sql, err := sh.sqlFor(j, j.shadowOn)
		if err != nil {
			sh.skip(j, err)
			continue
		}
		k := shadowConnKey{store: string(j.shadowOn), user: j.user, db: j.db, gucs: gucKey(j.gucs)}
		g := groups[k]
		if g == nil {
			g = &group{}
			groups[k] = g
			order = append(order, k)
		}
		g.jobs, g.sqls = append(g.jobs, j), append(g.sqls, sql)
	}
	for _, k := range order {
		g := groups[k]
		results, errs, durs := sh.runPipeline(g.jobs, g.sqls, route.Store(k.store))
		for i, j := range g.jobs {
			if errs[i] != nil {
				sh.skip(j, errs[i])
				continue
			}
			sh.finish(j, results[i], durs[i])
		}
	}
}

// prepare decides whether j can be compared and completes what it needs;
// it counts j as skipped when not.
func (sh *shadower) prepare(j *shadowJob) bool {
	if k := sh.srv.knobs.BeforeShadow; k != nil {
		k()
	}
	shape := classify.ShapeOf(j.sql)
	if !shape.Comparable {
		sh.count(j.fingerprint, metrics.ShadowSkipped, skipReason(shape.Reason))
		return false
	}
	j.shape = shadow.Shape{Ordered: shape.Ordered, Limited: shape.Limited, Offset: shape.Offset}
	for _, k := range shape.SortKeys {
		j.shape.SortKeys = append(j.shape.SortKeys, shadow.SortKey{Name: k.Name, Pos: k.Pos})
	}
	if j.result.Fields == nil && j.result.ErrCode == "" {
		// Columns never described in this session (prepared before it left
		// the byte relay): ask the store that served it.
		fs, err := sh.describe(j)
		if err != nil {
			sh.skip(j, err)
			return false
		}
		j.result.Fields = fs
	}
	return true
}

// runPipeline runs each job's statement (sqls[i], as it runs on st) in one
// pipeline on one connection, and returns each one's result, error and
// latency (from the pipeline's start to its result).
func (sh *shadower) runPipeline(jobs []*shadowJob, sqls []string, st route.Store) ([]shadow.Result, []error, []time.Duration) {
	results := make([]shadow.Result, len(jobs))
	errs := make([]error, len(jobs))
	durs := make([]time.Duration, len(jobs))
	fail := func(err error) ([]shadow.Result, []error, []time.Duration) {
		for i := range errs {
			if errs[i] == nil {
				errs[i] = err
			}
		}
		return results, errs, durs
	}
	ctx, cancel := context.WithTimeout(sh.ctx, sh.settings().timeout)
	defer cancel()
	c, key, err := sh.conn(ctx, st, jobs[0])
	if err != nil {
		return fail(err)
	}
	defer sh.put(key, c)
	start := time.Now()
	p := c.pc.StartPipeline(ctx)
	for i, j := range jobs {
		params, oids, fmts, rfmts := j.bindArgs()
		p.SendQueryParams(sqls[i], params, oids, fmts, rfmts)
		p.SendPipelineSync()
	}
	if err := p.Flush(); err != nil {
		_ = p.Close()
		return fail(err)
	}
	for i := range jobs {
		r, err := p.GetResults()
		var pe *pgconn.PgError
		switch {
		case errors.As(err, &pe):
			results[i].ErrCode, results[i].ErrMsg = pe.Code, pe.Message
		case err != nil:
			_ = p.Close()
			return fail(err)
		default:
			rr, ok := r.(*pgconn.ResultReader)
			if !ok {
				_ = p.Close()
				return fail(fmt.Errorf("shadow pipeline: unexpected %T", r))
			}
			results[i], errs[i] = sh.readResult(rr)
		}
		durs[i] = time.Since(start)
		if _, err := p.GetResults(); err != nil { // the query's Sync
			_ = p.Close()
			return fail(err)
		}
	}
	if err := p.Close(); err != nil {
		return fail(err)
	}
	return results, errs, durs
}

// finish compares a job's shadow result with its served one and, when they
// differ, re-reads and confirms.
func (sh *shadower) finish(j *shadowJob, other shadow.Result, dur time.Duration) {
	sshape := j.shape
	m := sh.srv.metrics.R()
	m.ShadowLatency(sh.ctx, string(j.served), "served", j.servedDur)
	m.ShadowLatency(sh.ctx, string(j.shadowOn), "shadow", dur)
	sh.latency(j.fingerprint, j.servedDur, dur)
	if shadow.Compare(j.result, other, sshape, sh.settings().opts) == nil {
		sh.count(j.fingerprint, metrics.ShadowMatched, "")
		return
	}

	// A difference. First re-read both stores at once: a race with a
	// write that has since landed on both ends here.
	prim, sec := j.primary, otherStore(j.primary)
	if j.aa {
		prim, sec = j.served, j.served
	}
	var p1, s1 shadow.Result
	var perr, serr error
	var wg sync.WaitGroup
	wg.Go(func() { p1, _, perr = sh.run(j, prim) })
	wg.Go(func() { s1, _, serr = sh.run(j, sec) })
	wg.Wait()
	if err := errors.Join(perr, serr); err != nil {
		sh.skip(j, err)
		return
	}
	if a, b := sh.orient(j, prim, p1, s1); shadow.Compare(a, b, sshape, sh.settings().opts) == nil {
		sh.count(j.fingerprint, metrics.ShadowTransient, "")
		return
	}
	// Still different: confirm with the writes to its tables held.
	if !sh.confirms.Allow() {
		sh.count(j.fingerprint, metrics.ShadowSkipped, "unconfirmed")
		return
	}
	d, err := sh.confirm(j, prim, sec, sshape)
	switch {
	case err != nil:
		sh.skip(j, err)
	case d == nil:
		sh.count(j.fingerprint, metrics.ShadowTransient, "")
	default:
		sh.count(j.fingerprint, metrics.ShadowMismatched, "")
		sh.srv.log.Warn("shadow read mismatch", "fingerprint", j.fingerprint, "served_by", j.served, "shadow_on", j.shadowOn,
			"kind", d.Kind, "summary", d.Summary)
		sh.store(j, d)
	}
}

// orient returns the primary's and the secondary's results as (served,
// shadow), the way the client's read saw them.
func (sh *shadower) orient(j *shadowJob, prim route.Store, p, s shadow.Result) (shadow.Result, shadow.Result) {
	if j.served == prim {
		return p, s
	}
	return s, p
}

// confirm decides whether a difference is real. In a transaction on the
// primary it takes SHARE locks on the read's tables: in-flight writes end
// (their mirror on the secondary follows within the mirror budget) and new
// ones wait. It reads the primary, then reads the secondary until it
// agrees or shadow.settle has passed. A secondary that still differs from
// a primary nobody can write to is a mismatch. Writers wait at most
// lock_timeout plus settle, and confirmations are rate-limited.
func (sh *shadower) confirm(j *shadowJob, prim, sec route.Store, shape shadow.Shape) (*shadow.Diff, error) {
	sql, err := sh.sqlFor(j, prim)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(sh.ctx, sh.settings().timeout+sh.settings().settle)
	defer cancel()
	c, key, err := sh.conn(ctx, prim, j)
	if err != nil {
		return nil, err
	}
	defer sh.put(key, c)
	lock := "BEGIN; SET LOCAL lock_timeout = '200ms'; LOCK TABLE " + strings.Join(sh.lockNames(j, prim), ", ") + " IN SHARE MODE"
	if _, err := c.pc.Exec(ctx, lock).ReadAll(); err != nil {
		_, _ = c.pc.Exec(ctx, "ROLLBACK").ReadAll()
		var pe *pgconn.PgError
		if errors.As(err, &pe) {
			return nil, errSkip("cannot hold writes for the confirmation: " + pe.Code)
		}
		return nil, err
	}
	defer func() { _, _ = c.pc.Exec(context.WithoutCancel(ctx), "ROLLBACK").ReadAll() }()
	p, err := sh.exec(ctx, c.pc, sql, j)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(sh.settings().settle)
	for {
		s, _, err := sh.run(j, sec)
		if err != nil {
			return nil, err
		}
		served, shadowRes := sh.orient(j, prim, p, s)
		d := shadow.Compare(served, shadowRes, shape, sh.settings().opts)
		if d == nil || time.Now().After(deadline) {
			return d, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// lockNames are the tables j reads, quoted, as named on store st.
func (sh *shadower) lockNames(j *shadowJob, st route.Store) []string {
	ms := sh.srv.mappings.Load()
	var out []string
	seen := map[string]bool{}
	for _, t := range j.tables {
		n := writtenName(t)
		if ms != nil {
			if m := ms.ForOld(n); m != nil {
				n = m.Old.Name
				if st == route.New {
					n = m.New.Name
				}
			}
		}
		q := pgx.Identifier{n.Schema, n.Table}.Sanitize()
		if !seen[q] {
			seen[q] = true
			out = append(out, q)
		}
	}
	return out
}

// skipReason turns a ReadShape reason into a metric label: its words up
// to the first detail ("volatile function random()" -> "volatile_function").
func skipReason(reason string) string {
	words := strings.Fields(reason)
	if len(words) > 2 {
		words = words[:2]
	}
	return strings.ToLower(strings.Join(words, "_"))
}

func (sh *shadower) skip(j *shadowJob, err error) {
	var sk errSkip
	if errors.As(err, &sk) {
		sh.count(j.fingerprint, metrics.ShadowSkipped, skipReason(string(sk)))
		return
	}
	if sh.ctx.Err() != nil {
		return
	}
	sh.srv.log.Debug("shadow read could not run", "fingerprint", j.fingerprint, "error", err)
	sh.count(j.fingerprint, metrics.ShadowSkipped, "store_error")
}

// store records a confirmed mismatch, within the per-fingerprint budget.
func (sh *shadower) store(j *shadowJob, d *shadow.Diff) {
	if sh.record == nil {
		return
	}
	now := time.Now()
	sh.mu.Lock()
	b := sh.recorded[j.fingerprint]
	if b == nil || now.Sub(b.minute) >= time.Minute {
		b = &recordBudget{minute: now}
		sh.recorded[j.fingerprint] = b
	}
	b.n++
	over := b.n > recordsPerMinute
	sh.mu.Unlock()
	if over {
		return
	}
	if sh.settings().redact {
		dc := *d
		dc.Changed = slices.Clone(d.Changed)
		for i := range dc.Changed {
			dc.Changed[i].Columns = maps.Clone(d.Changed[i].Columns)
		}
		dc.Redact()
		d = &dc
	}
	diff, err := json.Marshal(d)
	if err != nil {
		return
	}
	rec := mismatch.Record{Fingerprint: j.fingerprint, Statement: j.sql, ServedBy: string(j.served),
		ShadowOn: string(j.shadowOn), AA: j.aa, Kind: d.Kind, Summary: d.Summary, Diff: diff}
	if !sh.settings().redact && j.params != nil {
		rec.Params = make([]*string, len(j.params))
		for i, p := range j.params {
			if p == nil {
				continue
			}
			v := string(p)
			if formatOf(j.paramFmts, i) == 1 {
				// Binary: readable when the type is known, hex otherwise.
				v = shadow.Canonical(j.paramOIDs[i], 1, p)
			}
			rec.Params[i] = &v
		}
	}
	ctx, cancel := context.WithTimeout(sh.ctx, 5*time.Second)
	defer cancel()
	if err := sh.record(ctx, rec); err != nil {
		sh.srv.log.Warn("could not store a shadow mismatch", "fingerprint", j.fingerprint, "error", err)
	}
}

func formatOf(fmts []int16, i int) int16 {
	switch {
	case len(fmts) == 0:
		return 0
	case len(fmts) == 1:
		return fmts[0]
	case i < len(fmts):
		return fmts[i]
	}
	return 0
}

// sqlFor is j's statement as it runs on st: the client's text on old, the
// text rewritten through the table mappings on new.
func (sh *shadower) sqlFor(j *shadowJob, st route.Store) (string, error) {
	if st != route.New {
		return j.sql, nil
	}
	ms := sh.srv.mappings.Load()
	if ms == nil {
		return j.sql, nil
	}
	c := &sh.rewrites
	c.mu.Lock()
	if c.ms != ms {
		// New mappings: forget the old rewrites; parse nothing at all when
		// every table maps to itself.
		c.ms, c.m, c.reshaped = ms, map[string]rewritten{}, false
		for _, m := range ms.All() {
			if !m.Identity() {
				c.reshaped = true
			}
		}
	}
	if !c.reshaped {
		c.mu.Unlock()
		return j.sql, nil
	}
	r, ok := c.m[j.sql]
	c.mu.Unlock()
	if !ok {
		r.sql, r.ok, r.reason = ms.RewriteRead(j.sql)
		c.mu.Lock()
		if c.ms == ms {
			if len(c.m) >= 4096 {
				clear(c.m)
			}
			c.m[j.sql] = r
		}
		c.mu.Unlock()
	}
	if !r.ok {
		return "", errSkip("not rewritable for new: " + r.reason)
	}
	return r.sql, nil
}

// rewriteCache holds reads rewritten for new, for one set of mappings.
type rewriteCache struct {
	mu       sync.Mutex
	ms       *table.Mappings
	reshaped bool // some table maps to another name or shape
	m        map[string]rewritten
}

type rewritten struct {
	sql    string
	ok     bool
	reason string
}

// run executes j's statement on store st and returns its result.
func (sh *shadower) run(j *shadowJob, st route.Store) (shadow.Result, time.Duration, error) {
	sql, err := sh.sqlFor(j, st)
	if err != nil {
		return shadow.Result{}, 0, err
	}
	ctx, cancel := context.WithTimeout(sh.ctx, sh.settings().timeout)
	defer cancel()
	c, key, err := sh.conn(ctx, st, j)
	if err != nil {
		return shadow.Result{}, 0, err
	}
	start := time.Now()
	res, err := sh.exec(ctx, c.pc, sql, j)
	dur := time.Since(start)
	sh.put(key, c)
	return res, dur, err
}

// describe returns the result columns of j's statement on the store that
// served it, with the client's result formats.
func (sh *shadower) describe(j *shadowJob) ([]shadow.Field, error) {
	sql, err := sh.sqlFor(j, j.served)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(sh.ctx, sh.settings().timeout)
	defer cancel()
	c, key, err := sh.conn(ctx, j.served, j)
	if err != nil {
		return nil, err
	}
	sd, err := c.pc.Prepare(ctx, "", sql, j.paramOIDs)
	sh.put(key, c)
	if err != nil {
		return nil, fmt.Errorf("describing the statement: %w", err)
	}
	fs := make([]shadow.Field, len(sd.Fields))
	for i, f := range sd.Fields {
		fs[i] = shadow.Field{Name: f.Name, OID: f.DataTypeOID, Format: formatOf(j.resultFmts, i)}
	}
	return fs, nil
}

// exec runs j's statement alone on pc: sql is its text as it runs on that
// store. A Query runs as one parameterless extended-protocol statement with
// text results, as in a pipeline: for one statement the result is the same.
func (sh *shadower) exec(ctx context.Context, pc *pgconn.PgConn, sql string, j *shadowJob) (shadow.Result, error) {
	params, oids, fmts, rfmts := j.bindArgs()
	return sh.readResult(pc.ExecParams(ctx, sql, params, oids, fmts, rfmts))
}

// bindArgs are the parameters and formats j's statement is bound with:
// the client's, or none for a Query.
func (j *shadowJob) bindArgs() (params [][]byte, oids []uint32, fmts, rfmts []int16) {
	if !j.extended {
		return nil, nil, nil, nil
	}
	return j.params, j.paramOIDs, j.paramFmts, j.resultFmts
}

// readResult reads one result (its rows copied), up to twice the served
// result bound. A statement's error becomes the result's ErrCode; the
// error returned is the connection's, or a result over the bound.
func (sh *shadower) readResult(rr *pgconn.ResultReader) (shadow.Result, error) {
	var res shadow.Result
	limit, size := 2*sh.settings().maxResult, 0
	for _, fd := range rr.FieldDescriptions() {
		res.Fields = append(res.Fields, shadow.Field{Name: fd.Name, OID: fd.DataTypeOID, Format: fd.Format})
	}
	for rr.NextRow() {
		vals := rr.Values()
		row := make([][]byte, len(vals))
		for i, v := range vals {
			if v != nil {
				row[i] = append([]byte{}, v...)
				size += len(v)
			}
		}
		size += 8 * len(vals)
		if size > limit {
			_, _ = rr.Close()
			return res, errSkip("shadow result too large")
		}
		res.Rows = append(res.Rows, row)
	}
	_, err := rr.Close()
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		res.ErrCode, res.ErrMsg = pe.Code, pe.Message
		return res, nil
	}
	return res, err
}

// conn returns an idle connection to st for j's user and database, with
// j's settings applied, or opens one.
func (sh *shadower) conn(ctx context.Context, name route.Store, j *shadowJob) (*shadowConn, shadowConnKey, error) {
	key := shadowConnKey{store: string(name), user: j.user, db: j.db}
	gk := gucKey(j.gucs)
	sh.mu.Lock()
	var c *shadowConn
	if cs := sh.idle[key]; len(cs) > 0 {
		c = cs[len(cs)-1]
		sh.idle[key] = cs[:len(cs)-1]
	}
	sh.mu.Unlock()
	if c == nil {
		st := sh.srv.old
		if name == route.New {
			st = sh.srv.new
		}
		if st == nil {
			return nil, key, errSkip("no " + string(name) + " store")
		}
		pc, err := pgconn.ConnectConfig(ctx, shadowConfig(st, j))
		if err != nil {
			return nil, key, fmt.Errorf("connecting to the %s store: %w", name, err)
		}
		c = &shadowConn{pc: pc}
	}
	if c.gucs != gk {
		var b strings.Builder
		b.WriteString("RESET ALL")
		for _, g := range j.gucs {
			fmt.Fprintf(&b, "; SELECT pg_catalog.set_config(%s, %s, false)", quoteLiteral(g[0]), quoteLiteral(g[1]))
		}
		if _, err := c.pc.Exec(ctx, b.String()).ReadAll(); err != nil {
			_ = c.pc.Close(context.Background())
			return nil, key, fmt.Errorf("applying the session's settings: %w", err)
		}
		c.gucs = gk
	}
	return c, key, nil
}

func gucKey(g [][2]string) string {
	var b strings.Builder
	for _, kv := range g {
		b.WriteString(kv[0])
		b.WriteByte(0)
		b.WriteString(kv[1])
		b.WriteByte(0)
	}
	return b.String()
}

// put returns c to the idle list, or closes it if it is broken or the
// list is full.
func (sh *shadower) put(key shadowConnKey, c *shadowConn) {
	if c.pc.IsClosed() || c.pc.TxStatus() != 'I' {
		_ = c.pc.Close(context.Background())
		return
	}
	sh.mu.Lock()
	if sh.ctx.Err() == nil && len(sh.idle[key]) < cap(sh.queue) && len(sh.idle[key]) < 2*sh.srv.config().Shadow.Workers {
		sh.idle[key] = append(sh.idle[key], c)
		c = nil
	}
	sh.mu.Unlock()
	if c != nil {
		_ = c.pc.Close(context.Background())
	}
}

// shadowConfig is st's connection config for the session's user and
// database, as store.connect would open it.
func shadowConfig(st *store, j *shadowJob) *pgconn.Config {
	cfg := st.cfg.Copy()
	cfg.User, cfg.Database, cfg.Password = st.login(j.user, j.db)
	if cfg.Password == "" && st.passfile != nil {
		cfg.Password = st.passfile.FindPassword(cfg.Host, fmt.Sprint(cfg.Port), cfg.Database, cfg.User)
	}
	rp := map[string]string{}
	for k, v := range cfg.RuntimeParams {
		rp[k] = v
	}
	for k, v := range j.startup {
		switch k {
		case "user", "database", "replication", "application_name":
		default:
			rp[k] = v
		}
	}
	rp["application_name"] = "tandem shadow"
	cfg.RuntimeParams = rp
	cfg.OnNotice, cfg.OnNotification = nil, nil
	return cfg
}
