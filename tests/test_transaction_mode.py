"""publish_mode = transaction: whole transactions as JetStream atomic
batches (nats-server 2.12+; the tests run 2.15), so a consumer never sees
part of one; small transactions share batches; crashes lose nothing and
store nothing twice; a transaction too large for one batch goes one event
at a time."""

import asyncio
import json
import os
import random
import signal
import threading
import time

import nats
import psycopg
import pytest

from harness import event_bodies, stored_events, stream_count, wait_until


class TransactionLoader(threading.Thread):
    """Commits transactions 1..count into `tx (t, i, size)`: transaction t
    has `size` rows i = 0..size-1, size random in 1..max_rows."""

    def __init__(self, cluster, count: int, max_rows: int = 40, pause: float = 0.002):
        super().__init__(daemon=True)
        self.cluster, self.count, self.max_rows, self.pause = cluster, count, max_rows, pause
        self.committed = 0
        self.rng = random.Random(11)

    def run(self):
        deadline = time.monotonic() + 240
        while self.committed < self.count and time.monotonic() < deadline:
            try:
                with psycopg.connect(host=str(self.cluster.dir), port=self.cluster.port, user="postgres",
                                     dbname="app", autocommit=True) as conn:
                    while self.committed < self.count:
                        t = self.committed + 1
                        size = self.rng.randint(1, self.max_rows)
                        conn.execute("INSERT INTO tx SELECT %s, i, %s FROM generate_series(0, %s - 1) i "
                                     "ON CONFLICT DO NOTHING", (t, size, size))
                        self.committed = t
                        time.sleep(self.pause)
            except (psycopg.Error, OSError):
                time.sleep(0.2)


class PartialWatcher(threading.Thread):
    """A pull consumer that reads while the load runs. Each time it has read
    up to the stream's last message (the stream's last sequence, read after
    the fetch, equals the last one delivered), every transaction it has seen
    must be whole; `partials` counts the times one was not."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.partials = 0
        self.checks = 0
        self.seen: dict[int, set[int]] = {}
        self.sizes: dict[int, int] = {}
        self.stopped = threading.Event()
        self.start()

    def run(self):
        asyncio.run(self._watch())

    async def _watch(self):
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        wait = time.monotonic() + 30
        while True:
            try:
                sub = await js.pull_subscribe("wal_listener.>", durable="watcher")
                break
            except Exception:
                if time.monotonic() > wait:
                    raise
                await asyncio.sleep(0.2)
        delivered = 0
        while not self.stopped.is_set():
            try:
                msgs = await sub.fetch(1000, timeout=0.05)
            except nats.errors.TimeoutError:
                msgs = []
            for msg in msgs:
                data = json.loads(msg.data)["data"]
                self.seen.setdefault(data["t"], set()).add(data["i"])
                self.sizes[data["t"]] = data["size"]
                delivered = msg.metadata.sequence.stream
                await msg.ack()
            if delivered and (await js.stream_info("wal_listener")).state.last_seq == delivered:
                # Everything the stream holds is read: what we saw must be whole.
                self.checks += 1
                if any(len(rows) != self.sizes[t] for t, rows in self.seen.items()):
                    self.partials += 1
        await nc.close()

    def stop(self):
        self.stopped.set()
        self.join(30)


def check_every_transaction_whole_and_once(cluster, url: str, transactions: int):
    table = cluster.execute("SELECT t, count(*) AS n, max(size) AS size FROM tx GROUP BY t ORDER BY t")
    assert [r["t"] for r in table] == list(range(1, transactions + 1))
    rows = sum(r["n"] for r in table)
    wait_until(lambda: stream_count(url) >= rows, 180, f"{rows} events", interval=0.5)
    time.sleep(2)
    bodies = event_bodies(url)
    keys = [(b["data"]["t"], b["data"]["i"]) for b in bodies]
    assert len(keys) == len(set(keys)), "an event stored twice"
    assert len(keys) == rows, "lost events"
    # Stream order: the transactions in commit order, each one contiguous.
    order = [t for t, _ in keys]
    assert order == sorted(order), "transactions out of order or interleaved"


@pytest.fixture
def transactional(make_cluster, nats_server):
    cluster = make_cluster(publish_mode="transaction")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE TABLE tx (t int, i int, size int, PRIMARY KEY (t, i))")
    return cluster


@pytest.mark.parametrize("mode", ["transaction", "event"])
def test_a_consumer_never_sees_part_of_a_transaction(make_cluster, nats_server, mode):
    cluster = make_cluster(publish_mode=mode)
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE TABLE tx (t int, i int, size int, PRIMARY KEY (t, i))")
    watcher = PartialWatcher(nats_server.url)
    loader = TransactionLoader(cluster, 400, max_rows=60, pause=0.01)
    loader.start()
    loader.join(240)
    wait_until(lambda: stream_count(nats_server.url) >= cluster.execute("SELECT count(*) AS n FROM tx")[0]["n"], 120,
               "every event")
    time.sleep(1)
    watcher.stop()
    print(f"\npublish_mode = {mode}: the consumer caught up {watcher.checks} times and saw part of a "
          f"transaction {watcher.partials} times")
    if mode == "transaction":
        assert watcher.checks > 20
        assert watcher.partials == 0
        assert cluster.status()["transactions_unbatched"] == 0
    check_every_transaction_whole_and_once(cluster, nats_server.url, 400)


def test_kill_9_of_the_worker_and_of_nats_mid_batch_loses_and_duplicates_nothing(transactional, nats_server):
    loader = TransactionLoader(transactional, 600, max_rows=40)
    loader.start()
    wait_until(lambda: loader.committed >= 150, 120, "150 transactions")
    os.kill(transactional.worker_pid(), signal.SIGKILL)  # the postmaster resets the cluster
    wait_until(lambda: loader.committed >= 350, 180, "350 transactions")
    nats_server.stop(signal.SIGKILL)
    time.sleep(2)
    nats_server.start()
    loader.join(240)
    check_every_transaction_whole_and_once(transactional, nats_server.url, 600)
    replays = [line for line in transactional.log().splitlines() if "holds an event JetStream stored before" in line]
    print(f"\nreplayed batches refused as duplicates (then sent again one event at a time): {len(replays)}")


def test_a_transaction_too_large_for_one_batch_goes_one_event_at_a_time(transactional, nats_server):
    transactional.execute("INSERT INTO tx SELECT 1, i, 5000 FROM generate_series(0, 4999) i")
    transactional.execute("INSERT INTO tx SELECT 2, i, 3 FROM generate_series(0, 2) i")
    check_every_transaction_whole_and_once(transactional, nats_server.url, 2)
    wait_until(lambda: transactional.status()["transactions_unbatched"] == 1, 10, "one unbatched transaction")
    lines = [l for l in transactional.log().splitlines() if "goes one event at a time" in l]
    assert len(lines) == 1 and "more events than an atomic batch may hold" in lines[0], lines


def test_a_backlog_of_small_transactions_shares_batches_and_never_times_out(transactional, nats_server):
    """The server syncs its store once per batch (a few ms): one batch per
    single-row transaction would make a backlog wait past the PubAck
    timeout. Committed while NATS is down, they arrive grouped."""
    count = 20_000
    nats_server.stop()
    transactional.execute("""
        CREATE PROCEDURE single_rows(n int) LANGUAGE plpgsql AS $$
        BEGIN FOR t IN 1..n LOOP INSERT INTO tx VALUES (t, 0, 1); COMMIT; END LOOP; END $$""")
    transactional.execute(f"CALL single_rows({count})")
    nats_server.start()
    check_every_transaction_whole_and_once(transactional, nats_server.url, count)
    batches: dict[str, set[int]] = {}
    for headers, body in stored_events(nats_server.url):
        batches.setdefault(headers["Nats-Batch-Id"], set()).add(body["data"]["t"])
    print(f"\n{count} single-row transactions in {len(batches)} atomic batches")
    assert len(batches) <= count / 10, "transactions did not share batches"
    assert "no PubAck within" not in transactional.log()
    assert transactional.status()["transactions_unbatched"] == 0


async def _create_atomic_stream(url: str, name: str, subjects: list[str]):
    """A stream that allows atomic batches (nats-py has no field for it: the raw API)."""
    nc = await nats.connect(url)
    try:
        config = {"name": name, "subjects": subjects, "storage": "file", "num_replicas": 1,
                  "duplicate_window": 120_000_000_000, "allow_atomic": True}
        reply = await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(), timeout=5)
        assert "error" not in json.loads(reply.data), reply.data
    finally:
        await nc.close()


def test_transactions_alternating_between_two_streams_keep_the_batch_limit(transactional, nats_server):
    """Each transaction is its own batch when the next one goes to another
    stream; those batches wait for the limit like any other (the server
    refuses more than 50 open batches per stream: error 10210)."""
    count = 1000
    asyncio.run(_create_atomic_stream(nats_server.url, "other", ["other.>"]))
    cluster = transactional
    cluster.execute("CREATE TABLE a (t int PRIMARY KEY); CREATE TABLE b (t int PRIMARY KEY)")
    cluster.execute("SELECT wal_listener.add_filter('a'), wal_listener.add_filter('b', subject => 'other.b')")
    time.sleep(1)
    nats_server.stop()  # a backlog: every batch is ready at once
    cluster.execute("""
        CREATE PROCEDURE alternate(n int) LANGUAGE plpgsql AS $$
        BEGIN FOR t IN 1..n LOOP
            INSERT INTO a VALUES (t); COMMIT;
            INSERT INTO b VALUES (t); COMMIT;
        END LOOP; END $$""")
    cluster.execute(f"CALL alternate({count})")
    nats_server.start()
    wait_until(lambda: stream_count(nats_server.url) >= count and stream_count(nats_server.url, "other") >= count,
               120, "every row in its stream", interval=0.5)
    assert [b["data"]["t"] for b in event_bodies(nats_server.url) if b["table"] == "a"] == list(range(1, count + 1))
    assert [b["data"]["t"] for b in event_bodies(nats_server.url, "other")] == list(range(1, count + 1))
    assert "10210" not in cluster.log(), "the server refused a batch: too many open batches"
    assert cluster.status()["transactions_unbatched"] == 0
