-- The SQL API of wal_listener (DESIGN.md section 6); runs last in the
-- extension script, after the Rust functions it calls.

-- Filter sets, one row per change: the newest row is in force. The worker
-- meets each new row in the change stream and applies it from that commit
-- on; it records commit_lsn, so that after a restart it knows which set was
-- in force at the slot's position.
CREATE TABLE config_changes (
    version bigint PRIMARY KEY,
    filters jsonb NOT NULL,
    commit_lsn pg_lsn,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by name NOT NULL DEFAULT session_user
);
REVOKE ALL ON config_changes FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('config_changes', '');

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
    SELECT (f->>'relid')::oid::regclass AS "table",
           ARRAY(SELECT jsonb_array_elements_text(f->'actions')) AS actions,
           f->>'subject' AS subject
      FROM (SELECT c.filters FROM @extschema@.config_changes c ORDER BY c.version DESC LIMIT 1) latest,
           jsonb_array_elements(latest.filters) f;
COMMENT ON VIEW filters IS 'Filters in force; with no rows every table of the publication is published.';

-- Writes the next filter set: the current one without tbl (and without
-- dropped tables), plus `added`; returns whether tbl had a filter. An
-- advisory lock serializes writers, so version order is commit order; it
-- does not block the worker's commit_lsn updates.
CREATE FUNCTION _write_filters(tbl regclass, added jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_current jsonb;
    v_next jsonb;
    v_had_filter boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(7331000001);
    SELECT c.filters INTO v_current FROM @extschema@.config_changes c ORDER BY c.version DESC LIMIT 1;
    v_current := coalesce(v_current, '[]');
    v_had_filter := EXISTS (SELECT FROM jsonb_array_elements(v_current) e WHERE (e->>'relid')::oid = tbl::oid);
    SELECT coalesce(jsonb_agg(x.e ORDER BY (x.e->>'relid')::bigint), '[]') INTO v_next
      FROM (SELECT e FROM jsonb_array_elements(v_current) e
             WHERE (e->>'relid')::oid <> tbl::oid
               AND EXISTS (SELECT FROM pg_class WHERE oid = (e->>'relid')::oid)
            UNION ALL
            SELECT added WHERE added IS NOT NULL) x;
    IF v_next <> v_current THEN
        INSERT INTO @extschema@.config_changes (version, filters)
        SELECT coalesce(max(c.version), 0) + 1, v_next FROM @extschema@.config_changes c;
    END IF;
    RETURN v_had_filter;
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
    PERFORM @extschema@._write_filters(
        tbl, jsonb_build_object('relid', tbl::oid::bigint, 'actions', to_jsonb(v_actions), 'subject', subject));
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
    RETURN @extschema@._write_filters(tbl, NULL);
END
$$;
COMMENT ON FUNCTION remove_filter(regclass) IS 'Removes the filter of tbl; true when there was one.';

CREATE FUNCTION restart() RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT @extschema@._request_restart() $$;
COMMENT ON FUNCTION restart() IS
    'Asks the worker to drop its connections and resume from the slot; returns at once (false: no worker).';

CREATE FUNCTION reset_slot() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_slot name := current_setting('wal_listener.slot_name');
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
    RETURN format('the worker creates slot "%s" anew at the current WAL position; changes committed '
                  'since the old slot''s last confirmed position are not published', v_slot);
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
    OUT started_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH here AS (
        SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS lsn,
               nullif(pg_size_bytes(current_setting('max_slot_wal_keep_size')), -1) AS retention_limit
    )
    SELECT w.state,
           w.pid,
           current_setting('wal_listener.slot_name'),
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
           to_timestamp(w.started_at_us / 1e6)
      FROM @extschema@._worker_status() w
     CROSS JOIN here h
      LEFT JOIN pg_replication_slots s ON s.slot_name = current_setting('wal_listener.slot_name')
$$;
COMMENT ON FUNCTION status() IS 'State of the wal_listener worker: one row.';

-- Configuration is for superusers and roles an admin grants EXECUTE to;
-- monitoring for pg_monitor. USAGE on the schema lets everyone else be
-- refused by name ("permission denied for function add_filter").
GRANT USAGE ON SCHEMA @extschema@ TO PUBLIC;
REVOKE ALL ON FUNCTION add_filter(regclass, text[], text), remove_filter(regclass), restart(), reset_slot(),
    _write_filters(regclass, jsonb), _request_restart(), _normalize_actions(text[]), _check_subject(text),
    _worker_status(), status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION status() TO pg_monitor;
REVOKE ALL ON filters FROM PUBLIC;
GRANT SELECT ON filters TO pg_monitor;
