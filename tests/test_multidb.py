"""Capture in several databases of one cluster: CREATE EXTENSION in a
database other than wal_listener.database starts a worker of its own (slot
wal_listener_<oid>, subjects <topic>.<database>.<schema>_<table>), DROP
EXTENSION and DROP DATABASE stop it, and each database loses and duplicates
nothing across crashes, restarts and the others' coming and going."""

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import nats
import psycopg
import psycopg.sql
import pytest

from harness import Postgres, _each_stored, wait_until
from test_backfill import RandomWriter, assert_replica_equals_source, load_source, replay_into, wait_done

DATABASES = ["app", "b", "c"]
SUBJECT = {"app": "wal_listener.public_t", "b": "wal_listener.b.public_t", "c": "wal_listener.c.public_t"}


def by_subject(url: str) -> dict[str, list[tuple[dict, dict]]]:
    """Every event in stream order as (headers, body), grouped by subject;
    empty before the stream exists."""
    try:
        stored = asyncio.run(_each_stored(url, "wal_listener",
                                          lambda msg: (msg.subject, msg.headers or {}, json.loads(msg.data))))
    except nats.js.errors.NotFoundError:
        return {}
    grouped: dict[str, list[tuple[dict, dict]]] = {}
    for subject, headers, body in stored:
        grouped.setdefault(subject, []).append((headers, body))
    return grouped


def wait_for_subjects(url: str, expected: dict[str, int], timeout: float = 60) -> dict[str, list[tuple[dict, dict]]]:
    """Waits until each subject holds at least `expected[subject]` events,
    then a moment more, so that a surplus shows: returns by_subject()."""
    wait_until(lambda: all(len(by_subject(url).get(s, [])) >= n for s, n in expected.items()), timeout,
               f"events {expected}", 0.5)
    time.sleep(1.5)
    return by_subject(url)


def numbers(events: list[tuple[dict, dict]]) -> list[int]:
    """Column `n` of every event, sorted: equal to a range means each row once."""
    return sorted(body["data"]["n"] for _, body in events)


def ids(events: list[tuple[dict, dict]]) -> set[str]:
    for headers, body in events:
        assert headers["Nats-Msg-Id"] == body["id"], (headers, body)
    return {body["id"] for _, body in events}


def setup_database(cluster, db: str):
    """Database `db` (created unless it is app) with the extension and a table t (n int PRIMARY KEY)."""
    if db != "app":
        cluster.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(db)), dbname="postgres")
    cluster.execute("CREATE EXTENSION wal_listener", dbname=db)
    cluster.execute("CREATE TABLE t (n int PRIMARY KEY)", dbname=db)


def insert(cluster, db: str, first: int, last: int, per_transaction: int = 20):
    with cluster.connect(db) as conn:
        for start in range(first, last + 1, per_transaction):
            conn.execute("INSERT INTO t SELECT generate_series(%s::int, %s::int)",
                         (start, min(start + per_transaction - 1, last)))


def database_oid(cluster, db: str) -> int:
    return int(cluster.execute("SELECT oid FROM pg_database WHERE datname = %s", (db,))[0]["oid"])


def slot_names(cluster) -> set[str]:
    return {r["slot_name"] for r in cluster.execute("SELECT slot_name FROM pg_replication_slots")}


def db_status(cluster, db: str) -> dict:
    return cluster.execute("SELECT * FROM wal_listener.status()", dbname=db)[0]


def cluster_status(cluster, db: str = "app") -> dict[str, dict]:
    """wal_listener.cluster_status() run in `db`, by database; asserts one row per database."""
    rows = cluster.execute("SELECT * FROM wal_listener.cluster_status()", dbname=db)
    by_db = {r["database"]: r for r in rows}
    assert len(by_db) == len(rows), rows
    return by_db


def wait_streaming(cluster, db: str, not_pid: int | None = None, timeout: float = 60) -> dict:
    """status() in `db` once its worker streams (with a pid other than `not_pid`)."""

    def check():
        try:
            s = db_status(cluster, db)
        except psycopg.Error:  # the server is still in crash recovery
            return None
        return s if s["state"] == "streaming" and s["pid"] not in (None, not_pid) else None

    return wait_until(check, timeout, f"the worker of database {db} to stream")


def sessions_in(cluster, db: str) -> int:
    return cluster.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = %s", (db,), dbname="postgres")[0]["n"]


def assert_nothing_left(cluster, db: str):
    """No extension, worker, slot or cluster_status() row of database `db`."""
    oid = database_oid(cluster, db)
    assert cluster.execute("SELECT extname FROM pg_extension WHERE extname = 'wal_listener'", dbname=db) == []
    wait_until(lambda: sessions_in(cluster, db) == 0, 15, f"no session (no worker) left in database {db}")
    assert f"wal_listener_{oid}" not in slot_names(cluster)
    assert not cluster.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s", (db,))
    assert db not in cluster_status(cluster)


class RowWriter(threading.Thread):
    """Inserts n = 1, 2, ... into table t of database `db`, one row per
    transaction, until stopped; `rows` holds (n, started, returned), the
    monotonic times around each INSERT."""

    def __init__(self, cluster, db: str):
        super().__init__(daemon=True)
        self.cluster, self.db = cluster, db
        self.rows: list[tuple[int, float, float]] = []
        self.stopped = threading.Event()
        self.error: Exception | None = None

    def run(self):
        try:
            with self.cluster.connect(self.db) as conn:
                n = 0
                while not self.stopped.is_set():
                    n += 1
                    started = time.monotonic()
                    conn.execute("INSERT INTO t VALUES (%s)", (n,))
                    self.rows.append((n, started, time.monotonic()))
                    time.sleep(0.01)
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self):
        self.stopped.set()
        self.join(30)
        assert self.error is None, f"writer in {self.db}: {self.error}"

    def returned_before(self, moment: float) -> set[int]:
        return {n for n, _, returned in self.rows if returned < moment}

    def started_after(self, moment: float) -> set[int]:
        return {n for n, started, _ in self.rows if started > moment}


def test_three_databases_stream_concurrently_each_to_its_own_subject(cluster, nats_server):
    """Rows written at once in app, b and c arrive exactly once each, on
    the database's own subject, with ids of their own; each database has its
    slot, publication and worker, and cluster_status() lists all three."""
    for db in DATABASES:
        setup_database(cluster, db)
    rows = 600
    with ThreadPoolExecutor(3) as pool:
        for done in [pool.submit(insert, cluster, db, 1, rows) for db in DATABASES]:
            done.result()

    events = wait_for_subjects(nats_server.url, {SUBJECT[db]: rows for db in DATABASES})
    assert set(events) == set(SUBJECT.values())
    for db in DATABASES:
        assert numbers(events[SUBJECT[db]]) == list(range(1, rows + 1)), db
        assert {(b["schema"], b["table"], b["action"]) for _, b in events[SUBJECT[db]]} == {("public", "t", "INSERT")}
    id_sets = {db: ids(events[SUBJECT[db]]) for db in DATABASES}
    assert all(len(id_sets[db]) == rows for db in DATABASES)
    assert not (id_sets["app"] & id_sets["b"] or id_sets["app"] & id_sets["c"] or id_sets["b"] & id_sets["c"])

    slot_of = {"app": "wal_listener", **{db: f"wal_listener_{database_oid(cluster, db)}" for db in ("b", "c")}}
    slots = cluster.execute("SELECT slot_name, database, plugin FROM pg_replication_slots")
    assert sorted(slots, key=lambda s: s["database"]) == [
        {"slot_name": slot_of[db], "database": db, "plugin": "pgoutput"} for db in DATABASES]
    for db in ("b", "c"):
        assert cluster.execute("SELECT puballtables FROM pg_publication WHERE pubname = 'wal_listener'",
                               dbname=db) == [{"puballtables": True}]

    statuses = {db: wait_streaming(cluster, db) for db in DATABASES}
    pids = {db: statuses[db]["pid"] for db in DATABASES}
    assert len(set(pids.values())) == 3, pids
    for db in DATABASES:
        assert statuses[db]["slot"] == slot_of[db], statuses[db]
        assert cluster.execute("SELECT 1 AS alive FROM pg_stat_activity WHERE pid = %s", (pids[db],)) == [{"alive": 1}]

    wait_until(lambda: all(r["events_published"] == rows for r in cluster_status(cluster).values()), 15,
               f"events_published = {rows} in every row of cluster_status()")
    for asked_in in DATABASES:
        workers = cluster_status(cluster, asked_in)
        assert set(workers) == set(DATABASES), asked_in
        for db, row in workers.items():
            assert (row["slot_name"], row["state"], row["pid"]) == (slot_of[db], "streaming", pids[db]), row
            assert row["confirmed_lsn"] is not None


def test_create_and_drop_extension_while_other_databases_stream(cluster, nats_server):
    """While app, b and c are written to: CREATE EXTENSION in c publishes
    every row committed after it returned and none from before it began;
    DROP EXTENSION in b publishes every row committed before it began and
    none after it returned, then b's slot, publication and worker go, also
    across a restart; app's worker streams on untouched."""
    setup_database(cluster, "app")
    setup_database(cluster, "b")
    cluster.execute("CREATE DATABASE c", dbname="postgres")
    cluster.execute("CREATE TABLE t (n int PRIMARY KEY)", dbname="c")
    app_pid = wait_streaming(cluster, "app")["pid"]
    b_pid = wait_streaming(cluster, "b")["pid"]
    b_slot = f"wal_listener_{database_oid(cluster, 'b')}"
    c_slot = f"wal_listener_{database_oid(cluster, 'c')}"

    writers = {db: RowWriter(cluster, db) for db in DATABASES}
    for writer in writers.values():
        writer.start()
    time.sleep(2)
    create_began = time.monotonic()
    cluster.execute("CREATE EXTENSION wal_listener", dbname="c")
    create_returned = time.monotonic()
    time.sleep(2)
    drop_began = time.monotonic()
    cluster.execute("DROP EXTENSION wal_listener", dbname="b")
    drop_returned = time.monotonic()
    time.sleep(2)
    for writer in writers.values():
        writer.stop()

    app_rows = [n for n, _, _ in writers["app"].rows]
    b_before, b_after = writers["b"].returned_before(drop_began), writers["b"].started_after(drop_returned)
    c_before, c_after = writers["c"].returned_before(create_began), writers["c"].started_after(create_returned)
    assert b_before and b_after and c_before and c_after, "a writer did not write in every phase"

    # The worker of b drains for up to ~10 s, then drops its slot: after
    # that, nothing more of b can come.
    wait_until(lambda: b_slot not in slot_names(cluster), 30, "the slot of b to be dropped")
    wait_until(lambda: "b" not in cluster_status(cluster), 15, "cluster_status() to drop the row of b")
    events = wait_for_subjects(nats_server.url, {SUBJECT["app"]: len(app_rows), SUBJECT["b"]: len(b_before),
                                                 SUBJECT["c"]: len(c_after)})
    assert numbers(events[SUBJECT["app"]]) == sorted(app_rows)
    b_published, c_published = numbers(events[SUBJECT["b"]]), numbers(events[SUBJECT["c"]])
    assert len(b_published) == len(set(b_published)), "a row of b was published twice"
    assert not b_before - set(b_published), f"rows of b from before DROP EXTENSION lost: {sorted(b_before - set(b_published))}"
    assert not b_after & set(b_published), f"rows of b from after DROP EXTENSION published: {sorted(b_after & set(b_published))}"
    assert len(c_published) == len(set(c_published)), "a row of c was published twice"
    assert not c_after - set(c_published), f"rows of c from after CREATE EXTENSION lost: {sorted(c_after - set(c_published))}"
    assert not c_before & set(c_published), f"rows of c from before CREATE EXTENSION published: {sorted(c_before & set(c_published))}"
    assert set(events) == set(SUBJECT.values())

    assert cluster.execute("SELECT pubname FROM pg_publication", dbname="b") == []
    assert not cluster.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (b_pid,)), "the worker of b still runs"
    assert wait_streaming(cluster, "app")["pid"] == app_pid
    assert wait_streaming(cluster, "c")["slot"] == c_slot
    assert slot_names(cluster) == {"wal_listener", c_slot}

    # b stays without capture across a restart; app and c come back.
    cluster.restart()
    wait_streaming(cluster, "app", not_pid=app_pid)
    wait_streaming(cluster, "c")
    next_n = {db: len(writers[db].rows) + 1 for db in DATABASES}
    for db in DATABASES:
        cluster.execute("INSERT INTO t VALUES (%s)", (next_n[db],), dbname=db)
    events = wait_for_subjects(nats_server.url, {SUBJECT["app"]: len(app_rows) + 1,
                                                 SUBJECT["c"]: len(c_published) + 1})
    assert numbers(events[SUBJECT["app"]]) == sorted(app_rows) + [next_n["app"]]
    assert numbers(events[SUBJECT["c"]]) == c_published + [next_n["c"]]
    assert numbers(events[SUBJECT["b"]]) == b_published
    assert slot_names(cluster) == {"wal_listener", c_slot}
    assert set(cluster_status(cluster)) == {"app", "c"}


def test_drop_database_of_a_streaming_database_needs_no_force(cluster, nats_server):
    """DROP DATABASE c succeeds while c's worker streams: c's slot, worker
    and cluster_status() row are gone, app and b stream on with the same
    workers, and a new database named c is captured afresh."""
    for db in DATABASES:
        setup_database(cluster, db)
    pids = {db: wait_streaming(cluster, db)["pid"] for db in DATABASES}
    old_c_oid = database_oid(cluster, "c")
    b_slot = f"wal_listener_{database_oid(cluster, 'b')}"
    for db in DATABASES:
        insert(cluster, db, 1, 200)
    wait_for_subjects(nats_server.url, {SUBJECT[db]: 200 for db in DATABASES})
    assert wait_streaming(cluster, "c")["pid"] == pids["c"]

    cluster.execute("DROP DATABASE c", dbname="postgres")
    assert slot_names(cluster) == {"wal_listener", b_slot}
    assert not cluster.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pids["c"],)), "c's worker runs"
    wait_until(lambda: "c" not in cluster_status(cluster), 15, "cluster_status() to drop the row of c")
    assert set(cluster_status(cluster)) == {"app", "b"}

    for db in ("app", "b"):
        insert(cluster, db, 201, 300)
    events = wait_for_subjects(nats_server.url, {SUBJECT["app"]: 300, SUBJECT["b"]: 300})
    assert numbers(events[SUBJECT["app"]]) == numbers(events[SUBJECT["b"]]) == list(range(1, 301))
    assert numbers(events[SUBJECT["c"]]) == list(range(1, 201))
    for db in ("app", "b"):
        assert wait_streaming(cluster, db)["pid"] == pids[db], db

    setup_database(cluster, "c")
    new_c_oid = database_oid(cluster, "c")
    assert new_c_oid != old_c_oid
    insert(cluster, "c", 1001, 1010)
    events = wait_for_subjects(nats_server.url, {SUBJECT["c"]: 210})
    assert numbers(events[SUBJECT["c"]]) == list(range(1, 201)) + list(range(1001, 1011))
    assert slot_names(cluster) == {"wal_listener", b_slot, f"wal_listener_{new_c_oid}"}
    assert wait_streaming(cluster, "c")["pid"] != pids["c"]


def test_kill_9_of_one_worker_and_a_restart_lose_and_duplicate_nothing_in_any_database(cluster, nats_server):
    """kill -9 of b's worker resets the cluster: every database streams
    again with new workers and each row, written before and after, is on
    its subject exactly once; after a restart b's worker comes back by
    itself and streams."""
    for db in DATABASES:
        setup_database(cluster, db)
    pids = {db: wait_streaming(cluster, db)["pid"] for db in DATABASES}
    for db in DATABASES:
        insert(cluster, db, 1, 300)
    os.kill(pids["b"], signal.SIGKILL)  # the postmaster resets the cluster
    pids = {db: wait_streaming(cluster, db, not_pid=pids[db], timeout=120)["pid"] for db in DATABASES}
    for db in DATABASES:
        insert(cluster, db, 301, 600)
    events = wait_for_subjects(nats_server.url, {SUBJECT[db]: 600 for db in DATABASES}, timeout=120)
    for db in DATABASES:
        assert numbers(events[SUBJECT[db]]) == list(range(1, 601)), db
    assert set(cluster_status(cluster)) == set(DATABASES)

    cluster.restart()
    after = {db: wait_streaming(cluster, db, not_pid=pids[db])["pid"] for db in DATABASES}
    for db in DATABASES:
        insert(cluster, db, 601, 700)
    events = wait_for_subjects(nats_server.url, {SUBJECT[db]: 700 for db in DATABASES})
    for db in DATABASES:
        assert numbers(events[SUBJECT[db]]) == list(range(1, 701)), db
    workers = cluster_status(cluster, "b")
    assert {db: row["pid"] for db, row in workers.items()} == after
    assert workers["b"]["slot_name"] == f"wal_listener_{database_oid(cluster, 'b')}"


def test_without_a_static_database_each_is_captured_and_one_made_static_keeps_its_slot(make_cluster, nats_server):
    """wal_listener.database = '' (the Docker image's first start): every
    database is captured where CREATE EXTENSION runs and no slot is made
    for any other. Made wal_listener.database by a restart, app's static
    worker takes over its slot: each row once across its two subjects. That
    slot lost, the worker refuses to make another until reset_slot()."""
    cluster = make_cluster(database="''")
    for db in ("app", "b"):
        setup_database(cluster, db)
    wait_streaming(cluster, "app")
    assert slot_names(cluster) == {f"wal_listener_{database_oid(cluster, db)}" for db in ("app", "b")}
    assert set(cluster_status(cluster)) == {"app", "b"}
    for db in ("app", "b"):
        insert(cluster, db, 1, 200)
    wait_for_subjects(nats_server.url, {"wal_listener.app.public_t": 1, "wal_listener.b.public_t": 1})
    cluster.execute("ALTER SYSTEM SET wal_listener.database = 'app'")
    cluster.restart()  # app's rows not yet published at the stop come on the static subject
    assert wait_streaming(cluster, "app")["slot"] == f"wal_listener_{database_oid(cluster, 'app')}"
    wait_streaming(cluster, "b")
    insert(cluster, "app", 201, 300)
    insert(cluster, "b", 201, 300)
    app_subjects = ("wal_listener.app.public_t", "wal_listener.public_t")
    wait_until(lambda: sum(len(by_subject(nats_server.url).get(s, [])) for s in app_subjects) >= 300, 60,
               "app's 300 rows")
    events = wait_for_subjects(nats_server.url, {"wal_listener.public_t": 1, "wal_listener.b.public_t": 300})
    assert numbers(events["wal_listener.app.public_t"] + events["wal_listener.public_t"]) == list(range(1, 301))
    assert numbers(events["wal_listener.b.public_t"]) == list(range(1, 301))
    assert "wal_listener" not in slot_names(cluster)
    own = f"wal_listener_{database_oid(cluster, 'app')}"
    assert {db: row["slot_name"] for db, row in cluster_status(cluster).items()} == {
        "app": own, "b": f"wal_listener_{database_oid(cluster, 'b')}"}

    # The taken-over slot lost: refused like any lost slot, no other made in its place.
    nats_server.stop()
    insert(cluster, "app", 301, 301)  # unacked: lost with the slot
    wait_until(lambda: db_status(cluster, "app")["state"] == "backoff", 30, "app's worker to back off")

    def drop():
        try:
            cluster.execute("SELECT pg_drop_replication_slot(%s)", (own,))
            return True
        except psycopg.Error:
            return False

    wait_until(drop, 60, "dropping the slot between the worker's retries", 0.05)
    nats_server.start()
    status = wait_until(lambda: "is gone" in ((s := db_status(cluster, "app"))["last_error"] or "") and s, 60,
                        "an error naming the lost slot")
    assert f'"{own}"' in status["last_error"] and status["slot"] == own
    time.sleep(3)
    assert "wal_listener" not in slot_names(cluster) and own not in slot_names(cluster)
    assert "not published" in cluster.execute("SELECT wal_listener.reset_slot() AS m", dbname="app")[0]["m"]
    assert wait_streaming(cluster, "app")["slot"] == "wal_listener"
    insert(cluster, "app", 302, 302)
    wait_until(lambda: [n for _, body in by_subject(nats_server.url).get("wal_listener.public_t", [])
                        if (n := body["data"]["n"]) == 302], 60, "row 302 from the new slot")


@pytest.mark.parametrize("setting, value, static", [
    ("max_replication_slots", 2, "'app'"),
    ("max_wal_senders", 6, "'app'"),
    ("max_wal_senders", 6, "''"),  # app captured like b: no static database to count
])
def test_create_extension_beyond_capacity_is_refused_naming_the_setting(make_cluster, nats_server, setting, value,
                                                                        static):
    """With room for app and b only (a slot each; three walsenders each),
    CREATE EXTENSION in c fails with an ERROR naming the setting and leaves
    nothing in c; once DROP EXTENSION in b has freed its share, c can."""
    cluster = make_cluster(server_settings={setting: value}, database=static)
    setup_database(cluster, "app")
    setup_database(cluster, "b")
    wait_streaming(cluster, "app")
    wait_streaming(cluster, "b")
    cluster.execute("CREATE DATABASE c", dbname="postgres")
    with pytest.raises(psycopg.Error) as refused:
        cluster.execute("CREATE EXTENSION wal_listener", dbname="c")
    assert setting in refused.value.diag.message_primary, str(refused.value)
    assert_nothing_left(cluster, "c")
    assert set(cluster_status(cluster)) == {"app", "b"}
    insert(cluster, "b", 1, 10)
    assert numbers(wait_for_subjects(nats_server.url, {SUBJECT["b"]: 10})[SUBJECT["b"]]) == list(range(1, 11))

    b_slot = f"wal_listener_{database_oid(cluster, 'b')}"
    cluster.execute("DROP EXTENSION wal_listener", dbname="b")
    wait_until(lambda: b_slot not in slot_names(cluster) and sessions_in(cluster, "b") == 0, 30,
               "the worker of b to drop its slot and stop")
    cluster.execute("CREATE EXTENSION wal_listener", dbname="c")
    cluster.execute("CREATE TABLE t (n int PRIMARY KEY)", dbname="c")
    insert(cluster, "c", 1, 10)
    assert numbers(wait_for_subjects(nats_server.url, {SUBJECT["c"]: 10})[SUBJECT["c"]]) == list(range(1, 11))


def test_only_a_committed_drop_of_the_extension_stops_a_database(cluster, nats_server):
    """What does not drop the extension leaves capture alone: a forged
    marker from a role without privileges, a DROP EXTENSION rolled back to
    a savepoint, DROP and CREATE in one transaction; DROP SCHEMA ... CASCADE
    does drop it, and the worker stops for good."""
    setup_database(cluster, "app")
    setup_database(cluster, "b")
    pid = wait_streaming(cluster, "b")["pid"]
    b_slot = f"wal_listener_{database_oid(cluster, 'b')}"
    cluster.execute("CREATE ROLE nobody LOGIN", dbname="b")
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="nobody", dbname="b", autocommit=True) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, 'wal_listener.dropped', '')")
    insert(cluster, "b", 1, 10)
    with cluster.connect("b") as conn:
        with conn.transaction():
            conn.execute("SAVEPOINT s")
            conn.execute("DROP EXTENSION wal_listener")
            conn.execute("ROLLBACK TO SAVEPOINT s")
    insert(cluster, "b", 11, 20)
    with cluster.connect("b") as conn:
        with conn.transaction():
            conn.execute("DROP EXTENSION wal_listener")
            conn.execute("CREATE EXTENSION wal_listener")
    insert(cluster, "b", 21, 30)
    events = wait_for_subjects(nats_server.url, {SUBJECT["b"]: 30})
    assert numbers(events[SUBJECT["b"]]) == list(range(1, 31))
    time.sleep(2)  # what would stop the worker has had its chance
    assert db_status(cluster, "b")["pid"] == pid and b_slot in slot_names(cluster)
    assert "ignored a \"wal_listener.dropped\" message" in cluster.log()

    cluster.execute("DROP SCHEMA wal_listener CASCADE", dbname="b")
    wait_until(lambda: b_slot not in slot_names(cluster) and sessions_in(cluster, "b") == 0, 30,
               "the worker of b to drop its slot and stop")
    insert(cluster, "b", 31, 40)
    insert(cluster, "app", 1, 5)
    wait_for_subjects(nats_server.url, {SUBJECT["app"]: 5})
    assert numbers(by_subject(nats_server.url)[SUBJECT["b"]]) == list(range(1, 31))
    assert set(cluster_status(cluster)) == {"app"}


def test_a_role_that_may_not_create_the_extension_starts_no_worker(cluster):
    """The hook acts only for whoever may run the statement: a role that is
    not a superuser gets Postgres' refusal, and no slot or worker appears."""
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.execute("CREATE DATABASE b", dbname="postgres")
    cluster.execute("CREATE ROLE owner_b LOGIN; ALTER DATABASE b OWNER TO owner_b", dbname="postgres")
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="owner_b", dbname="b", autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE EXTENSION wal_listener")
    assert_nothing_left(cluster, "b")
    assert slot_names(cluster) == {"wal_listener"}


@pytest.mark.parametrize("name", ["my.db", "my db"])
def test_a_database_name_that_is_no_subject_token_is_refused(cluster, name):
    """CREATE EXTENSION in a database whose name cannot be a NATS subject
    token fails naming the database and leaves nothing behind."""
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)), dbname="postgres")
    with pytest.raises(psycopg.Error) as refused:
        cluster.execute("CREATE EXTENSION wal_listener", dbname=name)
    message = str(refused.value)
    assert name in message and "subject" in message.lower(), message
    assert_nothing_left(cluster, name)
    assert slot_names(cluster) == {"wal_listener"}
    assert set(cluster_status(cluster)) == {"app"}
    cluster.execute(psycopg.sql.SQL("DROP DATABASE {}").format(psycopg.sql.Identifier(name)), dbname="postgres")


class InDatabase:
    """`cluster` seen from database `db`: the helpers of test_backfill.py,
    which work in database app, work in `db` instead."""

    wait_for_state = Postgres.wait_for_state

    def __init__(self, cluster, db: str):
        self.cluster, self.db = cluster, db
        self.dir, self.port = cluster.dir, cluster.port

    def execute(self, sql, params=None, dbname: str = "app"):
        return self.cluster.execute(sql, params, dbname=self.db if dbname == "app" else dbname)

    def status(self) -> dict:
        return self.execute("SELECT * FROM wal_listener.status()")[0]


class RandomWriterIn(RandomWriter):
    """test_backfill's RandomWriter in database `cluster.db` of an InDatabase."""

    def run(self):
        while not self.stopped.is_set():
            try:
                with psycopg.connect(host=str(self.cluster.dir), port=self.cluster.port, user="postgres",
                                     dbname=self.cluster.db, autocommit=True) as conn:
                    while not self.stopped.is_set():
                        self.step(conn)
            except (psycopg.Error, OSError):
                time.sleep(0.2)


def test_oracle_backfills_under_concurrent_writes_in_two_databases_replay_to_their_sources(cluster, nats_server):
    """Backfills of table src in app and in b at once, both under random
    writes: each database's subject, replayed alone, rebuilds that
    database's table exactly."""
    cluster.execute("CREATE DATABASE b", dbname="postgres")
    views = {"app": InDatabase(cluster, "app"), "b": InDatabase(cluster, "b")}
    rows = 20_000
    for view in views.values():
        load_source(view, rows)
    writers = {db: RandomWriterIn(view, rows + 1) for db, view in views.items()}
    writers["b"].rng.seed(11)
    for writer in writers.values():
        writer.start()
    time.sleep(1)
    backfills = {db: view.execute("SELECT wal_listener.backfill('src') AS id")[0]["id"] for db, view in views.items()}
    for db, view in views.items():
        wait_done(view, backfills[db])
    time.sleep(1)
    for writer in writers.values():
        writer.stopped.set()
        writer.join(30)
    assert all(w.operations > 0 for w in writers.values())

    slots = {"app": "wal_listener", "b": f"wal_listener_{database_oid(cluster, 'b')}"}
    for db, slot in slots.items():
        lsn = cluster.execute("SELECT pg_current_wal_lsn()::text AS l")[0]["l"]
        wait_until(lambda: cluster.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn AS done FROM pg_replication_slots WHERE slot_name = %s",
            (lsn, slot))[0]["done"], 120, f"the worker of {db} to confirm everything")
    events = by_subject(nats_server.url)
    assert set(events) == {"wal_listener.public_src", "wal_listener.b.public_src"}
    assert not ids(events["wal_listener.public_src"]) & ids(events["wal_listener.b.public_src"])
    for db, subject in (("app", "wal_listener.public_src"), ("b", "wal_listener.b.public_src")):
        bodies = [body for _, body in events[subject]]
        # Concurrent deletes and key updates take some rows away before
        # the backfill reads them, so not every one of `rows` is read.
        assert sum(1 for body in bodies if body["action"] == "READ") > rows // 2, db
        replay_into(views[db], bodies)
        assert_replica_equals_source(views[db])
        cluster.execute("DROP DATABASE replica", dbname="postgres")


def test_rollback_of_a_failed_transaction_under_another_role_works(cluster):
    """ROLLBACK of a failed transaction under another role works: the
    utility hook asks who runs a statement only for the statements it acts
    on, never for ROLLBACK in an aborted transaction (where a catalog
    lookup is not allowed; it did not fail here with the old eager check,
    this guards the rule)."""
    cluster.execute("CREATE ROLE nobody LOGIN")
    with cluster.connect() as conn:
        conn.execute("BEGIN")
        conn.execute("SET LOCAL ROLE nobody")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT current_user AS u").fetchone()["u"] == "postgres"
