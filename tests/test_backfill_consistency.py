"""Backfills stay consistent with the live stream where the DBLog watermarks
alone are not enough: a commit decoded before it is visible, a replica
identity other than the chunk key, a lock held past the side session's
lock_timeout, and rows too large to hold a chunk of them in memory."""

import asyncio
import collections
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import nats
import psycopg
import pytest
from nats.js.api import DiscardPolicy, StorageType

from conftest import PG_VERSION, _failed, on_one_version
from harness import Nats, Postgres, Writer, event_bodies, wait_until


def wait_finished(cluster, backfill_id: int, timeout: float = 300) -> dict:
    """The job's row once it is done, failed or cancelled."""
    def finished():
        row = cluster.execute("SELECT * FROM wal_listener.backfills WHERE id = %s", (backfill_id,))[0]
        return row if row["state"] in ("done", "failed", "cancelled") else None

    return wait_until(finished, timeout, f"backfill {backfill_id} to finish", interval=0.5)


def wait_done(cluster, backfill_id: int, timeout: float = 300) -> dict:
    row = wait_finished(cluster, backfill_id, timeout)
    assert row["state"] == "done", row
    return row


def job(cluster, backfill_id: int) -> dict:
    return cluster.execute("SELECT * FROM wal_listener.backfills WHERE id = %s", (backfill_id,))[0]


def caught_up(cluster):
    lsn = cluster.execute("SELECT pg_current_wal_lsn()::text AS l")[0]["l"]
    wait_until(lambda: cluster.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn AS done FROM pg_replication_slots WHERE slot_name = 'wal_listener'",
        (lsn,))[0]["done"], 120, "the worker to confirm everything")


def create_slow_clause(cluster):
    """`public.slow_true(id)`: true after about a millisecond (pg_sleep
    rounds up to whole milliseconds). STABLE, so a where_clause may call it;
    it takes a column so that it runs per row, not once as a constant."""
    cluster.execute("""CREATE FUNCTION public.slow_true(i int) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
                       BEGIN PERFORM pg_sleep(0.0005); RETURN true; END $$""")


# ---------------------------------------------------------------------------
# 1. A commit decoded before it is visible.


def test_a_commit_not_yet_visible_at_the_low_watermark_is_not_overwritten_by_a_stale_read(streaming, nats_server):
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    cluster.execute("INSERT INTO t VALUES (1, 'old')")
    cluster.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    cluster.execute("SELECT pg_reload_conf()")
    time.sleep(1)  # the checkpointer publishes "a synchronous standby is defined" on reload

    updater = cluster.connect()
    warnings: list[str] = []
    updater.add_notice_handler(lambda diag: warnings.append(f"{diag.severity}: {diag.message_primary}"))
    updater_pid = updater.execute("SELECT pg_backend_pid() AS p").fetchone()["p"]
    assert updater.execute("SHOW synchronous_standby_names").fetchone()["synchronous_standby_names"] == "nobody"
    outcome: dict = {}

    def update():
        try:
            updater.execute("UPDATE t SET v = 'new' WHERE id = 1")
            outcome["ok"] = True
        except Exception as e:  # reported below
            outcome["error"] = e

    thread = threading.Thread(target=update, daemon=True)
    thread.start()
    try:
        wait_until(lambda: cluster.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                                           (updater_pid,))[0]["wait_event"] == "SyncRep",
                   20, "the UPDATE to wait for its synchronous standby")
        assert not outcome, outcome

        def update_published():
            return [b for b in event_bodies(nats_server.url) if b["table"] == "t" and b["action"] == "UPDATE"]

        wait_until(update_published, 30, "the UPDATE's event in the stream", 0.3)
        # The committed row is not visible yet: readers still see 'old'.
        assert cluster.execute("SELECT v FROM t WHERE id = 1") == [{"v": "old"}]

        with cluster.connect() as conn:
            conn.execute("SET synchronous_commit = local")
            backfill = conn.execute("SELECT wal_listener.backfill('t') AS id").fetchone()["id"]
        time.sleep(3)
        before_cancel = job(cluster, backfill)
        progress = cluster.status()["backfill"] or ""
        print(f"\nbackfill {backfill} while the UPDATE's commit waits: state {before_cancel['state']}, "
              f"rows_done {before_cancel['rows_done']}, status {progress!r}")
        # Waiting for that transaction, not done with a stale read.
        assert (before_cancel["state"], before_cancel["rows_done"]) == ("running", 0), before_cancel
        assert "may be committing" in progress and "SyncRep" in progress, progress
    finally:
        cluster.execute("SELECT pg_cancel_backend(%s)", (updater_pid,))
        thread.join(20)
        cluster.execute("ALTER SYSTEM RESET synchronous_standby_names")
        cluster.execute("SELECT pg_reload_conf()")
        updater.close()
    print(f"the UPDATE's session: {outcome}, notices {warnings}")
    assert outcome.get("ok"), outcome
    assert cluster.execute("SELECT v FROM t WHERE id = 1") == [{"v": "new"}]

    finished = wait_done(cluster, backfill, timeout=60)
    caught_up(cluster)
    events = [b for b in event_bodies(nats_server.url)
              if b["table"] == "t" and (b["data"] or b["dataOld"]).get("id") == 1]
    seen = [(b["action"], b["data"].get("v")) for b in events]
    print(f"events for id 1, in stream order: {seen}; job {finished['state']}, {finished['rows_done']} rows")
    assert seen, "no event for id 1"
    assert seen[-1][1] == "new", f"the stream ends with {seen[-1]} for id 1 while the table says 'new': {seen}"


# ---------------------------------------------------------------------------
# 2. A replica identity other than the primary key.


class CodeWriter(Writer):
    """Deletes random rows (by id), changes `code` (the replica identity) of
    random rows, updates `val` and inserts rows of `t (id, code, val)`, one
    statement per transaction, until stopped."""

    def __init__(self, cluster, first_new_id: int):
        super().__init__(cluster)
        self.next_id = first_new_id
        self.next_code = 1
        self.counts = collections.Counter()
        self.rng = random.Random(11)

    def step(self, conn):
        time.sleep(0.0005)
        pick = self.rng.randrange(1, self.next_id)
        op = self.rng.random()
        if op < 0.2:
            conn.execute("INSERT INTO t VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                         (self.next_id, f"c{self.next_id}", self.rng.randrange(1000)))
            self.next_id += 1
            self.counts["insert"] += 1
        elif op < 0.45:
            conn.execute("UPDATE t SET val = val + 1 WHERE id = %s", (pick,))
            self.counts["update val"] += 1
        elif op < 0.7:
            conn.execute("UPDATE t SET code = %s WHERE id = %s", (f"k{self.next_code}", pick))
            self.next_code += 1
            self.counts["update code"] += 1
        else:
            conn.execute("DELETE FROM t WHERE id = %s", (pick,))
            self.counts["delete"] += 1


def replay_by_code(bodies: list[dict]) -> dict:
    """The stream applied in order to a copy keyed by `code`: READ and
    INSERT upsert, UPDATE deletes a changed old code then upserts, DELETE
    removes the old code. Returns {code: (id, val)}."""
    copy: dict = {}
    for body in bodies:
        if body["table"] != "t":
            continue
        action, data, old = body["action"], body["data"], body["dataOld"]
        if action == "DELETE":
            copy.pop(old["code"], None)
            continue
        if action == "UPDATE" and old.get("code") not in (None, data["code"]):
            copy.pop(old["code"], None)
        copy[data["code"]] = (data["id"], data["val"])
    return copy


def test_the_chunk_key_is_the_replica_identity(cluster, nats_server):
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL UNIQUE, val int)")
    cluster.execute("ALTER TABLE t REPLICA IDENTITY USING INDEX t_code_key")
    cluster.execute("INSERT INTO t SELECT g, 'c' || g, g % 1000 FROM generate_series(1, 5000) g")
    create_slow_clause(cluster)
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)

    writer = CodeWriter(cluster, 5001)
    writer.start()
    time.sleep(1)
    started = time.monotonic()
    backfill = cluster.execute("SELECT wal_listener.backfill('t', where_clause => 'public.slow_true(id)') AS id")[0]["id"]
    try:
        finished = wait_done(cluster, backfill, timeout=120)
    finally:
        took = time.monotonic() - started
        time.sleep(1)
        writer.stopped.set()
        writer.join(30)
    caught_up(cluster)
    bodies = event_bodies(nats_server.url)
    deletes = [b for b in bodies if b["table"] == "t" and b["action"] == "DELETE"]
    assert deletes and all("code" in b["dataOld"] for b in deletes), deletes[:3]
    print(f"\nbackfill of 5,000 rows in {took:.1f} s ({finished['rows_done']} READ) under writes {dict(writer.counts)}; "
          f"a DELETE's dataOld: {deletes[0]['dataOld']}")

    copy = replay_by_code(bodies)
    table = {r["code"]: (r["id"], r["val"]) for r in cluster.execute("SELECT code, id, val FROM t")}
    extra = {code: copy[code] for code in copy.keys() - table.keys()}
    missing = {code: table[code] for code in table.keys() - copy.keys()}
    different = {code: (copy[code], table[code]) for code in copy.keys() & table.keys() if copy[code] != table[code]}
    if extra:
        # How an extra row got into the copy: its events in stream order.
        code = sorted(extra)[0]
        history = [(b["action"], b["data"], b["dataOld"]) for b in bodies
                   if b["table"] == "t" and code in (b["data"].get("code"), b["dataOld"].get("code"))]
        print(f"events of code {code!r} (extra in the copy): {history}")
    assert (len(extra), len(missing), len(different)) == (0, 0, 0), (
        f"{len(extra)} rows in the copy but not the table (e.g. {list(extra.items())[:5]}), "
        f"{len(missing)} missing (e.g. {list(missing.items())[:5]}), {len(different)} different "
        f"(e.g. {list(different.items())[:5]})")


# ---------------------------------------------------------------------------
# 3. A lock held longer than the side session's lock_timeout.


@on_one_version("15")
def test_a_lock_held_past_lock_timeout_delays_a_backfill_but_does_not_fail_it(streaming, nats_server):
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    cluster.execute("INSERT INTO t SELECT g, g FROM generate_series(1, 20000) g")
    create_slow_clause(cluster)
    started = time.monotonic()
    backfill = cluster.execute("SELECT wal_listener.backfill('t', where_clause => 'public.slow_true(id)') AS id")[0]["id"]
    wait_until(lambda: job(cluster, backfill)["rows_done"] > 0, 60, "a first chunk")

    waiting_sessions = []
    with cluster.connect() as locker:
        with locker.transaction():
            locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
            locked = time.monotonic()
            at_lock = job(cluster, backfill)
            assert at_lock["state"] == "running", at_lock
            while time.monotonic() - locked < 8:
                waiting_sessions += cluster.execute(
                    "SELECT pid, application_name, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE application_name = 'wal_listener_side' AND wait_event_type = 'Lock'")
                time.sleep(0.5)
    waited_for_the_lock = {(s["pid"], s["wait_event"]) for s in waiting_sessions}
    print(f"\nlock held {time.monotonic() - locked:.1f} s from rows_done {at_lock['rows_done']}; "
          f"side sessions seen waiting for it: {waited_for_the_lock}")

    finished = wait_finished(cluster, backfill, timeout=120)
    print(f"backfill {finished['state']} after {time.monotonic() - started:.1f} s: {finished['rows_done']} rows, "
          f"last_error {finished['last_error']!r}")
    assert (finished["state"], finished["rows_done"]) == ("done", 20000), finished
    reads = [b["data"]["id"] for b in event_bodies(nats_server.url) if b["table"] == "t" and b["action"] == "READ"]
    repeated = {i: n for i, n in collections.Counter(reads).items() if n > 1}
    assert not repeated, f"ids sent more than once: {list(repeated.items())[:10]}"
    assert sorted(reads) == list(range(1, 20001))


# ---------------------------------------------------------------------------
# 4. Rows of 16 MB.

ROW_MIB = 16
BIG_ROWS = 200
RSS_LIMIT_MIB = 256
GUARD_MIB = 2048


@pytest.fixture
def big_payload_nats():
    server = Nats(config="max_payload: 33554432\n")

    async def add_stream():
        nc = await nats.connect(server.url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            await nc.jetstream().add_stream(
                name="wal_listener", subjects=["wal_listener.>"], storage=StorageType.FILE,
                max_bytes=1 << 30, discard=DiscardPolicy.OLD, duplicate_window=120)
        finally:
            await nc.close()

    asyncio.run(add_stream())
    yield server
    server.destroy()


@pytest.fixture
def big_cluster(request, big_payload_nats):
    cluster = Postgres(PG_VERSION, {"wal_listener.nats_url": f"'{big_payload_nats.url}'"})
    cluster.start()
    cluster.execute("CREATE DATABASE app", dbname="postgres")
    yield cluster
    if _failed(request):
        print(f"---- server log of {cluster.dir} ----\n{cluster.log()[-6000:]}")
    cluster.destroy()


def _start_time(pid: int) -> str | None:
    """When `pid` started (field 22 of /proc/<pid>/stat): tells a process
    from a later one that reuses its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _memory_kib(pid: int, started: str) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) of `pid` in KiB; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    if _start_time(pid) != started:
        return None
    vm = re.search(r"VmRSS:\s+(\d+) kB", status)
    anon = re.search(r"RssAnon:\s+(\d+) kB", status)
    return (int(vm.group(1)), int(anon.group(1))) if vm and anon else None


class WorkerMemory(threading.Thread):
    """Samples VmRSS of the worker, of every side session
    (application_name wal_listener_side, whichever pids come and go) and of
    the walsender, until stopped. A process above GUARD_MIB is killed
    (SIGKILL) and `runaway` says which."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.peaks: dict[int, dict] = {}  # pid -> {"role", "vm_kib", "anon_kib"}
        self.runaway: str | None = None
        self._done = threading.Event()
        self.start()

    def _discover(self, conn):
        rows = conn.execute(
            "SELECT pid, backend_type, application_name FROM pg_stat_activity "
            "WHERE backend_type = 'wal_listener' OR application_name IN ('wal_listener_side', 'wal_listener')").fetchall()
        for row in rows:
            role = "worker" if row["backend_type"] == "wal_listener" else (
                "side session" if row["application_name"] == "wal_listener_side" else "walsender")
            if row["pid"] not in self.peaks and (started := _start_time(row["pid"])):
                self.peaks[row["pid"]] = {"role": role, "started": started, "vm_kib": 0, "anon_kib": 0}

    def run(self):
        conn = None
        try:
            last_discovery = 0.0
            while not self._done.is_set():
                if time.monotonic() - last_discovery > 0.2:
                    try:
                        conn = conn or self.cluster.connect()
                        self._discover(conn)
                    except psycopg.Error:  # a restarting server: sample the pids known so far
                        if conn:
                            conn.close()
                        conn = None
                    last_discovery = time.monotonic()
                for pid, peak in list(self.peaks.items()):
                    sample = _memory_kib(pid, peak["started"])
                    if sample is None:
                        continue
                    peak["vm_kib"] = max(peak["vm_kib"], sample[0])
                    peak["anon_kib"] = max(peak["anon_kib"], sample[1])
                    if sample[0] > GUARD_MIB * 1024 and self.runaway is None:
                        os.kill(pid, signal.SIGKILL)
                        self.runaway = f"{peak['role']} {pid} reached {sample[0] / 1024:.0f} MiB RSS: killed"
                self._done.wait(0.05)
        finally:
            if conn:
                conn.close()

    def stop(self):
        self._done.set()
        self.join(10)

    def report(self) -> list[str]:
        return [f"{p['role']} {pid}: VmRSS {p['vm_kib'] / 1024:.0f} MiB (anonymous {p['anon_kib'] / 1024:.0f} MiB)"
                for pid, p in sorted(self.peaks.items(), key=lambda item: item[1]["role"])]


@on_one_version("18")
def test_a_table_of_huge_rows_backfills_in_bounded_memory(big_cluster, big_payload_nats):
    cluster = big_cluster
    cluster.execute("CREATE TABLE big (id int PRIMARY KEY, payload text)")
    loading = time.monotonic()
    cluster.execute(f"INSERT INTO big SELECT g, repeat(md5(g::text), {ROW_MIB} * 1024 * 1024 / 32) "
                    f"FROM generate_series(1, {BIG_ROWS}) g")
    print(f"\n{BIG_ROWS} rows of {ROW_MIB} MiB loaded in {time.monotonic() - loading:.1f} s")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)

    memory = WorkerMemory(cluster)
    started = time.monotonic()
    backfill = cluster.execute("SELECT wal_listener.backfill('big') AS id")[0]["id"]

    def finished_or_runaway():
        if memory.runaway:
            return True
        row = job(cluster, backfill)
        return row["state"] in ("done", "failed", "cancelled")

    try:
        wait_until(finished_or_runaway, 240, f"backfill {backfill} to finish", interval=0.5)
    finally:
        memory.stop()
        took = time.monotonic() - started
        print(f"after {took:.1f} s; peak memory:\n  " + "\n  ".join(memory.report()))
    if memory.runaway:
        cluster.stop("immediate")
        pytest.fail(f"{memory.runaway}; backfill of {BIG_ROWS} rows of {ROW_MIB} MiB stopped")
    finished = job(cluster, backfill)
    print(f"backfill {finished['state']}: {finished['rows_done']} rows, last_error {finished['last_error']!r}")
    assert (finished["state"], finished["rows_done"]) == ("done", BIG_ROWS), finished
    roles = {p["role"] for p in memory.peaks.values()}
    assert {"worker", "side session", "walsender"} <= roles, f"sampled only {roles}"
    over = [line for pid, p in memory.peaks.items() if p["vm_kib"] > RSS_LIMIT_MIB * 1024
            for line in [f"{p['role']} {pid}: {p['vm_kib'] / 1024:.0f} MiB"]]
    assert not over, f"peak RSS over {RSS_LIMIT_MIB} MiB: {over}"


# ---------------------------------------------------------------------------
# 5. Which writers the chunk waits for.


@pytest.fixture
def two_phase(make_cluster):
    cluster = make_cluster(server_settings={"max_prepared_transactions": 4})
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    return cluster


def test_writers_idle_in_their_transaction_are_not_waited_for_and_prepared_ones_are(two_phase, nats_server):
    """A session that wrote the table and sits idle in its transaction (also
    inside a savepoint, whose subtransaction has an xid of its own) cannot be
    committing: the backfill goes on. A prepared transaction may be
    committed any moment: the backfill waits for it, says so, and goes on
    once it is rolled back."""
    cluster = two_phase
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    cluster.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g")
    idle = cluster.connect()
    idle.execute("BEGIN")
    idle.execute("UPDATE t SET v = 'idle' WHERE id = 1")
    idle.execute("SAVEPOINT s")
    idle.execute("UPDATE t SET v = 'in savepoint' WHERE id = 2")
    try:
        first = cluster.execute("SELECT wal_listener.backfill('t') AS id")[0]["id"]
        assert wait_done(cluster, first, timeout=30)["rows_done"] == 100

        with cluster.connect() as prepared:
            prepared.execute("BEGIN")
            prepared.execute("UPDATE t SET v = 'prepared' WHERE id = 3")
            prepared.execute("PREPARE TRANSACTION 'p1'")
        second = cluster.execute("SELECT wal_listener.backfill('t') AS id")[0]["id"]
        wait_until(lambda: "prepared transaction 'p1'" in (cluster.status()["backfill"] or ""), 30,
                   "the backfill to name the prepared transaction it waits for")
        assert job(cluster, second)["rows_done"] == 0
        cluster.execute("ROLLBACK PREPARED 'p1'")
        assert wait_done(cluster, second, timeout=30)["rows_done"] == 100
    finally:
        idle.execute("ROLLBACK")
        idle.close()
        for row in cluster.execute("SELECT gid FROM pg_prepared_xacts"):
            cluster.execute(f"ROLLBACK PREPARED '{row['gid']}'")


# ---------------------------------------------------------------------------
# 6. A slow, selective clause; columns changed under a backfill.


@on_one_version("15")
def test_a_slow_clause_that_selects_few_rows_finishes_though_one_scan_would_time_out(streaming, nats_server):
    """35,000 rows at about a millisecond each through the clause are 35 s,
    past the worker's 30 s statement_timeout: chunks are key ranges, so no
    read scans more than a chunk's keys, however few rows the clause picks."""
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY)")
    cluster.execute("INSERT INTO t SELECT generate_series(1, 35000)")
    create_slow_clause(cluster)
    started = time.monotonic()
    backfill = cluster.execute(
        "SELECT wal_listener.backfill('t', where_clause => 'public.slow_true(id) AND id > 34990') AS id")[0]["id"]
    finished = wait_finished(cluster, backfill, timeout=150)
    print(f"\n{finished['state']} after {time.monotonic() - started:.1f} s: {finished['rows_done']} rows, "
          f"last_error {finished['last_error']}")
    assert (finished["state"], finished["rows_done"]) == ("done", 10), finished
    reads = sorted(b["data"]["id"] for b in event_bodies(nats_server.url) if b["action"] == "READ")
    assert reads == list(range(34991, 35001))


def test_a_column_retyped_during_a_backfill_is_read_with_its_new_type(streaming, nats_server):
    """ALTER COLUMN ... TYPE between two chunks: every later READ carries the
    new type's JSON form (here a string), never the old kind's (a number
    written without quotes, which is not JSON)."""
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    cluster.execute("INSERT INTO t SELECT g, g FROM generate_series(1, 6000) g")
    create_slow_clause(cluster)
    backfill = cluster.execute("SELECT wal_listener.backfill('t', where_clause => 'public.slow_true(id)') AS id")[0]["id"]
    wait_until(lambda: job(cluster, backfill)["rows_done"] > 0, 60, "a first chunk")
    cluster.execute("ALTER TABLE t ALTER COLUMN v TYPE text USING 'x' || v")
    finished = wait_finished(cluster, backfill, timeout=120)
    assert (finished["state"], finished["rows_done"]) == ("done", 6000), finished
    reads = [b["data"] for b in event_bodies(nats_server.url) if b["action"] == "READ"]  # each body parsed as JSON
    assert len(reads) == 6000
    retyped = [r for r in reads if isinstance(r["v"], str)]
    assert retyped and all(r["v"] == f"x{r['id']}" for r in retyped), retyped[:3]
    assert all(r["v"] == r["id"] for r in reads if not isinstance(r["v"], str))
