package backfill

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/jsonout"
	"golang.org/x/time/rate"
)

// Throttle is the throttle's state.
type Throttle struct {
	Rate    float64          `json:"rate"` // rows per second; 0 = unlimited
	Paused  bool             `json:"paused"`
	Guarded bool             `json:"guarded"`       // the latency guard holds the copy
	Probe   jsonout.Duration `json:"probe_latency"` // the last latency-guard probe, as text ("3ms")
}

// SetRate changes the rate limit in rows per second, live; 0 = unlimited.
func (e *Engine) SetRate(r float64) {
	if r <= 0 {
		e.limiter.SetLimit(rate.Inf)
		return
	}
	e.limiter.SetLimit(rate.Limit(r))
}

// Pause holds every worker after its current unit, until Resume.
func (e *Engine) Pause() { e.set(func() { e.paused = true }) }

// Resume undoes Pause.
func (e *Engine) Resume() { e.set(func() { e.paused = false }) }

func (e *Engine) set(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f()
	close(e.changed)
	e.changed = make(chan struct{})
}

// Throttle returns the throttle's state.
func (e *Engine) Throttle() Throttle {
	e.mu.Lock()
	defer e.mu.Unlock()
	t := Throttle{Paused: e.paused, Guarded: e.guarded, Probe: jsonout.Duration(e.probe)}
	if l := e.limiter.Limit(); l != rate.Inf {
		t.Rate = float64(l)
	}
	return t
}

// hold waits while the backfill is paused or guarded.
func (e *Engine) hold(ctx context.Context) error {
	for {
		e.mu.Lock()
		free, ch := !e.paused && !e.guarded, e.changed
		e.mu.Unlock()
		if free {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// pace charges n rows to the rate limit and waits while held.
func (e *Engine) pace(ctx context.Context, n int) error {
	for n > 0 {
		k := min(n, e.limiter.Burst())
		if err := e.limiter.WaitN(ctx, k); err != nil {
			return err
		}
		n -= k
	}
	return e.hold(ctx)
}

// guard probes the primary's latency and holds the copy while it is over
// the bound.
func (e *Engine) guard(ctx context.Context, primary *pgx.Conn) {
	t := time.NewTicker(e.o.ProbeEvery)
	defer t.Stop()
	for {
		start := time.Now()
		_, err := primary.Exec(ctx, "SELECT 1")
		lat := time.Since(start)
		if ctx.Err() != nil {
			e.set(func() { e.guarded = false })
			return
		}
		over := err != nil || lat > e.o.LatencyBound
		e.mu.Lock()
		was := e.guarded
		e.probe = lat
		e.mu.Unlock()
		if over != was {
			e.o.Logger.Warn("backfill latency guard", "holding", over, "probe_latency", lat, "bound", e.o.LatencyBound)
			e.set(func() { e.guarded = over })
		}
		select {
		case <-ctx.Done():
			e.set(func() { e.guarded = false })
			return
		case <-t.C:
		}
	}
}
