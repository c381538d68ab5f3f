-- The SQL API of wal_listener (DESIGN.md section 6); runs last in the
-- extension script, after the Rust functions it calls.

-- Where capture starts: the WAL position when CREATE EXTENSION ran. Every
-- change committed after it is published (the worker has its slot before
-- this transaction commits), none before it. Not dumped: a restored
-- database starts anew.
CREATE TABLE capture_start (
    lsn pg_lsn NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON capture_start FROM PUBLIC;
INSERT INTO capture_start (lsn) VALUES (pg_current_wal_insert_lsn());
-- Marks this transaction in the change stream, for a worker that streams
-- the database before the extension exists.
SELECT pg_logical_emit_message(true, 'wal_listener.created', '');

-- Filter versions, one row per change: the newest is in force. Each
-- version takes effect at the commit that wrote it: the worker meets that
-- commit in the change stream (marked by the messages below) and applies
-- the version there.
CREATE TABLE config_changes (
    version bigint PRIMARY KEY,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by name NOT NULL DEFAULT session_user
);
REVOKE ALL ON config_changes FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('config_changes', '');

-- The rules of each version. Tables are regclass, so a dump names them and
-- a restore finds them again under their new OIDs.
CREATE TABLE filter_rules (
    version bigint NOT NULL,
    tbl regclass NOT NULL,
    actions text[] NOT NULL,
    subject text,
    PRIMARY KEY (version, tbl)
);
REVOKE ALL ON filter_rules FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('filter_rules', '');

-- The key config messages are signed with: any role may write a logical
-- message with our prefix (pg_logical_emit_message is PUBLIC), so the
-- worker takes only those whose MAC this key makes (filters.rs,
-- verified_payload). 32 random bytes (gen_random_uuid is pg_strong_random).
-- Not dumped: a restored database makes its own.
CREATE TABLE message_key (key bytea NOT NULL);
REVOKE ALL ON message_key FROM PUBLIC;
-- Row security with no policy: pg_read_all_data (which passes over
-- grants, not row security) reads no row; the owner still does.
ALTER TABLE message_key ENABLE ROW LEVEL SECURITY;
INSERT INTO message_key
    SELECT sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'));

-- <mac> <payload>: the hex of SHA-256(key || SHA-256(key || "<xid> " ||
-- payload)), xid being the low 32 bits of this transaction's id (what
-- pgoutput's BEGIN carries): a copy in another transaction does not verify.
CREATE FUNCTION _signed(p_payload text) RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT encode(sha256(k.key || sha256(k.key || convert_to(
               (pg_current_xact_id()::text::numeric % 4294967296)::text || ' ' || p_payload, 'UTF8'))), 'hex')
           || ' ' || p_payload
      FROM @extschema@.message_key k
$$;

-- Writes each new version and rule into the change stream as a logical
-- message: it reaches the worker whatever the publication contains, with
-- the table's OID in this cluster (also for the rows a restore writes), and
-- the worker needs no read of a transaction that may not be visible yet
-- (with a synchronous standby, it is not until the worker confirms it).
CREATE FUNCTION _announce_filter_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_TABLE_NAME = 'config_changes' THEN
        PERFORM pg_logical_emit_message(true, 'wal_listener.config',
            @extschema@._signed(jsonb_build_object('version', NEW.version)::text));
    ELSE
        PERFORM pg_logical_emit_message(true, 'wal_listener.config',
            @extschema@._signed(jsonb_build_object('version', NEW.version, 'relid', NEW.tbl::oid::bigint,
                                                   'table', NEW.tbl::text, 'actions', NEW.actions,
                                                   'subject', NEW.subject)::text));
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER announce AFTER INSERT ON config_changes
    FOR EACH ROW EXECUTE FUNCTION _announce_filter_change();
CREATE TRIGGER announce AFTER INSERT ON filter_rules
    FOR EACH ROW EXECUTE FUNCTION _announce_filter_change();

-- Where each version took effect, written by the worker before it confirms
-- anything past that commit, with the rules as it applied them: after a
-- restart it starts with the version in force at the slot's position.
-- Positions belong to this cluster's WAL: not dumped.
CREATE TABLE applied_versions (
    version bigint PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL,
    rules jsonb NOT NULL
);
REVOKE ALL ON applied_versions FROM PUBLIC;

-- Slots the worker has streamed from. One listed here but missing from
-- pg_replication_slots was dropped: the worker then stops instead of
-- creating a new slot, which would silently skip the changes in between;
-- reset_slot() accepts that loss. Not dumped: a restored database is a new
-- source with a new slot.
CREATE TABLE streamed_slots (
    slot_name name PRIMARY KEY,
    first_streamed_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON streamed_slots FROM PUBLIC;

CREATE VIEW filters AS
    SELECT r.tbl AS "table", r.actions, r.subject
      FROM @extschema@.filter_rules r
     WHERE r.version = (SELECT max(c.version) FROM @extschema@.config_changes c)
       AND EXISTS (SELECT FROM pg_catalog.pg_class WHERE oid = r.tbl);
COMMENT ON VIEW filters IS 'Filters in force; with no rows every table of the publication is published.';

-- The rules of version p_version without p_tbl (and without dropped
-- tables), plus p_tbl's rule when p_add.
CREATE FUNCTION _next_rules(p_version bigint, p_tbl regclass, p_add boolean, p_actions text[], p_subject text)
RETURNS TABLE (tbl regclass, actions text[], subject text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.tbl, r.actions, r.subject FROM @extschema@.filter_rules r
     WHERE r.version = p_version AND r.tbl <> p_tbl AND EXISTS (SELECT FROM pg_class c WHERE c.oid = r.tbl)
    UNION ALL
    SELECT p_tbl, p_actions, p_subject WHERE p_add
$$;

-- Writes the next version when it differs from the current one; returns
-- whether p_tbl had a rule. An advisory lock serializes writers, so version
-- order is commit order.
CREATE FUNCTION _write_filters(p_tbl regclass, p_add boolean, p_actions text[], p_subject text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_current bigint;
    v_had_rule boolean;
    v_unchanged boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(7331000001);
    SELECT max(c.version) INTO v_current FROM @extschema@.config_changes c;
    v_had_rule := EXISTS (SELECT FROM @extschema@.filter_rules r WHERE r.version = v_current AND r.tbl = p_tbl);
    SELECT NOT EXISTS (
               (SELECT r.tbl, r.actions, r.subject FROM @extschema@.filter_rules r WHERE r.version = v_current
                EXCEPT SELECT * FROM @extschema@._next_rules(v_current, p_tbl, p_add, p_actions, p_subject))
               UNION ALL
               (SELECT * FROM @extschema@._next_rules(v_current, p_tbl, p_add, p_actions, p_subject)
                EXCEPT SELECT r.tbl, r.actions, r.subject FROM @extschema@.filter_rules r WHERE r.version = v_current))
      INTO v_unchanged;
    IF NOT v_unchanged THEN
        INSERT INTO @extschema@.config_changes (version) VALUES (coalesce(v_current, 0) + 1);
        INSERT INTO @extschema@.filter_rules (version, tbl, actions, subject)
            SELECT coalesce(v_current, 0) + 1, n.tbl, n.actions, n.subject
              FROM @extschema@._next_rules(v_current, p_tbl, p_add, p_actions, p_subject) n;
    END IF;
    RETURN v_had_rule;
END
$$;

CREATE FUNCTION add_filter(
    tbl regclass,
    actions text[] DEFAULT '{insert,update,delete,truncate}',
    subject text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind "char";
    v_schema name;
    v_actions text[];
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'tbl must not be NULL; pass a table, e.g. ''public.orders''';
    END IF;
    SELECT c.relkind, n.nspname INTO v_kind, v_schema
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF v_kind IS DISTINCT FROM 'r' THEN
        RAISE EXCEPTION '% is not a table (relkind %); filters apply to ordinary tables%',
            tbl, coalesce(v_kind::text, 'unknown'),
            CASE WHEN v_kind = 'p' THEN '; add a filter for each partition' ELSE '' END;
    END IF;
    IF v_schema = '@extschema@' THEN
        RAISE EXCEPTION '% belongs to wal_listener, whose tables are never published', tbl;
    END IF;
    v_actions := @extschema@._normalize_actions(actions);
    PERFORM @extschema@._check_subject(subject);
    PERFORM @extschema@._write_filters(tbl, true, v_actions, subject);
END
$$;
COMMENT ON FUNCTION add_filter(regclass, text[], text) IS
    'Adds or replaces the filter of tbl: once any filter exists, only listed tables are published.';

CREATE FUNCTION remove_filter(tbl regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'tbl must not be NULL; pass a table, e.g. ''public.orders''';
    END IF;
    RETURN @extschema@._write_filters(tbl, false, NULL, NULL);
END
$$;
COMMENT ON FUNCTION remove_filter(regclass) IS 'Removes the filter of tbl; true when there was one.';

-- Backfills (DESIGN.md section 6): existing rows as READ events. The
-- worker runs one job at a time, saving its progress after each chunk.
-- Not dumped: jobs belong to this cluster's stream.
CREATE TABLE backfill_jobs (
    id bigserial PRIMARY KEY,
    tbl regclass NOT NULL,
    where_clause text,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'done', 'cancelled', 'failed')),
    rows_done bigint NOT NULL DEFAULT 0,
    rows_estimated bigint,
    chunks_done bigint NOT NULL DEFAULT 0,
    -- The key of the last row of the last finished chunk: a restart resumes after it.
    last_key text[],
    -- The role whose privileges read the rows and evaluate where_clause:
    -- the current user where backfill() was called.
    run_as regrole NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    requested_by name NOT NULL DEFAULT session_user,
    started_at timestamptz,
    finished_at timestamptz,
    last_error text
);
CREATE UNIQUE INDEX backfill_jobs_one_active_per_table ON backfill_jobs (tbl) WHERE state IN ('pending', 'running');
REVOKE ALL ON backfill_jobs FROM PUBLIC;

CREATE VIEW backfills AS
    SELECT j.id, j.tbl AS "table", j.state, j.rows_done, j.rows_estimated, j.started_at, j.finished_at, j.last_error
      FROM @extschema@.backfill_jobs j;
COMMENT ON VIEW backfills IS 'Backfills and their progress.';

-- The columns a change's old tuple carries as its key (attnums, in index
-- order), as Postgres picks them (RelationGetIdentityKeyBitmap): the key
-- columns of the replica identity index, which is the primary key by
-- default or the index REPLICA IDENTITY USING INDEX names, and must be
-- valid and immediate. NULL with FULL (every column), NOTHING, or no such
-- index. pgoutput flags these columns as the key; so do READ events.
CREATE FUNCTION _replica_identity_key(p_tbl regclass) RETURNS int2[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (SELECT array_agg(k.attnum ORDER BY k.n)
              FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n) WHERE k.n <= i.indnkeyatts)
      FROM pg_index i JOIN pg_class r ON r.oid = i.indrelid
     WHERE i.indrelid = p_tbl AND i.indisvalid AND i.indisunique AND i.indimmediate AND i.indpred IS NULL
       AND CASE r.relreplident WHEN 'i' THEN i.indisreplident WHEN 'd' THEN i.indisprimary ELSE false END
$$;

-- The columns a backfill orders and resumes its chunks by (attnums, in
-- index order): those a change's old tuple carries, so that the watermark
-- window matches a DELETE or a key UPDATE against the rows read, i.e. the
-- replica identity's key. With FULL the old tuple has every column, and
-- with NOTHING (or no replica identity index) no UPDATE or DELETE is
-- published: then any unique index on NOT NULL columns serves, the
-- primary key first. NULL: none. The one rule; the worker reads it too
-- (DESIGN.md rule 7).
CREATE FUNCTION _chunk_key(p_tbl regclass) RETURNS int2[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(@extschema@._replica_identity_key(p_tbl), (
        SELECT c.attnums
          FROM (SELECT i.indexrelid, i.indisprimary,
                       (SELECT array_agg(k.attnum ORDER BY k.n)
                          FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n) WHERE k.n <= i.indnkeyatts) AS attnums
                  FROM pg_index i
                 WHERE i.indrelid = p_tbl AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
                   AND i.indexprs IS NULL) c
         WHERE NOT EXISTS (SELECT FROM pg_attribute a
                            WHERE a.attrelid = p_tbl AND a.attnum = ANY (c.attnums) AND NOT a.attnotnull)
         ORDER BY c.indisprimary DESC, c.indexrelid
         LIMIT 1))
$$;

-- backfill() (Rust, in backfill_api.rs) records the role that calls it and
-- runs this as the extension's owner: the checks, then the job. The clause
-- is stored as the server re-prints it from the analysed condition.
CREATE FUNCTION _enqueue_backfill(p_tbl regclass, p_where_clause text, p_role oid) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind "char";
    v_schema name;
    v_schema_oid oid;
    v_name name;
    v_publication text := current_setting('wal_listener.publication');
    v_condition text;
    v_running bigint;
    v_id bigint;
BEGIN
    SELECT c.relkind, n.nspname, n.oid, c.relname INTO v_kind, v_schema, v_schema_oid, v_name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_tbl;
    IF v_kind IS DISTINCT FROM 'r' THEN
        RAISE EXCEPTION '% is not a table (relkind %); backfills read ordinary tables%', p_tbl,
            coalesce(v_kind::text, 'unknown'),
            CASE WHEN v_kind = 'p' THEN '; backfill each partition' ELSE '' END;
    END IF;
    IF v_schema = '@extschema@' THEN
        RAISE EXCEPTION '% belongs to wal_listener, whose tables are never published', p_tbl;
    END IF;
    IF NOT has_table_privilege(p_role, p_tbl, 'SELECT') OR NOT has_schema_privilege(p_role, v_schema_oid, 'USAGE') THEN
        RAISE EXCEPTION 'role % may not SELECT %: a backfill reads the table with the privileges of the role that calls backfill()',
            p_role::regrole, p_tbl
            USING HINT = format('GRANT USAGE ON SCHEMA %I TO %s; GRANT SELECT ON %s TO %s;', v_schema, p_role::regrole, p_tbl, p_role::regrole);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_publication_tables t
                    WHERE t.pubname = v_publication AND t.schemaname = v_schema AND t.tablename = v_name) THEN
        RAISE EXCEPTION '% is not in publication %, so the worker publishes none of its changes', p_tbl, v_publication;
    END IF;
    IF @extschema@._chunk_key(p_tbl) IS NULL THEN
        RAISE EXCEPTION '% has no primary key or unique index on NOT NULL columns, which a backfill reads it by', p_tbl
            USING HINT = format('Add one, e.g. ALTER TABLE %s ADD PRIMARY KEY (id);', p_tbl);
    END IF;
    IF p_where_clause IS NOT NULL THEN
        BEGIN
            v_condition := @extschema@._check_where_clause(p_tbl::text, p_where_clause);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'where_clause % is not a condition on % alone: %', quote_literal(p_where_clause), p_tbl, SQLERRM
                USING HINT = 'Name your own functions and types with their schema (public.f(x)): the clause is read with search_path = pg_catalog.';
        END;
    END IF;
    SELECT j.id INTO v_running FROM @extschema@.backfill_jobs j
     WHERE j.tbl = p_tbl AND j.state IN ('pending', 'running');
    IF FOUND THEN
        RAISE EXCEPTION 'backfill % of % has not finished; wait for it or cancel it: SELECT wal_listener.cancel_backfill(%)',
            v_running, p_tbl, v_running;
    END IF;
    INSERT INTO @extschema@.backfill_jobs (tbl, where_clause, run_as)
        VALUES (p_tbl, v_condition, p_role::regrole) RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

COMMENT ON FUNCTION backfill(regclass, text) IS
    'Publishes the rows tbl has (matching where_clause, read with the calling role''s privileges) as READ events, consistent with the live stream; returns the id.';

CREATE FUNCTION cancel_backfill(id bigint) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH cancelled AS (
        UPDATE @extschema@.backfill_jobs j SET state = 'cancelled', finished_at = now()
         WHERE j.id = cancel_backfill.id AND j.state IN ('pending', 'running') RETURNING 1)
    SELECT EXISTS (SELECT FROM cancelled)
$$;
COMMENT ON FUNCTION cancel_backfill(bigint) IS 'Stops a backfill after its current chunk; true when it was pending or running.';

CREATE FUNCTION restart() RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@._request_restart() $$;
COMMENT ON FUNCTION restart() IS
    'Asks the worker to drop its connections and resume from the slot; returns at once (false: no worker).';

CREATE FUNCTION reset_slot() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_slot name := @extschema@._slot_name();
    v_wal_status text;
BEGIN
    SELECT s.wal_status INTO v_wal_status FROM pg_replication_slots s WHERE s.slot_name = v_slot;
    IF FOUND AND v_wal_status IS DISTINCT FROM 'lost' THEN
        RAISE EXCEPTION 'replication slot "%" is usable (wal_status %): nothing to reset', v_slot, v_wal_status
            USING HINT = 'reset_slot() is for a slot that was dropped or invalidated.';
    END IF;
    IF FOUND THEN
        PERFORM pg_drop_replication_slot(v_slot);
    END IF;
    DELETE FROM @extschema@.streamed_slots WHERE slot_name = v_slot;
    PERFORM @extschema@._request_restart();
    -- The static database's own slot, gone and forgotten now, gives way to wal_listener.slot_name.
    RETURN format('the worker creates slot "%s" anew at the current WAL position; changes committed '
                  'since the last confirmed position of slot "%s" are not published',
                  @extschema@._slot_name(), v_slot);
END
$$;
COMMENT ON FUNCTION reset_slot() IS
    'After the slot was dropped or invalidated: accept the lost changes and stream again from now.';

CREATE FUNCTION status(
    OUT state text,
    OUT pid integer,
    OUT slot text,
    OUT publication text,
    OUT confirmed_flush_lsn pg_lsn,
    OUT lag_bytes bigint,
    OUT retained_bytes bigint,
    OUT wal_status text,
    OUT retention_limit_bytes bigint,
    OUT retention_percent numeric,
    OUT events_published bigint,
    OUT events_filtered bigint,
    OUT events_skipped bigint,
    OUT nats_connected boolean,
    OUT last_error text,
    OUT last_error_time timestamptz,
    OUT last_event_time timestamptz,
    OUT started_at timestamptz,
    OUT warnings text[],
    OUT backfill text,
    OUT transactions_unbatched bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH here AS (
        SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS lsn,
               nullif(pg_size_bytes(current_setting('max_slot_wal_keep_size')), -1) AS retention_limit,
               @extschema@._sync_standby_warning(current_setting('synchronous_standby_names')) AS sync_warning
    )
    SELECT w.state,
           w.pid,
           @extschema@._slot_name(),
           current_setting('wal_listener.publication'),
           coalesce(s.confirmed_flush_lsn, nullif(w.worker_confirmed_lsn, '0/0')::pg_lsn),
           pg_wal_lsn_diff(h.lsn, coalesce(s.confirmed_flush_lsn, nullif(w.worker_confirmed_lsn, '0/0')::pg_lsn))::bigint,
           pg_wal_lsn_diff(h.lsn, s.restart_lsn)::bigint,
           s.wal_status,
           h.retention_limit,
           round(100 * pg_wal_lsn_diff(h.lsn, s.restart_lsn) / h.retention_limit, 1),
           w.events_published,
           w.events_filtered,
           w.events_skipped,
           w.nats_connected,
           CASE WHEN w.pid IS NULL AND pg_is_in_recovery()
                THEN 'server is a standby: the worker starts streaming after promotion'
                ELSE w.last_error END,
           to_timestamp(w.last_error_at_us / 1e6),
           to_timestamp(w.last_event_at_us / 1e6),
           to_timestamp(w.started_at_us / 1e6),
           -- Settings the worker reads once per session, and this one read now.
           w.warnings || CASE WHEN h.sync_warning IS NULL OR h.sync_warning = ANY (w.warnings) THEN '{}'::text[]
                              ELSE ARRAY[h.sync_warning] END,
           w.backfill,
           w.transactions_unbatched
      FROM @extschema@._worker_status() w
     CROSS JOIN here h
      LEFT JOIN pg_replication_slots s ON s.slot_name = @extschema@._slot_name()
$$;
COMMENT ON FUNCTION status() IS 'State of this database''s wal_listener worker: one row.';

CREATE FUNCTION cluster_status(
    OUT database text,
    OUT slot_name text,
    OUT state text,
    OUT pid integer,
    OUT events_published bigint,
    OUT confirmed_lsn pg_lsn,
    OUT last_error text)
RETURNS SETOF record
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT w.database, w.slot_name, w.state, w.pid, w.events_published,
           coalesce(s.confirmed_flush_lsn, nullif(w.worker_confirmed_lsn, '0/0')::pg_lsn), w.last_error
      FROM @extschema@._cluster_status() w
      LEFT JOIN pg_replication_slots s ON s.slot_name = w.slot_name
     ORDER BY w.database
$$;
COMMENT ON FUNCTION cluster_status() IS 'The wal_listener worker of every streamed database of the cluster: one row each.';

-- publish(): a message to NATS at this transaction's commit, in commit
-- order with its row changes, never if it rolls back (README, "Publishing
-- from SQL"). The payload goes as is: jsonb as its text, text as UTF-8,
-- bytea raw; an untyped literal takes the text form. Plain SQL that the
-- planner inlines (a SECURITY DEFINER wrapper cost more than the rest of
-- the call): it runs as the caller, so every name in it is qualified, and
-- _publish does the checks.
CREATE FUNCTION publish(subject text, payload bytea, headers jsonb DEFAULT NULL) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT @extschema@._publish(subject, payload, headers) $$;
CREATE FUNCTION publish(subject text, payload text, headers jsonb DEFAULT NULL) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT @extschema@._publish(subject, pg_catalog.convert_to(payload, 'UTF8'), headers) $$;
CREATE FUNCTION publish(subject text, payload jsonb, headers jsonb DEFAULT NULL) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT @extschema@._publish(subject, pg_catalog.convert_to(payload::pg_catalog.text, 'UTF8'), headers) $$;
COMMENT ON FUNCTION publish(text, jsonb, jsonb) IS
    'Publishes payload to subject when this transaction commits; never if it rolls back.';

-- Who may publish: superusers, and the members of this role (roles are
-- shared by the cluster's databases; another CREATE EXTENSION finds it).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'wal_listener_publisher') THEN
        CREATE ROLE wal_listener_publisher NOLOGIN;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION publish(text, bytea, jsonb), publish(text, text, jsonb), publish(text, jsonb, jsonb),
    _publish(text, bytea, jsonb)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION publish(text, bytea, jsonb), publish(text, text, jsonb), publish(text, jsonb, jsonb),
    _publish(text, bytea, jsonb)
    TO wal_listener_publisher;

-- Configuration is for superusers and roles an admin grants EXECUTE to;
-- monitoring for pg_monitor. USAGE on the schema lets everyone else be
-- refused by name ("permission denied for function add_filter").
GRANT USAGE ON SCHEMA @extschema@ TO PUBLIC;
REVOKE ALL ON FUNCTION add_filter(regclass, text[], text), remove_filter(regclass), restart(), reset_slot(),
    backfill(regclass, text), cancel_backfill(bigint), _check_where_clause(text, text),
    _enqueue_backfill(regclass, text, oid), _replica_identity_key(regclass), _chunk_key(regclass),
    _read_chunk(oid, text, bigint, oid[]),
    _write_filters(regclass, boolean, text[], text), _next_rules(bigint, regclass, boolean, text[], text),
    _announce_filter_change(), _signed(text), _request_restart(),
    _normalize_actions(text[]), _check_subject(text), _sync_standby_warning(text), _worker_status(), status(),
    _slot_name(), _cluster_status(), cluster_status()
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION status(), cluster_status() TO pg_monitor;
REVOKE ALL ON filters, backfills FROM PUBLIC;
GRANT SELECT ON filters, backfills TO pg_monitor;
