package shadowpool

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/internal/metrics"
	"github.com/tandemdb/tandem/internal/mismatch"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/shadow"
)

// From a difference to a mismatch: re-read both stores, confirm under
// lock, and record what is confirmed within a per-fingerprint budget.

// recordBudget caps stored mismatches per fingerprint per minute.
type recordBudget struct {
	minute time.Time
	n      int
}

const (
	recordsPerMinute = 20  // mismatch records stored per fingerprint per minute (all are counted)
	metricFPs        = 500 // fingerprints with their own metric series; the rest are "other"
)

// finish compares a job's shadow result with its served one and, when they
// differ, re-reads and confirms.
func (sh *Pool) finish(j *Job, other shadow.Result, dur time.Duration) {
	sshape := j.shape
	m := sh.opts.Metrics
	m.ShadowLatency(sh.ctx, string(j.Served), "served", j.ServedDur)
	m.ShadowLatency(sh.ctx, string(j.ShadowOn), "shadow", dur)
	sh.latency(j.Fingerprint, j.ServedDur, dur)
	if shadow.Compare(j.Result, other, sshape, sh.Settings().Compare) == nil {
		sh.Count(j.Fingerprint, metrics.ShadowMatched, "")
		return
	}

	// A difference. First re-read both stores at once: a race with a
	// write that has since landed on both ends here.
	prim, sec := j.Primary, j.Secondary
	if j.AA {
		prim, sec = j.Served, j.Served
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
	if a, b := sh.orient(j, prim, p1, s1); shadow.Compare(a, b, sshape, sh.Settings().Compare) == nil {
		sh.Count(j.Fingerprint, metrics.ShadowTransient, "")
		return
	}
	// Still different: confirm with the writes to its tables held.
	if !sh.confirms.Allow() {
		sh.Count(j.Fingerprint, metrics.ShadowSkipped, "unconfirmed")
		return
	}
	d, err := sh.confirm(j, prim, sec, sshape)
	switch {
	case err != nil:
		sh.skip(j, err)
	case d == nil:
		sh.Count(j.Fingerprint, metrics.ShadowTransient, "")
	default:
		sh.Count(j.Fingerprint, metrics.ShadowMismatched, "")
		sh.opts.Log.Warn("shadow read mismatch", "fingerprint", j.Fingerprint, "served_by", j.Served, "shadow_on", j.ShadowOn,
			"kind", d.Kind, "summary", d.Summary)
		sh.store(j, d)
	}
}

// orient returns the primary's and the secondary's results as (served,
// shadow), the way the client's read saw them.
func (sh *Pool) orient(j *Job, prim route.Store, p, s shadow.Result) (shadow.Result, shadow.Result) {
	if j.Served == prim {
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
func (sh *Pool) confirm(j *Job, prim, sec route.Store, shape shadow.Shape) (*shadow.Diff, error) {
	sql, err := sh.sqlFor(j, prim)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(sh.ctx, sh.Settings().Timeout+sh.Settings().Settle)
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
	deadline := time.Now().Add(sh.Settings().Settle)
	for {
		s, _, err := sh.run(j, sec)
		if err != nil {
			return nil, err
		}
		served, shadowRes := sh.orient(j, prim, p, s)
		d := shadow.Compare(served, shadowRes, shape, sh.Settings().Compare)
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
func (sh *Pool) lockNames(j *Job, st route.Store) []string {
	ms := sh.opts.Mappings()
	var out []string
	seen := map[string]bool{}
	for _, t := range j.Tables {
		n := t
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

// store records a confirmed mismatch, within the per-fingerprint budget.
func (sh *Pool) store(j *Job, d *shadow.Diff) {
	if sh.opts.Record == nil {
		return
	}
	now := time.Now()
	sh.mu.Lock()
	b := sh.recorded[j.Fingerprint]
	if b == nil || now.Sub(b.minute) >= time.Minute {
		b = &recordBudget{minute: now}
		sh.recorded[j.Fingerprint] = b
	}
	b.n++
	over := b.n > recordsPerMinute
	sh.mu.Unlock()
	if over {
		return
	}
	if sh.Settings().Redact {
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
	rec := mismatch.Record{Fingerprint: j.Fingerprint, Statement: j.SQL, ServedBy: string(j.Served),
		ShadowOn: string(j.ShadowOn), AA: j.AA, Kind: d.Kind, Summary: d.Summary, Diff: diff}
	if !sh.Settings().Redact && j.Params != nil {
		rec.Params = make([]*string, len(j.Params))
		for i, p := range j.Params {
			if p == nil {
				continue
			}
			v := string(p)
			if FormatOf(j.ParamFmts, i) == 1 {
				// Binary: readable when the type is known, hex otherwise.
				v = shadow.Canonical(j.ParamOIDs[i], 1, p)
			}
			rec.Params[i] = &v
		}
	}
	ctx, cancel := context.WithTimeout(sh.ctx, 5*time.Second)
	defer cancel()
	if err := sh.opts.Record(ctx, rec); err != nil {
		sh.opts.Log.Warn("could not store a shadow mismatch", "fingerprint", j.Fingerprint, "error", err)
	}
}
