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
	"github.com/jackc/pgx/v5/pgproto3"
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
	checkers  map[table.Name]*compare.Checker

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

// relation is a published table as the stream describes it.
type relation struct {
	name   table.Name // the primary's table
	m      *table.Mapping
	keyIdx []int // the key columns' positions in a tuple, in key order; nil when the key cannot be read
}

// change is one key changed in a batch, with the commit time of the first
// transaction that changed it.
type change struct {
	key []string
	at  time.Time
}

// changes are the keys of one transaction or of a batch of them.
type changes struct {
	keys  map[uint32]map[string]change
	whole map[uint32]wholeChange // relations truncated, or whose keys are not checked one by one
	end   pglogrepl.LSN          // end of the last transaction in it
	last  time.Time              // commit time of the last transaction in it
	first time.Time              // when the batch's first transaction arrived
	recv  time.Time              // when its last transaction arrived
	n     int
}

// wholeChange is a table changed as a whole: truncated, or with keys that
// cannot be read or are too many to hold.
type wholeChange struct {
	at       time.Time
	truncate bool // only a truncate: equal when the secondary's table is empty too
}

// maxKeys is the most keys of one table one transaction (or batch) keeps
// in memory; past it the table is recorded as whole-table drift, and the
// repairer copies it, rather than the feed holding an unbounded set.
const maxKeys = 1 << 20

func (c *changes) reset() { *c = changes{} }

func (c *changes) add(rel uint32, key []string, at time.Time) {
	if w, ok := c.whole[rel]; ok && !w.truncate {
		return // the whole table is recorded anyway
	}
	if c.keys == nil {
		c.keys = map[uint32]map[string]change{}
	}
	m := c.keys[rel]
	if m == nil {
		m = map[string]change{}
		c.keys[rel] = m
	}
	k := joinKey(key)
	if _, ok := m[k]; !ok {
		m[k] = change{key: key, at: at}
		c.n++
	}
	if len(m) > maxKeys {
		c.addWhole(rel, at, false)
		c.n -= len(m)
		delete(c.keys, rel)
	}
}

// addWhole marks table rel changed as a whole; truncate says it was only
// truncated (a later unreadable key makes it a plain whole-table change).
func (c *changes) addWhole(rel uint32, at time.Time, truncate bool) {
	if c.whole == nil {
		c.whole = map[uint32]wholeChange{}
	}
	w, ok := c.whole[rel]
	if !ok {
		c.whole[rel] = wholeChange{at: at, truncate: truncate}
		c.n++
		return
	}
	if !truncate && w.truncate {
		w.truncate = false
		c.whole[rel] = w
	}
}

// merge adds the committed transaction t to the batch c.
func (c *changes) merge(t *changes) {
	if c.n == 0 {
		c.first = time.Now()
	}
	for rel, m := range t.keys {
		for _, ch := range m {
			c.add(rel, ch.key, ch.at)
		}
	}
	for rel, w := range t.whole {
		c.addWhole(rel, w.at, w.truncate)
	}
	c.end, c.last = t.end, t.last
}

// open connects to both stores and to the primary's slot (creating the
// publication and the slot when missing) and registers this replica in
// tandem.feed.
func (r *Runner) open(ctx context.Context, control *pgx.Conn, primary route.Store) (_ *session, err error) {
	s := &session{r: r, control: control, store: primary, primaryNow: primary, secondary: route.New, slot: SlotName(primary),
		rels: map[uint32]*relation{}, checkers: map[table.Name]*compare.Checker{}}
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
	if err := EnsurePublication(ctx, s.prim, scope); err != nil {
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
	if err := heartbeat(ctx, control, primary, r.opts.Replica, s.checked); err != nil {
		return nil, err
	}
	if s.repl, err = pgconn.ConnectConfig(ctx, replicationConfig(s.cc())); err != nil {
		return nil, fmt.Errorf("opening a replication connection to the %s store: %w", primary, err)
	}
	err = pglogrepl.StartReplication(ctx, s.repl, s.slot, 0, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", "publication_names '" + Publication + "'"},
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

// handle decodes one message of the stream.
func (s *session) handle(ctx context.Context, msg pgproto3.BackendMessage) error {
	cd, ok := isCopyData(msg)
	if !ok {
		if er, ok := msg.(*pgproto3.ErrorResponse); ok {
			return fmt.Errorf("the slot %s: %w", s.slot, pgconn.ErrorResponseToPgError(er))
		}
		return fmt.Errorf("the slot %s: unexpected %T", s.slot, msg)
	}
	if len(cd.Data) == 0 {
		return nil
	}
	switch cd.Data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
		if err != nil {
			return err
		}
		s.sent = max(s.sent, ka.ServerWALEnd)
		// Between transactions, everything that committed before the
		// server's WAL end has been sent, and is checked or in the batch.
		if !s.inTx {
			s.idleEnd = max(s.idleEnd, ka.ServerWALEnd)
		}
		if ka.ReplyRequested {
			return s.confirm(ctx)
		}
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
		if err != nil {
			return err
		}
		s.sent = max(s.sent, xld.ServerWALEnd)
		m, err := pglogrepl.Parse(xld.WALData)
		if err != nil {
			return fmt.Errorf("decoding the slot %s: %w", s.slot, err)
		}
		s.decode(m)
	}
	return nil
}

// decode adds one pgoutput message to the transaction being received.
// proto_version 1 sends only committed transactions, whole.
func (s *session) decode(m pglogrepl.Message) {
	switch m := m.(type) {
	case *pglogrepl.RelationMessage:
		s.rels[m.RelationID] = s.relation(m)
	case *pglogrepl.BeginMessage:
		s.inTx = true
		s.tx.reset()
		s.tx.last = m.CommitTime
	case *pglogrepl.InsertMessage:
		s.addTuple(m.RelationID, m.Tuple)
	case *pglogrepl.UpdateMessage:
		if m.OldTuple != nil { // the key changed (or REPLICA IDENTITY FULL): the old key too
			s.addTuple(m.RelationID, m.OldTuple)
		}
		s.addTuple(m.RelationID, m.NewTuple)
	case *pglogrepl.DeleteMessage:
		s.addTuple(m.RelationID, m.OldTuple)
	case *pglogrepl.TruncateMessage:
		for _, id := range m.RelationIDs {
			if s.rels[id] != nil {
				s.tx.addWhole(id, s.tx.last, true)
			}
		}
	case *pglogrepl.CommitMessage:
		s.tx.end, s.tx.last = m.TransactionEndLSN, m.CommitTime
		s.batch.merge(&s.tx)
		switch {
		case s.batch.n > 0:
			s.batch.recv = time.Now()
		case len(s.pending) > 0: // nothing in scope: done with the batches before it
			s.batch.end = 0
			last := &s.pending[len(s.pending)-1]
			last.end = max(last.end, m.TransactionEndLSN)
		default: // nothing in scope: done as soon as received
			s.batch.end = 0
			s.checked = max(s.checked, m.TransactionEndLSN)
		}
		s.inTx = false
		s.tx.reset()
	}
}

// relation maps a Relation message to the table's mapping and key.
func (s *session) relation(m *pglogrepl.RelationMessage) *relation {
	n := table.Name{Schema: m.Namespace, Table: m.RelationName}
	var mp *table.Mapping
	if s.store == route.New {
		mp = s.ms.ForNew(n)
	} else {
		mp = s.ms.ForOld(n)
	}
	if mp == nil {
		s.r.log.Warn("a published table has no usable mapping; its changes are not checked", "table", n)
		return nil
	}
	rel := &relation{name: n, m: mp}
	var names []string
	if s.store == route.New {
		cols, ok := mp.KeyPreserving()
		if !ok {
			return rel
		}
		for _, c := range cols {
			names = append(names, c.Name)
		}
	} else {
		names = mp.Old.KeyNames()
	}
	if len(names) == 0 {
		return rel
	}
	for _, name := range names {
		i := -1
		for j, c := range m.Columns {
			if c.Name == name {
				i = j
			}
		}
		if i < 0 {
			return rel
		}
		rel.keyIdx = append(rel.keyIdx, i)
	}
	return rel
}

// addTuple adds the key of tuple t of relation id to the transaction. A
// key that cannot be read (no key, an unchanged TOASTed key column) makes
// the whole table a change.
func (s *session) addTuple(id uint32, t *pglogrepl.TupleData) {
	rel := s.rels[id]
	if rel == nil || t == nil {
		return
	}
	key := make([]string, len(rel.keyIdx))
	for i, c := range rel.keyIdx {
		if c >= len(t.Columns) || t.Columns[c].DataType != pglogrepl.TupleDataTypeText {
			key = nil
			break
		}
		key[i] = string(t.Columns[c].Data)
	}
	if len(key) == 0 {
		s.tx.addWhole(id, s.tx.last, false)
		return
	}
	s.tx.add(id, key, s.tx.last)
}

// check checks the batch: each key's row on both stores, a difference
// confirmed and recorded in the drift ledger; a truncated table whose
// secondary is not empty, or a table whose keys cannot be read, is
// recorded whole. Then the batch is checked: its end may be confirmed.
func (s *session) check(ctx context.Context, b *changes) error {
	if k := s.r.opts.Knobs.BeforeCheck; k != nil {
		if err := k(ctx, b.end); err != nil {
			return err
		}
	}
	var entries []table.DriftEntry
	var detected []time.Time
	rels := map[uint32]bool{}
	for id := range b.keys {
		rels[id] = true
	}
	for id := range b.whole {
		rels[id] = true
	}
	for id := range rels {
		rel := s.rels[id]
		if rel == nil {
			continue
		}
		// A batch over many tables may take a while: stay alive meanwhile.
		if time.Since(s.beat) > statusEvery {
			if err := s.heartbeat(ctx); err != nil {
				return err
			}
		}
		if w, ok := b.whole[id]; ok {
			empty := false
			if w.truncate { // fine if the secondary's table is empty too
				var err error
				if empty, err = s.secondaryEmpty(ctx, rel); err != nil {
					return err
				}
			}
			if !empty {
				entries = append(entries, table.DriftEntry{Table: rel.name, Reason: Reason, Stale: string(s.secondary)})
				detected = append(detected, w.at)
				s.r.opts.Metrics.Differences(rel.name.String(), "whole table", 1)
				continue
			}
		}
		m := b.keys[id]
		if len(m) == 0 {
			continue
		}
		c, err := s.checker(ctx, rel)
		if err != nil {
			return err
		}
		keys := make([][]string, 0, len(m))
		for _, ch := range m {
			keys = append(keys, ch.key)
		}
		diffs, _, err := c.Check(ctx, keys)
		if err != nil {
			return fmt.Errorf("checking %s: %w", rel.name, err)
		}
		s.r.opts.Metrics.Checked(rel.name.String(), len(keys))
		for _, d := range diffs {
			entries = append(entries, table.DriftEntry{Table: rel.name, Key: d.Key, Reason: Reason, Stale: string(s.secondary)})
			detected = append(detected, m[joinKey(d.Key)].at)
			s.r.opts.Metrics.Differences(rel.name.String(), string(d.Kind), 1)
		}
	}
	if len(entries) > 0 && s.until == 0 {
		// Before recording which store is stale, make sure this store is
		// still the primary: a difference in a mirror write that the new
		// primary made after a flip is stale on this store, not the other.
		if err := s.follow(ctx); err != nil {
			return err
		}
	}
	if !s.flippedAt.IsZero() {
		kept, keptAt := entries[:0], detected[:0]
		for i, e := range entries {
			if detected[i].Before(s.flippedAt) {
				kept, keptAt = append(kept, e), append(keptAt, detected[i])
			}
		}
		entries, detected = kept, keptAt
	}
	if err := table.RecordDrift(ctx, s.control, entries); err != nil {
		return err
	}
	if len(entries) > 0 {
		s.r.log.Info("the change feed found differences; recorded as drift", "entries", len(entries), "stale", s.secondary)
	}
	if k := s.r.opts.Knobs.Detected; k != nil {
		for _, at := range detected {
			k(at)
		}
	}
	s.checked = max(s.checked, b.end)
	if !b.last.IsZero() {
		s.lastAt = b.last
	}
	return nil
}

func (s *session) secondaryEmpty(ctx context.Context, rel *relation) (bool, error) {
	conn, name := s.new, rel.m.New.Name
	if s.store == route.New {
		conn, name = s.old, rel.m.Old.Name
	}
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+name.Quoted()+")").Scan(&exists); err != nil {
		return false, fmt.Errorf("reading %s on the %s store: %w", name, s.secondary, err)
	}
	return !exists, nil
}

func (s *session) checker(ctx context.Context, rel *relation) (*compare.Checker, error) {
	if c := s.checkers[rel.name]; c != nil {
		return c, nil
	}
	c, err := compare.NewChecker(ctx, s.old, s.new, rel.m, compare.Options{Settle: s.r.opts.Settle, PrimaryNew: s.primaryNow == route.New})
	if err != nil {
		return nil, err
	}
	s.checkers[rel.name] = c
	return c, nil
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
	if err := heartbeat(ctx, s.control, s.store, s.r.opts.Replica, s.checked); err != nil {
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
	s.checkers = map[table.Name]*compare.Checker{}
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

// errNoSlot is returned by guard when the slot does not exist.
var errNoSlot = errors.New("the replication slot is gone")

// guard measures the WAL the slot retains on the primary: past WALWarn
// it warns, past WALMax it drops the slot rather than fill the primary's
// disk, creates it again, and records whole-table drift for every table
// in scope, so nothing the dropped slot held is trusted unchecked. The
// drift is recorded after the new slot exists, so the repair that copies
// the tables runs after every change the new slot misses.
func (s *session) guard(ctx context.Context) error {
	var retained *int64
	err := s.prim.QueryRow(ctx, "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()", s.slot).Scan(&retained)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%w: %s on the %s store", errNoSlot, s.slot, s.store)
	}
	if err != nil {
		return fmt.Errorf("reading the WAL the slot %s retains: %w", s.slot, err)
	}
	if retained == nil {
		return nil
	}
	s.r.opts.Metrics.Retained(*retained)
	o := s.r.opts
	switch {
	case o.WALMax > 0 && *retained > o.WALMax:
		s.r.log.Error("the change feed's slot retains more WAL than feed.wal_max: dropping it and recording every table in scope as drift",
			"slot", s.slot, "store", s.store, "retained_bytes", *retained, "wal_max", o.WALMax)
		if s.repl != nil {
			_ = s.repl.Close(ctx)
			s.repl = nil
		}
		if err := DropSlot(ctx, s.prim, s.slot); err != nil {
			return err
		}
		if _, err := EnsureSlot(ctx, s.prim, s.slot); err != nil {
			return err
		}
		scope, err := publishedTables(ctx, s.prim)
		if err != nil {
			return err
		}
		var entries []table.DriftEntry
		for _, n := range scope {
			entries = append(entries, table.DriftEntry{Table: n, Reason: Reason, Stale: string(s.secondary)})
			o.Metrics.Differences(n.String(), "slot dropped", 1)
		}
		if err := table.RecordDrift(ctx, s.control, entries); err != nil {
			return err
		}
		if err := heartbeat(ctx, s.control, s.store, o.Replica, 0); err != nil {
			return err
		}
		_, _ = s.control.Exec(ctx, "UPDATE tandem.feed SET last_error = $2 WHERE store = $1", string(s.store),
			fmt.Sprintf("slot dropped at %s: it retained %d bytes of WAL, more than feed.wal_max; every table in scope recorded as drift", time.Now().UTC().Format(time.RFC3339), *retained))
		return errFollow // a running session restarts on the new slot
	case o.WALWarn > 0 && *retained > o.WALWarn:
		if !s.warned {
			s.r.log.Warn("the change feed's slot retains more WAL than feed.wal_warn; the feed is behind or stopped",
				"slot", s.slot, "store", s.store, "retained_bytes", *retained, "wal_warn", o.WALWarn, "wal_max", o.WALMax)
		}
		s.warned = true
	default:
		s.warned = false
	}
	return nil
}

// heartbeat registers holder as running the feed on store, alive now, and
// advances checked_lsn to checked (never back) when it is set.
func heartbeat(ctx context.Context, control *pgx.Conn, store route.Store, holder string, checked pglogrepl.LSN) error {
	var lsn *string
	if checked != 0 {
		v := checked.String()
		lsn = &v
	}
	_, err := control.Exec(ctx, `INSERT INTO tandem.feed AS f (store, slot_name, holder, checked_lsn, checked_at, heartbeat_at)
		VALUES ($1, $2, $3, $4::pg_lsn, CASE WHEN $4::pg_lsn IS NULL THEN NULL ELSE now() END, now())
		ON CONFLICT (store) DO UPDATE SET slot_name = EXCLUDED.slot_name, holder = EXCLUDED.holder, heartbeat_at = now(),
			checked_lsn = GREATEST(f.checked_lsn, EXCLUDED.checked_lsn),
			checked_at = COALESCE(EXCLUDED.checked_at, f.checked_at)`, string(store), SlotName(store), holder, lsn)
	if err != nil {
		return fmt.Errorf("the change feed's heartbeat: %w", err)
	}
	return nil
}

// publishedTables are the tables of the feed's publication on the store
// conn reaches: the tables in scope, by the primary's names, known without
// the secondary or the mappings.
func publishedTables(ctx context.Context, conn *pgx.Conn) ([]table.Name, error) {
	rows, err := conn.Query(ctx, "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2", Publication)
	if err != nil {
		return nil, fmt.Errorf("reading the publication %s: %w", Publication, err)
	}
	defer rows.Close()
	var out []table.Name
	for rows.Next() {
		var n table.Name
		if err := rows.Scan(&n.Schema, &n.Table); err != nil {
			return nil, fmt.Errorf("reading the publication %s: %w", Publication, err)
		}
		out = append(out, n)
	}
	return out, rows.Err()
}
