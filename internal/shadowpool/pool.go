// Package shadowpool runs shadow reads: sampled reads the proxy served (and
// captured) are run again on the other store, compared, re-read and
// confirmed under lock when they differ, and counted or recorded as
// mismatches. The proxy keeps the capture and hands a Job to Submit.
package shadowpool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/classify"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
	"github.com/tandemdb/tandem/internal/table"
	"golang.org/x/time/rate"
)

// Pool runs the shadow workers.
type Pool struct {
	opts     Options
	set      atomic.Pointer[Settings] // replaced whole by a reload
	queue    chan *Job
	confirms *rate.Limiter // locked confirmations: they make writers wait
	rewrites rewriteCache

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once

	mu       sync.Mutex
	idle     map[shadowConnKey][]*shadowConn
	counts   map[string]*mismatch.Counts // since the last TakeCounts
	recorded map[string]*recordBudget
	fps      map[string]bool // fingerprints with their own metric series
}

// Settings are the shadow section's settings that a reload can change;
// workers and the queue's length keep their values until a restart.
type Settings struct {
	AA        bool          // shadow on the store that served (A/A), not the other one
	MaxResult int           // bytes of a served reply captured for comparison
	Timeout   time.Duration // a shadow run's limit
	Settle    time.Duration // how long a confirmation waits for the secondary to agree
	Redact    bool          // store mismatches without values
	Compare   shadow.Options
}

// Options configure a Pool.
type Options struct {
	Workers int // goroutines running samples
	Queue   int // samples waiting; more are dropped (and counted)
	// Settings are the first settings in force (SetSettings replaces them).
	Settings *Settings
	// Config returns the connection settings for user on database db of
	// store st, with the password; nil when there is no such store. The
	// pool adds the client's startup parameters and its application_name.
	Config func(st route.Store, user, db string) *pgconn.Config
	// Mappings returns the table mappings in force (nil: none): a read is
	// rewritten through them for new, and its tables locked by their names
	// there.
	Mappings func() *table.Mappings
	// Record stores a confirmed mismatch (nil: mismatches are counted only).
	Record func(ctx context.Context, r mismatch.Record) error
	// BeforeRun, if set, is called by a worker before it runs a sample
	// (a test hook).
	BeforeRun func()
	Metrics   *metrics.Routing // may be nil
	Log       *slog.Logger
}

// Settings returns the settings in force now.
func (sh *Pool) Settings() *Settings { return sh.set.Load() }

// SetSettings replaces the settings, as a reload does.
func (sh *Pool) SetSettings(s *Settings) { sh.set.Store(s) }

// New starts a pool's workers; Stop ends them.
func New(opts Options) *Pool {
	sh := &Pool{opts: opts,
		queue: make(chan *Job, opts.Queue), confirms: rate.NewLimiter(2, 4),
		idle: map[shadowConnKey][]*shadowConn{}, counts: map[string]*mismatch.Counts{},
		recorded: map[string]*recordBudget{}, fps: map[string]bool{}}
	sh.set.Store(opts.Settings)
	sh.ctx, sh.cancel = context.WithCancel(context.Background())
	for range opts.Workers {
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
					jobs := []*Job{j}
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
// Submit queues j for a worker; when the queue is full, j is dropped and
// counted as dropped.
func (sh *Pool) Submit(j *Job) {
	select {
	case sh.queue <- j:
	default:
		sh.Count(j.Fingerprint, metrics.ShadowDropped, "")
	}
}

// Stop ends the workers (waiting for them) and closes the idle
// connections; later calls do nothing.
func (sh *Pool) Stop() {
	sh.stopOnce.Do(sh.stopNow)
}

func (sh *Pool) stopNow() {
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

// Count records one outcome, in the metrics and in the counters flushed
// to the control schema.
func (sh *Pool) Count(fp, outcome, reason string) {
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
	sh.opts.Metrics.Shadow(sh.ctx, mfp, outcome, reason)
}

// latency adds one compared read's served and shadow time to fp's counters.
func (sh *Pool) latency(fp string, served, shadowDur time.Duration) {
	sh.mu.Lock()
	c := sh.countsOf(fp)
	c.ServedSeconds += served.Seconds()
	c.ShadowSeconds += shadowDur.Seconds()
	sh.mu.Unlock()
}

// countsOf returns fp's counters since the last TakeCounts; sh.mu
// must be held.
func (sh *Pool) countsOf(fp string) *mismatch.Counts {
	c := sh.counts[fp]
	if c == nil {
		c = &mismatch.Counts{}
		sh.counts[fp] = c
	}
	return c
}

// TakeCounts returns the shadow-read outcomes per fingerprint since the
// last call, for the control plane to store.
func (sh *Pool) TakeCounts() map[string]mismatch.Counts {
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
func (sh *Pool) processBatch(jobs []*Job) {
	type group struct {
		jobs []*Job
		sqls []string
	}
	groups := map[shadowConnKey]*group{}
	var order []shadowConnKey
	for _, j := range jobs {
		if !sh.prepare(j) {
			continue
		}
		sql, err := sh.sqlFor(j, j.ShadowOn)
		if err != nil {
			sh.skip(j, err)
			continue
		}
		k := shadowConnKey{store: string(j.ShadowOn), user: j.User, db: j.DB, gucs: gucKey(j.GUCs)}
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
func (sh *Pool) prepare(j *Job) bool {
	if k := sh.opts.BeforeRun; k != nil {
		k()
	}
	shape := classify.ShapeOf(j.SQL)
	if !shape.Comparable {
		sh.Count(j.Fingerprint, metrics.ShadowSkipped, SkipReason(shape.Reason))
		return false
	}
	j.shape = shadow.Shape{Ordered: shape.Ordered, Limited: shape.Limited, Offset: shape.Offset}
	for _, k := range shape.SortKeys {
		j.shape.SortKeys = append(j.shape.SortKeys, shadow.SortKey{Name: k.Name, Pos: k.Pos})
	}
	if j.Result.Fields == nil && j.Result.ErrCode == "" {
		// Columns never described in this session (prepared before it left
		// the byte relay): ask the store that served it.
		fs, err := sh.describe(j)
		if err != nil {
			sh.skip(j, err)
			return false
		}
		j.Result.Fields = fs
	}
	return true
}

// runPipeline runs each job's statement (sqls[i], as it runs on st) in one
// pipeline on one connection, and returns each one's result, error and
// latency (from the pipeline's start to its result).
func (sh *Pool) runPipeline(jobs []*Job, sqls []string, st route.Store) ([]shadow.Result, []error, []time.Duration) {
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
	ctx, cancel := context.WithTimeout(sh.ctx, sh.Settings().Timeout)
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

// SkipReason turns a ReadShape reason into a metric label: its words up
// to the first detail ("volatile function random()" -> "volatile_function").
func SkipReason(reason string) string {
	words := strings.Fields(reason)
	if len(words) > 2 {
		words = words[:2]
	}
	return strings.ToLower(strings.Join(words, "_"))
}

func (sh *Pool) skip(j *Job, err error) {
	var sk errSkip
	if errors.As(err, &sk) {
		sh.Count(j.Fingerprint, metrics.ShadowSkipped, SkipReason(string(sk)))
		return
	}
	if sh.ctx.Err() != nil {
		return
	}
	sh.opts.Log.Debug("shadow read could not run", "fingerprint", j.Fingerprint, "error", err)
	sh.Count(j.Fingerprint, metrics.ShadowSkipped, "store_error")
}

// FormatOf is the format of column (or parameter) i under fmts, as a Bind
// gives them: none (text), one for all, or one each.
func FormatOf(fmts []int16, i int) int16 {
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

// Job is one sampled read waiting for its shadow run: what the proxy
// captured when it served the read.
type Job struct {
	SQL         string
	Fingerprint string
	Tables      []table.Name // the tables it reads, as the client named them
	Extended    bool         // Bind/Execute: run with the parameters below
	Params      [][]byte
	ParamFmts   []int16
	ParamOIDs   []uint32
	ResultFmts  []int16
	User, DB    string
	Startup     map[string]string // the client's startup parameters
	GUCs        [][2]string       // the session's SET values (nil: none)
	Served      route.Store       // the store whose reply the client got
	ShadowOn    route.Store
	Primary     route.Store
	Secondary   route.Store
	Result      shadow.Result
	Desc        []shadow.Field // the statement's columns from an earlier Describe, if known
	ServedDur   time.Duration
	AA          bool

	shape shadow.Shape // how to compare, from the statement's text
}
