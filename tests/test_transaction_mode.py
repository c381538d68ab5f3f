"""publish_mode = transaction: whole transactions as JetStream atomic
batches (nats-server 2.12+; the tests run 2.15), so the stream never holds
part of one, and END events that tell a live consumer when it holds a whole
one (in either mode); small transactions share batches; crashes lose nothing and
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
    """A pull consumer that reads while the load runs, as a service would.

    - Live: at each delivery it notes `num_pending`. `live_partials` counts
      deliveries after which the server had nothing pending for it while it
      held part of a transaction: a batch is stored message by message, so
      even in transaction mode a live consumer can (README).
    - Stored: each time it has read up to the stream's last message (the
      last sequence, read after the fetch, equals the last delivered), every
      transaction it has seen must be whole; `stored_partials` counts the
      times one was not (none in transaction mode).
    - END events: each must find every event it counts delivered before it;
      `early_ends` counts those that did not."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.stored_partials = self.checks = 0
        self.live_partials = self.caught_up = 0
        self.ends: dict[str, dict] = {}
        self.early_ends = 0
        self.seen: dict[int, set[int]] = {}
        self.sizes: dict[int, int] = {}
        self.by_lsn: dict[str, dict[str, int]] = {}
        self.stopped = threading.Event()
        self.start()

    def run(self):
        asyncio.run(self._watch())

    def partial(self) -> bool:
        return any(len(rows) != self.sizes[t] for t, rows in self.seen.items())

    def take(self, msg):
        body = json.loads(msg.data)
        if body["action"] == "END":
            self.ends[body["lsn"]] = body
            if self.by_lsn.get(body["lsn"]) != body["subjects"]:
                self.early_ends += 1
        else:
            data = body["data"]
            self.seen.setdefault(data["t"], set()).add(data["i"])
            self.sizes[data["t"]] = data["size"]
            counts = self.by_lsn.setdefault(body["lsn"], {})
            counts[msg.subject] = counts.get(msg.subject, 0) + 1
        if msg.metadata.num_pending == 0:
            self.caught_up += 1
            self.live_partials += self.partial()

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
                self.take(msg)
                delivered = msg.metadata.sequence.stream
                await msg.ack()
            if delivered and (await js.stream_info("wal_listener")).state.last_seq == delivered:
                # Everything the stream holds is read: what we saw must be whole.
                self.checks += 1
                self.stored_partials += self.partial()
        await nc.close()

    def stop(self):
        self.stopped.set()
        self.join(30)


def check_every_transaction_whole_and_once(cluster, url: str, transactions: int, end_events: bool = False):
    table = cluster.execute("SELECT t, count(*) AS n, max(size) AS size FROM tx GROUP BY t ORDER BY t")
    assert [r["t"] for r in table] == list(range(1, transactions + 1))
    rows = sum(r["n"] for r in table)
    stored = rows + (transactions if end_events else 0)
    wait_until(lambda: stream_count(url) >= stored, 180, f"{stored} events", interval=0.5)
    time.sleep(2)
    bodies = [b for b in event_bodies(url) if b["action"] != "END"]
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
def test_an_end_event_tells_a_live_consumer_when_it_holds_a_whole_transaction(make_cluster, nats_server, mode):
    cluster = make_cluster(publish_mode=mode, transaction_end_events="on")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE TABLE tx (t int, i int, size int, PRIMARY KEY (t, i))")
    watcher = PartialWatcher(nats_server.url)
    loader = TransactionLoader(cluster, 400, max_rows=60, pause=0.01)
    loader.start()
    loader.join(240)
    rows = cluster.execute("SELECT count(*) AS n FROM tx")[0]["n"]
    wait_until(lambda: stream_count(nats_server.url) >= rows + 400, 120, "every event and END")
    time.sleep(1)
    watcher.stop()
    print(f"\npublish_mode = {mode}: at num_pending = 0 the consumer held part of a transaction "
          f"{watcher.live_partials} times out of {watcher.caught_up}; having read all the stream stored, "
          f"{watcher.stored_partials} times out of {watcher.checks}; END events before their last event: "
          f"{watcher.early_ends} of {len(watcher.ends)}")
    # Every END came after all it counts, and counts what the table has.
    assert watcher.early_ends == 0
    sizes = {r["t"]: r["n"] for r in cluster.execute("SELECT t, count(*) AS n FROM tx GROUP BY t")}
    assert len(watcher.ends) == 400
    by_lsn = {lsn: counts["wal_listener.public_tx"] for lsn, counts in watcher.by_lsn.items()}
    assert sorted(by_lsn[lsn] for lsn in watcher.ends) == sorted(sizes.values())
    assert all(end["events"] == by_lsn[lsn] for lsn, end in watcher.ends.items())
    if mode == "transaction":
        assert watcher.checks > 20
        assert watcher.stored_partials == 0
        assert cluster.status()["transactions_unbatched"] == 0
    check_every_transaction_whole_and_once(cluster, nats_server.url, 400, end_events=True)
    stored = stored_events(nats_server.url)
    ends = [(headers, body) for headers, body in stored if body["action"] == "END"]
    assert all(h["Nats-Msg-Id"] == b["id"] for h, b in ends)
    # Stream order: each END right after its transaction's last event.
    actions = [(b["lsn"], b["action"]) for _, b in stored]
    for (lsn, action), following in zip(actions, actions[1:]):
        if action != "END" and following[0] != lsn:
            assert following == (lsn, "END")
    assert actions[-1][1] == "END"


def test_kill_9_of_the_worker_and_of_nats_mid_batch_loses_and_duplicates_nothing(transactional, nats_server):
    # With END events too: replayed, they are dropped as duplicates like the rest.
    transactional.set(transaction_end_events="on")
    wait_until(lambda: "configuration changed; reconnecting" in transactional.log(), 30, "the new setting")
    transactional.wait_for_state("streaming", timeout=60)
    loader = TransactionLoader(transactional, 600, max_rows=40)
    loader.start()
    wait_until(lambda: loader.committed >= 150, 120, "150 transactions")
    os.kill(transactional.worker_pid(), signal.SIGKILL)  # the postmaster resets the cluster
    wait_until(lambda: loader.committed >= 350, 180, "350 transactions")
    nats_server.stop(signal.SIGKILL)
    time.sleep(2)
    nats_server.start()
    loader.join(240)
    check_every_transaction_whole_and_once(transactional, nats_server.url, 600, end_events=True)
    ends = [b for b in event_bodies(nats_server.url) if b["action"] == "END"]
    assert sorted(e["events"] for e in ends) == sorted(
        r["n"] for r in transactional.execute("SELECT count(*) AS n FROM tx GROUP BY t")), "END events lost or twice"
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
