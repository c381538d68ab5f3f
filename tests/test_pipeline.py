"""End to end: committed row changes in Postgres become JetStream events,
checked with a real NATS client."""

import re
import time
import uuid

import pytest

from harness import read_stream, stream_count, wait_for_count, wait_until

WAL_LISTENER_KEYS = ["id", "schema", "table", "action", "data", "dataOld", "commitTime"]
POSITION_KEYS = ["primaryKey", "lsn", "xid", "ordinal"]
LSN = re.compile(r"^[0-9A-F]+/[0-9A-F]+$")
COMMIT_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_worker_waits_for_create_extension_then_streams(cluster):
    waiting = 'waiting for CREATE EXTENSION wal_listener in database "app"'
    wait_until(lambda: waiting in cluster.log(), 30, "the worker to say it waits")
    # cluster_status() shows it from any database holding the extension
    # (where CREATE EXTENSION starts that database's own worker).
    cluster.execute("CREATE EXTENSION wal_listener", dbname="postgres")
    rows = {r["database"]: r for r in cluster.execute("SELECT * FROM wal_listener.cluster_status()", dbname="postgres")}
    assert set(rows) == {"app", "postgres"}, rows
    assert rows["app"]["state"] == "waiting" and rows["app"]["last_error"].startswith(waiting), rows
    # The slot exists already, so that nothing after CREATE EXTENSION is lost.
    assert cluster.execute("SELECT slot_name FROM pg_replication_slots WHERE database = 'app'") == [
        {"slot_name": "wal_listener"}
    ]
    workers = cluster.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'wal_listener'")
    assert sorted(w["pid"] for w in workers) == sorted(r["pid"] for r in rows.values())

    cluster.execute("CREATE EXTENSION wal_listener")
    status = cluster.wait_for_state("streaming", timeout=60)
    assert status["slot"] == "wal_listener" and status["publication"] == "wal_listener"
    assert status["nats_connected"] is True
    assert cluster.execute("SELECT puballtables FROM pg_publication WHERE pubname = 'wal_listener'") == [
        {"puballtables": True}
    ]
    slot = cluster.execute("SELECT plugin, database FROM pg_replication_slots WHERE slot_name = 'wal_listener'")
    assert slot == [{"plugin": "pgoutput", "database": "app"}]


def test_insert_update_delete_truncate_round_trip_exact_json(streaming, nats_server):
    streaming.execute(
        """
        CREATE TABLE users (id int PRIMARY KEY, email text, score float8, balance numeric,
                            active bool, profile jsonb, seen timestamptz, big bigint);
        INSERT INTO users VALUES (1, 'a@b.c', 1.5, 10.50, true, '{"tags": ["x", null], "n": 1}',
                                  '2026-11-24 21:43:42.123456+00', 9007199254740993);
        UPDATE users SET email = 'é "quoted"\n', score = 'NaN', active = false WHERE id = 1;
        INSERT INTO users (id) VALUES (2);
        DELETE FROM users WHERE id = 1;
        TRUNCATE users;
        """
    )
    events = read_stream(nats_server.url) if wait_for_count(nats_server.url, 5) == 5 else []
    assert len(events) == 5

    for e in events:
        assert list(e.body) == WAL_LISTENER_KEYS + POSITION_KEYS
        assert e.body["primaryKey"] == ["id"]
        assert LSN.match(e.body["lsn"]) and isinstance(e.body["xid"], int)
        assert e.subject == "wal_listener.public_users"
        assert e.headers["Nats-Msg-Id"] == e.body["id"]
        assert uuid.UUID(e.body["id"]).version == 5
        assert COMMIT_TIME.match(e.body["commitTime"]), e.body["commitTime"]
        assert (e.body["schema"], e.body["table"]) == ("public", "users")
    assert len({e.body["id"] for e in events}) == 5

    row1 = {
        "id": 1, "email": "a@b.c", "score": 1.5, "balance": "10.50", "active": True,
        "profile": {"n": 1, "tags": ["x", None]}, "seen": "2026-11-24T21:43:42.123456Z",
        "big": 9007199254740993,
    }
    updated = dict(row1, email='é "quoted"\n', score="NaN", active=False)
    nulls = {k: None for k in row1 if k != "id"}
    expected = [
        ("INSERT", row1, {}),
        ("UPDATE", updated, {}),  # REPLICA IDENTITY DEFAULT, key unchanged: Postgres sends no old row
        ("INSERT", dict(nulls, id=2), {}),
        ("DELETE", {}, {"id": 1}),
        ("TRUNCATE", {}, {}),
    ]
    assert [(e.body["action"], e.body["data"], e.body["dataOld"]) for e in events] == expected
    # Integers are JSON numbers, exact beyond 2^53.
    assert b'"big":9007199254740993' in events[0].raw


def test_events_of_one_transaction_share_commit_position_and_keep_order(streaming, nats_server):
    streaming.execute("CREATE TABLE items (id int PRIMARY KEY)")
    with streaming.connect() as conn:
        with conn.transaction():
            for i in range(1, 6):
                conn.execute("INSERT INTO items VALUES (%s)", (i,))
    assert wait_for_count(nats_server.url, 5) == 5
    events = read_stream(nats_server.url)
    assert [e.body["data"]["id"] for e in events] == [1, 2, 3, 4, 5]
    assert [e.body["ordinal"] for e in events] == [0, 1, 2, 3, 4]
    assert len({(e.body["commitTime"], e.body["lsn"], e.body["xid"]) for e in events}) == 1


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_loses_and_duplicates_nothing(streaming, nats_server, mode):
    streaming.execute("CREATE TABLE seq (n int PRIMARY KEY)")
    for batch in range(10):
        streaming.execute("INSERT INTO seq SELECT g FROM generate_series(%s::int, %s::int) g", (batch * 100 + 1, batch * 100 + 100))
    # Restart while the worker is most likely still publishing.
    streaming.restart(mode)
    for batch in range(10, 20):
        streaming.execute("INSERT INTO seq SELECT g FROM generate_series(%s::int, %s::int) g", (batch * 100 + 1, batch * 100 + 100))

    assert wait_for_count(nats_server.url, 2000, timeout=120) == 2000
    events = read_stream(nats_server.url)
    assert sorted(e.body["data"]["n"] for e in events) == list(range(1, 2001))
    assert len({e.body["id"] for e in events}) == 2000


def test_ten_thousand_rows_in_a_hundred_transactions_arrive_once(streaming, nats_server):
    streaming.execute("CREATE TABLE bulk (id int PRIMARY KEY, payload text)")
    started = time.monotonic()
    with streaming.connect() as conn:
        for tx in range(100):
            conn.execute(
                "INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g", (tx * 100 + 1, tx * 100 + 100)
            )
    wait_until(lambda: stream_count(nats_server.url) >= 10_000, 120, "10,000 events", interval=0.05)
    elapsed = time.monotonic() - started

    assert wait_for_count(nats_server.url, 10_000) == 10_000
    events = read_stream(nats_server.url)
    stored_span = (events[-1].stored_at - events[0].stored_at).total_seconds()
    print(
        f"\n10,000 rows in 100 transactions: {elapsed:.2f} s from first INSERT to last event stored "
        f"({10_000 / elapsed:,.0f} events/s); first to last event stored {stored_span:.3f} s"
    )
    assert sorted(e.body["data"]["id"] for e in events) == list(range(1, 10_001))
    assert len({e.body["id"] for e in events}) == 10_000
    assert streaming.status()["events_published"] == 10_000


def test_confirmed_flush_lsn_advances_past_published_commits(streaming, nats_server):
    streaming.execute("CREATE TABLE t (id int)")
    before = streaming.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots")[0]["confirmed_flush_lsn"]
    streaming.execute("INSERT INTO t VALUES (1)")
    commit_end = streaming.execute("SELECT pg_current_wal_lsn() AS lsn")[0]["lsn"]
    assert wait_for_count(nats_server.url, 1) == 1

    def confirmed_past_commit():
        rows = streaming.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn AS done, confirmed_flush_lsn > %s::pg_lsn AS moved "
            "FROM pg_replication_slots WHERE slot_name = 'wal_listener'",
            (commit_end, before),
        )
        return rows[0]["done"] and rows[0]["moved"]

    wait_until(confirmed_past_commit, 30, "confirmed_flush_lsn to pass the commit")
    status = streaming.status()
    assert status["lag_bytes"] >= 0
    assert status["events_published"] == 1
    assert status["last_event_time"] is not None


def test_new_nats_url_takes_effect_after_reload(make_cluster, nats_server):
    cluster = make_cluster(nats_url="'nats://127.0.0.1:1'")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.execute("CREATE TABLE t (id int)")
    cluster.execute("INSERT INTO t VALUES (1)")
    status = wait_until(
        lambda: (s := cluster.status())["state"] == "backoff" and "nats://127.0.0.1:1" in s["last_error"] and s,
        60,
        "backoff with the NATS error",
    )
    assert "cannot connect" in status["last_error"]
    assert status["nats_connected"] is False
    assert stream_count(nats_server.url) == 0

    cluster.execute(f"ALTER SYSTEM SET wal_listener.nats_url = '{nats_server.url}'")
    cluster.execute("SELECT pg_reload_conf()")
    cluster.wait_for_state("streaming", timeout=60)
    # The row committed while NATS was unreachable was kept by the slot.
    assert wait_for_count(nats_server.url, 1) == 1
    assert read_stream(nats_server.url)[0].body["data"] == {"id": 1}


def test_worker_is_restarted_after_it_is_terminated(streaming, nats_server):
    old_pid = streaming.status()["pid"]
    streaming.execute("CREATE TABLE t (id int)")
    streaming.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    streaming.execute("INSERT INTO t VALUES (1)")
    status = wait_until(
        lambda: (s := streaming.status())["state"] == "streaming" and s["pid"] not in (None, old_pid) and s,
        60,
        "a new worker to stream",
    )
    assert status["pid"] != old_pid
    assert wait_for_count(nats_server.url, 1) == 1


def test_fast_shutdown_stops_the_worker_cleanly(streaming):
    streaming.stop("fast")
    assert not streaming.running()
    assert "wal_listener: worker stopped" in streaming.log()


def test_wal_level_below_logical_is_reported_with_the_fix(make_cluster):
    cluster = make_cluster(server_settings={"wal_level": "replica"})
    cluster.execute("CREATE EXTENSION wal_listener")
    status = wait_until(
        lambda: (s := cluster.status())["state"] == "backoff" and "wal_level" in (s["last_error"] or "") and s,
        60,
        "backoff naming wal_level",
    )
    assert "set wal_level = logical" in status["last_error"]
    assert cluster.execute("SELECT count(*) AS n FROM pg_replication_slots") == [{"n": 0}]


def test_loopback_connection_uses_peer_authentication(make_cluster, nats_server):
    # Debian's default: the bootstrap superuser is admitted by peer auth only.
    # The map also lets this test (running as root) connect as postgres.
    cluster = make_cluster()
    (cluster.data / "pg_ident.conf").write_text("local postgres postgres\nlocal root postgres\n")
    (cluster.data / "pg_hba.conf").write_text("local all postgres peer map=local\n")
    cluster.execute("SELECT pg_reload_conf()")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1


def test_rejected_loopback_connection_names_the_pg_hba_line_to_add(make_cluster):
    cluster = make_cluster()
    (cluster.data / "pg_hba.conf").write_text("local app postgres reject\nlocal all all trust\n")
    cluster.execute("SELECT pg_reload_conf()", dbname="postgres")
    cluster.execute("CREATE EXTENSION wal_listener", dbname="postgres")
    app_row = "SELECT * FROM wal_listener.cluster_status() WHERE database = 'app'"
    status = wait_until(
        lambda: (s := cluster.execute(app_row, dbname="postgres")[0])["state"]
        == "backoff"
        and "pg_hba" in (s["last_error"] or "")
        and s,
        60,
        "backoff naming pg_hba.conf",
    )
    assert 'local app postgres peer' in status["last_error"]


def test_a_role_that_is_not_a_superuser_is_refused_with_the_reason(make_cluster):
    cluster = make_cluster(role="'streamer'")
    cluster.execute("CREATE ROLE streamer LOGIN REPLICATION", dbname="postgres")
    cluster.execute("CREATE EXTENSION wal_listener")
    status = wait_until(
        lambda: (s := cluster.status())["state"] == "backoff" and "not a superuser" in (s["last_error"] or "") and s,
        60,
        "backoff saying why the role is refused",
    )
    assert 'wal_listener.role "streamer"' in status["last_error"]
    assert cluster.execute("SELECT count(*) AS n FROM pg_replication_slots") == [{"n": 0}]


def test_drop_database_elsewhere_finishes_while_the_worker_streams(streaming):
    """DROP DATABASE waits until every process has absorbed a procsignal
    barrier; a worker that never processed interrupts kept it waiting forever."""
    streaming.execute("CREATE DATABASE scratch", dbname="postgres")
    with streaming.connect("postgres") as conn:
        conn.execute("SET statement_timeout = '20s'")
        conn.execute("DROP DATABASE scratch")
    assert streaming.execute("SELECT datname FROM pg_database WHERE datname = 'scratch'") == []
    assert streaming.status()["state"] == "streaming"
