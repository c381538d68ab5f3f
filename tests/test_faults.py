"""Nothing lost, nothing duplicated: a loader commits numbered rows in many
transactions while one fault is injected; the checker then compares every
row the table holds with every event the stream holds."""

import asyncio
import os
import re
import signal
import threading
import time

import nats
import psycopg
import pytest

from conftest import on_one_version
from harness import Nats, inserted_numbers, last_number, read_stream, stream_count, wait_for_count, wait_until

TRANSACTIONS = 300
ROWS_PER_TRANSACTION = 10


class Loader(threading.Thread):
    """Commits rows 1..TRANSACTIONS*ROWS_PER_TRANSACTION, one transaction at a
    time, riding out server crashes. A retried insert whose first attempt did
    commit inserts nothing (ON CONFLICT), so the table stays the truth."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.committed_transactions = 0
        self.errors = 0

    def run(self):
        deadline = time.monotonic() + 180
        while self.committed_transactions < TRANSACTIONS and time.monotonic() < deadline:
            try:
                with self.cluster.connect() as conn:
                    while self.committed_transactions < TRANSACTIONS:
                        first = self.committed_transactions * ROWS_PER_TRANSACTION + 1
                        conn.execute(
                            "INSERT INTO load SELECT g FROM generate_series(%s::int, %s::int) g ON CONFLICT DO NOTHING",
                            (first, first + ROWS_PER_TRANSACTION - 1),
                        )
                        self.committed_transactions += 1
                        time.sleep(0.005)
            except (psycopg.Error, OSError):
                self.errors += 1
                time.sleep(0.2)

    def wait_for(self, transactions: int):
        wait_until(lambda: self.committed_transactions >= transactions, 120, f"{transactions} loader transactions")


def start_loader(cluster) -> Loader:
    cluster.execute("CREATE TABLE load (n int PRIMARY KEY)")
    loader = Loader(cluster)
    loader.start()
    return loader


def check_everything_arrived_once(cluster, nats_server, loader: Loader):
    loader.join(timeout=200)
    assert not loader.is_alive() and loader.committed_transactions == TRANSACTIONS
    rows = sorted(r["n"] for r in cluster.execute("SELECT n FROM load"))
    assert rows == list(range(1, TRANSACTIONS * ROWS_PER_TRANSACTION + 1))
    wait_until(lambda: stream_count(nats_server.url) >= len(rows), 180, f"{len(rows)} events", interval=0.5)
    time.sleep(2)  # and nothing more arrives
    events = read_stream(nats_server.url)
    numbers = [e.body["data"]["n"] for e in events if e.body["table"] == "load"]
    assert len(numbers) == len(set(numbers)), "duplicate events"
    assert sorted(numbers) == rows, "lost events"
    assert len({e.body["id"] for e in events}) == len(events)


def postmaster_pid(cluster) -> int:
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


def first_row_after(loader: Loader) -> int:
    """A row number no transaction in flight now can hold."""
    return (loader.committed_transactions + 1) * ROWS_PER_TRANSACTION


def report_recovery(fault: str, started: float, arrived):
    """Prints how long after `started` the pipeline delivered again: until
    `arrived()` is true."""
    wait_until(arrived, 120, f"delivery after: {fault}", 0.05)
    print(f"\n{fault}: delivering again {time.monotonic() - started:.2f} s after")


def newer_row_stored(nats_server, row: int):
    return lambda: last_number(nats_server.url) > row


def caught_up(nats_server, loader: Loader):
    """True once every row committed before this call is in the stream."""
    row = loader.committed_transactions * ROWS_PER_TRANSACTION
    return lambda: last_number(nats_server.url) >= row


def test_worker_killed_with_sigkill(streaming, nats_server):
    loader = start_loader(streaming)
    loader.wait_for(TRANSACTIONS // 3)
    started, row = time.monotonic(), first_row_after(loader)
    os.kill(streaming.worker_pid(), signal.SIGKILL)  # the postmaster then resets the whole cluster
    report_recovery("kill -9 worker", started, newer_row_stored(nats_server, row))
    check_everything_arrived_once(streaming, nats_server, loader)


def test_postmaster_killed_with_sigkill(streaming, nats_server):
    loader = start_loader(streaming)
    loader.wait_for(TRANSACTIONS // 3)
    started, row = time.monotonic(), first_row_after(loader)
    os.kill(postmaster_pid(streaming), signal.SIGKILL)
    # Its children notice and exit; start again once they have.
    wait_until(lambda: _try_start(streaming), 60, "the server to start again", interval=0.5)
    report_recovery("kill -9 postmaster, then pg_ctl start", started, newer_row_stored(nats_server, row))
    check_everything_arrived_once(streaming, nats_server, loader)


def _try_start(cluster) -> bool:
    try:
        cluster.start()
        return True
    except Exception:
        return False


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restarted_while_loading(streaming, nats_server, mode):
    loader = start_loader(streaming)
    loader.wait_for(TRANSACTIONS // 3)
    started, row = time.monotonic(), first_row_after(loader)
    streaming.restart(mode)
    report_recovery(f"pg_ctl restart -m {mode}", started, newer_row_stored(nats_server, row))
    check_everything_arrived_once(streaming, nats_server, loader)


@on_one_version("15")
def test_nats_stopped_for_30_seconds(streaming, nats_server):
    loader = start_loader(streaming)
    loader.wait_for(TRANSACTIONS // 3)
    nats_server.stop()
    time.sleep(30)
    # Between retries; a retry itself shows "connecting" for a few milliseconds.
    wait_until(lambda: streaming.status()["state"] == "backoff", 10, "backoff while NATS is down")
    nats_server.start()
    started = time.monotonic()
    report_recovery("nats-server stopped 30 s (timed from its restart)", started, caught_up(nats_server, loader))
    check_everything_arrived_once(streaming, nats_server, loader)


def test_nats_killed_with_sigkill(streaming, nats_server):
    loader = start_loader(streaming)
    loader.wait_for(TRANSACTIONS // 3)
    nats_server.stop(signal.SIGKILL)
    time.sleep(2)
    nats_server.start()
    started = time.monotonic()
    report_recovery("nats-server kill -9, down 2 s (timed from its restart)", started, caught_up(nats_server, loader))
    check_everything_arrived_once(streaming, nats_server, loader)


def test_stream_deleted_while_streaming_comes_back(streaming, nats_server):
    async def delete_stream():
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().delete_stream("wal_listener")
        await nc.close()

    loader = start_loader(streaming)
    loader.wait_for(TRANSACTIONS // 3)
    asyncio.run(delete_stream())
    deleted_after = loader.committed_transactions * ROWS_PER_TRANSACTION
    loader.join(timeout=200)
    # Events stored before the deletion are gone with the stream; every row
    # committed after it must be in the re-created stream, once.
    wait_until(
        lambda: (stream_count(nats_server.url) or 0) > 0
        and max(e.body["data"]["n"] for e in read_stream(nats_server.url)) == TRANSACTIONS * ROWS_PER_TRANSACTION,
        120,
        "the last row in the re-created stream",
        interval=1,
    )
    time.sleep(2)
    numbers = [e.body["data"]["n"] for e in read_stream(nats_server.url)]
    assert len(numbers) == len(set(numbers))
    assert set(range(deleted_after + 1, TRANSACTIONS * ROWS_PER_TRANSACTION + 1)) <= set(numbers)


def test_stream_deleted_with_create_stream_off_waits_for_the_operator(streaming, nats_server):
    async def stream(action):
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        if action == "delete":
            await js.delete_stream("wal_listener")
        else:
            await js.add_stream(name="wal_listener", subjects=["wal_listener.>"])
        await nc.close()

    streaming.execute("ALTER SYSTEM SET wal_listener.create_stream = off")
    streaming.execute("SELECT pg_reload_conf()")
    wait_until(lambda: "configuration changed; reconnecting" in streaming.log(), 30, "the reload")
    streaming.wait_for_state("streaming", timeout=30)
    streaming.execute("CREATE TABLE t (id int)")
    asyncio.run(stream("delete"))
    streaming.execute("INSERT INTO t VALUES (1)")
    status = wait_until(
        lambda: (s := streaming.status())["state"] == "backoff" and "create_stream is off" in (s["last_error"] or "")
        and s,
        90,
        "backoff saying the stream is missing",
    )
    assert "create it with subjects wal_listener.>" in status["last_error"]
    asyncio.run(stream("create"))
    streaming.wait_for_state("streaming", timeout=60)
    assert wait_for_count(nats_server.url, 1) == 1
    assert read_stream(nats_server.url)[0].body["data"] == {"id": 1}


def test_event_larger_than_max_payload(make_cluster):
    """Policy `error` stops before the event and publishes nothing after it;
    `skip` leaves it out with a log line naming it and a count in status."""
    small_nats = Nats(config="max_payload: 32768")
    try:
        cluster = make_cluster(nats_url=f"'{small_nats.url}'")
        cluster.execute("CREATE EXTENSION wal_listener")
        cluster.wait_for_state("streaming", timeout=60)
        cluster.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        cluster.execute("INSERT INTO docs SELECT g, 'small' FROM generate_series(1, 3) g")
        with cluster.connect() as conn, conn.transaction():
            conn.execute("INSERT INTO docs VALUES (4, repeat('x', 100000))")
            conn.execute("INSERT INTO docs VALUES (5, 'after the big one')")
        cluster.execute("INSERT INTO docs VALUES (6, 'next transaction')")

        status = wait_until(
            lambda: (s := cluster.status())["state"] == "backoff" and "max_payload" in (s["last_error"] or "") and s,
            60,
            "backoff naming max_payload",
        )
        assert "public.docs (id)=(4)" in status["last_error"], status["last_error"]
        assert "oversize_policy = skip" in status["last_error"]
        time.sleep(3)  # retries fail the same way; nothing after row 4 goes out
        assert [e.body["data"]["id"] for e in read_stream(small_nats.url)] == [1, 2, 3]

        cluster.set(oversize_policy="skip")
        assert wait_for_count(small_nats.url, 5) == 5
        assert [e.body["data"]["id"] for e in read_stream(small_nats.url)] == [1, 2, 3, 5, 6]
        wait_until(lambda: cluster.status()["events_skipped"] == 1, 10, "events_skipped = 1")
        skipped = [line for line in cluster.log().splitlines() if "skipped event" in line]
        assert len(skipped) == 1 and "public.docs (id)=(4)" in skipped[0], skipped
        assert re.search(r"committed at [0-9A-F]+/[0-9A-F]+", skipped[0]), skipped[0]
    finally:
        small_nats.destroy()


@pytest.mark.parametrize(
    "fault, error",
    [
        ("panic", "panicked"),
        ("unknown_message", "unknown pgoutput message type"),
        ("undescribed_relation", "never described"),
    ],
)
def test_bad_input_and_panics_restart_from_the_slot(streaming, nats_server, fault, error):
    """A panic or undecodable data in the pipeline: status shows the error,
    the server and its sessions live on, and once the fault is gone every
    row arrives once."""
    bystander = streaming.connect()
    streaming.execute("CREATE TABLE load (n int PRIMARY KEY)")
    streaming.execute("INSERT INTO load SELECT generate_series(1, 5)")
    assert wait_for_count(nats_server.url, 5) == 5
    streaming.set(inject_fault=fault)
    wait_until(lambda: "configuration changed" in streaming.log(), 30, "the reload")
    streaming.execute("INSERT INTO load SELECT generate_series(6, 10)")
    status = wait_until(
        lambda: (s := streaming.status())["state"] == "backoff" and error in (s["last_error"] or "") and s,
        30,
        f"backoff with {error!r}",
    )
    print(f"\n{fault}: {status['last_error']}")
    assert stream_count(nats_server.url) == 5
    streaming.set(inject_fault=None)
    assert wait_for_count(nats_server.url, 10) == 10
    assert sorted(inserted_numbers(nats_server.url)) == list(range(1, 11))
    assert bystander.execute("SELECT 1").fetchone() is not None, "the server restarted"
    assert "terminated by signal" not in streaming.log()
    bystander.close()


def test_panic_on_the_worker_main_thread(streaming, nats_server):
    """The thread that calls Postgres panics: the worker exits with an ERROR
    and is started again; the rest of the server is untouched."""
    bystander = streaming.connect()
    first_worker = streaming.worker_pid()
    streaming.execute("CREATE TABLE load (n int PRIMARY KEY)")
    streaming.set(inject_fault="host_panic")
    wait_until(lambda: "injected by wal_listener.inject_fault = host_panic" in streaming.log(), 30, "the panic")
    streaming.execute("INSERT INTO load SELECT generate_series(1, 5)")
    streaming.set(inject_fault=None)
    assert wait_for_count(nats_server.url, 5, timeout=60) == 5
    assert sorted(inserted_numbers(nats_server.url)) == [1, 2, 3, 4, 5]
    assert streaming.worker_pid() not in (None, first_worker)
    assert bystander.execute("SELECT 1").fetchone() is not None, "the server restarted"
    assert "terminated by signal" not in streaming.log()
    bystander.close()


class Responder(threading.Thread):
    """A core NATS subscriber on `subject` that answers every message at
    once, as request/reply services do; its replies land on our PubAck inbox."""

    def __init__(self, url: str, subject: str):
        super().__init__(daemon=True)
        self.url, self.subject = url, subject
        self.answered = 0
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.start()
        assert self.ready.wait(10), "responder did not subscribe"

    def run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self):
        self.nc = await nats.connect(self.url)

        async def answer(msg):
            self.answered += 1
            await msg.respond(b"ok")

        await self.nc.subscribe(self.subject, cb=answer)
        await self.nc.flush()
        self.ready.set()
        self.stopped = asyncio.Event()
        await self.stopped.wait()
        await self.nc.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.join(10)


def confirmed_flush(cluster) -> str:
    return cluster.execute("SELECT confirmed_flush_lsn::text AS l FROM pg_replication_slots")[0]["l"]


def lsn_before(cluster, a: str, b: str) -> bool:
    return cluster.execute("SELECT %s::pg_lsn < %s::pg_lsn AS before", (a, b))[0]["before"]


def test_a_core_responder_never_confirms_an_event_the_stream_refused(streaming, nats_server):
    async def stream_limit(max_msgs: int):
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        config = (await js.stream_info("wal_listener")).config
        config.max_msgs, config.discard = max_msgs, nats.js.api.DiscardPolicy.NEW
        await js.update_stream(config)
        await nc.close()

    streaming.execute("CREATE TABLE t (id int)")
    streaming.execute("INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1
    asyncio.run(stream_limit(1))  # full: the stream refuses the next message
    responder = Responder(nats_server.url, "wal_listener.>")
    try:
        before = streaming.execute("SELECT pg_current_wal_lsn()::text AS l")[0]["l"]
        streaming.execute("INSERT INTO t VALUES (2)")
        status = wait_until(
            lambda: (s := streaming.status())["state"] == "backoff" and "maximum messages" in (s["last_error"] or "") and s,
            60,
            "backoff naming the refusal",
        )
        print(f"\nstream full, responder answering: {status['last_error']}")
        time.sleep(3)
        assert responder.answered >= 1, "the responder never answered"
        assert not lsn_before(streaming, before, confirmed_flush(streaming)), "confirmed past an event the stream refused"
        assert stream_count(nats_server.url) == 1

        asyncio.run(stream_limit(-1))
        assert wait_for_count(nats_server.url, 2, timeout=90) == 2
        assert [e.body["data"]["id"] for e in read_stream(nats_server.url)] == [1, 2]
        wait_until(lambda: lsn_before(streaming, before, confirmed_flush(streaming)), 30, "the confirm")
        assert "only a PubAck from the stream does" in streaming.log()
    finally:
        responder.stop()


def test_signal_storm_leaves_the_worker_and_other_sessions_alone(streaming, nats_server):
    bystander = streaming.connect()
    pid = streaming.worker_pid()
    loader = start_loader(streaming)
    loader.wait_for(TRANSACTIONS // 10)
    for i in range(5000):
        os.kill(pid, signal.SIGHUP if i % 2 else signal.SIGUSR1)
    with streaming.connect() as conn:
        for _ in range(200):
            conn.execute("SELECT pg_reload_conf()")
    for i in range(5000):
        os.kill(pid, signal.SIGUSR1 if i % 2 else signal.SIGHUP)
    check_everything_arrived_once(streaming, nats_server, loader)
    assert streaming.worker_pid() == pid
    assert bystander.execute("SELECT 1").fetchone() is not None, "the server restarted"
    assert "terminated by signal" not in streaming.log()
    bystander.close()


def test_a_dead_supervisor_ends_the_worker_instead_of_freezing_its_status(streaming, nats_server):
    first_worker = streaming.worker_pid()
    streaming.set(inject_fault="supervisor_panic")
    wait_until(lambda: "pipeline supervisor ended unexpectedly" in streaming.log(), 30, "the worker to notice")
    status = wait_until(lambda: (s := streaming.status())["pid"] is None and s, 10, "the worker to exit")
    assert status["state"] == "stopped"
    streaming.set(inject_fault=None)
    status = wait_until(lambda: (s := streaming.status())["state"] == "streaming" and s, 60, "a new worker")
    assert status["pid"] not in (None, first_worker)
    streaming.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
    assert wait_for_count(nats_server.url, 1) == 1
