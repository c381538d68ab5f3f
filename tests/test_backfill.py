"""Backfills: a table's existing rows as READ events, consistent with the
live stream (DBLog watermarks), resumable, with bad input refused."""

import os
import random
import signal
import time

import psycopg
import pytest

from harness import Writer, event_bodies, read_stream, stream_count, wait_for_count, wait_until


def jobs(cluster) -> list[dict]:
    return cluster.execute("SELECT * FROM wal_listener.backfills ORDER BY id")


def wait_done(cluster, backfill_id: int, timeout: float = 300) -> dict:
    def finished():
        row = cluster.execute("SELECT * FROM wal_listener.backfills WHERE id = %s", (backfill_id,))[0]
        return row if row["state"] in ("done", "failed", "cancelled") else None

    row = wait_until(finished, timeout, f"backfill {backfill_id} to finish", interval=0.5)
    assert row["state"] == "done", row
    return row


def test_existing_rows_become_read_events(cluster, nats_server):
    # Rows from before the extension: the stream never carried their INSERTs.
    streaming = cluster
    streaming.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric)")
    streaming.execute("INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 2500) g")
    streaming.execute("CREATE EXTENSION wal_listener")
    streaming.wait_for_state("streaming", timeout=60)
    streaming.execute("SELECT wal_listener.add_filter('items', subject => 'wal_listener.catalog.items')")
    backfill = streaming.execute("SELECT wal_listener.backfill('items') AS id")[0]["id"]
    job = wait_done(streaming, backfill)
    assert (job["rows_done"], job["table"]) == (2500, "items")
    assert wait_for_count(nats_server.url, 2500) == 2500
    events = read_stream(nats_server.url)
    assert {e.subject for e in events} == {"wal_listener.catalog.items"}
    first = events[0].body
    assert (first["action"], first["dataOld"], first["backfill"], first["primaryKey"]) == ("READ", {}, backfill, ["id"])
    assert first["data"] == {"id": 1, "name": "item 1", "price": "1.5"}
    assert sorted(e.body["data"]["id"] for e in events) == list(range(1, 2501))
    assert len({e.body["id"] for e in events}) == 2500
    assert streaming.status()["backfill"] is None

    # The same backfill again sends the same ids: JetStream drops them.
    streaming.execute("UPDATE wal_listener.backfill_jobs SET state = 'pending', last_key = NULL WHERE id = %s", (backfill,))
    wait_done(streaming, backfill)
    time.sleep(2)
    assert stream_count(nats_server.url) == 2500


def test_a_sparse_table_of_1600_columns_is_read_in_chunks_bounded_by_its_columns(cluster, nats_server):
    # 1,000 rows of about 250 bytes on disk each (all but two columns NULL)
    # are 51 kB each once read: 1,600 values. Counted by their bytes alone
    # they made one chunk of 1,000 rows, 80 MB in the worker (4,000 rows
    # at the chunk cap: 200 MB); each value counts now, so a chunk holds
    # at most 82 rows (4 MiB).
    streaming = cluster
    columns = ", ".join(f"c{i} int" for i in range(1, 1600))
    streaming.execute(f"CREATE TABLE sparse (id int PRIMARY KEY, {columns})")
    streaming.execute("INSERT INTO sparse (id, c1599) SELECT g, g FROM generate_series(1, 1000) g")
    streaming.execute("CREATE EXTENSION wal_listener")
    streaming.wait_for_state("streaming", timeout=60)
    backfill = streaming.execute("SELECT wal_listener.backfill('sparse') AS id")[0]["id"]
    job = wait_done(streaming, backfill)
    assert job["rows_done"] == 1000
    chunks = streaming.execute("SELECT chunks_done FROM wal_listener.backfill_jobs WHERE id = %s", (backfill,))[0]
    assert chunks["chunks_done"] >= 1000 / 82, chunks
    assert wait_for_count(nats_server.url, 1000) == 1000
    events = read_stream(nats_server.url)
    assert sorted(e.body["data"]["id"] for e in events) == list(range(1, 1001))
    first = events[0].body["data"]
    assert (len(first), first["c2"], first["c1599"]) == (1600, None, first["id"]), {k: v for k, v in first.items() if v}
    assert all(e.body["data"]["c1599"] == e.body["data"]["id"] and e.body["data"]["c2"] is None
               and len(e.body["data"]) == 1600 for e in events)


def test_a_where_clause_selects_the_rows(cluster, nats_server):
    streaming = cluster
    streaming.execute("CREATE TABLE orders (id int PRIMARY KEY, created date)")
    streaming.execute("INSERT INTO orders SELECT g, date '2026-01-01' + g FROM generate_series(1, 300) g")
    streaming.execute("CREATE EXTENSION wal_listener")
    streaming.wait_for_state("streaming", timeout=60)
    backfill = streaming.execute(
        "SELECT wal_listener.backfill('orders', where_clause => 'created > ''2026-10-01''') AS id")[0]["id"]
    wait_done(streaming, backfill)
    expected = streaming.execute("SELECT count(*) AS n FROM orders WHERE created > '2026-10-01'")[0]["n"]
    assert wait_for_count(nats_server.url, expected) == expected
    assert all(e.body["data"]["created"] > "2026-10-01" for e in read_stream(nats_server.url))


@pytest.mark.parametrize(
    "call, message",
    [
        ("backfill('no_such_table')", 'relation "no_such_table" does not exist'),
        ("backfill('a_view')", "a_view is not a table (relkind v)"),
        ("backfill('no_key')", "no_key has no primary key or unique index on NOT NULL columns"),
        ("backfill('keyed', 'id >')", "is not a condition on public.keyed alone: syntax error"),
        ("backfill('keyed', 'id IN (SELECT id FROM public.no_key)')", "may refer only to the table's own columns"),
        ("backfill('keyed', 'no_such_column = 1')", 'column "no_such_column" does not exist'),
        ("backfill('keyed', 'random() < 0.5')", "must not call volatile functions"),
        ("backfill('keyed', 'true) UNION SELECT 1 FROM public.no_key WHERE (true')", "may refer only to the table's own"),
        ("backfill('keyed', 'true) ORDER BY (1')", "nothing may follow it"),
        ("backfill('keyed', 'true); DROP TABLE public.no_key; SELECT (1')", "not several statements"),
        ("backfill('keyed', '1')", "argument of WHERE must be type boolean"),
        ("backfill(NULL)", "tbl must not be NULL"),
        ("backfill('wal_listener.backfill_jobs')", "belongs to wal_listener"),
    ],
)
def test_bad_input_is_refused_and_starts_nothing(streaming, call, message):
    streaming.execute("""CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE no_key (id int);
                         CREATE VIEW a_view AS SELECT * FROM keyed""")
    with pytest.raises(psycopg.Error, match=".*") as raised:
        streaming.execute(f"SELECT wal_listener.{call}")
    assert message in str(raised.value), str(raised.value)
    assert jobs(streaming) == []
    assert streaming.execute("SELECT count(*) AS n FROM no_key") == [{"n": 0}], "the clause ran"


def test_a_second_backfill_of_the_same_table_waits_for_the_first(streaming, nats_server):
    streaming.execute("CREATE TABLE t (id int PRIMARY KEY)")
    nats_server.stop()  # the first one cannot finish
    first = streaming.execute("SELECT wal_listener.backfill('t') AS id")[0]["id"]
    with pytest.raises(psycopg.Error, match=f"backfill {first} of public.t has not finished"):
        streaming.execute("SELECT wal_listener.backfill('t')")
    assert streaming.execute("SELECT wal_listener.cancel_backfill(%s) AS c", (first,)) == [{"c": True}]
    assert streaming.execute("SELECT wal_listener.cancel_backfill(%s) AS c", (first,)) == [{"c": False}]
    second = streaming.execute("SELECT wal_listener.backfill('t') AS id")[0]["id"]
    assert second == first + 1
    nats_server.start()
    wait_done(streaming, second)


class RandomWriter(Writer):
    """Inserts, updates keys and other columns of, and deletes random rows
    of `src` (id int PRIMARY KEY, val int), one statement per transaction,
    until stopped; rides out server restarts."""

    def __init__(self, cluster, first_new_id: int):
        super().__init__(cluster)
        self.next_id = first_new_id
        self.operations = 0
        self.rng = random.Random(7)

    def step(self, conn):
        time.sleep(0.0005)  # a busy table, not a benchmark of the writer
        pick = self.rng.randrange(1, self.next_id)
        op = self.rng.random()
        if op < 0.3:
            conn.execute("INSERT INTO src VALUES (%s, %s) ON CONFLICT DO NOTHING", (self.next_id, self.rng.randrange(1000)))
            self.next_id += 1
        elif op < 0.6:
            conn.execute("UPDATE src SET val = val + 1 WHERE id = %s", (pick,))
        elif op < 0.8:
            # A key update: the row moves, possibly across the backfill's chunks.
            conn.execute("UPDATE src SET id = %s WHERE id = %s", (self.next_id, pick))
            self.next_id += 1
        else:
            conn.execute("DELETE FROM src WHERE id = %s", (pick,))
        self.operations += 1


def replay_into(cluster, bodies: list[dict]):
    """Applies the stream to table `src` of database `replica`, in stream
    order: READ and INSERT as upserts, UPDATE as an upsert after deleting a
    changed old key, DELETE by key."""
    cluster.execute("CREATE DATABASE replica", dbname="postgres")
    cluster.execute("CREATE TABLE src (id int PRIMARY KEY, val int)", dbname="replica")
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="postgres", dbname="replica") as conn:
        with conn.cursor() as cur:
            batch, kind = [], None

            def flush():
                if not batch:
                    return
                if kind == "upsert":
                    cur.executemany("INSERT INTO src VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET val = excluded.val", batch)
                else:
                    cur.executemany("DELETE FROM src WHERE id = %s", batch)
                batch.clear()

            for body in bodies:
                if body["table"] != "src":
                    continue
                steps = []
                action, data, old = body["action"], body["data"], body["dataOld"]
                if action == "DELETE":
                    steps.append(("delete", (old["id"],)))
                else:
                    if action == "UPDATE" and old.get("id") not in (None, data["id"]):
                        steps.append(("delete", (old["id"],)))
                    steps.append(("upsert", (data["id"], data["val"])))
                for step_kind, params in steps:
                    if step_kind != kind:
                        flush()
                        kind = step_kind
                    batch.append(params)
            flush()
        conn.commit()


def assert_replica_equals_source(cluster):
    source = cluster.execute("SELECT id, val FROM src ORDER BY id")
    replica = cluster.execute("SELECT id, val FROM src ORDER BY id", dbname="replica")
    missing = len({(r["id"], r["val"]) for r in source} - {(r["id"], r["val"]) for r in replica})
    extra = len({(r["id"], r["val"]) for r in replica} - {(r["id"], r["val"]) for r in source})
    assert (missing, extra) == (0, 0), f"{missing} source rows missing or different in the replica, {extra} extra"
    assert source == replica


def caught_up(cluster):
    lsn = cluster.execute("SELECT pg_current_wal_lsn()::text AS l")[0]["l"]
    wait_until(lambda: cluster.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn AS done FROM pg_replication_slots WHERE slot_name = 'wal_listener'",
        (lsn,))[0]["done"], 120, "the worker to confirm everything")


def load_source(cluster, rows: int):
    """`src` with `rows` rows, written before the extension exists: the stream
    never carries their INSERTs, only the backfill can."""
    cluster.execute("CREATE TABLE src (id int PRIMARY KEY, val int)")
    cluster.execute("INSERT INTO src SELECT g, g %% 1000 FROM generate_series(1, %s) g", (rows,))
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)


def test_oracle_a_backfill_under_concurrent_writes_replays_to_the_source_table(cluster, nats_server):
    load_source(cluster, 200_000)
    writer = RandomWriter(cluster, 200_001)
    writer.start()
    time.sleep(1)
    started = time.monotonic()
    backfill = cluster.execute("SELECT wal_listener.backfill('src') AS id")[0]["id"]
    job = wait_done(cluster, backfill)
    took = time.monotonic() - started
    time.sleep(1)
    writer.stopped.set()
    writer.join(30)
    caught_up(cluster)
    bodies = event_bodies(nats_server.url)
    reads = sum(1 for b in bodies if b["action"] == "READ")
    print(f"\nbackfill of 200,000 rows under {writer.operations} concurrent writes: {took:.1f} s "
          f"({job['rows_done'] / took:,.0f} rows/s), {reads} READ events, {len(bodies) - reads} live events")
    replay_into(cluster, bodies)
    assert_replica_equals_source(cluster)


def test_oracle_holds_across_a_worker_kill_and_a_server_crash_mid_backfill(cluster, nats_server):
    load_source(cluster, 100_000)
    writer = RandomWriter(cluster, 100_001)
    writer.start()
    backfill = cluster.execute("SELECT wal_listener.backfill('src') AS id")[0]["id"]
    progress = lambda: cluster.execute("SELECT rows_done FROM wal_listener.backfills WHERE id = %s", (backfill,))[0]["rows_done"]
    wait_until(lambda: progress() > 0, 60, "a first chunk")
    killed = cluster.worker_pid()
    os.kill(killed, signal.SIGKILL)  # the postmaster resets the cluster
    wait_until(lambda: _try(lambda: (s := cluster.status())["state"] == "streaming" and s["pid"] != killed), 120,
               "a new worker after the kill")
    before_crash = progress()
    cluster.restart("immediate")
    job = wait_done(cluster, backfill)
    print(f"\nbackfill resumed after kill -9 and a crash: {job['rows_done']} rows, "
          f"progress at the crash {before_crash}")
    writer.stopped.set()
    writer.join(30)
    caught_up(cluster)
    replay_into(cluster, event_bodies(nats_server.url))
    assert_replica_equals_source(cluster)


def _try(check):
    try:
        return check()
    except Exception:
        return False
