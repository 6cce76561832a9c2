package control

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/backfill"
)

// Backfill serves the backfill's status and its live throttle from the
// control database: GET /api/v1/backfill and POST /api/v1/backfill. The
// throttle is the control row every running `tandem backfill` process
// polls (backfill.SetControl), so a change reaches them all within about a
// second.
type Backfill struct {
	// Connect opens a connection to the control database; each request
	// uses its own and closes it.
	Connect func(ctx context.Context) (*pgx.Conn, error)
}

// BackfillRequest is the body of POST /api/v1/backfill: nil fields keep
// their value.
type BackfillRequest struct {
	Rate   *float64 `json:"rate,omitempty"` // rows per second, >= 0; 0 = unlimited
	Paused *bool    `json:"paused,omitempty"`
}

// Status reads the backfill's status (backfill.Status).
func (b *Backfill) Status(ctx context.Context) (backfill.State, error) {
	conn, err := b.Connect(ctx)
	if err != nil {
		return backfill.State{}, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return backfill.Status(ctx, conn)
}

// Set changes the live throttle and returns the status after the change;
// a malformed request is a *BadRequestError.
func (b *Backfill) Set(ctx context.Context, by string, req BackfillRequest) (backfill.State, error) {
	ch := backfill.ControlChange{Rate: req.Rate, Paused: req.Paused, By: by}
	if err := ch.Check(); err != nil {
		return backfill.State{}, &BadRequestError{Reason: err.Error()}
	}
	conn, err := b.Connect(ctx)
	if err != nil {
		return backfill.State{}, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := backfill.SetControl(ctx, conn, ch); err != nil {
		return backfill.State{}, err
	}
	return backfill.Status(ctx, conn)
}
