"""High availability: a Postgres failover to a standby (failover slots,
PostgreSQL 17+) and a NATS cluster losing its stream leader, then its
quorum. Every committed row arrives once, in commit order."""

import asyncio
import os
import signal
import subprocess
import threading
import time

import nats
import psycopg
import pytest

from conftest import PG_VERSION, on_one_version
from harness import NatsCluster, Postgres, inserted_numbers, last_number, read_stream, stream_count, wait_until
from test_multidb import by_subject, cluster_status, database_oid, insert, numbers, setup_database, wait_for_subjects, \
    wait_streaming

FAILOVER_SLOTS = int(PG_VERSION) >= 17


class Loader(threading.Thread):
    """Commits rows 1, 2, 3 … one per transaction into `load`, on whatever
    server `target` names; after a connection error it retries the same
    number (ON CONFLICT: a commit that did happen inserts nothing twice).
    `acked` holds the numbers whose commit returned."""

    def __init__(self, target: Postgres, rows: int, pause: float = 0.01):
        super().__init__(daemon=True)
        self.target, self.rows, self.pause = target, rows, pause
        self.first_target = target
        self.acked: list[int] = []
        self.next = 1
        self.switched_at_row: int | None = None
        self.errors = 0

    def switch_to(self, server: Postgres):
        self.target = server
        self.switched_at_row = None

    def run(self):
        self.deadline = time.monotonic() + 300
        while self.next <= self.rows and time.monotonic() < self.deadline:
            target = self.target
            try:
                with psycopg.connect(host=str(target.dir), port=target.port, user="postgres", dbname="app",
                                     autocommit=True, connect_timeout=3) as conn:
                    while self.next <= self.rows and self.target is target:
                        conn.execute("INSERT INTO load VALUES (%s) ON CONFLICT DO NOTHING", (self.next,))
                        if self.switched_at_row is None and target is not self.first_target:
                            self.switched_at_row = self.next
                        self.acked.append(self.next)
                        self.next += 1
                        time.sleep(self.pause)
            except (psycopg.Error, OSError):
                self.errors += 1
                time.sleep(0.2)

    def wait_for(self, rows: int, timeout: float = 120):
        wait_until(lambda: len(self.acked) >= rows, timeout, f"{rows} loader rows")

    def finish(self, more: int = 100):
        """Ends a loader started with an open-ended `rows` after `more` rows
        (and within 120 s, however long the faults before took)."""
        self.rows = self.next + more
        self.deadline = time.monotonic() + 120


def check_every_row_once_in_order(server: Postgres, url: str, loader: Loader):
    loader.join(timeout=300)
    assert not loader.is_alive() and loader.next > loader.rows
    rows = sorted(r["n"] for r in server.execute("SELECT n FROM load"))
    assert set(loader.acked) <= set(rows), "a commit the loader saw is missing from the table"
    wait_until(lambda: stream_count(url) >= len(rows), 180, f"{len(rows)} events", interval=0.5)
    time.sleep(2)
    numbers = inserted_numbers(url)
    assert len(numbers) == len(set(numbers)), "duplicate events"
    assert sorted(numbers) == rows, "lost or invented events"
    assert numbers == sorted(numbers), "events out of commit order"


def standby_of(primary: Postgres, nats_url: str, more: dict | None = None) -> Postgres:
    """A hot standby on the physical slot `standby1`, set up for failover slots."""
    settings = {**(more or {}),
        "primary_conninfo": f"'host={primary.dir} port={primary.port} user=postgres dbname=app application_name=standby1'",
        "primary_slot_name": "'standby1'",
        "hot_standby_feedback": "on",
        "wal_listener.nats_url": f"'{nats_url}'",
    }
    if FAILOVER_SLOTS:
        settings["sync_replication_slots"] = "on"
    standby = Postgres(PG_VERSION, settings, base_backup_of=primary)
    standby.start()
    wait_until(
        lambda: primary.execute("SELECT 1 FROM pg_stat_replication WHERE application_name = 'standby1' AND state = 'streaming'"),
        60,
        "the standby to stream",
    )
    return standby


@pytest.fixture
def primary_and_standby(make_cluster, nats_server):
    primary = make_cluster()
    primary.execute("CREATE EXTENSION wal_listener")
    primary.wait_for_state("streaming", timeout=60)
    primary.execute("SELECT pg_create_physical_replication_slot('standby1', true)")
    primary.execute("CREATE TABLE load (n int PRIMARY KEY)")
    standby = standby_of(primary, nats_server.url)
    yield primary, standby
    standby.destroy()


def standby_status(standby: Postgres) -> dict:
    return standby.execute("SELECT * FROM wal_listener.status()")[0]


@pytest.mark.skipif(not FAILOVER_SLOTS, reason="failover slots need PostgreSQL 17 or later")
def test_failover_to_the_standby_loses_and_duplicates_nothing(primary_and_standby, nats_server):
    primary, standby = primary_and_standby
    # Every acknowledged commit is on the standby, and the worker publishes
    # only what the standby has.
    primary.execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
    primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
    primary.execute("SELECT pg_reload_conf()")
    # One postgresql.conf for every node: the standby has the same list,
    # which names its own slot once it is promoted.
    standby.execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
    standby.execute("SELECT pg_reload_conf()")
    primary.execute("SELECT wal_listener.add_filter('load', subject => 'wal_listener.public_load')")
    wait_until(
        lambda: standby.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'wal_listener' AND synced AND NOT temporary"),
        90,
        "the slot to be synced to the standby",
    )
    waiting = wait_until(lambda: (s := standby_status(standby))["warnings"] == [] and s, 30, "a clean standby audit")
    assert waiting["state"] == "waiting" and "standby" in waiting["last_error"], waiting
    wait_until(lambda: primary.status()["warnings"] == [], 30, "a clean primary audit")

    loader = Loader(primary, rows=3000, pause=0.005)
    loader.start()
    loader.wait_for(800)
    primary.crash()
    promoted_at = time.monotonic()
    standby._run("pg_ctl", "-D", str(standby.data), "-w", "promote")
    loader.switch_to(standby)
    wait_until(lambda: loader.switched_at_row, 60, "the loader to commit on the new primary")
    first_new = loader.switched_at_row
    # The new primary holds every logical change for a slot it does not
    # have: status() says so instead of a plain "streaming".
    held = wait_until(
        lambda: (s := standby_status(standby))["state"] == "waiting"
        and "synchronized_standby_slots" in (s["last_error"] or "") and s,
        30, "status() to name the slot that holds every change")
    print(f"\nstatus() after the promotion: {held['last_error']}")
    assert "synchronized_standby_slots" in held["last_error"] and '"standby1" does not exist' in held["last_error"]
    assert any("synchronized_standby_slots" in w for w in held["warnings"]), held["warnings"]
    assert last_number(nats_server.url) < first_new, "the server held back no change"
    standby.execute("ALTER SYSTEM RESET synchronized_standby_slots")
    standby.execute("SELECT pg_reload_conf()")
    cleared_at = time.monotonic()
    wait_until(lambda: last_number(nats_server.url) >= first_new, 60, "an event from the new primary", interval=0.05)
    print(f"\npromotion to the first event from the new primary: {time.monotonic() - promoted_at:.2f} s, "
          f"{time.monotonic() - cleared_at:.2f} s after synchronized_standby_slots was cleared "
          f"(loader reconnected at row {first_new}, {loader.errors} failed attempts)")
    wait_until(lambda: standby_status(standby)["state"] == "streaming", 30, "status() to say streaming again")
    assert "in recovery" not in (standby_status(standby)["last_error"] or "")
    check_every_row_once_in_order(standby, nats_server.url, loader)
    # The filter version and its position were replicated: still in force.
    assert standby.execute("SELECT count(*) AS n FROM wal_listener.applied_versions") == [{"n": 1}]


@pytest.mark.skipif(not FAILOVER_SLOTS, reason="failover slots need PostgreSQL 17 or later")
def test_a_failover_keeps_every_database_captured(make_cluster, nats_server):
    """Databases captured by workers of their own (slots wal_listener_<oid>,
    wal_listener.database = '') fail over: on the promoted standby b's synced
    slot gets its worker back, and app, the standby's wal_listener.database,
    is streamed by the static worker from app's synced slot, whenever it
    was synced. Each row, committed before and after, arrives once."""
    primary = make_cluster(database="''")
    for db in ("app", "b"):
        setup_database(primary, db)
        wait_streaming(primary, db)
    oids = {db: database_oid(primary, db) for db in ("app", "b")}
    primary.execute("SELECT pg_create_physical_replication_slot('standby1', true)")
    standby = standby_of(primary, nats_server.url, {"wal_listener.database": "'app'"})
    try:
        # Every acknowledged commit is on the standby, and no slot confirms past it.
        primary.execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
        primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
        primary.execute("SELECT pg_reload_conf()")
        slots = [f"wal_listener_{oid}" for oid in oids.values()]
        wait_until(
            lambda: len(standby.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = ANY(%s) AND synced AND NOT temporary",
                (slots,))) == 2,
            90,
            "both slots to be synced to the standby",
        )
        for db in ("app", "b"):
            insert(primary, db, 1, 600, per_transaction=3)
        wait_until(lambda: by_subject(nats_server.url).get("wal_listener.b.public_t"), 30, "b's first events")
        primary.crash()
        standby._run("pg_ctl", "-D", str(standby.data), "-w", "promote")
        standby.execute("ALTER SYSTEM RESET synchronized_standby_slots")
        standby.execute("SELECT pg_reload_conf()")
        assert wait_streaming(standby, "b", timeout=90)["slot"] == f"wal_listener_{oids['b']}"
        assert wait_streaming(standby, "app", timeout=90)["slot"] == f"wal_listener_{oids['app']}"
        for db in ("app", "b"):
            insert(standby, db, 601, 900)
        app_subjects = ("wal_listener.app.public_t", "wal_listener.public_t")
        wait_until(lambda: sum(len(by_subject(nats_server.url).get(s, [])) for s in app_subjects) >= 900, 120,
                   "app's 900 rows")
        events = wait_for_subjects(nats_server.url, {"wal_listener.b.public_t": 900}, timeout=120)
        assert numbers(events["wal_listener.b.public_t"]) == list(range(1, 901))
        assert numbers(events.get("wal_listener.app.public_t", []) + events["wal_listener.public_t"]) == \
            list(range(1, 901))
        assert set(cluster_status(standby)) == {"app", "b"}
        assert "wal_listener" not in {r["slot_name"] for r in standby.execute("SELECT slot_name FROM pg_replication_slots")}
    finally:
        standby.destroy()


def lsn_at_least(server: Postgres, query: str, lsn: str) -> bool:
    rows = server.execute(f"SELECT ({query}) >= %s::pg_lsn AS past", (lsn,))
    return bool(rows and rows[0]["past"])


@pytest.mark.skipif(not FAILOVER_SLOTS, reason="failover slots need PostgreSQL 17 or later")
def test_a_promotion_between_a_filter_change_and_its_record_keeps_the_new_filters(primary_and_standby, nats_server):
    # The worker records where a filter version took effect (applied_versions)
    # in a transaction of its own, after the change's commit. A standby that
    # has the change but not the record must not get a slot past the change:
    # promoted, it would stream on with the version before.
    primary, standby = primary_and_standby
    primary.execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
    primary.execute("SELECT pg_reload_conf()")
    primary.set(inject_fault="slow_filter_record")
    wait_until(lambda: "configuration changed; reconnecting" in primary.log(), 30, "the fault to be set")
    primary.wait_for_state("streaming", timeout=60)
    wait_until(
        lambda: standby.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'wal_listener' AND synced AND NOT temporary"),
        90,
        "the slot to be synced to the standby",
    )
    primary.execute("SELECT wal_listener.add_filter('load', subject => 'wal_listener.moved')")
    changed_at = primary.execute("SELECT pg_current_wal_lsn()::text AS l")[0]["l"]
    # The worker has the change (so the standby has it), and waits 5 s before recording it.
    wait_until(lambda: "pausing 5 s before recording filters version 1" in primary.log(), 30, "the change to arrive")
    receiver = standby.execute("SELECT pid FROM pg_stat_wal_receiver")[0]["pid"]
    os.kill(receiver, signal.SIGSTOP)
    try:
        wait_until(lambda: "filters version 1 in force" in primary.log(), 30, "the record")
        slot = "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'wal_listener'"
        # Before the fix the worker confirmed past the change at once, and the
        # standby's slot sync copied that; now it must not happen at all.
        try:
            wait_until(lambda: lsn_at_least(primary, slot, changed_at), 8, "a confirm past the change")
            wait_until(lambda: lsn_at_least(standby, slot, changed_at), 40, "the standby's slot past the change")
        except TimeoutError:
            pass
        print(f"\nfilter change before {changed_at}; slot on the primary at "
              f"{primary.execute(slot)[0]['confirmed_flush_lsn']}, on the standby at "
              f"{standby.execute(slot)[0]['confirmed_flush_lsn']}")
        primary.crash()
    finally:
        os.kill(receiver, signal.SIGCONT)
    standby._run("pg_ctl", "-D", str(standby.data), "-w", "promote")
    standby.wait_for_state("streaming", timeout=60)
    standby.execute("INSERT INTO load VALUES (1)")
    wait_until(lambda: any(e.body.get("table") == "load" for e in read_stream(nats_server.url)), 60, "the row's event")
    assert [e.subject for e in read_stream(nats_server.url) if e.body.get("table") == "load"] == ["wal_listener.moved"]


def test_the_audit_names_what_makes_failover_unsafe(primary_and_standby):
    primary, standby = primary_and_standby
    standby.execute("ALTER SYSTEM SET hot_standby_feedback = off")
    standby.execute("SELECT pg_reload_conf()")
    if FAILOVER_SLOTS:
        primary_warning = wait_until(lambda: primary.status()["warnings"], 30, "a primary audit finding")
        print(f"\nprimary without synchronized_standby_slots: {primary_warning}")
        assert any(w.startswith("synchronized_standby_slots is empty") for w in primary_warning)
    standby_warnings = wait_until(
        lambda: [w for w in standby_status(standby)["warnings"] if "hot_standby_feedback" in w or "no failover" in w],
        30,
        "a standby audit finding",
    )
    print(f"standby: {standby_status(standby)['warnings']}")
    assert standby_warnings


@pytest.mark.skipif(FAILOVER_SLOTS, reason="before PostgreSQL 17 only")
def test_a_promoted_standby_without_failover_slots_refuses_until_reset_slot(primary_and_standby, nats_server):
    primary, standby = primary_and_standby
    primary.execute("INSERT INTO load VALUES (1)")
    wait_until(lambda: stream_count(nats_server.url) >= 1, 30, "the first event")
    wait_until(lambda: standby.execute("SELECT n FROM load"), 30, "the row on the standby")
    primary.crash()
    standby._run("pg_ctl", "-D", str(standby.data), "-w", "promote")
    status = wait_until(
        lambda: "is gone" in ((s := standby_status(standby))["last_error"] or "") and s, 60, "the refusal")
    assert status["state"] == "backoff" and "reset_slot()" in status["last_error"]
    standby.execute("SELECT wal_listener.reset_slot()")
    standby.wait_for_state("streaming", timeout=60)
    standby.execute("INSERT INTO load VALUES (2)")
    wait_until(lambda: last_number(nats_server.url) == 2, 30, "the row from the new primary")


def stream_leader(url: str) -> str:
    async def leader():
        nc = await nats.connect(url.split(","), connect_timeout=2)
        try:
            return (await nc.jetstream().stream_info("wal_listener")).cluster.leader
        finally:
            await nc.close()

    return asyncio.run(leader())


@on_one_version("15")
def test_a_nats_cluster_loses_its_leader_then_its_quorum_and_nothing_is_lost(make_cluster):
    nats_cluster = NatsCluster()
    try:
        cluster = make_cluster(nats_url=f"'{nats_cluster.url}'", stream_replicas="3")
        cluster.execute("CREATE EXTENSION wal_listener")
        cluster.wait_for_state("streaming", timeout=90)
        assert cluster.status()["warnings"] == []
        cluster.execute("CREATE TABLE load (n int PRIMARY KEY)")
        url = nats_cluster.url
        # Open-ended: a stall is timed to the first event of a row committed
        # after the fault, so rows must still be coming then (a loader that
        # had finished made the wait unsatisfiable on a fast machine).
        loader = Loader(cluster, rows=10**9, pause=0.01)
        loader.start()
        loader.wait_for(500)

        def stall(fault: str, row: int, started: float):
            assert loader.is_alive(), "the loader stopped before the fault"
            wait_until(lambda: last_number(url) > row, 120, f"delivery after {fault}", 0.05)
            print(f"\n{fault}: events flow again {time.monotonic() - started:.2f} s after")

        leader_name = stream_leader(url)
        leader = nats_cluster.node(leader_name)
        row, started = len(loader.acked), time.monotonic()
        leader.stop(signal.SIGKILL)
        stall(f"stream leader {leader_name} killed", row, started)

        # A second node: one of three left, no quorum.
        other = next(n for n in nats_cluster.nodes if n is not leader and n.process)
        other.stop(signal.SIGKILL)
        cluster.wait_for_state("backoff", timeout=60)
        confirmed = cluster.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots")[0]
        time.sleep(3)
        assert cluster.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots")[0] == confirmed, \
            "confirmed while JetStream had no quorum"
        print(f"quorum lost: {cluster.status()['last_error']}")

        row, started = len(loader.acked), time.monotonic()
        leader.start()
        other.start()
        stall("both nodes back (timed from their restart)", row, started)
        loader.finish()
        check_every_row_once_in_order(cluster, url, loader)
    finally:
        nats_cluster.destroy()



def nats_node_of(nats_cluster: NatsCluster, pid: int):
    """The node process `pid` holds an established connection to (`ss`)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True).stdout
    ports = {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if f"pid={pid}," in line}
    return next((n for n in nats_cluster.nodes if n.port in ports), None)


@on_one_version("18")
def test_a_nats_client_with_a_full_queue_never_sends_it_after_the_replay(make_cluster):
    """The worker's NATS client queues publishes it cannot write yet. When
    its server died, async-nats reconnected to another seed and flushed
    that queue, events later than those lost in the dead connection, while
    the new session replayed from the slot: later events stored before
    earlier ones. Here the server stalls (SIGSTOP) under large events, so
    the queue fills, then dies (SIGKILL)."""
    nats_cluster = NatsCluster()
    try:
        cluster = make_cluster(nats_url=f"'{nats_cluster.url}'", stream_replicas="3")
        cluster.execute("CREATE EXTENSION wal_listener")
        cluster.wait_for_state("streaming", timeout=90)
        # ~20 kB per event: the in-flight events outgrow the socket buffers.
        cluster.execute("CREATE TABLE load (n int PRIMARY KEY, pad text NOT NULL "
                        "DEFAULT repeat(md5(random()::text), 640))")
        url = nats_cluster.url
        loader = Loader(cluster, rows=1500, pause=0)
        loader.start()
        loader.wait_for(200)
        node = nats_node_of(nats_cluster, cluster.status()["pid"])
        assert node is not None, "the worker's NATS connection"
        node.process.send_signal(signal.SIGSTOP)
        time.sleep(3)
        node.stop(signal.SIGKILL)
        row, started = len(loader.acked), time.monotonic()
        live = ",".join(n.url for n in nats_cluster.nodes if n is not node)
        wait_until(lambda: last_number(live) >= row, 120, "delivery after the stalled server was killed", 0.05)
        print(f"\nevents flow again {time.monotonic() - started:.2f} s after the kill")
        node.start()
        check_every_row_once_in_order(cluster, url, loader)
    finally:
        nats_cluster.destroy()
