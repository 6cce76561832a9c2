package feed

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/tandemdb/tandem/compare"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

// Timing of a session: how often the slot's position is confirmed (and a
// keepalive asked for), the control row written, the routing state read
// and the retained WAL measured, and how long committed transactions are
// gathered into one batch before they are checked.
const (
	statusEvery    = 250 * time.Millisecond
	stateEvery     = time.Second
	retentionEvery = 5 * time.Second
	batchDelay     = 20 * time.Millisecond
)

// session is the feed on one primary's slot, from open to the first error
// or a change of the routing state. It runs in one goroutine.
type session struct {
	r         *Runner
	control   *pgx.Conn // holds the election lock; every control write goes through it
	store     route.Store
	secondary route.Store
	slot      string
	old, new  *pgx.Conn // the check connections
	prim      *pgx.Conn // old or new: the store whose WAL is read
	repl      *pgconn.PgConn
	ms        *table.Mappings
	rels      map[uint32]*relation
	checkers  map[*table.Mapping]*compare.Checker

	inTx  bool
	tx    changes
	batch changes
	// pending are closed batches waiting to settle: a batch is checked
	// only Options.Delay after its last transaction arrived, so that a mirror
	// write still in flight on the secondary when the transaction
	// committed (it lands within the mirror budget, or is recorded as
	// drift by the proxy) has landed. Without the wait, a key a direct
	// write or a cascade set back to what the secondary still had (an
	// insert in flight there, deleted on the primary) read equal, and the
	// in-flight insert then left a row the primary no longer has.
	pending []changes
	idleEnd pglogrepl.LSN // the WAL end of the last keepalive received between transactions
	checked pglogrepl.LSN // every transaction that committed at or before it is checked
	sent    pglogrepl.LSN // the server's WAL end, as last reported
	lastAt  time.Time     // commit time of the last checked transaction
	until   pglogrepl.LSN // when set, the store stopped being primary: end once checked passes it
	// flippedAt is when the routing state made another store primary
	// (set with until). A change this store's WAL holds from then on is a
	// mirror write from the new primary, whose own slot checks it; only
	// the changes before it are checked here, against the new primary.
	flippedAt  time.Time
	primaryNow route.Store // the routing state's primary, as last read
	warned     bool
	beat       time.Time // when tandem.feed was last written
}

// open connects to both stores and to the primary's slot (creating the
// publication and the slot when missing) and registers this replica in
// tandem.feed.
func (r *Runner) open(ctx context.Context, control *pgx.Conn, primary route.Store) (_ *session, err error) {
	s := &session{r: r, control: control, store: primary, primaryNow: primary, secondary: route.New, slot: r.opts.Names.Slot(primary),
		rels: map[uint32]*relation{}, checkers: map[*table.Mapping]*compare.Checker{}}
	if primary == route.New {
		s.secondary = route.Old
	}
	defer func() {
		if err != nil {
			s.close(context.WithoutCancel(ctx))
		}
	}()
	// The primary first: its slot's WAL is guarded even while the
	// secondary is unreachable (and nothing can be checked).
	pconn, sconn := &s.old, &s.new
	pcc, scc := r.opts.Old, r.opts.New
	if primary == route.New {
		pconn, sconn, pcc, scc = sconn, pconn, scc, pcc
	}
	if *pconn, err = pgx.ConnectConfig(ctx, pcc.Copy()); err != nil {
		return nil, fmt.Errorf("connecting to the %s store: %w", primary, err)
	}
	s.prim = *pconn
	if err := s.guard(ctx); err != nil && !errors.Is(err, errFollow) && !errors.Is(err, errNoSlot) {
		return nil, err
	}
	if *sconn, err = pgx.ConnectConfig(ctx, scc.Copy()); err != nil {
		return nil, fmt.Errorf("connecting to the %s store: %w", s.secondary, err)
	}
	ms, probs, err := table.LoadMappings(ctx, r.opts.Tables, s.old, s.new)
	if err != nil {
		return nil, fmt.Errorf("loading the table mappings: %w", err)
	}
	if len(probs) > 0 {
		r.log.Warn("tables with a mapping problem are not checked by the change feed", "problems", len(probs), "first", probs[0].String())
	}
	s.ms = ms
	scope, without, err := Publishable(ctx, s.prim, s.scope())
	if err != nil {
		return nil, err
	}
	if len(without) > 0 {
		r.log.Warn("tables without a replica identity are not published, and the change feed does not check them (add a primary key, or ALTER TABLE ... REPLICA IDENTITY)",
			"tables", len(without), "first", without[0].String())
	}
	if err := EnsurePublication(ctx, s.prim, r.opts.Names.Publication(), scope); err != nil {
		return nil, err
	}
	if _, err := EnsureSlot(ctx, s.prim, s.slot); err != nil {
		return nil, err
	}
	var confirmed *string
	if err := s.prim.QueryRow(ctx, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", s.slot).Scan(&confirmed); err != nil {
		return nil, fmt.Errorf("reading the replication slot %s: %w", s.slot, err)
	}
	if confirmed != nil {
		if s.checked, err = pglogrepl.ParseLSN(*confirmed); err != nil {
			return nil, err
		}
	}
	if err := heartbeat(ctx, control, primary, s.slot, r.opts.Replica, s.checked); err != nil {
		return nil, err
	}
	if s.repl, err = pgconn.ConnectConfig(ctx, table.ReplicationConfig(s.cc())); err != nil {
		return nil, fmt.Errorf("opening a replication connection to the %s store: %w", primary, err)
	}
	err = pglogrepl.StartReplication(ctx, s.repl, s.slot, 0, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", "publication_names '" + r.opts.Names.Publication() + "'"},
	})
	if err != nil {
		return nil, fmt.Errorf("starting replication from the slot %s on the %s store: %w", s.slot, primary, err)
	}
	r.log.Info("change feed reading the primary's WAL", "store", primary, "slot", s.slot, "from", s.checked)
	return s, nil
}

func (s *session) cc() *pgx.ConnConfig {
	if s.store == route.New {
		return s.r.opts.New
	}
	return s.r.opts.Old
}

// scope is the primary's names of the tables in scope that can be checked
// by key: a primary key carried column for column by the mapping.
func (s *session) scope() []table.Name {
	var out []table.Name
	for _, m := range s.ms.All() {
		if _, ok := m.KeyPreserving(); !ok || !m.Old.HasKey() {
			continue
		}
		if s.store == route.New {
			out = append(out, m.New.Name)
		} else {
			out = append(out, m.Old.Name)
		}
	}
	return out
}

func (s *session) close(ctx context.Context) {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if s.repl != nil {
		_ = s.repl.Close(cctx)
	}
	for _, c := range []*pgx.Conn{s.old, s.new} {
		if c != nil {
			_ = c.Close(cctx)
		}
	}
}

// run streams until ctx ends, an error, or errFollow.
func (s *session) run(ctx context.Context) error {
	now := time.Now()
	nextStatus, nextState, nextGuard, nextScope := now, now.Add(stateEvery), now.Add(retentionEvery), now.Add(s.r.opts.Rescope)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		deadline := nextStatus
		if s.batch.n > 0 && s.batch.first.Add(batchDelay).Before(deadline) {
			deadline = s.batch.first.Add(batchDelay)
		}
		if len(s.pending) > 0 && s.pending[0].recv.Add(s.r.opts.Delay).Before(deadline) {
			deadline = s.pending[0].recv.Add(s.r.opts.Delay)
		}
		rctx, cancel := context.WithDeadline(ctx, deadline)
		msg, err := s.repl.ReceiveMessage(rctx)
		cancel()
		switch {
		case err != nil && pgconn.Timeout(err) && ctx.Err() == nil:
		case err != nil:
			return fmt.Errorf("reading the slot %s: %w", s.slot, err)
		default:
			if err := s.handle(ctx, msg); err != nil {
				return err
			}
		}
		now = time.Now()
		if s.batch.n > 0 && (s.batch.n >= s.r.opts.Batch || !now.Before(s.batch.first.Add(batchDelay))) {
			s.pending = append(s.pending, s.batch)
			s.batch.reset()
		}
		for len(s.pending) > 0 && !now.Before(s.pending[0].recv.Add(s.r.opts.Delay)) {
			if err := s.check(ctx, &s.pending[0]); err != nil {
				return err
			}
			s.pending[0] = changes{}
			s.pending = s.pending[1:]
			now = time.Now()
		}
		if s.batch.n == 0 && len(s.pending) == 0 && !s.inTx && s.idleEnd > s.checked {
			s.checked = s.idleEnd
		}
		if now.After(nextStatus) {
			if err := s.status(ctx); err != nil {
				return err
			}
			nextStatus = now.Add(statusEvery)
		}
		if s.until != 0 && s.checked >= s.until {
			return errFollow
		}
		if now.After(nextState) {
			if err := s.follow(ctx); err != nil {
				return err
			}
			nextState = now.Add(stateEvery)
		}
		if now.After(nextScope) && s.batch.n == 0 && len(s.pending) == 0 && !s.inTx {
			if err := s.rescope(ctx); err != nil {
				return err
			}
			nextScope = now.Add(s.r.opts.Rescope)
		}
		if now.After(nextGuard) {
			if err := s.guard(ctx); err != nil {
				return err
			}
			nextGuard = now.Add(retentionEvery)
		}
	}
}

// status confirms the checked position to the slot and the control
// database, and reports the feed's lag.
func (s *session) status(ctx context.Context) error {
	if err := s.heartbeat(ctx); err != nil {
		return err
	}
	if err := s.confirm(ctx); err != nil {
		return err
	}
	lag := int64(0)
	if s.sent > s.checked {
		lag = int64(s.sent - s.checked)
	}
	secs := 0.0
	if len(s.pending) > 0 || s.batch.n > 0 || s.inTx {
		secs = time.Since(s.lastAt).Seconds()
		switch {
		case len(s.pending) > 0:
			secs = time.Since(s.pending[0].first).Seconds()
		case !s.batch.first.IsZero():
			secs = time.Since(s.batch.first).Seconds()
		}
	}
	s.r.opts.Metrics.Lag(lag, secs)
	return nil
}

// heartbeat writes tandem.feed: alive, and checked up to s.checked.
func (s *session) heartbeat(ctx context.Context) error {
	if err := heartbeat(ctx, s.control, s.store, s.slot, s.r.opts.Replica, s.checked); err != nil {
		return err
	}
	s.beat = time.Now()
	return nil
}

// confirm tells the server the slot may forget what is checked, and asks
// for a keepalive (whose WAL end advances the position while idle).
func (s *session) confirm(ctx context.Context) error {
	if s.checked == 0 {
		return nil
	}
	err := pglogrepl.SendStandbyStatusUpdate(ctx, s.repl, pglogrepl.StandbyStatusUpdate{WALWritePosition: s.checked, ReplyRequested: true})
	if err != nil {
		return fmt.Errorf("confirming the slot %s: %w", s.slot, err)
	}
	return nil
}

// follow reads the routing state: when mirroring is off the session ends;
// when the primary changed, it reads this store's WAL to its current end
// and then ends (run returns errFollow, and the slot is dropped).
func (s *session) follow(ctx context.Context) error {
	st, err := route.Load(ctx, s.control)
	if err != nil {
		return fmt.Errorf("reading the routing state: %w", err)
	}
	if !st.Mirror {
		return errFollow
	}
	if st.Primary == s.store || s.until != 0 {
		return nil
	}
	var end string
	if err := s.prim.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&end); err != nil {
		return fmt.Errorf("reading the %s store's WAL position: %w", s.store, err)
	}
	if s.until, err = pglogrepl.ParseLSN(end); err != nil {
		return err
	}
	// The re-check holds the actual primary from now on.
	s.flippedAt, s.primaryNow = st.ChangedAt, st.Primary
	s.checkers = map[*table.Mapping]*compare.Checker{}
	s.r.log.Info("the primary changed; checking the former primary's WAL to its end before moving", "from", s.store, "to", st.Primary, "until", s.until)
	return nil
}

// rescope re-reads the tables in scope; when it changed, the session ends
// (errFollow) and the next one publishes and maps the new scope. Nothing
// is pending when it is called, so nothing is re-checked needlessly.
func (s *session) rescope(ctx context.Context) error {
	ms, _, err := table.LoadMappings(ctx, s.r.opts.Tables, s.old, s.new)
	if err != nil {
		return fmt.Errorf("reloading the table mappings: %w", err)
	}
	was := s.scope()
	cur := (&session{ms: ms, store: s.store}).scope()
	if slices.EqualFunc(was, cur, func(a, b table.Name) bool { return a == b }) {
		return nil
	}
	s.r.log.Info("the tables in scope changed; the change feed restarts on the new scope", "tables", len(cur), "were", len(was))
	return errFollow
}

// heartbeat registers holder as running the feed on store, alive now, and
// advances checked_lsn to checked (never back) when it is set.
func heartbeat(ctx context.Context, control *pgx.Conn, store route.Store, slot, holder string, checked pglogrepl.LSN) error {
	var lsn *string
	if checked != 0 {
		v := checked.String()
		lsn = &v
	}
	_, err := control.Exec(ctx, `INSERT INTO tandem.feed AS f (store, slot_name, holder, checked_lsn, checked_at, heartbeat_at)
		VALUES ($1, $2, $3, $4::pg_lsn, CASE WHEN $4::pg_lsn IS NULL THEN NULL ELSE now() END, now())
		ON CONFLICT (store) DO UPDATE SET slot_name = EXCLUDED.slot_name, holder = EXCLUDED.holder, heartbeat_at = now(),
			checked_lsn = GREATEST(f.checked_lsn, EXCLUDED.checked_lsn),
			checked_at = COALESCE(EXCLUDED.checked_at, f.checked_at)`, string(store), slot, holder, lsn)
	if err != nil {
		return fmt.Errorf("the change feed's heartbeat: %w", err)
	}
	return nil
}
