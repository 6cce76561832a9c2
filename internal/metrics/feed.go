package metrics

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// KeyDifference is the kind of a difference the change feed found:
// MissingOnNew, MissingOnOld, ValueDiff, "whole table" (a truncate, or a
// key that cannot be read) or "slot dropped" (past feed.wal_max).
const KeyDifference = attribute.Key("tandem.feed.difference")

// Feed holds the change feed's instruments:
//
//	tandem.feed.leader          1 on the replica elected to run the feed, else 0
//	tandem.feed.lag_bytes       WAL the server has sent past what is checked
//	tandem.feed.lag_seconds     how long the oldest unchecked transaction has waited
//	tandem.feed.retained_bytes  WAL the slot retains on the primary
//	tandem.feed.checked         keys checked, by table (tandem.table)
//	tandem.feed.differences     differences recorded as drift, by table and tandem.feed.difference
//
// A nil *Feed records nothing. It is safe for concurrent use.
type Feed struct {
	leader, lagBytes, retained metric.Int64Gauge
	lagSeconds                 metric.Float64Gauge
	checked, differences       metric.Int64Counter
}

// NewFeed creates the change feed's instruments on meter.
func NewFeed(meter metric.Meter) (*Feed, error) {
	f := &Feed{}
	var err error
	if f.leader, err = meter.Int64Gauge("tandem.feed.leader",
		metric.WithDescription("1 on the proxy replica elected to run the change feed, else 0.")); err != nil {
		return nil, err
	}
	if f.lagBytes, err = meter.Int64Gauge("tandem.feed.lag_bytes",
		metric.WithDescription("WAL the primary has sent to the change feed past what it has checked."), metric.WithUnit("By")); err != nil {
		return nil, err
	}
	if f.lagSeconds, err = meter.Float64Gauge("tandem.feed.lag_seconds",
		metric.WithDescription("How long the oldest committed transaction the change feed has not checked yet has waited."), metric.WithUnit("s")); err != nil {
		return nil, err
	}
	if f.retained, err = meter.Int64Gauge("tandem.feed.retained_bytes",
		metric.WithDescription("WAL the change feed's slot retains on the primary (pg_current_wal_lsn() - restart_lsn)."), metric.WithUnit("By")); err != nil {
		return nil, err
	}
	if f.checked, err = meter.Int64Counter("tandem.feed.checked",
		metric.WithDescription("Changed keys the change feed checked on both stores, by table."), metric.WithUnit("{key}")); err != nil {
		return nil, err
	}
	if f.differences, err = meter.Int64Counter("tandem.feed.differences",
		metric.WithDescription("Differences the change feed confirmed and recorded as drift, by table and kind."), metric.WithUnit("{difference}")); err != nil {
		return nil, err
	}
	return f, nil
}

// Leader records whether this replica runs the feed.
func (f *Feed) Leader(on bool) {
	if f == nil {
		return
	}
	v := int64(0)
	if on {
		v = 1
	}
	f.leader.Record(context.Background(), v)
}

// Lag records the feed's lag.
func (f *Feed) Lag(bytes int64, seconds float64) {
	if f == nil {
		return
	}
	f.lagBytes.Record(context.Background(), bytes)
	f.lagSeconds.Record(context.Background(), seconds)
}

// Retained records the WAL the slot retains.
func (f *Feed) Retained(bytes int64) {
	if f == nil {
		return
	}
	f.retained.Record(context.Background(), bytes)
}

// Checked counts n keys of table checked.
func (f *Feed) Checked(table string, n int) {
	if f == nil {
		return
	}
	f.checked.Add(context.Background(), int64(n), metric.WithAttributes(KeyTable.String(table)))
}

// Differences counts n differences of kind in table.
func (f *Feed) Differences(table, kind string, n int) {
	if f == nil {
		return
	}
	f.differences.Add(context.Background(), int64(n), metric.WithAttributes(KeyTable.String(table), KeyDifference.String(kind)))
}
