package control

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/config"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// prepareSequences connects to both stores and the control database before
// a write flip's fence goes up. The returned sync runs with writes fenced:
// it first repairs the drift that is stale on the store becoming primary
// (copying from the store that has the rows, which no writer touches while
// the fence is up), then brings to's sequences up to the other store's.
// Without the repair, a rollback before the repairer caught up would make a
// stale row the store of record, and the next write to it would mirror the
// stale row back over the good one. done closes the connections.
func prepareSequences(ctx context.Context, cfg *config.Config, to route.Store) (func(context.Context) (route.SequenceSync, error), func(), error) {
	from := route.Old
	if to == route.Old {
		from = route.New
	}
	conns := map[string]*pgx.Conn{}
	done := func() {
		for _, c := range conns {
			c.Close(context.WithoutCancel(ctx))
		}
	}
	for _, s := range []route.Store{from, to} {
		cc, err := StoreConnConfig(cfg, s)
		if err != nil {
			done()
			return nil, nil, err
		}
		c, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			done()
			return nil, nil, fmt.Errorf("connecting to the %s store: %w", s, err)
		}
		conns[string(s)] = c
	}
	ccfg, err := ControlConnConfig(cfg)
	if err != nil {
		done()
		return nil, nil, err
	}
	control, err := pgx.ConnectConfig(ctx, ccfg)
	if err != nil {
		done()
		return nil, nil, fmt.Errorf("connecting to the control database: %w", err)
	}
	conns["control"] = control
	// The mappings are read now, before the fence goes up: the fence then
	// covers only the repair and the sequences. A failure still fails the
	// sync, under the fence, as a gate --force can override.
	ms, _, mapErr := table.LoadMappings(ctx, cfg.Tables, conns[string(route.Old)], conns[string(route.New)])
	sync := func(ctx context.Context) (route.SequenceSync, error) {
		if mapErr != nil {
			return route.SequenceSync{}, fmt.Errorf("loading the table mappings: %w", mapErr)
		}
		bound, cancel := context.WithTimeout(ctx, cfg.Routing.FenceTimeout.Duration())
		defer cancel()
		var repairErr error
		// Writes are fenced and drained, so the drift the store becoming
		// primary missed can only shrink: look before claiming (a claim is
		// a transaction of three round trips, with nothing to claim most
		// of the time).
		var pending bool
		if err := control.QueryRow(bound, `SELECT EXISTS (SELECT 1 FROM tandem.drift WHERE repaired_at IS NULL AND stale = $1)`, string(to)).Scan(&pending); err != nil {
			pending = true // let the repair say what is wrong
		}
		for pending {
			// Every entry, also those in their backoff after failing: a
			// failure now fails the flip (a gate --force overrides).
			n, err := table.RepairWith(bound, control, conns[string(from)], conns[string(to)], table.RepairOptions{
				Target: string(to), Limit: 1000, Mappings: ms, IgnoreBackoff: true})
			if err != nil {
				repairErr = fmt.Errorf("repairing the drift the %s store missed before it becomes primary: %w", to, err)
				break
			}
			if n == 0 {
				break
			}
		}
		seq, err := route.SyncSequences(ctx, conns[string(from)], conns[string(to)], int64(cfg.Routing.SequenceMargin))
		if repairErr != nil {
			return seq, repairErr
		}
		return seq, err
	}
	return sync, done, nil
}
