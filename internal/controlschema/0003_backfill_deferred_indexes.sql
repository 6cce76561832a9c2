-- tandem backfill --defer-indexes (issue 14): the definitions of the new store's
-- indexes dropped before the copy, saved before each drop; a row goes once its
-- index is rebuilt and valid.
CREATE TABLE IF NOT EXISTS tandem.backfill_deferred_indexes (
	index_schema text NOT NULL,
	index_name   text NOT NULL,
	schema_name  text NOT NULL,
	table_name   text NOT NULL,
	definition   text NOT NULL,
	saved_at     timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (index_schema, index_name)
);
COMMENT ON TABLE tandem.backfill_deferred_indexes IS 'indexes of the new store (on schema_name.table_name there) that tandem backfill --defer-indexes dropped for the copy, with their pg_get_indexdef definitions; rebuilt with CREATE INDEX CONCURRENTLY after the copy (or by the next run after a crash), and the row deleted once the index is valid; the write-flip gate refuses while a row is left';
