"""The slot never pins WAL needlessly and never loses changes silently:
heartbeats, quiet databases, the retention warning, and slots that were
dropped or invalidated."""

import time

import pytest

from harness import stream_count, wait_for_count, wait_until

HEARTBEAT = b"wal_listener.heartbeat"


def heartbeats_seen(cluster, slot: str) -> int:
    """Heartbeat messages in this database's WAL since `slot` was made,
    read by peeking at a pgoutput slot that asks for messages."""
    rows = cluster.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'wal_listener', 'messages', 'true')",
        (slot,),
    )
    return sum(1 for r in rows if r["data"][:1] == b"M" and HEARTBEAT in r["data"])


def test_heartbeat_interval(make_cluster):
    cluster = make_cluster(heartbeat_interval="1")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("SELECT pg_create_logical_replication_slot('probe', 'pgoutput')")
    wait_until(lambda: heartbeats_seen(cluster, "probe") >= 3, 20, "three heartbeats")

    cluster.set(heartbeat_interval="0")
    wait_until(lambda: "configuration changed" in cluster.log(), 30, "the reload")
    time.sleep(2)  # a heartbeat already on its way may still land
    seen = heartbeats_seen(cluster, "probe")
    time.sleep(4)
    assert heartbeats_seen(cluster, "probe") == seen, "heartbeat_interval = 0 still writes heartbeats"


def test_quiet_database_does_not_pin_wal(make_cluster, nats_server):
    """Only other databases and unpublished tables write: the worker keeps
    confirming the server's position, so the slot follows and the WAL it
    retains shrinks back once the server moves restart_lsn."""
    cluster = make_cluster(heartbeat_interval="1")
    cluster.execute("CREATE TABLE published (id int)")
    cluster.execute("CREATE TABLE unpublished (id int, pad text)")
    # The worker made its publication when the database appeared; replace it in one transaction.
    with cluster.connect() as conn, conn.transaction():
        conn.execute("DROP PUBLICATION IF EXISTS wal_listener")
        conn.execute("CREATE PUBLICATION wal_listener FOR TABLE published")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE DATABASE other", dbname="postgres")
    cluster.execute("CREATE TABLE busy (id int, pad text)", dbname="other")

    peak_lag, peak_retained, started = 0, 0, time.monotonic()
    start_lsn = cluster.execute("SELECT pg_current_wal_lsn() AS l")[0]["l"]
    while time.monotonic() - started < 40:
        cluster.execute("INSERT INTO busy SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g", dbname="other")
        cluster.execute("INSERT INTO unpublished SELECT g, repeat('y', 500) FROM generate_series(1, 2000) g")
        cluster.execute("TRUNCATE busy", dbname="other")
        status = cluster.status()
        peak_lag, peak_retained = max(peak_lag, status["lag_bytes"]), max(peak_retained, status["retained_bytes"])
        time.sleep(0.2)
    generated = int(cluster.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s) AS d", (start_lsn,))[0]["d"])
    # restart_lsn moves at the server's running-transactions records (every
    # 15 s while busy) and checkpoints: retained WAL shrinks once one passes.
    final = wait_until(
        lambda: (r := cluster.status()["retained_bytes"]) < 48 << 20 and r, 60, "retained WAL to shrink", 1
    )
    print(
        f"\nunrelated WAL {generated >> 20} MB in 40 s; unconfirmed at most {peak_lag >> 20} MB; "
        f"retained at most {peak_retained >> 20} MB, finally {final >> 20} MB"
    )
    assert generated > 500 << 20
    assert peak_lag < generated / 4, "the worker stopped confirming while nothing was published"
    assert stream_count(nats_server.url) == 0


def drop_slot_while_inactive(cluster):
    def attempt():
        try:
            cluster.execute("SELECT pg_drop_replication_slot('wal_listener')")
            return True
        except Exception:
            return False

    wait_until(attempt, 60, "dropping the slot between the worker's retries", 0.05)


def test_dropped_slot_is_not_recreated_silently(streaming, nats_server):
    streaming.execute("CREATE TABLE t (id int)")
    streaming.execute("INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1
    with pytest.raises(Exception, match="nothing to reset"):
        streaming.execute("SELECT wal_listener.reset_slot()")

    nats_server.stop()
    streaming.execute("INSERT INTO t VALUES (2)")  # unacked: lost with the slot
    # The worker backs off and lets go of the slot between retries.
    drop_slot_while_inactive(streaming)
    nats_server.start()
    status = wait_until(
        lambda: "is gone" in ((s := streaming.status())["last_error"] or "") and s, 60, "an error naming the lost slot"
    )
    assert status["state"] == "backoff"
    assert "wal_listener.reset_slot()" in status["last_error"]
    time.sleep(3)
    assert streaming.execute("SELECT count(*) AS n FROM pg_replication_slots")[0]["n"] == 0

    message = streaming.execute("SELECT wal_listener.reset_slot() AS m")[0]["m"]
    assert "not published" in message
    streaming.wait_for_state("streaming", timeout=30)
    streaming.execute("INSERT INTO t VALUES (3)")
    assert wait_for_count(nats_server.url, 2) == 2


def test_invalidated_slot_warns_first_then_stops_with_a_clear_error(make_cluster, nats_server):
    cluster = make_cluster({"max_slot_wal_keep_size": "'64MB'"}, heartbeat_interval="1")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE DATABASE other", dbname="postgres")
    cluster.execute("CREATE TABLE busy (id int, pad text)", dbname="other")
    cluster.execute("CREATE TABLE t (id int)")
    nats_server.stop()
    cluster.execute("INSERT INTO t VALUES (0)")  # unacked: the worker backs off
    cluster.wait_for_state("backoff", timeout=30)

    def write_wal(megabytes: int):
        for _ in range(megabytes // 10):
            cluster.execute("INSERT INTO busy SELECT g, repeat('x', 900) FROM generate_series(1, 10000) g", dbname="other")
            cluster.execute("TRUNCATE busy", dbname="other")

    write_wal(60)
    status = wait_until(lambda: (s := cluster.status())["retention_percent"] and s["retention_percent"] > 80 and s, 30, "80 %")
    assert status["retention_limit_bytes"] == 64 << 20
    wait_until(lambda: "of max_slot_wal_keep_size" in cluster.log(), 30, "the retention WARNING")
    warning = next(line for line in cluster.log().splitlines() if "of max_slot_wal_keep_size" in line)
    assert "WARNING" in warning, warning

    write_wal(100)
    cluster.execute("CHECKPOINT")
    wait_until(lambda: cluster.status()["wal_status"] == "lost", 30, "the slot to be invalidated")
    nats_server.start()
    status = wait_until(
        lambda: "invalidated" in ((s := cluster.status())["last_error"] or "") and s, 60, "an error naming the invalidation"
    )
    assert status["state"] == "backoff" and "wal_listener.reset_slot()" in status["last_error"]

    cluster.execute("SELECT wal_listener.reset_slot()")
    cluster.wait_for_state("streaming", timeout=30)
    assert cluster.status()["wal_status"] == "reserved"
    cluster.execute("INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1
