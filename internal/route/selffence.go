package route

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// waitSilent runs when live replicas did not drain a write fence within
// FenceTimeout (issue 12). A replica that is cut off from the control
// database is not slow but silent: it fences itself (refuses writes) once
// it has not read the routing state for routing.self_fence, a bound no
// longer than the liveness window Live, counted from a read that started
// before its last heartbeat. So once its last heartbeat is older than Live
// (by the control database's clock) it no longer writes under the old
// state, and the flip may go on without it.
//
// waitSilent waits, until deadline, for each of pending that has not sent
// a heartbeat since to leave the liveness window, and returns those that
// did (silent) and those that did not: heard from again without draining
// the fence (alive but held up by a transaction), or still in the window
// at the deadline.
func (o Options) waitSilent(ctx context.Context, conn *pgx.Conn, pending []Replica, token int64, deadline time.Time) (silent, still []Replica, err error) {
	last := make(map[string]time.Time, len(pending))
	for _, r := range pending {
		last[r.ID] = r.HeartbeatAt
	}
	for {
		reps, err := ListReplicas(ctx, conn, o.Live)
		if err != nil {
			return nil, nil, err
		}
		byID := make(map[string]Replica, len(reps))
		for _, r := range reps {
			byID[r.ID] = r
		}
		silent, still = silent[:0], still[:0]
		waiting := false
		for _, p := range pending {
			r, ok := byID[p.ID]
			switch {
			case !ok || !r.Live:
				silent = append(silent, p) // left (or was removed): past its self-fence bound
			case r.FenceAcked == token:
				// Drained after all: it holds writes at the fence.
			case r.HeartbeatAt.After(last[p.ID]):
				still = append(still, r) // heard from: alive, so not fenced by silence
			default:
				still = append(still, r)
				waiting = true
			}
		}
		if !waiting || !time.Now().Before(deadline) {
			return silent, still, nil
		}
		if err := awaitNotification(ctx, conn, deadline); err != nil {
			return silent, still, err
		}
	}
}
