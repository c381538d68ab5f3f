"""Filters, per-table subjects, status() and restart() against the live
pipeline."""

import asyncio
import subprocess
import threading
import time

import nats
import psycopg
import pytest

from harness import (
    Nats,
    _as_postgres_user,
    execute_bounded,
    read_stream,
    stream_count,
    sync_standby_star,
    wait_for_count,
    wait_until,
)


def ids_and_actions(events):
    return [(e.body["table"], e.body["action"], (e.body["data"] or e.body["dataOld"]).get("id")) for e in events]


def test_filter_takes_effect_exactly_at_its_commit(streaming, nats_server):
    streaming.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    streaming.execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)")
    with streaming.connect() as conn:
        # Changes in the filter's own transaction commit with it and still use the old filters.
        with conn.transaction():
            conn.execute("INSERT INTO b VALUES (2)")
            conn.execute("SELECT wal_listener.add_filter('a', '{insert,delete}')")
        conn.execute("INSERT INTO a VALUES (2); INSERT INTO b VALUES (3); UPDATE a SET id = 20 WHERE id = 2")
        conn.execute("DELETE FROM a WHERE id = 1")
        # A filter change rolled back never applies.
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT wal_listener.remove_filter('a')")
        conn.execute("INSERT INTO b VALUES (4)")
        conn.execute("SELECT wal_listener.remove_filter('a')")
        conn.execute("INSERT INTO b VALUES (5)")

    expected = [
        ("a", "INSERT", 1), ("b", "INSERT", 1), ("b", "INSERT", 2),  # before the filter
        ("a", "INSERT", 2), ("a", "DELETE", 1),  # only a, only insert and delete
        ("b", "INSERT", 5),  # filter removed: everything again
    ]
    assert wait_for_count(nats_server.url, len(expected)) == len(expected)
    assert ids_and_actions(read_stream(nats_server.url)) == expected
    wait_until(lambda: streaming.status()["events_filtered"] == 3, 10, "3 filtered events")
    # The extension's own config table is never published.
    assert all(e.body["schema"] != "wal_listener" for e in read_stream(nats_server.url))


def test_filters_in_force_survive_a_restart_of_the_worker(streaming, nats_server):
    streaming.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    streaming.execute("SELECT wal_listener.add_filter('a')")
    streaming.execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1
    streaming.restart("immediate")
    streaming.execute("INSERT INTO a VALUES (2); INSERT INTO b VALUES (2)")
    assert wait_for_count(nats_server.url, 2) == 2
    assert ids_and_actions(read_stream(nats_server.url)) == [("a", "INSERT", 1), ("a", "INSERT", 2)]
    applied = streaming.execute("SELECT version, commit_lsn IS NOT NULL AS recorded FROM wal_listener.applied_versions")
    assert applied == [{"version": 1, "recorded": True}]


def test_per_table_subject_replaces_the_default(streaming, nats_server):
    streaming.execute("CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE other (id int)")
    streaming.execute("SELECT wal_listener.add_filter('orders', subject => 'wal_listener.shop.orders')")
    streaming.execute("SELECT wal_listener.add_filter('other')")
    streaming.execute("INSERT INTO orders VALUES (1); INSERT INTO other VALUES (1)")
    assert wait_for_count(nats_server.url, 2) == 2
    assert [e.subject for e in read_stream(nats_server.url)] == ["wal_listener.shop.orders", "wal_listener.public_other"]


def test_status_shows_backoff_with_the_nats_error_then_streaming_again(streaming, nats_server):
    streaming.execute("CREATE TABLE t (id int)")
    status = streaming.status()
    assert (status["state"], status["nats_connected"]) == ("streaming", True)
    assert status["retained_bytes"] >= status["lag_bytes"] >= 0
    assert status["started_at"] is not None

    nats_server.stop()
    streaming.execute("INSERT INTO t VALUES (1)")  # its publish cannot be acked
    down = wait_until(lambda: (s := streaming.status())["state"] == "backoff" and s, 60, "backoff")
    assert "NATS" in down["last_error"] and down["last_error_time"] is not None
    assert down["nats_connected"] is False
    print(f"\nstatus() while NATS is down: {down}")

    nats_server.start()
    up = streaming.wait_for_state("streaming", timeout=90)
    assert up["nats_connected"] is True
    assert wait_for_count(nats_server.url, 1) == 1


def test_restart_reconnects_and_resumes_from_the_slot(streaming, nats_server):
    streaming.execute("CREATE TABLE t (id int)")
    pid = streaming.status()["pid"]
    assert streaming.execute("SELECT wal_listener.restart() AS asked") == [{"asked": True}]
    wait_until(lambda: "restart requested; reconnecting" in streaming.log(), 10, "the worker to restart")
    streaming.wait_for_state("streaming", timeout=30)
    assert streaming.status()["pid"] == pid  # the same process reconnected
    streaming.execute("INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1


def test_filter_change_survives_restart_and_retry_with_synchronous_standby_star(streaming, nats_server):
    streaming.execute("CREATE TABLE t (id int PRIMARY KEY)")
    sync_standby_star(streaming)
    warnings = wait_until(lambda: streaming.status()["warnings"], 10, "a warning about synchronous_standby_names")
    assert any("synchronous_standby_names" in w for w in warnings), warnings

    execute_bounded(streaming, "SELECT wal_listener.add_filter('t', subject => 'wal_listener.renamed')")
    execute_bounded(streaming, "INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1

    assert streaming.execute("SELECT wal_listener.restart() AS asked") == [{"asked": True}]
    wait_until(lambda: "restart requested; reconnecting" in streaming.log(), 10, "the restart")
    streaming.wait_for_state("streaming", timeout=30)
    execute_bounded(streaming, "INSERT INTO t VALUES (2)")
    assert wait_for_count(nats_server.url, 2) == 2

    # A publish failure and a retry: the commit waits for the worker, which
    # waits for NATS.
    nats_server.stop()
    waiting_insert = threading.Thread(target=execute_bounded, args=(streaming, "INSERT INTO t VALUES (3)", 120))
    waiting_insert.start()
    streaming.wait_for_state("backoff", timeout=60)
    nats_server.start()
    waiting_insert.join(timeout=150)
    execute_bounded(streaming, "INSERT INTO t VALUES (4)")

    assert wait_for_count(nats_server.url, 4) == 4
    events = read_stream(nats_server.url)
    assert sorted(e.body["data"]["id"] for e in events) == [1, 2, 3, 4]
    assert {e.subject for e in events} == {"wal_listener.renamed"}


def test_a_lock_on_the_table_the_worker_records_in_gives_backoff_naming_it_then_recovers(streaming, nats_server):
    streaming.execute("CREATE TABLE t (id int PRIMARY KEY)")
    locker = streaming.connect()
    locker.autocommit = False
    # The worker meets the filter change only after NATS is back, when the
    # table it records applied versions in is locked.
    nats_server.stop()
    streaming.execute("INSERT INTO t VALUES (1)")
    streaming.wait_for_state("backoff", timeout=60)
    streaming.execute("SELECT wal_listener.add_filter('t', subject => 'wal_listener.renamed')")
    locker.execute("LOCK TABLE wal_listener.applied_versions IN SHARE MODE")
    nats_server.start()
    status = wait_until(
        lambda: (s := streaming.status())["state"] == "backoff" and "wal_listener.applied_versions" in (s["last_error"] or "")
        and "lock" in s["last_error"] and s,
        90,
        "backoff naming the lock on applied_versions",
    )
    print(f"\napplied_versions locked: {status['last_error']}")
    assert wait_for_count(nats_server.url, 1) == 1  # the row before the filter change
    locker.rollback()
    locker.close()
    streaming.wait_for_state("streaming", timeout=60)
    streaming.execute("INSERT INTO t VALUES (2)")
    assert wait_for_count(nats_server.url, 2) == 2
    assert [e.subject for e in read_stream(nats_server.url)] == ["wal_listener.public_t", "wal_listener.renamed"]


def test_a_lock_on_the_config_tables_stalls_nothing(streaming, nats_server):
    """The worker reads filter changes from the stream, never from the
    config tables, so a session that locks them blocks only writers of filters."""
    streaming.execute("CREATE TABLE t (id int PRIMARY KEY)")
    streaming.execute("SELECT wal_listener.add_filter('t', subject => 'wal_listener.renamed')")
    locker = streaming.connect()
    locker.autocommit = False
    locker.execute("LOCK TABLE wal_listener.config_changes, wal_listener.filter_rules IN ACCESS EXCLUSIVE MODE")
    try:
        streaming.execute("SELECT wal_listener.restart()")  # the next session starts while they are locked
        wait_until(lambda: "restart requested; reconnecting" in streaming.log(), 10, "the restart")
        streaming.wait_for_state("streaming", timeout=60)
        streaming.execute("INSERT INTO t VALUES (1)")
        assert wait_for_count(nats_server.url, 1) == 1
        assert read_stream(nats_server.url)[0].subject == "wal_listener.renamed"
    finally:
        locker.close()


def test_a_user_replaced_publication_decides_what_is_published(streaming, nats_server):
    """Fewer tables, a row filter and a column list: events follow the
    publication, and filters still work (they reach the worker as messages)."""
    streaming.execute("CREATE TABLE a (id int PRIMARY KEY, secret text, amount int); CREATE TABLE b (id int PRIMARY KEY)")
    with streaming.connect() as conn, conn.transaction():
        # One transaction: at every WAL position a publication of that name exists.
        conn.execute("DROP PUBLICATION wal_listener")
        conn.execute("CREATE PUBLICATION wal_listener FOR TABLE a (id, amount) WHERE (amount > 10) WITH (publish = 'insert')")
    streaming.execute("INSERT INTO a VALUES (1, 's', 5), (2, 's', 50); INSERT INTO b VALUES (1)")
    streaming.execute("SELECT wal_listener.add_filter('a', subject => 'wal_listener.big')")
    streaming.execute("INSERT INTO a VALUES (3, 's', 60), (4, 's', 1)")
    assert wait_for_count(nats_server.url, 2) == 2
    events = read_stream(nats_server.url)
    assert [(e.subject, e.body["data"]) for e in events] == [
        ("wal_listener.public_a", {"id": 2, "amount": 50}),
        ("wal_listener.big", {"id": 3, "amount": 60}),
    ]


def dump(cluster, *options: str) -> str:
    return subprocess.run(
        [str(cluster.bindir / "pg_dump"), "-h", str(cluster.dir), "-p", str(cluster.port), "-U", "postgres", *options,
         "app"],
        check=True, capture_output=True, text=True, **_as_postgres_user(),
    ).stdout


def restore(cluster, script: str) -> str:
    """psql as a restore runs it: on errors it goes on (the target's worker
    has made its publication already, which the dump creates too)."""
    return subprocess.run(
        [str(cluster.bindir / "psql"), "-X", "-h", str(cluster.dir), "-p", str(cluster.port), "-U", "postgres", "-d", "app"],
        input=script, check=True, capture_output=True, text=True, **_as_postgres_user(),
    ).stderr


@pytest.mark.parametrize("options", [(), ("--inserts",)], ids=["copy", "inserts"])
def test_filters_survive_dump_and_restore_into_another_cluster(streaming, nats_server, make_cluster, options):
    # A restore writes a version in parts: the header, then its rules (one
    # COPY, or with --inserts one transaction per rule). Each part of the
    # version in force used to replace it: with --inserts, only the last
    # rule was left.
    streaming.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    streaming.execute("SELECT wal_listener.add_filter('b', '{insert}', subject => 'wal_listener.bees')")
    streaming.execute("SELECT wal_listener.add_filter('a', '{delete}')")
    script = dump(streaming, *options)

    other_nats = Nats()
    try:
        target = make_cluster(nats_url=f"'{other_nats.url}'")
        # Other tables first, so that a and b get other OIDs there.
        target.execute("CREATE TABLE first (x int); CREATE TABLE second (x int)")
        wait_until(lambda: "waiting for CREATE EXTENSION" in target.log(), 60, "the target's worker to wait")
        errors = restore(target, script)
        print(f"\nrestore said: {errors.strip()}")
        oids = lambda c: c.execute("SELECT 'a'::regclass::oid AS a, 'b'::regclass::oid AS b")[0]
        assert oids(target) != oids(streaming)
        filters = target.execute('SELECT "table"::text AS tbl, actions, subject FROM wal_listener.filters ORDER BY 1')
        assert filters == [
            {"tbl": "a", "actions": ["delete"], "subject": None},
            {"tbl": "b", "actions": ["insert"], "subject": "wal_listener.bees"},
        ]
        target.wait_for_state("streaming", timeout=60)
        target.execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1); DELETE FROM a; DELETE FROM b")
        assert wait_for_count(other_nats.url, 2) == 2
        events = read_stream(other_nats.url)
        assert [(e.subject, e.body["action"]) for e in events] == [
            ("wal_listener.bees", "INSERT"), ("wal_listener.public_a", "DELETE")]
        # And after a restart, from the positions the target's worker recorded.
        target.restart("immediate")
        target.execute("INSERT INTO b VALUES (2); INSERT INTO a VALUES (2)")
        assert wait_for_count(other_nats.url, 3) == 3
        assert read_stream(other_nats.url)[-1].body["data"] == {"id": 2}
    finally:
        other_nats.destroy()


def test_a_subject_no_stream_stores_is_a_warning_and_held_until_one_does(streaming, nats_server):
    streaming.execute("CREATE TABLE t (id int)")
    streaming.execute("SELECT wal_listener.add_filter('t', subject => 'audit.t')")
    warning = wait_until(
        lambda: [w for w in streaming.status()["warnings"] if "audit.t" in w], 30, "a warning naming audit.t"
    )
    assert "no JetStream stream stores subject audit.t (public.t)" in warning[0], warning
    streaming.execute("INSERT INTO t VALUES (1)")
    status = wait_until(lambda: (s := streaming.status())["state"] == "backoff" and s, 60, "backoff")
    assert "audit.t" in status["last_error"] and "no JetStream stream stores" in status["last_error"]

    async def create_audit_stream():
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(name="audit", subjects=["audit.>"])
        await nc.close()

    asyncio.run(create_audit_stream())
    streaming.wait_for_state("streaming", timeout=60)
    assert wait_for_count(nats_server.url, 1, stream="audit") == 1
    wait_until(lambda: not streaming.status()["warnings"], 30, "the warning to clear")


def test_restart_signals_no_process_once_the_worker_has_died(streaming):
    streaming.set(inject_fault="host_panic")
    status = wait_until(lambda: (s := streaming.status())["pid"] is None and s, 10, "the worker to be gone")
    assert status["state"] == "stopped"
    assert streaming.execute("SELECT wal_listener.restart() AS asked") == [{"asked": False}]
    streaming.set(inject_fault=None)
    streaming.wait_for_state("streaming", timeout=60)


def test_a_config_message_from_another_role_changes_no_filter(streaming, nats_server):
    """pg_logical_emit_message is PUBLIC: a role with no right on the
    extension wrote a 'wal_listener.config' message naming a filter version
    99 for no real table, and every table stopped being published. Only
    messages the extension's triggers sign count now."""
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY); "
                    "CREATE ROLE plain LOGIN; GRANT INSERT ON t TO plain")
    forged = ['{"version": 99, "relid": 1, "table": "x", "actions": ["insert"], "subject": null}',
              '0' * 64 + ' {"version": 98}', "not json at all"]
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="plain", dbname="app",
                         autocommit=True) as conn:
        with conn.transaction():
            for content in forged:
                conn.execute("SELECT pg_logical_emit_message(true, 'wal_listener.config', %s)", (content,))
            conn.execute("INSERT INTO t VALUES (1)")
    cluster.execute("INSERT INTO t VALUES (2); INSERT INTO u VALUES (1)")
    assert wait_for_count(nats_server.url, 3) == 3
    assert cluster.status()["state"] == "streaming"
    assert "ignored 3 config message(s)" in cluster.log()
    assert "filters version 9" not in cluster.log()
    # The extension's own changes still apply.
    cluster.execute("SELECT wal_listener.add_filter('u')")
    cluster.execute("INSERT INTO t VALUES (3); INSERT INTO u VALUES (2)")
    wait_until(lambda: "filters version 1 in force" in cluster.log(), 30, "the real filter change")
    assert wait_for_count(nats_server.url, 4) == 4
    time.sleep(1)
    assert stream_count(nats_server.url) == 4, "t is filtered out now"


def test_a_replayed_signed_message_changes_no_filter_and_no_reader_sees_the_key(streaming, nats_server):
    """A role that reads the key can sign anything: pg_read_all_data passes
    over grants, so the key table has row security. A signed message copied
    into another transaction (here signed by a superuser in one and written
    in the next, as a copy from the WAL would be) must not verify: the MAC
    covers the writing transaction's xid. Before, it re-applied version 1
    with only the copied rule."""
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE u (id int PRIMARY KEY); "
                    "CREATE ROLE reader LOGIN IN ROLE pg_read_all_data")
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="reader", dbname="app",
                         autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM wal_listener.message_key").fetchone() == (0,)
    cluster.execute("SELECT wal_listener.add_filter('u')")
    wait_until(lambda: "filters version 1 in force" in cluster.log(), 30, "the real filter change")
    signed = cluster.execute(
        "SELECT wal_listener._signed('{\"version\": 1}') AS header, wal_listener._signed("
        "jsonb_build_object('version', 1, 'relid', 't'::regclass::oid::bigint, 'table', 't', "
        "'actions', ARRAY['insert'], 'subject', null)::text) AS rule")[0]
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="postgres", dbname="app",
                         autocommit=True) as conn:
        with conn.transaction():
            for content in (signed["header"], signed["rule"]):
                conn.execute("SELECT pg_logical_emit_message(true, 'wal_listener.config', %s::text)", (content,))
    cluster.execute("INSERT INTO t VALUES (1); INSERT INTO u VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1
    time.sleep(1)
    events = read_stream(nats_server.url)
    assert [(e.body["table"], e.body["data"]["id"]) for e in events] == [("u", 1)], "version 1 applied again"
    assert "ignored 2 config message(s)" in cluster.log()
