-- The control schema as Tandem created it before the schema was versioned:
-- each owner's DDL, as the code ran it (every statement idempotent, under
-- the advisory lock hashtext('tandem.route.schema')). Kept as the fixture
-- of an existing control schema that must upgrade cleanly (TestUpgradeFromBeforeVersions).

-- route.EnsureSchema: the routing state, its history, the replicas, the fence token (internal/route/control.go schemaSQL)
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.state (
	id         int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
	version    bigint NOT NULL,
	primary_store text NOT NULL CHECK (primary_store IN ('old', 'new')),
	mirror     boolean NOT NULL,
	reads      int NOT NULL CHECK (reads BETWEEN 0 AND 100),
	shadow     int NOT NULL CHECK (shadow BETWEEN 0 AND 100),
	changed_at timestamptz NOT NULL DEFAULT now(),
	changed_by text NOT NULL
);
CREATE TABLE IF NOT EXISTS tandem.state_history (
	version    bigint PRIMARY KEY,
	primary_store text NOT NULL,
	mirror     boolean NOT NULL,
	reads      int NOT NULL,
	shadow     int NOT NULL,
	changed_at timestamptz NOT NULL DEFAULT now(),
	changed_by text NOT NULL,
	reason     text NOT NULL DEFAULT '',
	forced     boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS tandem.replicas (
	replica_id    text PRIMARY KEY,
	acked_version bigint NOT NULL,
	heartbeat_at  timestamptz NOT NULL DEFAULT now(),
	started_at    timestamptz NOT NULL DEFAULT now()
);
-- Added with the write flip; ADD COLUMN IF NOT EXISTS upgrades an older schema in place.
ALTER TABLE tandem.state
	ADD COLUMN IF NOT EXISTS fence bigint NOT NULL DEFAULT 0,
	ADD COLUMN IF NOT EXISTS fence_expires timestamptz NULL;
ALTER TABLE tandem.state_history
	ADD COLUMN IF NOT EXISTS fence_ms double precision NULL;
ALTER TABLE tandem.replicas
	ADD COLUMN IF NOT EXISTS fence_acked bigint NOT NULL DEFAULT 0,
	ADD COLUMN IF NOT EXISTS breaker text NOT NULL DEFAULT 'closed',
	ADD COLUMN IF NOT EXISTS writers bigint NOT NULL DEFAULT 0;
CREATE SEQUENCE IF NOT EXISTS tandem.fence_token;
INSERT INTO tandem.state (id, version, primary_store, mirror, reads, shadow, changed_by)
VALUES (1, 1, 'old', false, 0, 0, 'tandem: initial passthrough')
ON CONFLICT (id) DO NOTHING;
INSERT INTO tandem.state_history (version, primary_store, mirror, reads, shadow, changed_by, reason)
VALUES (1, 'old', false, 0, 0, 'tandem: initial passthrough', 'control schema created')
ON CONFLICT (version) DO NOTHING;

-- table.EnsureSchema: the drift ledger (internal/table/drift.go driftSchemaSQL)
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.drift (
	id          bigserial PRIMARY KEY,
	schema_name text NOT NULL,
	table_name  text NOT NULL,
	key         text[],
	reason      text NOT NULL DEFAULT '',
	recorded_at timestamptz NOT NULL DEFAULT now(),
	repaired_at timestamptz,
	attempts    int NOT NULL DEFAULT 0,
	last_error  text,
	stale       text NOT NULL DEFAULT 'new' CHECK (stale IN ('old', 'new')),
	failing_since   timestamptz,
	next_attempt_at timestamptz
);
-- Ledgers created before the stale column: every entry then was a write the
-- new store (the only secondary before a write flip existed) missed.
ALTER TABLE tandem.drift ADD COLUMN IF NOT EXISTS stale text NOT NULL DEFAULT 'new' CHECK (stale IN ('old', 'new'));
-- Ledgers created before the repairer backed off failing entries (issue 10).
ALTER TABLE tandem.drift ADD COLUMN IF NOT EXISTS attempts int NOT NULL DEFAULT 0;
ALTER TABLE tandem.drift ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE tandem.drift ADD COLUMN IF NOT EXISTS failing_since timestamptz;
ALTER TABLE tandem.drift ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz;
COMMENT ON COLUMN tandem.drift.attempts IS 'failed repair attempts so far; the entry is stuck at routing.drift_stuck_attempts';
COMMENT ON COLUMN tandem.drift.last_error IS 'the error of the last failed repair attempt';
COMMENT ON COLUMN tandem.drift.failing_since IS 'when the first repair attempt failed';
COMMENT ON COLUMN tandem.drift.next_attempt_at IS 'the repairer leaves the entry alone until then (backoff after a failure); NULL = now';
COMMENT ON COLUMN tandem.drift.key IS 'the key values as text, in key order; NULL = the whole table';
COMMENT ON COLUMN tandem.drift.stale IS 'the store that missed the write (old or new); the repairer copies to it from the other';
CREATE INDEX IF NOT EXISTS drift_open ON tandem.drift (repaired_at) WHERE repaired_at IS NULL;

-- mismatch.EnsureSchema: shadow-read mismatches and counts (internal/mismatch/mismatch.go SchemaSQL)
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.mismatches (
	id          bigserial PRIMARY KEY,
	at          timestamptz NOT NULL DEFAULT now(),
	replica     text NOT NULL,
	fingerprint text NOT NULL,
	statement   text NOT NULL,
	params      jsonb,
	served_by   text NOT NULL,
	shadow_on   text NOT NULL,
	aa          boolean NOT NULL DEFAULT false,
	kind        text NOT NULL,
	summary     text NOT NULL,
	diff        jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS mismatches_fingerprint ON tandem.mismatches (fingerprint, at);
COMMENT ON COLUMN tandem.mismatches.params IS 'the statement''s parameters as text (NULL: none, or not recorded as shadow.record_values is off)';
CREATE TABLE IF NOT EXISTS tandem.shadow_stats (
	bucket      timestamptz NOT NULL,
	replica     text NOT NULL,
	fingerprint text NOT NULL,
	matched     bigint NOT NULL DEFAULT 0,
	mismatched  bigint NOT NULL DEFAULT 0,
	transient   bigint NOT NULL DEFAULT 0,
	dropped     bigint NOT NULL DEFAULT 0,
	skipped     bigint NOT NULL DEFAULT 0,
	served_seconds double precision NOT NULL DEFAULT 0,
	shadow_seconds double precision NOT NULL DEFAULT 0,
	PRIMARY KEY (bucket, replica, fingerprint)
);
COMMENT ON TABLE tandem.shadow_stats IS 'shadow-read outcomes per minute, replica and statement fingerprint';

-- route.EnsureFeedSchema: the change feed's progress (internal/route/feed.go feedSchemaSQL)
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.feed (
  store        text PRIMARY KEY CHECK (store IN ('old','new')),
  slot_name    text NOT NULL,
  holder       text,
  checked_lsn  pg_lsn,
  checked_at   timestamptz,
  heartbeat_at timestamptz NOT NULL DEFAULT now(),
  last_error   text
);
COMMENT ON COLUMN tandem.feed.store IS 'the store whose WAL the feed reads';
COMMENT ON COLUMN tandem.feed.holder IS 'the proxy replica running the feed now; NULL = nobody';
COMMENT ON COLUMN tandem.feed.checked_lsn IS 'every transaction that committed on store at or before this LSN is checked: equal on the other store, or in tandem.drift';
COMMENT ON COLUMN tandem.feed.heartbeat_at IS 'the feed is alive: updated at least every second while it runs';

-- backfill.EnsureSchema: the backfill's plan and chunks (backfill/schema.go controlSchemaSQL)
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.backfill_tables (
	schema_name text NOT NULL,
	table_name  text NOT NULL,
	total_rows  bigint NOT NULL,
	chunks      int NOT NULL,
	planned_at  timestamptz NOT NULL DEFAULT now(),
	finished_at timestamptz,
	PRIMARY KEY (schema_name, table_name)
);
COMMENT ON TABLE tandem.backfill_tables IS 'one row per table a backfill has planned; finished_at is set when every chunk is done';
CREATE TABLE IF NOT EXISTS tandem.backfill_chunks (
	schema_name     text NOT NULL,
	table_name      text NOT NULL,
	chunk           int NOT NULL,
	lo              text[],
	hi              text[],
	status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
	claimed_by      text,
	claimed_at      timestamptz,
	attempts        int NOT NULL DEFAULT 0,
	next_attempt_at timestamptz,
	last_error      text,
	failed_keys     jsonb NOT NULL DEFAULT '[]',
	rows            bigint NOT NULL DEFAULT 0,
	created_at      timestamptz NOT NULL DEFAULT now(),
	updated_at      timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (schema_name, table_name, chunk)
);
COMMENT ON COLUMN tandem.backfill_chunks.lo IS 'the chunk covers keys after lo (NULL: from the start) up to hi inclusive (NULL: to the end), as text in key order';
COMMENT ON COLUMN tandem.backfill_chunks.status IS 'a worker claims a chunk by locking its row FOR UPDATE for as long as it works on it; running without a lock means the claim died';

-- table.EnsureMigrationLog (with backfill.EnsureSchema and compare): the migration log (internal/table/migration_log.go MigrationLogSchemaSQL)
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.migration_log (
	id          bigserial PRIMARY KEY,
	schema_name text NOT NULL,
	table_name  text NOT NULL,
	lo          text[],
	lo_inclusive boolean NOT NULL DEFAULT false,
	hi          text[],
	rows        bigint NOT NULL DEFAULT 0,
	status      text NOT NULL CONSTRAINT migration_log_status_allowed CHECK (status IN ('done', 'failed', 'repaired')),
	error       text,
	duration_ms double precision NOT NULL DEFAULT 0,
	attempt     int NOT NULL DEFAULT 1,
	worker_id   text NOT NULL,
	logged_at   timestamptz NOT NULL DEFAULT now(),
	source      text NOT NULL DEFAULT 'backfill'
);
ALTER TABLE tandem.migration_log ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT 'backfill';
DO $tandem$
DECLARE
	c record;
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'tandem.migration_log'::regclass
			AND contype = 'c' AND conname = 'migration_log_status_allowed') THEN
		FOR c IN SELECT conname FROM pg_constraint WHERE conrelid = 'tandem.migration_log'::regclass
				AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%status%' LOOP
			EXECUTE format('ALTER TABLE tandem.migration_log DROP CONSTRAINT %I', c.conname);
		END LOOP;
		ALTER TABLE tandem.migration_log ADD CONSTRAINT migration_log_status_allowed
			CHECK (status IN ('done', 'failed', 'repaired'));
	END IF;
END
$tandem$;
COMMENT ON COLUMN tandem.migration_log.source IS 'the tool that ran the unit: backfill or compare (a verify repair)';
CREATE INDEX IF NOT EXISTS migration_log_failed ON tandem.migration_log (schema_name, table_name) WHERE status = 'failed';

-- backfill.EnsureControl: the backfill's live throttle (backfill/control.go controlTableSQL)
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.backfill_control (
	id         int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
	rate       float8 NOT NULL DEFAULT 0 CHECK (rate >= 0),
	paused     boolean NOT NULL DEFAULT false,
	updated_at timestamptz NOT NULL DEFAULT now(),
	updated_by text
);
COMMENT ON TABLE tandem.backfill_control IS 'the live throttle of every running tandem backfill: rate in rows per second (0 = unlimited) and the pause switch; engines poll it about every second';
INSERT INTO tandem.backfill_control (id) VALUES (1) ON CONFLICT DO NOTHING;

-- compare: the verify runs (compare/runs.go runsSchemaSQL)
CREATE SCHEMA IF NOT EXISTS tandem;
CREATE TABLE IF NOT EXISTS tandem.verify_runs (
	id             bigserial PRIMARY KEY,
	schema_name    text NOT NULL,
	table_name     text NOT NULL,
	new_schema     text NOT NULL,
	new_table      text NOT NULL,
	started_at     timestamptz NOT NULL DEFAULT now(),
	updated_at     timestamptz NOT NULL DEFAULT now(),
	finished_at    timestamptz,
	status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
	checkpoint     text[],
	rows           bigint NOT NULL DEFAULT 0,
	ranges         bigint NOT NULL DEFAULT 0,
	missing_on_new bigint NOT NULL DEFAULT 0,
	missing_on_old bigint NOT NULL DEFAULT 0,
	value_diff     bigint NOT NULL DEFAULT 0,
	transient      bigint NOT NULL DEFAULT 0,
	repaired       bigint NOT NULL DEFAULT 0,
	drift_keys     bigint NOT NULL DEFAULT 0,
	clean          boolean,
	error          text
);
COMMENT ON TABLE tandem.verify_runs IS 'one row per table verify (tandem compare); the cutover gate reads the latest done run per table';
COMMENT ON COLUMN tandem.verify_runs.checkpoint IS 'the last old key whose top-level range is verified (and repaired), as text in key order';
COMMENT ON COLUMN tandem.verify_runs.clean IS 'set when done: no unrepaired difference';
CREATE INDEX IF NOT EXISTS verify_runs_table ON tandem.verify_runs (schema_name, table_name, id);
