"""Large transactions arrive whole while the worker's memory stays bounded,
and a stalled NATS does not get the walsender disconnected."""

import signal
import time

from conftest import on_one_version
from harness import Nats, PeakMemory, inserted_numbers, read_stream, stream_count, wait_for_count, wait_until

# The target for the worker's own memory (anonymous RSS).
MEMORY_LIMIT_MIB = 64


def check_all_arrived_once(nats_server, expected: int):
    assert wait_for_count(nats_server.url, expected, timeout=600) == expected
    numbers = inserted_numbers(nats_server.url)
    assert len(numbers) == expected
    assert len(set(numbers)) == expected, "duplicates"
    assert min(numbers) == 1 and max(numbers) == expected, "lost events"


def load_and_watch_memory(
    cluster, nats_server, load_sql: str, events: int, timeout: float
) -> tuple[float, float, float]:
    """Runs `load_sql` while sampling the worker's memory; checks that all
    `events` arrive once, within `timeout`. Returns (seconds to commit,
    seconds from the start to the last event stored, peak RSS in MiB)."""
    memory = PeakMemory(cluster.worker_pid())
    started = time.monotonic()
    cluster.execute(load_sql)
    committed = time.monotonic()
    wait_until(lambda: stream_count(nats_server.url) >= events, timeout, f"{events} events", 0.5)
    stored = time.monotonic()
    peak = memory.stop()
    check_all_arrived_once(nats_server, events)
    return committed - started, stored - started, peak


def test_one_transaction_of_a_million_rows(streaming, nats_server):
    streaming.execute("CREATE TABLE big (n int)")
    commit, stored, peak = load_and_watch_memory(
        streaming, nats_server, "INSERT INTO big SELECT generate_series(1, 1000000)", 1_000_000, 600
    )
    print(
        f"\n1,000,000-row transaction: commit {commit:.1f} s, last event stored "
        f"{stored - commit:.1f} s after commit; worker peak anonymous RSS {peak:.1f} MiB"
    )
    assert peak <= MEMORY_LIMIT_MIB


@on_one_version("18")
def test_200k_transactions_of_10_rows(streaming, nats_server):
    streaming.execute("CREATE TABLE small (n int)")
    streaming.execute(
        """CREATE PROCEDURE load(transactions int) LANGUAGE plpgsql AS $$
           BEGIN
               FOR t IN 0 .. transactions - 1 LOOP
                   INSERT INTO small SELECT t * 10 + g FROM generate_series(1, 10) g;
                   COMMIT;
               END LOOP;
           END $$"""
    )
    commits, stored, peak = load_and_watch_memory(streaming, nats_server, "CALL load(200000)", 2_000_000, 900)
    print(
        f"\n200,000 transactions x 10 rows: commits took {commits:.1f} s, last event stored "
        f"{stored:.1f} s after the first commit; worker peak anonymous RSS {peak:.1f} MiB"
    )
    assert peak <= MEMORY_LIMIT_MIB


def test_stalled_nats_does_not_get_the_walsender_disconnected(make_cluster, nats_server):
    """nats-server is frozen (SIGSTOP) for 3 x wal_sender_timeout while the
    worker has a backlog: the worker keeps answering the walsender, so the
    same replication connection resumes once NATS does."""
    cluster = make_cluster({"wal_sender_timeout": "'2s'"})
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE TABLE t (n int)")
    walsender = cluster.execute("SELECT pid FROM pg_stat_replication WHERE application_name = 'wal_listener'")[0]["pid"]
    log_before = len(cluster.log())
    nats_server.process.send_signal(signal.SIGSTOP)
    try:
        cluster.execute("INSERT INTO t SELECT generate_series(1, 200000)")
        time.sleep(6)
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    check_all_arrived_once(nats_server, 200_000)
    log = cluster.log()[log_before:]
    assert "replication timeout" not in log and "retrying" not in log, "the session was restarted"
    after = cluster.execute("SELECT pid FROM pg_stat_replication WHERE application_name = 'wal_listener'")
    assert [r["pid"] for r in after] == [walsender]


@on_one_version("15")
def test_memory_is_bounded_in_bytes_while_nats_is_frozen(make_cluster):
    """400 rows of 1 MiB while nats-server is frozen: the worker holds at most
    max_in_flight_bytes of unacked payloads plus its read-ahead (a quarter of
    it), not max_in_flight events of any size."""
    big_nats = Nats(config="max_payload: 8MB")
    try:
        cluster = make_cluster(nats_url=f"'{big_nats.url}'")
        cluster.execute("CREATE EXTENSION wal_listener")
        cluster.wait_for_state("streaming", timeout=60)
        cluster.execute("CREATE TABLE blobs (n int PRIMARY KEY, body text)")
        memory = PeakMemory(cluster.worker_pid())
        big_nats.process.send_signal(signal.SIGSTOP)
        try:
            for n in range(1, 401):
                # Compressible, so the WAL stays small; pgoutput sends it whole.
                cluster.execute("INSERT INTO blobs VALUES (%s, repeat(chr(65 + %s %% 26), 1048576))", (n, n))
            time.sleep(8)
        finally:
            big_nats.process.send_signal(signal.SIGCONT)
        assert wait_for_count(big_nats.url, 400, timeout=300) == 400
        peak = memory.stop()
        numbers = [e.body["data"]["n"] for e in read_stream(big_nats.url)]
        limit = 2 * 64 + 32
        print(f"\n400 x 1 MiB rows, NATS frozen 8 s: worker peak anonymous RSS {peak:.1f} MiB (limit {limit} MiB)")
        assert sorted(numbers) == list(range(1, 401))
        assert peak <= limit
    finally:
        big_nats.destroy()


@on_one_version("18")
def test_nats_frozen_past_the_ack_timeout_confirms_nothing_of_the_transaction(streaming, nats_server):
    streaming.execute("CREATE TABLE t (n int)")
    nats_server.process.send_signal(signal.SIGSTOP)
    try:
        streaming.execute("INSERT INTO t SELECT generate_series(1, 50000)")
        commit_end = streaming.execute("SELECT pg_current_wal_lsn()::text AS l")[0]["l"]
        deadline, timed_out = time.monotonic() + 15, False  # past the 10 s PubAck timeout
        while time.monotonic() < deadline:
            timed_out = timed_out or "no PubAck within 10 s" in (streaming.status()["last_error"] or "")
            confirmed = streaming.execute("SELECT confirmed_flush_lsn::text AS l FROM pg_replication_slots")[0]["l"]
            before = streaming.execute("SELECT %s::pg_lsn < %s::pg_lsn AS b", (confirmed, commit_end))[0]["b"]
            assert before, f"confirmed {confirmed} passed the unacked transaction ending at {commit_end}"
            time.sleep(0.5)
        assert timed_out, f"no PubAck timeout reported: {streaming.status()}"
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    check_all_arrived_once(nats_server, 50_000)
    wait_until(
        lambda: streaming.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn AS done FROM pg_replication_slots", (commit_end,))[0]["done"],
        60,
        "the confirm once the acks arrived",
    )
