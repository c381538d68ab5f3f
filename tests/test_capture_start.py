"""Capture starts at CREATE EXTENSION: the worker holds its slot before the
extension exists, so nothing committed after CREATE EXTENSION returns is
lost, nothing committed before it is published, and the waiting slot pins
no WAL."""

import os
import signal
import subprocess
import time

import psycopg
import pytest

from harness import _as_postgres_user, read_stream, sync_standby_star, wait_for_count, wait_until

WAITING = 'waiting for CREATE EXTENSION wal_listener in database "app"'


def psql(cluster, *commands: str) -> str:
    args = [str(cluster.bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", str(cluster.dir), "-p", str(cluster.port),
            "-U", "postgres", "-d", "app"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120, **_as_postgres_user()).stdout


def test_a_script_that_creates_the_extension_then_writes_loses_nothing(cluster, nats_server):
    # No wait anywhere: the database was created a moment ago, and the three
    # statements run as one transaction.
    psql(cluster, "CREATE EXTENSION wal_listener; CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1, timeout=60) == 1
    assert read_stream(nats_server.url)[0].body["data"] == {"id": 1}


def test_statements_after_create_extension_in_their_own_transactions_lose_nothing(cluster, nats_server):
    psql(cluster, "CREATE EXTENSION wal_listener", "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)",
         "INSERT INTO t VALUES (2)")
    assert wait_for_count(nats_server.url, 2, timeout=60) == 2
    assert [e.body["data"]["id"] for e in read_stream(nats_server.url)] == [1, 2]


@pytest.mark.parametrize("one_transaction", [False, True], ids=["own_transactions", "one_transaction"])
def test_create_extension_returns_when_the_worker_is_the_only_synchronous_standby(cluster, nats_server,
                                                                                  one_transaction):
    # With '*' and no other standby, the CREATE EXTENSION commit waits for
    # the worker's walsender, and the worker cannot see the extension until
    # that commit is visible. The hook commits it with synchronous_commit =
    # local. Before, the statement never returned and the worker opened a
    # session (and logged) per millisecond; then, with rows of its own in
    # the transaction, it still never returned.
    wait_until(lambda: WAITING in cluster.log(), 60, "the worker to wait for CREATE EXTENSION with its slot")
    sync_standby_star(cluster)
    started = time.monotonic()
    statements = ["CREATE EXTENSION wal_listener", "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)"]
    psql(cluster, *(["; ".join(statements)] if one_transaction else statements))
    returned_after = time.monotonic() - started
    print(f"CREATE EXTENSION; CREATE TABLE; INSERT returned after {returned_after:.2f} s")
    assert returned_after < 60
    assert wait_for_count(nats_server.url, 1, timeout=60) == 1
    assert read_stream(nats_server.url)[0].body["data"] == {"id": 1}
    assert cluster.status()["state"] == "streaming"
    assert cluster.log().count(WAITING) == 1


def test_a_created_marker_written_by_a_role_is_ignored_and_pins_no_wal(cluster, nats_server):
    # Any role may write a message with the extension's prefix. Before, the
    # worker took it for CREATE EXTENSION, found no extension, and started
    # over from before it, a session per millisecond, never moving the slot.
    wait_until(lambda: WAITING in cluster.log(), 60, "the worker to wait for CREATE EXTENSION with its slot")
    cluster.execute("CREATE ROLE plain LOGIN")
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="plain", dbname="app",
                         autocommit=True) as conn:
        forged_at = conn.execute(
            "SELECT pg_logical_emit_message(true, 'wal_listener.created', '')::text").fetchone()[0]
    wait_until(
        lambda: cluster.execute("SELECT confirmed_flush_lsn > %s::pg_lsn AS past FROM pg_replication_slots "
                                "WHERE slot_name = 'wal_listener'", (forged_at,)) == [{"past": True}],
        30, "the slot to move past the forged marker")
    assert 'ignored a "wal_listener.created" message' in cluster.log()
    psql(cluster, "CREATE EXTENSION wal_listener", "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1, timeout=60) == 1
    assert cluster.log().count(WAITING) == 1


def test_a_filter_added_in_the_create_extension_transaction_is_in_force(cluster, nats_server):
    # Under a synchronous standby, the worker confirmed a marker transaction
    # with no user row at once and the next session started after it: the
    # filter change it carried was never applied, and every table was
    # published.
    wait_until(lambda: WAITING in cluster.log(), 60, "the worker to wait for CREATE EXTENSION with its slot")
    sync_standby_star(cluster)
    psql(cluster, "BEGIN; CREATE EXTENSION wal_listener; CREATE TABLE t (id int PRIMARY KEY); "
                  "CREATE TABLE u (id int PRIMARY KEY); SELECT wal_listener.add_filter('u'); COMMIT",
         "INSERT INTO t VALUES (1)", "INSERT INTO u VALUES (1)")
    assert wait_for_count(nats_server.url, 1, timeout=60) == 1
    assert [(e.body["table"], e.body["data"]["id"]) for e in read_stream(nats_server.url)] == [("u", 1)]
    assert cluster.execute("SELECT version FROM wal_listener.applied_versions") == [{"version": 1}]


def test_create_extension_is_seen_past_the_first_xid_epoch(make_cluster, nats_server):
    # The worker rebuilt the 64-bit xid of the marker's transaction from a
    # snapshot, and got the epoch wrong for an xid above the snapshot's
    # xmax: with an older transaction still open and the commit waiting for
    # the synchronous standby, it judged the real CREATE EXTENSION forged
    # and published nothing ever after.
    cluster = make_cluster()
    cluster.stop()
    cluster._run("pg_resetwal", "-e", "1", "-D", str(cluster.data))
    cluster.start()
    wait_until(lambda: cluster.execute("SELECT 1 FROM pg_stat_replication WHERE application_name = 'wal_listener'"),
               60, "the worker to stream again after the restart")
    assert int(cluster.execute("SELECT txid_current() / 4294967296 AS epoch")[0]["epoch"]) == 1
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="postgres", dbname="app",
                         autocommit=True) as older:
        older.execute("BEGIN")
        older.execute("SELECT txid_current()")
        sync_standby_star(cluster)
        psql(cluster, "CREATE EXTENSION wal_listener", "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)")
        assert wait_for_count(nats_server.url, 1, timeout=60) == 1
        older.execute("COMMIT")
    assert 'ignored a "wal_listener.created" message' not in cluster.log()
    assert read_stream(nats_server.url)[0].body["data"] == {"id": 1}


def slot_lag(cluster) -> dict:
    return cluster.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS unconfirmed, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained "
        "FROM pg_replication_slots WHERE slot_name = 'wal_listener'"
    )[0]


def test_a_late_create_extension_publishes_nothing_from_before_and_pins_no_wal_meanwhile(make_cluster, nats_server):
    cluster = make_cluster(heartbeat_interval="1")
    wait_until(lambda: WAITING in cluster.log(), 60, "the worker to wait for CREATE EXTENSION with its slot")
    assert cluster.execute("SELECT count(*) AS n FROM pg_replication_slots WHERE database = 'app'") == [{"n": 1}]

    # The hour before CREATE EXTENSION, compressed: rows in this database and
    # WAL from elsewhere, none of which may be published or pinned.
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    cluster.execute("CREATE DATABASE other", dbname="postgres")
    cluster.execute("CREATE TABLE busy (id int, pad text)", dbname="other")
    peak_unconfirmed, generated_from = 0, cluster.execute("SELECT pg_current_wal_lsn() AS l")[0]["l"]
    for batch in range(20):
        cluster.execute("INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(%s::int, %s::int) g",
                        (batch * 1000 + 1, batch * 1000 + 1000))
        cluster.execute("INSERT INTO busy SELECT g, repeat('y', 500) FROM generate_series(1, 20000) g", dbname="other")
        cluster.execute("TRUNCATE busy", dbname="other")
        time.sleep(0.3)
        peak_unconfirmed = max(peak_unconfirmed, slot_lag(cluster)["unconfirmed"])
    generated = int(cluster.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s) AS d", (generated_from,))[0]["d"])
    final = wait_until(lambda: (r := slot_lag(cluster)["retained"]) < 48 << 20 and r, 60, "retained WAL to shrink", 1)
    print(f"\nbefore CREATE EXTENSION: {generated >> 20} MB of WAL, unconfirmed at most {peak_unconfirmed >> 20} MB, "
          f"retained finally {final >> 20} MB")
    assert generated > 200 << 20
    assert peak_unconfirmed < generated / 4, "the waiting slot pinned WAL"

    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.execute("INSERT INTO t VALUES (100001, 'after')")
    cluster.execute("UPDATE t SET pad = 'changed' WHERE id = 1")
    assert wait_for_count(nats_server.url, 2, timeout=60) == 2
    events = read_stream(nats_server.url)
    assert [(e.body["action"], e.body["data"]["id"]) for e in events] == [("INSERT", 100001), ("UPDATE", 1)]


def test_a_replay_from_before_create_extension_publishes_nothing_from_before(make_cluster, nats_server):
    """A crash puts the slot back to its position at the last checkpoint,
    before CREATE EXTENSION: the replay meets older changes again, and the
    position of CREATE EXTENSION, not the slot's, keeps them out."""
    cluster = make_cluster()
    wait_until(lambda: WAITING in cluster.log(), 60, "the worker to wait with its slot")
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY)")
    cluster.execute("CHECKPOINT")  # saves the slot's position
    cluster.execute("INSERT INTO t VALUES (1)")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.execute("INSERT INTO t VALUES (2)")
    assert wait_for_count(nats_server.url, 1, timeout=60) == 1
    killed = cluster.worker_pid()
    os.kill(killed, signal.SIGKILL)  # the postmaster resets the cluster
    # Until the postmaster notices, status() still shows the dead worker
    # streaming: wait for a new worker.
    wait_until(lambda: _streaming(cluster, killed), 60, "a new worker to stream after the crash")
    cluster.execute("INSERT INTO t VALUES (3)")
    assert wait_for_count(nats_server.url, 2, timeout=60) == 2
    assert [e.body["data"]["id"] for e in read_stream(nats_server.url)] == [2, 3]


def _streaming(cluster, not_pid: int | None = None) -> bool:
    try:
        status = cluster.status()
        return status["state"] == "streaming" and status["pid"] != not_pid
    except Exception:  # the server is still in crash recovery
        return False
