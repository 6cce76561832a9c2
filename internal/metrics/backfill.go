package metrics

import (
	"context"
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Attribute keys of the backfill instruments.
const (
	KeyTable       = attribute.Key("tandem.table")                 // schema.table (old store)
	KeyChunkStatus = attribute.Key("tandem.backfill.chunk_status") // done, failed, running
)

// BackfillTable is one table's backfill as last read from the control
// schema.
type BackfillTable struct {
	Table                                   string // schema.table
	TotalRows, DoneRows                     int64
	ChunksDone, ChunksFailed, ChunksRunning int64
}

// BackfillSnapshot is the backfill's state as last read: the proxy reads it
// from the control schema every routing.poll (backfill.Status), whichever
// process runs the backfill.
type BackfillSnapshot struct {
	Tables []BackfillTable
	Rate   float64 // rows per second; 0 = unlimited
	Paused bool
}

// Backfill holds the backfill's observable gauges:
//
//	tandem.backfill.rows_copied  rows copied per table (tandem.table)
//	tandem.backfill.rows_total   rows to copy per table, estimated at planning
//	tandem.backfill.chunks       chunks per table and tandem.backfill.chunk_status (done, failed, running)
//	tandem.backfill.rate_limit   the live rate limit in rows/s (0 = unlimited)
//	tandem.backfill.paused       the pause switch: 1 paused, 0 running
//
// Nothing is observed before the first Set. A nil *Backfill records
// nothing.
type Backfill struct {
	mu   sync.Mutex
	snap *BackfillSnapshot
}

// NewBackfill registers the backfill's gauges on meter.
func NewBackfill(meter metric.Meter) (*Backfill, error) {
	b := &Backfill{}
	copied, err := meter.Int64ObservableGauge("tandem.backfill.rows_copied",
		metric.WithDescription("Rows the backfill has copied old -> new, per table (counted per finished chunk), as last read from the control schema."),
		metric.WithUnit("{row}"))
	if err != nil {
		return nil, err
	}
	total, err := meter.Int64ObservableGauge("tandem.backfill.rows_total",
		metric.WithDescription("Rows the backfill has to copy per table, estimated when it planned the table."), metric.WithUnit("{row}"))
	if err != nil {
		return nil, err
	}
	chunks, err := meter.Int64ObservableGauge("tandem.backfill.chunks",
		metric.WithDescription("Backfill chunks per table by status: done, failed (gave up after its attempts or waiting for a retry), running (claimed by a worker)."),
		metric.WithUnit("{chunk}"))
	if err != nil {
		return nil, err
	}
	rate, err := meter.Float64ObservableGauge("tandem.backfill.rate_limit",
		metric.WithDescription("The backfill's live rate limit in rows per second (0 = unlimited), from tandem.backfill_control."), metric.WithUnit("{row}/s"))
	if err != nil {
		return nil, err
	}
	paused, err := meter.Int64ObservableGauge("tandem.backfill.paused",
		metric.WithDescription("The backfill's pause switch: 1 paused, 0 running."), metric.WithUnit("{state}"))
	if err != nil {
		return nil, err
	}
	_, err = meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		b.mu.Lock()
		s := b.snap
		b.mu.Unlock()
		if s == nil {
			return nil
		}
		for _, t := range s.Tables {
			tbl := metric.WithAttributes(KeyTable.String(t.Table))
			o.ObserveInt64(copied, t.DoneRows, tbl)
			o.ObserveInt64(total, t.TotalRows, tbl)
			for _, c := range []struct {
				status string
				n      int64
			}{{"done", t.ChunksDone}, {"failed", t.ChunksFailed}, {"running", t.ChunksRunning}} {
				o.ObserveInt64(chunks, c.n, metric.WithAttributes(KeyTable.String(t.Table), KeyChunkStatus.String(c.status)))
			}
		}
		o.ObserveFloat64(rate, s.Rate)
		p := int64(0)
		if s.Paused {
			p = 1
		}
		o.ObserveInt64(paused, p)
		return nil
	}, copied, total, chunks, rate, paused)
	return b, err
}

// Set records the state last read.
func (b *Backfill) Set(s BackfillSnapshot) {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.snap = &s
	b.mu.Unlock()
}
