"""wal_listener benchmarks (GitHub issue 8): throughput of the worker against
its two limits (pgoutput decoding alone, JetStream publishing alone),
commit-to-subscriber latency, pgbench overhead, and the core's decode+encode
cost. Prints a markdown report and writes bench/results.md and results.png.

Environment: WL_BENCH_SCALE (default 1) scales the workload sizes;
WL_BENCH_CRITERION=0 skips the Criterion benchmark.
"""

import asyncio
import json
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import nats  # noqa: E402

from harness import Nats, PeakMemory, Postgres, _as_postgres_user, free_port, stream_count, wait_until  # noqa: E402

SCALE = float(os.environ.get("WL_BENCH_SCALE", "1"))
RUN_CRITERION = os.environ.get("WL_BENCH_CRITERION", "1") != "0"
# The write path's baseline that every WAL-based tool pays (issue 23).
FLOOR = "pg_recvlogical (floor)"
SWEEP_RATES = (500, 5000, 10000)  # besides the write path's 2,000 tx/s
PG_VERSION = "15"
STREAM = "wal_listener"
BASELINE = REPO / "target" / "release" / "examples" / "nats_baseline"
OUT = Path(__file__).resolve().parent


def scaled(n: int) -> int:
    return max(1000, int(n * SCALE))


# The narrow rows match core/benches/decode_encode.rs' narrow row.
NARROW_TABLE = "(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int, created timestamptz DEFAULT now())"

# 30 columns, the same as the wide row of core/benches/decode_encode.rs.
WIDE_COLUMNS = """
    id bigint PRIMARY KEY, i2 smallint, i4 int, i8 bigint, num1 numeric, num2 numeric,
    txt1 text, txt2 text, vc1 varchar(64), vc2 varchar(64), flag1 bool, flag2 bool,
    ts1 timestamptz, ts2 timestamptz, d1 date, d2 date, doc1 jsonb, doc2 jsonb,
    u1 uuid, u2 uuid, f1 float8, f2 float8, i4b int, i8b bigint, num3 numeric,
    txt3 text, vc3 varchar(64), flag3 bool, ts3 timestamptz, big text"""
WIDE_VALUES = """
    i, (i % 30000)::smallint, i, i::bigint * 1000003, i / 7.0, i * 0.001,
    'short text ' || i, 'another text, with "quotes" ' || i, 'varchar ' || i, 'user' || i || '@example.com',
    i % 2 = 0, i % 3 = 0, now(), now() - i * interval '1 minute', current_date, date '2000-01-01' + i % 9000,
    jsonb_build_object('a', i, 'b', jsonb_build_array(1, 2, 3), 'c', 'x'), '{"nested": {"k": "v", "n": null}}',
    md5(i::text)::uuid, md5((i + 1)::text)::uuid, i / 3.0::float8, -0.5, -i, i::bigint * 17, 99.95,
    'third text', 'v3', true, now(), repeat(md5(i::text), 64)"""

SETUP_SQL = f"""
CREATE TABLE bench_single {NARROW_TABLE};
CREATE TABLE bench_bulk {NARROW_TABLE};
CREATE TABLE bench_wide ({WIDE_COLUMNS});
CREATE TABLE bench_latency {NARROW_TABLE};
CREATE TABLE bench_pgbench (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int);
-- Procedures commit per loop step: many transactions without a client round trip each.
CREATE PROCEDURE bench_single_txns(count int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..count LOOP INSERT INTO bench_single(n) VALUES (i); COMMIT; END LOOP;
END $$;
CREATE PROCEDURE bench_wide_rows(count int, per_txn int) LANGUAGE plpgsql AS $$
BEGIN
  FOR start IN 0..count - 1 BY per_txn LOOP
    INSERT INTO bench_wide SELECT {WIDE_VALUES} FROM generate_series(start + 1, least(start + per_txn, count)) i;
    COMMIT;
  END LOOP;
END $$;
"""


def bench_cluster() -> tuple[Postgres, Nats, int]:
    """A started Postgres with database `app` (checkpoints kept out of the
    timed parts), and nats-server on the port it publishes to."""
    nats_port = free_port()
    pg = Postgres(
        PG_VERSION,
        {
            "wal_listener.nats_url": f"'nats://127.0.0.1:{nats_port}'",
            "max_wal_size": "'20GB'",
            "checkpoint_timeout": "'1h'",
        },
    )
    pg.start()
    pg.execute("CREATE DATABASE app", dbname="postgres")
    return pg, Nats(port=nats_port), nats_port


class Bench:
    def __init__(self):
        self.pg, self.nats, self.nats_port = bench_cluster()
        # Rows from before the extension: only a backfill publishes them.
        self.backfill_rows = scaled(500_000)
        self.pg.execute(f"CREATE TABLE bench_backfill {NARROW_TABLE}")
        self.pg.execute(f"INSERT INTO bench_backfill(n) SELECT generate_series(1, {self.backfill_rows})")
        self.pg.execute("CREATE EXTENSION wal_listener")
        self.pg.wait_for_state("streaming", 60)
        with self.pg.connect() as conn:
            conn.execute(SETUP_SQL)
        self.results = {"workloads": [], "scale": SCALE}

    def close(self):
        if self.nats:
            self.nats.destroy()
        self.pg.destroy()

    def pg_tool(self, tool: str, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.pg.bindir / tool), "-h", str(self.pg.dir), "-p", str(self.pg.port), "-U", "postgres", *args],
            check=True, capture_output=True, text=True, timeout=timeout, **_as_postgres_user(),
        )

    def stop_nats(self):
        """NATS down and the worker idle in backoff: new WAL waits in the slot."""
        if self.nats:
            self.settle_slot()
            self.nats.destroy()
            self.nats = None
        self.pg.execute("SELECT wal_listener.restart()")
        self.pg.wait_for_state("backoff", 30)

    def settle_slot(self, restart_lsn: bool = True):
        """Waits until the worker's slot confirmed all WAL written so far (else
        the worker replays the tail into the next, empty stream) and its
        restart_lsn followed (else the next read re-decodes earlier workloads).
        restart_lsn moves only past a running-xacts record, which CHECKPOINT logs."""
        lsn = self.pg.execute("SELECT pg_current_wal_lsn()::text AS lsn")[0]["lsn"]

        def settled():
            if restart_lsn:
                self.pg.execute("CHECKPOINT")
            return self.pg.execute(
                "SELECT (restart_lsn >= %(lsn)s::pg_lsn OR NOT %(restart)s) AND confirmed_flush_lsn >= %(lsn)s::pg_lsn AS ok "
                "FROM pg_replication_slots WHERE slot_name = 'wal_listener'", {"lsn": lsn, "restart": restart_lsn})[0]["ok"]

        wait_until(settled, 120, "the worker's slot to confirm everything", interval=1 if restart_lsn else 0.1)

    def workload(self, name: str, table: str, events: int, generate: str):
        print(f"== {name}: {events} events", flush=True)
        self.stop_nats()
        # Same restart and confirmed positions as the worker's slot: the same WAL to read.
        self.pg.execute("SELECT pg_copy_logical_replication_slot('wal_listener', 'bench_decode')")
        t = time.monotonic()
        self.pg.execute(generate)
        generate_s = time.monotonic() - t
        end_lsn = self.pg.execute("SELECT pg_current_wal_lsn()::text AS lsn")[0]["lsn"]
        self.pg.execute("CHECKPOINT")

        decode_s = self.decode_only(end_lsn)
        self.pg.execute("SELECT pg_drop_replication_slot('bench_decode')")
        e2e = self.end_to_end(events)
        payloads = OUT / f".payloads-{name}.bin"
        dump_payloads(self.nats.url, events, payloads)
        self.stop_nats()
        nats_s = nats_only(payloads)
        payloads.unlink()
        # The same workload once more with publish_mode = transaction, into
        # the emptied table (its TRUNCATE published and confirmed first).
        self.ensure_nats()
        self.pg.execute(f"TRUNCATE {table}")
        self.pg.set(publish_mode="transaction")
        self.stop_nats()
        self.pg.execute(generate)
        self.pg.execute("CHECKPOINT")
        e2e_tx = self.end_to_end(events)
        self.pg.set(publish_mode=None)
        self.stop_nats()

        row = {
            "name": name, "events": events, "generate_s": generate_s,
            "decode_eps": events / decode_s, "nats_eps": events / nats_s, **e2e,
            "transaction_mode": e2e_tx,
        }
        row["ratio"] = row["e2e_eps"] / min(row["decode_eps"], row["nats_eps"])
        print(json.dumps(row), flush=True)
        self.results["workloads"].append(row)

    def decode_only(self, end_lsn: str) -> float:
        t = time.monotonic()
        self.pg_tool(
            "pg_recvlogical", "-d", "app", "--slot", "bench_decode", "--start", "--no-loop",
            "--endpos", end_lsn, "-o", "proto_version=1", "-o", "publication_names=wal_listener", "-f", "/dev/null",
        )
        return time.monotonic() - t

    def end_to_end(self, events: int) -> dict:
        """NATS back, worker woken at t0; ends at the stored time of the last message.
        Counting from t0 rather than from the first stored message includes what
        the walsender does before the first event (for one big transaction:
        decoding all of it into the reorder buffer), as pg_recvlogical's time does."""
        self.nats = Nats(port=self.nats_port)
        worker = self.pg.worker_pid()
        peak = PeakMemory(worker)
        cpu = {"worker": cpu_seconds(worker), "nats-server": cpu_seconds(self.nats.process.pid)}
        t0 = time.time()
        self.pg.execute("SELECT wal_listener.restart()")
        walsender = wait_until(lambda: self.pg.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'wal_listener'")[0]["active_pid"],
            30, "the worker's walsender")
        wait_until(lambda: stream_count(self.nats.url) >= events, 3600, f"{events} events", 0.25)
        t_seen = time.time()
        used = {
            "worker": cpu_seconds(worker) - cpu["worker"],
            "walsender": cpu_seconds(walsender),  # started after t0
            "nats-server": cpu_seconds(self.nats.process.pid) - cpu["nats-server"],
        }
        cpu_pct = {k: round(100 * v / (t_seen - t0)) for k, v in used.items()}
        cpu_us = {k: v * 1e6 / events for k, v in used.items()}
        first, last = asyncio.run(stored_times(self.nats.url))
        rss = peak.stop()
        count = stream_count(self.nats.url)
        if count != events:
            raise RuntimeError(f"stream holds {count} events, expected {events}")
        return {
            "e2e_eps": events / (last - t0), "first_event_s": first - t0,
            "e2e_s": last - t0, "rss_mib": rss, "cpu_pct": cpu_pct, "cpu_us": cpu_us,
        }

    def backfill(self):
        """A backfill of bench_backfill (rows from before the extension),
        with the latency of live single-row transactions measured meanwhile."""
        print(f"== backfill of {self.backfill_rows} rows, latency meanwhile", flush=True)
        self.ensure_nats()
        before = stream_count(self.nats.url)
        t = time.monotonic()
        backfill_id = self.pg.execute("SELECT wal_listener.backfill('bench_backfill') AS id")[0]["id"]
        live = self.latency(seconds=10, key="latency_during_backfill")
        row = wait_until(lambda: (r := self.pg.execute(
            "SELECT state, rows_done, extract(epoch FROM finished_at - started_at) AS s, "
            "extract(epoch FROM started_at) AS started, extract(epoch FROM finished_at) AS finished "
            "FROM wal_listener.backfills WHERE id = %s", (backfill_id,))[0])["state"] == "done" and r, 3600,
            "the backfill", 0.5)
        # Only the live events committed while the backfill ran.
        during = [lat for commit, lat in zip(live.commit_times, live.latencies)
                  if float(row["started"]) <= commit <= float(row["finished"])]
        self.results["latency_during_backfill"] = latency_stats(during, 1000, float(row["s"]))
        print(json.dumps(self.results["latency_during_backfill"]), flush=True)
        if row["rows_done"] != self.backfill_rows:
            raise RuntimeError(f"backfill published {row['rows_done']} rows, expected {self.backfill_rows}")
        self.results["backfill"] = {"rows": row["rows_done"], "seconds": float(row["s"]),
                                    "rows_per_s": row["rows_done"] / float(row["s"]),
                                    "wall_s": time.monotonic() - t, "events_before": before}
        print(json.dumps(self.results["backfill"]), flush=True)

    def ensure_nats(self):
        if self.nats is None:
            self.nats = Nats(port=self.nats_port)
            self.pg.execute("SELECT wal_listener.restart()")
            self.pg.wait_for_state("streaming", 30)

    def latency(self, rate: int = 1000, seconds: int = 20, key: str = "latency"):
        print(f"== latency at {rate} tx/s for {seconds} s", flush=True)
        self.ensure_nats()
        before = self.pg.execute("SELECT count(*) AS n FROM bench_latency")[0]["n"]
        subscriber = LatencySubscriber(self.nats.url)
        script = self.pg.dir / "latency.sql"
        script.write_text("INSERT INTO bench_latency(n) VALUES (1);\n")
        self.pg_tool("pgbench", "-n", "-c", "2", "-j", "2", "-R", str(rate), "-T", str(seconds), "-f", str(script), "app")
        sent = self.pg.execute("SELECT count(*) AS n FROM bench_latency")[0]["n"] - before
        wait_until(lambda: len(subscriber.latencies) >= sent, 60, f"{sent} latency events")
        subscriber.stop()
        self.results[key] = latency_stats(subscriber.latencies, rate, seconds)
        print(json.dumps(self.results[key]), flush=True)
        return subscriber

    def write_path(self, rate: int = 2000, seconds: int = 15):
        """What a user pays on the database host, for single-row inserts
        from 4 pgbench clients: the CPU of every Postgres process (worker and
        walsender included) per event at a fixed rate, minus that of the
        same load with no CDC at all, and the highest TPS; with fsync off
        and on. Against a trigger outbox plus a relay that polls, publishes
        to JetStream and deletes (the pattern we replace), on the same data
        directory: the worker modes first, then a restart without the
        extension for no CDC and the outbox."""
        script = self.pg.dir / "insert.sql"
        script.write_text("INSERT INTO bench_pgbench(n) VALUES (1);\n")
        self.ensure_nats()
        results = self.results["write_path"] = {}
        # Worker + walsender and the floor at other steady rates (fsync
        # off, event mode): the linger's rule must not leave a cliff.
        sweep = self.results["steady_rates"] = {}

        def measure(config: str, fsync: str, relay=None, at: int = rate):
            self.pg.execute(f"ALTER SYSTEM SET fsync = {fsync}")
            self.pg.execute("SELECT pg_reload_conf()")
            self.pg.execute("TRUNCATE bench_pgbench")
            self.pg.execute("CHECKPOINT")
            before = self.db_host_cpu()
            switches_before = self.switches()
            relay_before = cpu_seconds(relay.pid) if relay else 0.0
            self.pg_tool("pgbench", "-n", "-c", "4", "-j", "2", "-R", str(at), "-T", str(seconds), "-f",
                         str(script), "app")
            events = self.pg.execute("SELECT count(*) AS n FROM bench_pgbench")[0]["n"]
            self.drained(config)
            cpu = {k: v - before.get(k, 0.0) for k, v in self.db_host_cpu().items()}
            row = {"events": events, "db_us": cpu["total"] * 1e6 / events,
                   "worker_us": cpu.get("worker", 0.0) * 1e6 / events,
                   "walsender_us": cpu.get("walsender", 0.0) * 1e6 / events,
                   "side_us": cpu.get("side session", 0.0) * 1e6 / events,
                   "relay_us": (cpu_seconds(relay.pid) - relay_before) * 1e6 / events if relay else None,
                   "switches": {k: (v - switches_before.get(k, 0)) / events for k, v in self.switches().items()}}
            if at != rate:
                sweep[f"{config} at {at}"] = row
                print(f"== steady rate {config} at {at} tx/s: {json.dumps(row)}", flush=True)
                return
            self.pg.execute("TRUNCATE bench_pgbench")
            self.pg.execute("CHECKPOINT")
            out = self.pg_tool("pgbench", "-n", "-c", "4", "-j", "2", "-T", str(seconds), "-f", str(script), "app").stdout
            row["tps"] = float(re.search(r"tps = ([\d.]+)", out).group(1))
            self.drained(config)
            results[f"{config}, fsync {fsync}"] = row
            print(f"== write path {config}, fsync {fsync}: {json.dumps(row)}", flush=True)

        for mode in ("event", "transaction"):
            self.pg.set(publish_mode=mode)
            self.pg.wait_for_state("streaming", 30)
            for fsync in ("off", "on"):
                measure(f"wal_listener ({mode})", fsync)
            for at in SWEEP_RATES if mode == "event" else ():
                measure(f"wal_listener ({mode})", "off", at=at)
        with open(self.pg.data / "postgresql.conf", "a") as conf:
            conf.write("shared_preload_libraries = ''\n")
        self.pg.restart()
        for fsync in ("off", "on"):
            measure("no CDC", fsync)
        # The floor of any pgoutput consumer: pg_recvlogical writing the same
        # publication's stream to /dev/null, with its walsender, same load.
        self.pg.execute("SELECT pg_create_logical_replication_slot('bench_floor', 'pgoutput')")
        floor = subprocess.Popen(
            [str(self.pg.bindir / "pg_recvlogical"), "-h", str(self.pg.dir), "-p", str(self.pg.port), "-U", "postgres",
             "-d", "app", "--slot", "bench_floor", "--start", "-o", "proto_version=1",
             "-o", "publication_names=wal_listener", "-s", "1", "-F", "0", "-f", "/dev/null"], **_as_postgres_user())
        try:
            for fsync in ("off", "on"):
                measure(FLOOR, fsync, floor)
            for at in SWEEP_RATES:
                measure(FLOOR, "off", floor, at=at)
        finally:
            floor.kill()
            floor.wait()
        wait_until(lambda: self.pg.execute(
            "SELECT NOT active AS idle FROM pg_replication_slots WHERE slot_name = 'bench_floor'")[0]["idle"],
            30, "pg_recvlogical's walsender to end")
        self.pg.execute("SELECT pg_drop_replication_slot('bench_floor')")
        self.pg.execute("""
            CREATE TABLE bench_outbox (id bigserial PRIMARY KEY, payload json, created timestamptz DEFAULT now());
            CREATE FUNCTION bench_outbox_write() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO bench_outbox(payload) VALUES (row_to_json(NEW)); RETURN NEW; END $$;
            CREATE TRIGGER bench_outbox AFTER INSERT ON bench_pgbench FOR EACH ROW EXECUTE FUNCTION bench_outbox_write();
        """)
        relay = subprocess.Popen([sys.executable, str(OUT / "outbox_relay.py"), str(self.pg.dir), str(self.pg.port),
                                  self.nats.url])
        try:
            for fsync in ("off", "on"):
                measure("outbox + relay", fsync, relay)
        finally:
            relay.kill()
            relay.wait()
        for key, row in results.items():
            fsync = key.rsplit(" ", 1)[1]
            row["extra_db_us"] = row["db_us"] - results[f"no CDC, fsync {fsync}"]["db_us"]

    def drained(self, config: str):
        """Waits until the CDC of `config` has published everything written."""
        if config.startswith("wal_listener"):
            self.settle_slot(restart_lsn=False)
        elif config == FLOOR:
            lsn = self.pg.execute("SELECT pg_current_wal_lsn()::text AS lsn")[0]["lsn"]
            wait_until(lambda: self.pg.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn AS ok FROM pg_replication_slots "
                "WHERE slot_name = 'bench_floor'", (lsn,))[0]["ok"], 120, "pg_recvlogical to confirm everything", 0.1)
        elif config.startswith("outbox"):
            wait_until(lambda: self.pg.execute("SELECT count(*) AS n FROM bench_outbox")[0]["n"] == 0, 600,
                       "the relay to empty the outbox", 0.1)

    def db_host_cpu(self) -> dict:
        """CPU seconds of the Postgres process tree: the postmaster, its live
        children and the ones it reaped; the worker and walsender apart."""
        postmaster = self.pg.postmaster_pid()
        fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        total = sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
        parts = {}
        worker = self.pg.worker_pid()
        walsender = self.streaming_walsender_pid()
        side = {r["pid"] for r in self.pg.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'wal_listener_side'")}
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True)
        for pid in (int(p) for p in children.stdout.split()):
            try:
                used = cpu_seconds(pid)
            except OSError:
                continue
            total += used
            if pid == worker:
                parts["worker"] = used
            elif pid == walsender:
                parts["walsender"] = used
            elif pid in side:
                parts["side session"] = parts.get("side session", 0.0) + used
        return {"total": total, **parts}

    def streaming_walsender_pid(self) -> int | None:
        """The walsender serving the worker's slot or the floor's."""
        rows = self.pg.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name IN ('wal_listener', 'bench_floor') "
            "AND active_pid IS NOT NULL")
        return rows[0]["active_pid"] if rows else None

    def switches(self) -> dict:
        """Context switches (voluntary + involuntary, all threads) of the
        worker and the walsender: how often each was woken."""
        pids = {"worker": self.pg.worker_pid(), "walsender": self.streaming_walsender_pid()}
        counts = {}
        for name, pid in pids.items():
            if pid is None:
                continue
            try:
                counts[name] = sum(
                    int(line.split()[1]) for task in Path(f"/proc/{pid}/task").iterdir()
                    for line in (task / "status").read_text().splitlines() if "ctxt_switches:" in line)
            except OSError:
                continue
        return counts


def latency_stats(latencies: list[float], rate: int, seconds: float) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    if not ms:
        raise RuntimeError(f"no latency sample in {seconds:.1f} s at {rate} tx/s")
    return {"rate": rate, "seconds": seconds, "events": len(ms), "p50_ms": statistics.median(ms),
            "p99_ms": ms[int(len(ms) * 0.99) - 1], "max_ms": ms[-1]}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stored_times(url: str) -> tuple[float, float]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(STREAM)).state
        first = await js.get_msg(STREAM, state.first_seq)
        last = await js.get_msg(STREAM, state.last_seq)
        return first.time.timestamp(), last.time.timestamp()
    finally:
        await nc.close()


def dump_payloads(url: str, events: int, path: Path):
    """Writes the stream's messages for nats_baseline: per message u32 subject
    length, subject, u32 body length, body (big-endian)."""

    async def dump():
        nc = await nats.connect(url)
        done = asyncio.Event()
        with open(path, "wb") as f:
            written = 0

            async def on_message(msg):
                nonlocal written
                subject = msg.subject.encode()
                f.write(struct.pack(">I", len(subject)) + subject + struct.pack(">I", len(msg.data)) + msg.data)
                written += 1
                if written == events:
                    done.set()

            sub = await nc.jetstream().subscribe(f"{STREAM}.>", ordered_consumer=True, cb=on_message,
                                                 pending_msgs_limit=200_000, pending_bytes_limit=1 << 30)
            await asyncio.wait_for(done.wait(), timeout=1800)
            await sub.unsubscribe()
        await nc.close()

    asyncio.run(dump())


def nats_only(payloads: Path) -> float:
    server = Nats()
    try:
        out = subprocess.run([str(BASELINE), server.url, STREAM, str(payloads)],
                             check=True, capture_output=True, text=True, timeout=3600)
        return float(out.stdout.strip())
    finally:
        server.destroy()


class LatencySubscriber:
    """Core NATS subscription on wal_listener.> in a thread of its own;
    latency = receive wall time - the event's commitTime (same host clock)."""

    PATTERN = re.compile(rb'"commitTime":"([^"]+)"')

    def __init__(self, url: str):
        self.latencies: list[float] = []
        self.commit_times: list[float] = []  # epoch seconds, one per latency
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(url),), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _run(self, url: str):
        nc = await nats.connect(url)
        self._stop = asyncio.Event()

        async def on_message(msg):
            received = time.time()
            commit = datetime.fromisoformat(self.PATTERN.search(msg.data).group(1).decode())
            self.commit_times.append(commit.timestamp())
            self.latencies.append(received - commit.timestamp())

        # Only the latency table: a backfill's READ events carry the read time.
        await nc.subscribe(f"{STREAM}.public_bench_latency", cb=on_message)
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def stop(self) -> list[float]:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        return self.latencies


def criterion() -> dict:
    print("== criterion decode_encode", flush=True)
    out = subprocess.run(["cargo", "bench", "-p", "wal_listener_core", "--bench", "decode_encode"],
                         cwd=REPO, check=True, capture_output=True, text=True).stdout
    results = {}
    for name in ("narrow", "wide"):
        estimates = json.loads((REPO / "target" / "criterion" / "decode_encode" / name / "new" / "estimates.json").read_text())
        line = re.search(rf"^{name}: (\d+) columns, (\d+) B pgoutput -> (\d+) B JSON, allocations/event: ([\d.]+)", out, re.M)
        results[name] = {
            "ns": estimates["mean"]["point_estimate"], "columns": int(line[1]),
            "pgoutput_bytes": int(line[2]), "json_bytes": int(line[3]), "allocs": float(line[4]),
        }
    return results


def machine() -> str:
    cpu = re.search(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    nats_version = subprocess.run([str(Path(sys.executable).parent / "nats-server"), "--version"],
                                  capture_output=True, text=True).stdout.strip()
    return (f"{cpu.group(1) if cpu else platform.processor()}, {os.cpu_count()} cores, {mem_kib / 2**20:.0f} GiB RAM, "
            f"Linux {platform.release()}, PostgreSQL {PG_VERSION} (fsync off), {nats_version}")


def report(results: dict) -> str:
    crit = results.get("criterion", {})
    lines = [
        f"Machine: {results['machine']}. Scale {results['scale']}; {results['date']}.", "",
        "| workload | events | decode-only ev/s | NATS-only ev/s | mode | end to end ev/s | ratio "
        "| CPU µs/event worker / walsender / nats-server | worker ÷ walsender | worker peak RSS MiB "
        "| decode+encode limit ev/s |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for w in results["workloads"]:
        core = crit.get("wide" if w["name"].startswith("wide") else "narrow")
        limit = f"{1e9 / core['ns']:,.0f}" if core else "-"
        floor = min(w["decode_eps"], w["nats_eps"])
        for mode, run in (("event", w), ("transaction", w.get("transaction_mode"))):
            if not run:
                continue
            c = run["cpu_us"]
            lines.append(
                f"| {w['name']} | {w['events']:,} | {w['decode_eps']:,.0f} | {w['nats_eps']:,.0f} | {mode} "
                f"| {run['e2e_eps']:,.0f} | {run['e2e_eps'] / floor:.2f} "
                f"| {c['worker']:.2f} / {c['walsender']:.2f} / {c['nats-server']:.2f} "
                f"| {c['worker'] / c['walsender']:.2f} | {run['rss_mib']:.1f} | {limit} |"
            )
    if "latency" in results:
        lat = results["latency"]
        lines += ["", f"Commit-to-subscriber latency at {lat['rate']} tx/s for {lat['seconds']} s ({lat['events']:,} events): "
                  f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms."]
    if "backfill" in results:
        b, during = results["backfill"], results.get("latency_during_backfill")
        big = next((w for w in results["workloads"] if w["name"] == "one big txn"), None)
        lines += ["", f"Backfill of {b['rows']:,} narrow rows: {b['seconds']:.1f} s, {b['rows_per_s']:,.0f} rows/s"
                  + (f" (the same rows as one transaction: decode-only {big['decode_eps']:,.0f} ev/s, NATS-only "
                     f"{big['nats_eps']:,.0f} ev/s; backfill ÷ NATS-only {b['rows_per_s'] / big['nats_eps']:.2f})."
                     if big else ".")]
        if during:
            lines += [f"Latency at {during['rate']} tx/s of the live events committed during the backfill "
                      f"({during['events']:,} events): "
                      f"p50 {during['p50_ms']:.1f} ms, p99 {during['p99_ms']:.1f} ms, max {during['max_ms']:.1f} ms."]
    if "write_path" in results:
        lines += ["", "| write path: 4 pgbench clients, single-row inserts | fsync | highest TPS | DB-host CPU µs/event "
                  "over no CDC (at 2,000 tx/s) | of which worker / walsender | relay or pg_recvlogical µs/event "
                  "| worker's side session µs/event | context switches per event worker / walsender |",
                  "|---|---|--:|--:|--:|--:|--:|--:|"]
        for key, row in results["write_path"].items():
            config, fsync = key.rsplit(", fsync ", 1)
            worker = f"{row['worker_us']:.1f}" if config.startswith("wal_listener") else "-"
            walsender = f"{row['walsender_us']:.1f}" if config.startswith("wal_listener") or config == FLOOR else "-"
            relay = f"{row['relay_us']:.1f}" if row.get("relay_us") is not None else "-"
            side = f"{row['side_us']:.1f}" if config.startswith("wal_listener") and "side_us" in row else "-"
            sw = row.get("switches", {})
            switches = " / ".join(f"{sw[k]:.2f}" if k in sw else "-" for k in ("worker", "walsender"))
            lines.append(f"| {config} | {fsync} | {row['tps']:,.0f} | {row['extra_db_us']:.1f} | {worker} / {walsender} "
                         f"| {relay} | {side} | {switches} |")
        lines += [""] + [f"Worker + walsender against the floor (pg_recvlogical + its walsender), {text}."
                         for text in floor_ratios(results["write_path"])]
    if results.get("steady_rates"):
        lines += ["", "| steady rate (fsync off, event mode) | worker / walsender µs/event | pg_recvlogical / its walsender "
                  "µs/event | ours ÷ floor |", "|--:|--:|--:|--:|"]
        rows = dict(results["steady_rates"])
        rows[f"wal_listener (event) at 2000"] = results["write_path"].get("wal_listener (event), fsync off")
        rows[f"{FLOOR} at 2000"] = results["write_path"].get(f"{FLOOR}, fsync off")
        for at in sorted({500, 2000, *SWEEP_RATES}):
            ours, floor = rows.get(f"wal_listener (event) at {at}"), rows.get(f"{FLOOR} at {at}")
            if ours and floor:
                a, b = ours["worker_us"] + ours["walsender_us"], floor["relay_us"] + floor["walsender_us"]
                lines.append(f"| {at:,} tx/s | {ours['worker_us']:.1f} / {ours['walsender_us']:.1f} "
                             f"| {floor['relay_us']:.1f} / {floor['walsender_us']:.1f} | {a / b:.2f} |")
    if crit:
        lines += ["", "| Criterion decode + encode | columns | pgoutput B | JSON B | ns/event | allocations/event |",
                  "|---|--:|--:|--:|--:|--:|"]
        for name, c in crit.items():
            lines.append(f"| {name} | {c['columns']} | {c['pgoutput_bytes']:,} | {c['json_bytes']:,} "
                         f"| {c['ns']:,.0f} | {c['allocs']:.1f} |")
    return "\n".join(lines) + "\n"


def floor_ratios(write_path: dict) -> list[str]:
    """Issue 23's steady-rate target: ours ≤ 1.2 × the floor's CPU per event."""
    texts = []
    for key, row in write_path.items():
        config, fsync = key.rsplit(", fsync ", 1)
        floor = write_path.get(f"{FLOOR}, fsync {fsync}")
        if config.startswith("wal_listener") and floor:
            ours, base = row["worker_us"] + row["walsender_us"], floor["walsender_us"] + floor["relay_us"]
            texts.append(f"{config[len('wal_listener '):].strip('()')} mode, fsync {fsync}: "
                         f"{ours:.1f} ÷ {base:.1f} µs/event = {ours / base:.2f}")
    return texts


def write_path_parts(row: dict, config: str) -> dict:
    """A write-path row's DB-host CPU per event split by who pays it."""
    own = row["worker_us"] + row["walsender_us"]
    return {"backends": max(row["extra_db_us"] - own, 0.0), "walsender": row["walsender_us"],
            "worker": row["worker_us"], "relay or pg_recvlogical": row["relay_us"] or 0.0}


def chart(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if "write_path" in results else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 2, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [w["name"] for w in results["workloads"]]
    series = [
        ("decode-only", lambda w: w["decode_eps"]),
        ("NATS-only", lambda w: w["nats_eps"]),
        ("end to end, event", lambda w: w["e2e_eps"]),
        ("end to end, transaction", lambda w: w["transaction_mode"]["e2e_eps"]),
    ]
    width = 0.8 / len(series)
    for i, (label, value) in enumerate(series):
        xs = [j + (i - 1.5) * width for j in range(len(names))]
        ax.bar(xs, [value(w) for w in results["workloads"]], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("events/s")
    ax.set_title("Throughput per workload")
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        rows = [(k.replace(" (floor), fsync", "\n(floor)\nfsync").replace("wal_listener (", "wal_listener\n")
                 .replace("), fsync", "\nfsync").replace(" + relay, fsync", " + relay\nfsync"),
                 write_path_parts(v, k)) for k, v in results["write_path"].items() if not k.startswith("no CDC")]
        labels = [k for k, _ in rows]
        bottom = [0.0] * len(rows)
        for i, part in enumerate(("backends", "walsender", "worker", "relay or pg_recvlogical")):
            heights = [parts[part] for _, parts in rows]
            ax.bar(labels, heights, bottom=bottom, label=part, color=f"C{i}")
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.legend(fontsize=8)
        ax.set_ylabel("CPU µs per event over no CDC")
        ax.set_title("What the write path pays (2,000 tx/s)")
        ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    bench = Bench()
    try:
        bench.workload("single-row txns", "bench_single", scaled(100_000),
                       f"CALL bench_single_txns({scaled(100_000)})")
        bench.workload("one big txn", "bench_bulk", scaled(1_000_000),
                       f"INSERT INTO bench_bulk(n) SELECT generate_series(1, {scaled(1_000_000)})")
        bench.workload("wide rows", "bench_wide", scaled(100_000), f"CALL bench_wide_rows({scaled(100_000)}, 1000)")
        bench.latency()
        bench.backfill()
        bench.write_path()
    except BaseException:
        print("== Postgres log, last lines:\n" + "\n".join(bench.pg.log().splitlines()[-40:]), file=sys.stderr)
        raise
    finally:
        bench.close()
    results = bench.results
    if RUN_CRITERION:
        results["criterion"] = criterion()
    results["machine"] = machine()
    results["date"] = time.strftime("%Y-%m-%d")
    text = report(results)
    print(text)
    (OUT / "results.md").write_text(text)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    chart(results, OUT / "results.png")


if __name__ == "__main__":
    main()
