"""Filters, per-table subjects, status() and restart() against the live
pipeline."""

from harness import read_stream, wait_for_count, wait_until


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
    commit_lsns = streaming.execute("SELECT commit_lsn IS NOT NULL AS recorded FROM wal_listener.config_changes")
    assert commit_lsns == [{"recorded": True}]


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
