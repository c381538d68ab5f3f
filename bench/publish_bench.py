"""wal_listener.publish() benchmark (GitHub issue 22): what a transaction pays
to send a message with publish(), next to the same transaction without a
message and with a transactional-outbox insert instead. 4 client threads,
each running the same number of transactions, for three workloads:

  a) baseline: INSERT INTO orders(body) VALUES (<payload>)
  b) outbox:   the same + INSERT INTO outbox(subject, payload, headers)
  c) publish:  the same + SELECT wal_listener.publish(<subject>, <payload>, <headers>)

Per workload: transactions/s (wall clock), CPU of the 4 client backends per
transaction, WAL bytes per transaction, and what the worker and its
walsender spend to put the workload's messages into JetStream; for (c) the
end-to-end rate of the publish() messages. Ratios against (a) of the same
run. Prints a markdown report and writes bench/publish_results.md.

Environment: WAL_LISTENER_PG (default 15) the PostgreSQL version;
WL_BENCH_SCALE (default 1: 5,000 transactions per client) scales the
transactions; WL_BENCH_ONLY (default a,b,c) the workloads to run, e.g. a,b.
"""

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import nats  # noqa: E402
import psycopg  # noqa: E402

from bench import bench_cluster, cpu_seconds, machine  # noqa: E402
from harness import Postgres, wait_until  # noqa: E402

SCALE = float(os.environ.get("WL_BENCH_SCALE", "1"))
PG_VERSION = os.environ.get("WAL_LISTENER_PG", "15")
ONLY = [w.strip() for w in os.environ.get("WL_BENCH_ONLY", "a,b,c").split(",") if w.strip()]
CLIENTS = 4
TX_PER_CLIENT = max(50, int(5000 * SCALE))
WARMUP_TX = min(100, TX_PER_CLIENT)  # per client, before the measured part
STREAM = "wal_listener"
# Row events go to <topic>.<topic_prefix><schema>_<table> (topic_prefix '' by default).
ORDERS_SUBJECT = f"{STREAM}.public_orders"
OUTBOX_SUBJECT = f"{STREAM}.public_outbox"
PUBLISH_SUBJECT = f"{STREAM}.orders.created"
HEADERS = '{"type":"order"}'
OUT = Path(__file__).resolve().parent

SETUP_SQL = """
CREATE TABLE orders (id bigserial, body jsonb);
CREATE TABLE outbox (id bigserial, subject text, payload jsonb, headers jsonb, created_at timestamptz DEFAULT now());
"""

INSERT_ORDER = "INSERT INTO orders(body) VALUES (%s::jsonb)"
INSERT_OUTBOX = "INSERT INTO outbox(subject, payload, headers) VALUES (%s::text, %s::jsonb, %s::jsonb)"
PUBLISH = "SELECT wal_listener.publish(%s::text, %s::jsonb, %s::jsonb)"

WORKLOADS = {
    "a": "baseline: insert into orders",
    "b": "outbox: + insert into outbox",
    "c": "publish: + wal_listener.publish()",
}


def payload(client: int, i: int) -> str:
    """An order of ~200 bytes of JSON (jsonb::text form), different per transaction."""
    order = client * 10_000_000 + i
    return json.dumps({
        "order_id": order, "customer": f"cust-{order % 100_000:06d}", "currency": "EUR",
        "total": f"{(order % 9973) / 7:.2f}",
        "items": [{"sku": f"SKU-{order % 997:05d}", "qty": 1 + order % 3, "price": "19.99"},
                  {"sku": f"SKU-{order % 991:05d}", "qty": 1, "price": "4.50"}],
        "ship_to": "DE-10115",
    })


async def _subject_counts(url: str) -> tuple[dict, int, int]:
    """Per-subject message counts of the stream, its message count and last sequence."""
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        try:
            state = (await nc.jetstream().stream_info(STREAM, subjects_filter=f"{STREAM}.>")).state
        except nats.js.errors.NotFoundError:
            return {}, 0, 0
        return dict(state.subjects or {}), state.messages, state.last_seq
    finally:
        await nc.close()


def subject_counts(url: str) -> tuple[dict, int, int]:
    return asyncio.run(_subject_counts(url))


async def _stored_message(url: str, seq: int | None = None, subject: str | None = None):
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        return await (js.get_last_msg(STREAM, subject) if subject else js.get_msg(STREAM, seq))
    finally:
        await nc.close()


def stored_message(url: str, seq: int | None = None, subject: str | None = None):
    return asyncio.run(_stored_message(url, seq, subject))


class Client(threading.Thread):
    """One client: an autocommit-off connection, one transaction per call;
    WARMUP_TX transactions, then waits at `ready` and `go`, then `count`."""

    def __init__(self, pg: Postgres, index: int, workload: str, count: int, ready, go):
        super().__init__(daemon=True)
        self.index, self.workload, self.count = index, workload, count
        self.ready, self.go = ready, go
        self.error = None
        self.conn = psycopg.connect(host=str(pg.dir), port=pg.port, user="postgres", dbname="app", autocommit=False)
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.conn.commit()

    def transaction(self, cur, i: int):
        body = payload(self.index, i)
        cur.execute(INSERT_ORDER, (body,))
        if self.workload == "b":
            cur.execute(INSERT_OUTBOX, (PUBLISH_SUBJECT, body, HEADERS))
        elif self.workload == "c":
            cur.execute(PUBLISH, (PUBLISH_SUBJECT, body, HEADERS))
        self.conn.commit()

    def run(self):
        try:
            with self.conn.cursor() as cur:
                for i in range(WARMUP_TX):
                    self.transaction(cur, 1_000_000 + i)
                self.ready.wait()
                self.go.wait()
                for i in range(self.count):
                    self.transaction(cur, i)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
            self.ready.abort()
            self.go.abort()


class PublishBench:
    def __init__(self):
        # Checkpoints are kept out of the timed parts (and one runs before each).
        self.pg, self.nats, self.nats_port = bench_cluster()
        self.pg.execute(SETUP_SQL)
        self.pg.execute("CREATE EXTENSION wal_listener")
        self.pg.wait_for_state("streaming", 60)
        publication = self.pg.execute(
            "SELECT p.pubname, p.puballtables, "
            "       array(SELECT t.tablename::text FROM pg_publication_tables t WHERE t.pubname = p.pubname "
            "              AND t.tablename IN ('orders', 'outbox') ORDER BY 1) AS tables "
            "FROM pg_publication p WHERE p.pubname = current_setting('wal_listener.publication')")
        settings = self.pg.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', "
            "'wal_listener.publish_mode', 'wal_listener.transaction_end_events', 'full_page_writes', "
            "'wal_listener.max_publish_bytes', 'wal_listener.publish_subjects') ORDER BY name")
        self.results = {
            "scale": SCALE, "clients": CLIENTS, "tx_per_client": TX_PER_CLIENT, "warmup_tx_per_client": WARMUP_TX,
            "pg_version": PG_VERSION, "payload_bytes": len(payload(0, 0)),
            "publication": publication[0] if publication else None,
            "settings": {r["name"]: r["setting"] for r in settings},
            "workloads": {},
        }

    def close(self):
        if self.nats:
            self.nats.destroy()
        self.pg.destroy()

    def lsn(self) -> str:
        return self.pg.execute("SELECT pg_current_wal_lsn()::text AS lsn")[0]["lsn"]

    def slot_confirmed(self, lsn: str) -> bool:
        return self.pg.execute(
            "SELECT coalesce(confirmed_flush_lsn >= %s::pg_lsn, false) AS ok FROM wal_listener.status()",
            (lsn,))[0]["ok"]

    def settle(self, what: str):
        """Waits until the worker confirmed all WAL written so far."""
        lsn = self.lsn()
        wait_until(lambda: self.slot_confirmed(lsn), 300, f"the worker to confirm {lsn} ({what})", 0.05)

    def streaming_pids(self) -> tuple[int, int]:
        """The worker's pid (wal_listener.status()) and its walsender's
        (pg_stat_replication, application_name 'wal_listener', serving the slot)."""
        status = self.pg.status()
        if status["state"] != "streaming":
            raise RuntimeError(f"worker not streaming: {status}")
        rows = self.pg.execute(
            "SELECT r.pid, s.slot_name IS NOT NULL AS serves_slot FROM pg_stat_replication r "
            "LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid AND s.slot_name = %s "
            "WHERE r.application_name = 'wal_listener' ORDER BY 2 DESC", (status["slot"],))
        if not rows:
            raise RuntimeError("no walsender with application_name 'wal_listener' in pg_stat_replication")
        return status["pid"], rows[0]["pid"]

    def run(self, key: str):
        count = CLIENTS * TX_PER_CLIENT
        print(f"== {key}) {WORKLOADS[key]}: {CLIENTS} clients x {TX_PER_CLIENT:,} transactions", flush=True)
        self.pg.execute("TRUNCATE orders, outbox")
        self.pg.execute("CHECKPOINT")
        ready = threading.Barrier(CLIENTS + 1)
        go = threading.Barrier(CLIENTS + 1)
        clients = [Client(self.pg, i, key, TX_PER_CLIENT, ready, go) for i in range(CLIENTS)]
        try:
            for c in clients:
                c.start()
            try:
                ready.wait(timeout=600)
            except threading.BrokenBarrierError:
                raise next(c.error for c in clients if c.error) from None
            # The warm-up's messages published and confirmed: the worker idle at the start.
            self.settle("warm-up")
            time.sleep(1.2)  # status() is copied from the worker about once a second
            published_before = self.pg.status()["events_published"]
            worker, walsender = self.streaming_pids()
            counts_before, messages_before, _ = subject_counts(self.nats.url)
            lsn_before = self.lsn()
            backend_before = sum(cpu_seconds(c.pid) for c in clients)
            worker_before, walsender_before = cpu_seconds(worker), cpu_seconds(walsender)
            process_before = time.process_time()
            t0_wall, t0 = time.time(), time.monotonic()
            try:
                go.wait(timeout=60)
            except threading.BrokenBarrierError:
                raise next(c.error for c in clients if c.error) from None
            for c in clients:
                c.join()
            elapsed = time.monotonic() - t0
            t1_wall = time.time()
            errors = [c.error for c in clients if c.error]
            if errors:
                raise errors[0]
            backend_s = sum(cpu_seconds(c.pid) for c in clients) - backend_before
            process_s = time.process_time() - process_before
            lsn_after = self.lsn()
        finally:
            for c in clients:
                c.conn.close()
        wal_bytes = int(self.pg.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn) AS d",
                                        (lsn_after, lsn_before))[0]["d"])

        # Every message of the workload in JetStream: the subjects' counts reached.
        expected = {ORDERS_SUBJECT: count}
        if key == "b":
            expected[OUTBOX_SUBJECT] = count
        if key == "c":
            expected[PUBLISH_SUBJECT] = count

        def arrived():
            counts, _, _ = subject_counts(self.nats.url)
            return all(counts.get(s, 0) - counts_before.get(s, 0) >= n for s, n in expected.items())

        try:
            wait_until(arrived, 1800, f"{expected} new messages in stream {STREAM}", 0.05)
        except TimeoutError:
            counts, _, _ = subject_counts(self.nats.url)
            raise TimeoutError(f"stream subjects before {counts_before}, now {counts}; expected new {expected}; "
                               f"status {self.pg.status()}") from None
        seen_wall = time.time()
        self.settle("the workload")  # confirmed too: the worker's CPU of the workload, whole
        worker_s, walsender_s = cpu_seconds(worker) - worker_before, cpu_seconds(walsender) - walsender_before
        pids_after = self.streaming_pids()
        counts, messages_after, last_seq = subject_counts(self.nats.url)
        messages = messages_after - messages_before
        try:
            wait_until(lambda: self.pg.status()["events_published"] - published_before >= messages, 5,
                       "status().events_published to count the workload")
        except TimeoutError:
            pass  # reported as it is
        status = self.pg.status()
        new = {s: counts.get(s, 0) - counts_before.get(s, 0) for s in set(counts) | set(counts_before)}
        new = {s: n for s, n in sorted(new.items()) if n}
        last_stored = stored_message(self.nats.url, seq=last_seq).time.timestamp()
        row = {
            "name": WORKLOADS[key], "transactions": count, "seconds": elapsed, "tps": count / elapsed,
            "backend_us_per_tx": backend_s * 1e6 / count, "wal_bytes_per_tx": wal_bytes / count,
            "client_process_us_per_tx": process_s * 1e6 / count,
            "messages": messages, "messages_by_subject": new,
            "events_published": status["events_published"] - published_before,
            "e2e_s": last_stored - t0_wall, "drain_after_load_s": last_stored - t1_wall,
            "seen_after_load_s": seen_wall - t1_wall,
            "e2e_messages_per_s": messages / (last_stored - t0_wall),
            "worker_us_per_message": worker_s * 1e6 / messages, "walsender_us_per_message": walsender_s * 1e6 / messages,
            "worker_us_per_tx": worker_s * 1e6 / count, "walsender_us_per_tx": walsender_s * 1e6 / count,
            "pids_changed": pids_after != (worker, walsender),
            "last_error": status["last_error"],
        }
        if key == "c":
            last = stored_message(self.nats.url, subject=PUBLISH_SUBJECT)
            row["publish_e2e_messages_per_s"] = count / (last.time.timestamp() - t0_wall)
            row["publish_message"] = {"headers": dict(last.headers or {}), "body_bytes": len(last.data),
                                      "body_is_json": _is_json(last.data)}
        print(json.dumps(row), flush=True)
        self.results["workloads"][key] = row


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def report(results: dict) -> str:
    work = results["workloads"]
    base = work.get("a")
    s = results["settings"]

    def ratio(row, field, fmt):
        value = f"{row[field]:{fmt}}"
        return f"{value} ({row[field] / base[field]:.2f}×)" if base and row is not base else value

    pub = results["publication"]
    pub_text = (f"publication `{pub['pubname']}` {'FOR ALL TABLES' if pub['puballtables'] else 'of some tables'}, "
                f"holding {', '.join(pub['tables']) or 'neither orders nor outbox'}" if pub else "no publication")
    lines = [
        f"Machine: {results['machine']}. Scale {results['scale']}; {results['date']}. "
        f"fsync {s.get('fsync')}, synchronous_commit {s.get('synchronous_commit')}, "
        f"publish_mode {s.get('wal_listener.publish_mode')}, {pub_text}: the row events of orders (and outbox) "
        f"are streamed in every workload. Payload {results['payload_bytes']} bytes of JSON; "
        f"{results['clients']} clients × {results['tx_per_client']:,} transactions each "
        f"(after {results['warmup_tx_per_client']} warm-up transactions each).", "",
        "| workload | transactions | tx/s (× a) | backend CPU µs/tx (× a) | WAL bytes/tx (× a) "
        "| messages stored | end to end msg/s | drained s after load | worker µs/msg | walsender µs/msg |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for key, row in work.items():
        lines.append(
            f"| {key}) {row['name']} | {row['transactions']:,} | {ratio(row, 'tps', ',.0f')} "
            f"| {ratio(row, 'backend_us_per_tx', ',.1f')} | {ratio(row, 'wal_bytes_per_tx', ',.0f')} "
            f"| {row['messages']:,} | {row['e2e_messages_per_s']:,.0f} | {max(row['drain_after_load_s'], 0):.2f} "
            f"| {row['worker_us_per_message']:.1f} | {row['walsender_us_per_message']:.1f} |")
    lines += ["", "| workload | messages by subject | worker µs/tx | walsender µs/tx | client (Python) CPU µs/tx "
              "| status().events_published | last_error |", "|---|---|--:|--:|--:|--:|---|"]
    for key, row in work.items():
        subjects = ", ".join(f"{s}: {n:,}" for s, n in row["messages_by_subject"].items())
        lines.append(f"| {key} | {subjects} | {row['worker_us_per_tx']:.1f} | {row['walsender_us_per_tx']:.1f} "
                     f"| {row['client_process_us_per_tx']:.1f} | {row['events_published']:,} "
                     f"| {row['last_error'] or '-'} |")
    if "c" in work:
        c = work["c"]
        m = c["publish_message"]
        lines += ["", f"publish(): {c['transactions']:,} messages on `{PUBLISH_SUBJECT}`, from the start of the load "
                  f"until the last one was stored in JetStream: {c['publish_e2e_messages_per_s']:,.0f} msg/s end to end "
                  f"({c['e2e_s']:.2f} s; the load itself took {c['seconds']:.2f} s). Last message: "
                  f"{m['body_bytes']} body bytes ({'JSON' if m['body_is_json'] else 'not JSON'}), headers "
                  f"{', '.join(sorted(m['headers']))}."]
    odd = [f"{k}: the worker or walsender pid changed during the run" for k, r in work.items() if r["pids_changed"]]
    if odd:
        lines += ["", "Note: " + "; ".join(odd) + "."]
    lines += [
        "", "Columns: tx/s = transactions ÷ wall time of the 4 clients from a common start to the last commit; "
        "backend CPU = utime + stime (`/proc/<pid>/stat`) of the 4 client backends (`pg_backend_pid()`) over the "
        "load ÷ transactions; WAL bytes = `pg_current_wal_lsn()` after − before ÷ transactions (a CHECKPOINT before "
        "each workload, so the full-page images are alike); messages stored = new messages in stream "
        f"`{STREAM}` (row events + publish() messages); end to end msg/s = those ÷ (JetStream's stored time of the "
        "last − start of the load), the worker streaming while the clients write; drained s after load = stored time "
        "of the last message − end of the load; worker / walsender µs/msg = CPU of the worker "
        "(`wal_listener.status().pid`) and of its walsender (`pg_stat_replication`, application_name "
        "`wal_listener`) from the start of the load until the slot confirmed everything, ÷ messages stored. "
        "No relay drains the outbox in (b): its cost on the write path only (bench/bench.py measures a relay). "
        "Orders and outbox are emptied (TRUNCATE) before each workload.",
    ]
    return "\n".join(lines) + "\n"


def main():
    unknown = set(ONLY) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"WL_BENCH_ONLY: unknown workloads {sorted(unknown)} (known: a, b, c)")
    started = time.monotonic()
    bench = PublishBench()
    try:
        for key in WORKLOADS:
            if key in ONLY:
                bench.run(key)
    except BaseException:
        print("== Postgres log, last lines:\n" + "\n".join(bench.pg.log().splitlines()[-40:]), file=sys.stderr)
        raise
    finally:
        bench.close()
    results = bench.results
    results["machine"] = machine()
    results["date"] = time.strftime("%Y-%m-%d")
    text = report(results)
    text += f"\nTotal run time {time.monotonic() - started:.0f} s.\n"
    print(text)
    (OUT / "publish_results.md").write_text(text)


if __name__ == "__main__":
    main()
