-- The snapshot backfill (issue 14): the logical slot it reads its changes from.
CREATE TABLE IF NOT EXISTS tandem.backfill_slots (
	slot_name      text PRIMARY KEY,
	consistent_lsn pg_lsn NOT NULL,
	schemas        text[] NOT NULL,
	tables         text[] NOT NULL,
	created_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tandem.backfill_slots IS 'the logical slot on the old store of a snapshot backfill: its changes from consistent_lsn on are reconciled before its tables are finished; dropped with the row after the reconcile';
