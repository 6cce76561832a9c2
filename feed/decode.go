package feed

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/tandemdb/tandem/internal/route"
	"github.com/tandemdb/tandem/internal/table"
)

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
	rel := &relation{name: n, m: mp, onOld: s.store == route.Old}
	var names []string
	if s.store == route.New && mp.Filtered() {
		// A new table other deployments share: only the rows with this
		// deployment's discriminator values are its to check.
		for _, c := range m.Columns {
			rel.cols = append(rel.cols, c.Name)
		}
	}
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
	if rel.cols != nil && !rel.owns(t) {
		return // another deployment's row
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

// relation is a published table as the stream describes it.
type relation struct {
	name table.Name // the primary's table
	// m is its mapping: on old, the old table's (a split's owner part);
	// on new, the new table's (one part of a split).
	m      *table.Mapping
	onOld  bool  // the primary is old: a split's changes are checked through every part
	keyIdx []int // the key columns' positions in a tuple, in key order; nil when the key cannot be read
	// cols are the tuple's column names when the table is a new table
	// shared with other deployments (a discriminator), nil otherwise.
	cols []string
}

// parts are the mappings rel's changes are checked through: on old, every
// part of a split old table (its one mapping otherwise; a table of a merge
// its own); on new, every table of a merge into the new table (the new
// table's one mapping otherwise, a split's part).
func (rel *relation) parts() []*table.Mapping {
	switch {
	case rel.onOld:
		return rel.m.Parts()
	case rel.m.Merged():
		return rel.m.Members()
	}
	return []*table.Mapping{rel.m}
}

// owns reports whether tuple t of rel carries this deployment's
// discriminator values (table.Mapping.OwnsNewRow). A column sent without
// its value (an unchanged TOASTed one, or a non-key column of a delete's
// old key) counts as NULL, which no discriminator is: the discriminator
// columns are in the new key, so a tuple always carries them.
func (rel *relation) owns(t *pglogrepl.TupleData) bool {
	values := make([][]byte, len(rel.cols))
	for i, c := range t.Columns {
		if i < len(values) && c.DataType == pglogrepl.TupleDataTypeText {
			values[i] = c.Data
		}
	}
	return rel.m.OwnsNewRow(rel.cols, values)
}
