"""wal_listener.publish(): messages written in a transaction and published
by the worker at its commit, in commit order with the row events.

Covers the three overloads (body exactly the payload), the caller's headers
and the worker's (Nats-Msg-Id, WL-Commit-LSN, WL-Commit-Time), rollbacks,
savepoints and two-phase commit, the order within and across transactions,
kill -9 of the worker (every message once), the checks at call time (each
error with its SQLSTATE, nothing sent), who may call it and which subjects
(wal_listener.publish_subjects), forged messages, atomic batches in
publish_mode = transaction, the WL-* headers of row and END events, and a
message no stream stores (held, not skipped). Messages are read with their
raw NATS headers (nats-py's dict keeps one value of a repeated header)."""

import asyncio
import base64
import json
import os
import re
import signal
import threading
import time
from collections import Counter

import nats
import psycopg
import pytest

from harness import Writer, stream_count, wait_until

LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
COMMIT_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
MSG = "wal_listener.msg"  # the subjects the tests publish to (stored by the worker's stream)


class Stored:
    """One message a stream stores, with its headers as (name, value) pairs
    in the order NATS holds them."""

    def __init__(self, seq: int, subject: str, headers: list[tuple[str, str]], data: bytes, stored_at: str):
        self.seq, self.subject, self.headers, self.data, self.stored_at = seq, subject, headers, data, stored_at

    @property
    def is_message(self) -> bool:
        """A publish() message (not a row or END event)."""
        return not self.subject.startswith("wal_listener.") or self.subject.startswith(MSG + ".")

    @property
    def body(self) -> dict:
        return json.loads(self.data)

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str:
        values = self.values(name)
        assert len(values) == 1, f"header {name}: {values} in {self.headers}"
        return values[0]

    def commit_lsn(self) -> str:
        """The commit LSN: WL-Commit-LSN of a message, the body's lsn of an event."""
        return self.header("WL-Commit-LSN") if self.is_message else self.body["lsn"]

    def __repr__(self):
        return f"Stored({self.seq}, {self.subject}, {self.data[:80]!r})"


def _parse_headers(hdrs: str | None) -> list[tuple[str, str]]:
    if not hdrs:
        return []
    lines = base64.b64decode(hdrs).decode().split("\r\n")
    assert lines[0].startswith("NATS/1.0"), lines
    pairs = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            pairs.append((name.strip(), value.strip()))
    return pairs


async def _stored(url: str, stream: str) -> list[Stored]:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        try:
            info = await nc.jetstream().stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        if info.state.messages == 0:
            return []
        messages = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode(), timeout=5)
            answer = json.loads(reply.data)
            assert "error" not in answer, answer
            m = answer["message"]
            messages.append(Stored(m["seq"], m["subject"], _parse_headers(m.get("hdrs")),
                                   base64.b64decode(m.get("data") or ""), m["time"]))
        return messages
    finally:
        await nc.close()


def stored(url: str, stream: str = "wal_listener") -> list[Stored]:
    """Every message of `stream`, in stream order."""
    return asyncio.run(_stored(url, stream))


def wait_for_stored(url: str, predicate, what: str, stream: str = "wal_listener", timeout: float = 30) -> list[Stored]:
    """Polls the stream until `predicate(messages)` holds; returns the messages."""
    return wait_until(lambda: (ms := stored(url, stream)) and predicate(ms) and ms, timeout, what, 0.1)


def commit_marker(cluster, url: str, label: str, timeout: float = 30) -> list[Stored]:
    """Commits a row into `marker` and waits until its event is stored: the
    worker has then passed everything committed before it. Returns the stream."""
    cluster.execute("CREATE TABLE IF NOT EXISTS marker (label text PRIMARY KEY)")
    cluster.execute("INSERT INTO marker VALUES (%s)", (label,))
    return wait_for_stored(url, lambda ms: any(is_marker(m, label) for m in ms), f"marker {label!r}", timeout=timeout)


def is_marker(m: Stored, label: str | None = None) -> bool:
    return (m.subject == "wal_listener.public_marker"
            and (label is None or m.body["data"]["label"] == label))


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def publish_sql(subject: str, payload_sql: str, headers: str | None = None) -> str:
    return (f"SELECT wal_listener.publish('{subject}', {payload_sql}"
            + (f", '{headers}'::jsonb" if headers is not None else "") + ")")


def messages(ms: list[Stored]) -> list[Stored]:
    return [m for m in ms if m.is_message]


def reload_until(cluster, setting: str, value: str):
    """After ALTER SYSTEM + pg_reload_conf: waits until new sessions see it."""
    wait_until(lambda: cluster.execute(f"SHOW {setting}")[0][setting] == value, 10, f"{setting} = {value}")


def text(e: psycopg.Error) -> str:
    """The error's message (its str() may carry a backtrace in DETAIL)."""
    return e.diag.message_primary or ""


def error_of(cluster, sql: str, user: str = "postgres") -> psycopg.Error:
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user=user, dbname="app", autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(sql)
    return raised.value


def backfill_whole(cluster, table: str):
    """Backfills `table` and waits until the job is done."""
    backfill = cluster.execute("SELECT wal_listener.backfill(%s) AS id", (table,))[0]["id"]
    state = "SELECT state FROM wal_listener.backfills WHERE id = %s"
    wait_until(lambda: cluster.execute(state, (backfill,))[0]["state"] == "done", 60, "the backfill")


def check_event_headers(e: Stored):
    """The WL-* headers of a row or END event equal its body."""
    body = e.body
    assert e.header("WL-Action") == body["action"], e.headers
    assert e.header("WL-Commit-LSN") == body["lsn"], e.headers
    assert e.header("WL-Commit-Time") == body["commitTime"], e.headers
    if body["action"] != "END":
        assert e.header("WL-Schema") == body["schema"], e.headers
        assert e.header("WL-Table") == body["table"], e.headers
    assert e.header("Nats-Msg-Id") == body["id"]


def test_a_committed_publish_arrives_with_the_payload_as_is_the_callers_headers_and_its_commit(streaming, nats_server):
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY)")
    jsonb_in = '{"b": [1, 2.50, null], "a": "é \\"q\\"", "c": {}}'
    headers = {"X-Trace": "abc-123", "X-Multi": ["one", "two"], "X-Note": "héllo wörld ✓"}
    utf8 = "grüße ✓ 日本 😀"
    with cluster.connect() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("SELECT wal_listener.publish(%s, %s::jsonb, %s::jsonb)",
                         (f"{MSG}.json", jsonb_in, json.dumps(headers)))
            conn.execute("SELECT wal_listener.publish(%s, %s::text)", (f"{MSG}.text", utf8))
            conn.execute("SELECT wal_listener.publish(%s, %s::bytea)", (f"{MSG}.bytes", b"\x00\xffA\xff\x00"))
            conn.execute(f"SELECT wal_listener.publish('{MSG}.empty', '')")  # unknown literal: the text overload
            conn.execute(f"SELECT wal_listener.publish('{MSG}.literal', '{{\"b\":1,  \"a\":2}}')")  # not jsonb
            conn.execute(f"SELECT wal_listener.publish('{MSG}.literal', '\\x00ff')")  # not bytea
            conn.execute("INSERT INTO t VALUES (2)")
    jsonb_text = cluster.execute("SELECT %s::jsonb::text AS t", (jsonb_in,))[0]["t"]
    assert jsonb_text == '{"a": "é \\"q\\"", "b": [1, 2.50, null], "c": {}}'  # as Postgres prints it

    # A transaction of one publish and nothing else.
    before = cluster.execute("SELECT pg_current_wal_lsn()::text AS l")[0]["l"]
    cluster.execute(f"SELECT wal_listener.publish('{MSG}.alone', 'alone')")
    after = cluster.execute("SELECT pg_current_wal_lsn()::text AS l")[0]["l"]

    ms = commit_marker(cluster, nats_server.url, "end")
    assert [(m.subject, m.data if m.is_message else m.body["data"]) for m in ms] == [
        ("wal_listener.public_t", {"id": 1}),
        (f"{MSG}.json", jsonb_text.encode()),
        (f"{MSG}.text", utf8.encode()),
        (f"{MSG}.bytes", b"\x00\xffA\xff\x00"),
        (f"{MSG}.empty", b""),
        (f"{MSG}.literal", b'{"b":1,  "a":2}'),
        (f"{MSG}.literal", b"\\x00ff"),
        ("wal_listener.public_t", {"id": 2}),
        (f"{MSG}.alone", b"alone"),
        ("wal_listener.public_marker", {"label": "end"}),
    ]
    row1, json_msg, text_msg, bytes_msg, empty_msg, literal1, literal2, row2, alone, _ = ms
    tx_messages = [json_msg, text_msg, bytes_msg, empty_msg, literal1, literal2]
    assert json_msg.header("X-Trace") == "abc-123"
    assert json_msg.header("X-Note") == "héllo wörld ✓"
    assert json_msg.values("X-Multi") == ["one", "two"], json_msg.headers  # an array: a repeated header
    for m in tx_messages:
        assert m.header("WL-Commit-LSN") == row1.body["lsn"] == row2.body["lsn"]
        assert m.header("WL-Commit-Time") == row1.body["commitTime"]
        assert m.values("WL-Action") == [], "a message is not a row event"
    for m in tx_messages[1:]:
        assert m.values("X-Trace") == [], "headers of one call only"
    msg_ids = [m.header("Nats-Msg-Id") for m in tx_messages + [alone]]
    assert all(msg_ids) and len(set(msg_ids)) == 7, msg_ids
    assert not set(msg_ids) & {row1.body["id"], row2.body["id"]}
    assert LSN.match(alone.header("WL-Commit-LSN")) and COMMIT_TIME.match(alone.header("WL-Commit-Time"))
    assert lsn_int(before) <= lsn_int(alone.header("WL-Commit-LSN")) <= lsn_int(after)
    assert alone.header("WL-Commit-Time") >= row1.body["commitTime"]


def test_rolled_back_transactions_and_savepoints_send_nothing(streaming, nats_server):
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int)")
    with cluster.connect() as conn:
        with conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute(f"SELECT wal_listener.publish('{MSG}.x', 'rolled back')")
        with conn.transaction():
            conn.execute(f"SELECT wal_listener.publish('{MSG}.x', 'before the savepoint')")
            with pytest.raises(psycopg.errors.RaiseException):
                with conn.transaction():  # SAVEPOINT ... ROLLBACK TO SAVEPOINT
                    conn.execute(f"SELECT wal_listener.publish('{MSG}.x', 'in the rolled-back savepoint')")
                    conn.execute("INSERT INTO t VALUES (2)")
                    conn.execute("DO $$ BEGIN RAISE EXCEPTION 'roll back'; END $$")
            with conn.transaction():  # SAVEPOINT ... RELEASE
                conn.execute(f"SELECT wal_listener.publish('{MSG}.x', 'in a released savepoint')")
            conn.execute(f"""DO $$ BEGIN
                BEGIN
                    PERFORM wal_listener.publish('{MSG}.x', 'in a failed exception block');
                    RAISE EXCEPTION 'undo';
                EXCEPTION WHEN OTHERS THEN NULL;
                END;
                PERFORM wal_listener.publish('{MSG}.x', 'after the savepoint');
            END $$""")
    ms = commit_marker(cluster, nats_server.url, "after")
    assert [m.data.decode() for m in messages(ms)] == [
        "before the savepoint", "in a released savepoint", "after the savepoint"]
    assert [m.body["data"] for m in ms if not m.is_message] == [{"label": "after"}]


def test_two_phase_commit_sends_at_commit_prepared_and_never_after_rollback_prepared(make_cluster, nats_server):
    cluster = make_cluster(server_settings={"max_prepared_transactions": "5"})
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE TABLE t (id int)")
    with cluster.connect() as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute(f"SELECT wal_listener.publish('{MSG}.x', 'prepared then committed')")
        conn.execute("PREPARE TRANSACTION 'p1'")
        conn.execute("BEGIN")
        conn.execute(f"SELECT wal_listener.publish('{MSG}.x', 'prepared then rolled back')")
        conn.execute("PREPARE TRANSACTION 'p2'")
    ms = commit_marker(cluster, nats_server.url, "while prepared")
    assert messages(ms) == [], "sent before COMMIT PREPARED"
    cluster.execute("ROLLBACK PREPARED 'p2'")
    cluster.execute("COMMIT PREPARED 'p1'")
    ms = commit_marker(cluster, nats_server.url, "after")
    assert [(m.subject, m.data if m.is_message else m.body["data"]) for m in ms] == [
        ("wal_listener.public_marker", {"label": "while prepared"}),
        ("wal_listener.public_t", {"id": 1}),
        (f"{MSG}.x", b"prepared then committed"),
        ("wal_listener.public_marker", {"label": "after"}),
    ]
    assert ms[2].header("WL-Commit-LSN") == ms[1].body["lsn"]
    assert ms[2].header("WL-Commit-Time") == ms[1].body["commitTime"]


def test_concurrent_transactions_publish_every_message_once_in_commit_order(streaming, nats_server):
    cluster = streaming
    cluster.execute("CREATE TABLE conc (thread int, n int, PRIMARY KEY (thread, n))")
    # Commit order, not call order: a publish() called first and committed second comes second.
    with cluster.connect() as a, cluster.connect() as b:
        a.execute("BEGIN")
        a.execute(publish_sql(f"{MSG}.order", "'called first, committed second'"))
        b.execute("BEGIN")
        b.execute(publish_sql(f"{MSG}.order", "'called second, committed first'"))
        b.execute("COMMIT")
        a.execute("COMMIT")
    threads, per_thread = 4, 50
    errors = []

    def write(thread: int):
        try:
            with cluster.connect() as conn:
                for n in range(per_thread):
                    with conn.transaction():
                        conn.execute("INSERT INTO conc VALUES (%s, %s)", (thread, n))
                        conn.execute("SELECT wal_listener.publish(%s, jsonb_build_object('thread', %s::int, "
                                     "'n', %s::int))", (f"{MSG}.conc", thread, n))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    writers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert not errors, errors
    ms = commit_marker(cluster, nats_server.url, "end", timeout=60)
    assert [m.data for m in ms if m.subject == f"{MSG}.order"] == [
        b"called second, committed first", b"called first, committed second"]
    msgs = [m for m in ms if m.subject == f"{MSG}.conc"]
    payloads = [json.loads(m.data) for m in msgs]
    keys = [(p["thread"], p["n"]) for p in payloads]
    assert Counter(keys) == Counter((t, n) for t in range(threads) for n in range(per_thread)), "lost or twice"
    # Stream order is commit order: commit LSNs increase along the stream.
    lsns = [lsn_int(m.commit_lsn()) for m in ms]
    assert lsns == sorted(lsns), "stream order is not commit order"
    msg_lsns = [lsn_int(m.header("WL-Commit-LSN")) for m in msgs]
    assert len(set(msg_lsns)) == len(msg_lsns)
    for thread in range(threads):
        assert [n for t, n in keys if t == thread] == list(range(per_thread)), f"thread {thread} out of order"
    switches = sum(a != b for (a, _), (b, _) in zip(keys, keys[1:]))
    assert switches >= threads, f"the threads' transactions hardly interleaved ({switches} switches)"
    # Each message right after its own transaction's row.
    for i, m in enumerate(ms):
        if m.subject == f"{MSG}.conc":
            row = ms[i - 1]
            p = json.loads(m.data)
            assert not row.is_message and row.body["data"] == p, (row, m)
            assert row.body["lsn"] == m.header("WL-Commit-LSN") and row.body["commitTime"] == m.header("WL-Commit-Time")


class PublishingWriter(Writer):
    """Commits numbers first..first+count-1, each as a row of `load` and a
    message with the number as payload. A retry whose first attempt did
    commit finds the row and publishes nothing, so the table is the truth."""

    def __init__(self, cluster, first: int, count: int):
        super().__init__(cluster)
        self.next, self.last = first, first + count - 1
        self.committed = 0

    def step(self, conn):
        if self.next > self.last:
            self.stopped.set()
            return
        with conn.transaction():
            inserted = conn.execute("INSERT INTO load VALUES (%s) ON CONFLICT DO NOTHING", (self.next,)).rowcount
            if inserted:
                conn.execute("SELECT wal_listener.publish(%s, %s::text)", (f"{MSG}.load", str(self.next)))
        self.next += 1
        self.committed += 1
        time.sleep(0.003)


def test_kill_9_of_the_worker_while_writers_publish_sends_every_message_exactly_once(streaming, nats_server):
    cluster = streaming
    cluster.execute("CREATE TABLE load (n int PRIMARY KEY)")
    writers = [PublishingWriter(cluster, 1 + 100_000 * i, 250) for i in range(2)]
    for w in writers:
        w.start()
    wait_until(lambda: sum(w.committed for w in writers) >= 150, 60, "150 transactions")
    log_at_kill = len(cluster.log())
    os.kill(cluster.worker_pid(), signal.SIGKILL)  # the postmaster then resets the whole cluster
    stored_at_kill = stream_count(nats_server.url)
    for w in writers:
        w.join(120)
    assert all(not w.is_alive() for w in writers), "writers did not finish"
    cluster.wait_for_state("streaming", timeout=60)
    rows = sorted(r["n"] for r in cluster.execute("SELECT n FROM load"))
    assert len(rows) == 500
    ms = commit_marker(cluster, nats_server.url, "end", timeout=120)
    counts = Counter(int(m.data) for m in messages(ms))
    assert sorted(counts) == rows, "lost messages"
    assert [n for n, c in counts.items() if c > 1] == [], "messages stored twice"
    row_events = Counter(m.body["data"]["n"] for m in ms if m.subject == "wal_listener.public_load")
    assert sorted(row_events) == rows and max(row_events.values()) == 1
    assert "terminated by signal 9" in cluster.log()[log_at_kill:]
    # How many stored messages the new worker sent again (JetStream dropped them as duplicates).
    resumed = re.findall(r'streaming slot "wal_listener" from ([0-9A-F]+/[0-9A-F]+)', cluster.log()[log_at_kill:])
    replayed = [m for m in messages(ms[:stored_at_kill]) if resumed and lsn_int(m.commit_lsn()) >= lsn_int(resumed[0])]
    print(f"\n{stored_at_kill} stored at the kill; the new worker resumed from {resumed[:1]}; "
          f"{len(replayed)} of the messages stored before the kill sent again and dropped as duplicates")


BAD_CALLS = [
    # (call, SQLSTATE, words the message must contain)
    ("publish(NULL, 'x')", "22004", "must not be NULL"),
    ("publish('wal_listener.a', NULL::text)", "22004", "must not be NULL"),
    ("publish('wal_listener.a', NULL::jsonb)", "22004", "must not be NULL"),
    ("publish('wal_listener.a', NULL::bytea)", "22004", "must not be NULL"),
    ("publish(NULL::text, '{}'::jsonb, '{\"X-A\": \"b\"}')", "22004", "must not be NULL"),
    ("publish('', 'x')", "22023", "subject"),
    ("publish('wal_listener.*', 'x')", "22023", "subject"),
    ("publish('wal_listener.>', 'x')", "22023", "subject"),
    ("publish('wal_listener.a.*.b', '{}'::jsonb)", "22023", "subject"),
    ("publish('wal_listener.a b', 'x')", "22023", "subject"),
    ("publish(E'wal_listener.a\\tb', 'x')", "22023", "subject"),
    ("publish(E'wal_listener.a\\nb', '\\x00'::bytea)", "22023", "subject"),
    ("publish('wal_listener..a', 'x')", "22023", "subject"),
    ("publish('wal_listener.a.', 'x')", "22023", "subject"),
    ("publish('wal_listener.' || repeat('a', 243), 'x')", "22023", "subject"),  # 256 bytes
    ("publish('wal_listener.a', 'x', '[\"X-A\", \"b\"]')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '\"X-A: b\"')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"X-A\": 1}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"X-A\": null}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"X-A\": {\"b\": \"c\"}}')", "22023", "header"),
    ("publish('wal_listener.a', '{}'::jsonb, '{\"X-A\": [\"b\", 2]}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"X:A\": \"b\"}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"X A\": \"b\"}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"\": \"b\"}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"X-é\": \"b\"}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"X-A\": \"b\\nc\"}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"X-A\": \"b\\rc\"}')", "22023", "header"),
    ("publish('wal_listener.a', '\\xff'::bytea, '{\"X-A\": [\"ok\", \"b\\nc\"]}')", "22023", "header"),
    ("publish('wal_listener.a', 'x', '{\"Nats-Msg-Id\": \"b\"}')", "22023", "reserved"),
    ("publish('wal_listener.a', 'x', '{\"nats-expected-stream\": \"b\"}')", "22023", "reserved"),
    ("publish('wal_listener.a', 'x', '{\"NATS-Batch-Id\": \"b\"}')", "22023", "reserved"),
    ("publish('wal_listener.a', 'x', '{\"WL-Action\": \"INSERT\"}')", "22023", "reserved"),
    ("publish('wal_listener.a', '{}'::jsonb, '{\"wl-commit-lsn\": \"0/1\"}')", "22023", "reserved"),
    # NATS clients take a message with these for a control message of the server.
    ("publish('wal_listener.a', '', '{\"Status\": \"404\"}')", "22023", "reserved"),
    ("publish('wal_listener.a', '', '{\"description\": \"x\"}')", "22023", "reserved"),
]


def test_bad_input_is_refused_with_its_sqlstate_and_sends_nothing(streaming, nats_server):
    cluster = streaming
    wrong = []
    with cluster.connect() as conn:
        for call, sqlstate, words in BAD_CALLS:
            try:
                conn.execute(f"SELECT wal_listener.{call}")
                wrong.append(f"{call}: no error")
            except psycopg.Error as e:
                if e.sqlstate != sqlstate or words.lower() not in text(e).lower():
                    wrong.append(f"{call}: {e.sqlstate} {text(e)}")
    assert wrong == [], "\n".join(wrong)
    # The longest subject allowed: 255 bytes.
    longest = f"{MSG}." + "a" * (255 - len(MSG) - 1)
    cluster.execute(publish_sql(longest, "'ok'", '{"X-A": "b"}'))
    ms = commit_marker(cluster, nats_server.url, "end")
    assert [(m.subject, m.data) for m in messages(ms)] == [(longest, b"ok")]
    assert len(ms) == 2


def test_max_publish_bytes_is_sighup_and_refuses_larger_payload_and_headers(streaming, nats_server):
    cluster = streaming
    for setting, value in [("max_publish_bytes", "2kB"), ("publish_subjects", "x.>")]:
        e = error_of(cluster, f"SET wal_listener.{setting} = '{value}'")
        assert e.sqlstate == "55P02", f"{setting}: {e.sqlstate} {text(e)}"  # cannot be changed now
    assert cluster.execute("SHOW wal_listener.max_publish_bytes") == [{"wal_listener.max_publish_bytes": "1MB"}]
    cluster.set(max_publish_bytes="1kB")
    reload_until(cluster, "wal_listener.max_publish_bytes", "1kB")
    big = [
        publish_sql(f"{MSG}.big", "repeat('x', 1100)"),
        publish_sql(f"{MSG}.big", "to_jsonb(repeat('x', 1100))"),
        publish_sql(f"{MSG}.big", "decode(repeat('ff', 1100), 'hex')"),
        publish_sql(f"{MSG}.big", "repeat('x', 500)", json.dumps({"X-Pad": "y" * 700})),
    ]
    for sql in big:
        e = error_of(cluster, sql)
        assert e.sqlstate == "54000" and "max_publish_bytes" in text(e), f"{sql}: {e.sqlstate} {text(e)}"
    cluster.execute(publish_sql(f"{MSG}.small", "repeat('x', 600)"))
    ms = commit_marker(cluster, nats_server.url, "end")
    assert [(m.subject, m.data) for m in messages(ms)] == [(f"{MSG}.small", b"x" * 600)]


def test_only_members_of_wal_listener_publisher_may_publish(streaming, nats_server):
    cluster = streaming
    assert cluster.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'wal_listener_publisher'") == [
        {"rolcanlogin": False}]
    cluster.execute("CREATE ROLE alice LOGIN")
    for payload in ["'x'", "'{}'::jsonb", "'\\x00'::bytea"]:
        e = error_of(cluster, publish_sql(f"{MSG}.alice", payload), user="alice")
        assert e.sqlstate == "42501" and "permission denied for function publish" in text(e), \
            f"{payload}: {e.sqlstate} {text(e)}"
    # Nor the function the overloads call.
    e = error_of(cluster, f"SELECT wal_listener._publish('{MSG}.alice', '\\x00'::bytea, NULL)", user="alice")
    assert e.sqlstate == "42501" and "permission denied for function _publish" in text(e), text(e)
    # publish() does not depend on PUBLIC's right to pg_logical_emit_message.
    # (Each signature: PostgreSQL 17 added a fourth argument.)
    cluster.execute("DO $$ DECLARE f regprocedure; BEGIN "
                    "FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname = 'pg_logical_emit_message' LOOP "
                    "EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f); END LOOP; END $$")
    cluster.execute("GRANT wal_listener_publisher TO alice")
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user="alice", dbname="app", autocommit=True) as conn:
        conn.execute(publish_sql(f"{MSG}.alice", "'from alice'", '{"X-By": "alice"}'))
    # SET ROLE: the member's rights, not the session user's.
    cluster.execute("CREATE ROLE bob LOGIN")
    with cluster.connect() as conn:
        conn.execute("SET ROLE bob")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function publish"):
            conn.execute(publish_sql(f"{MSG}.bob", "'from bob'"))
        conn.execute("SET ROLE alice")
        conn.execute(publish_sql(f"{MSG}.alice", "'alice again'"))
    ms = commit_marker(cluster, nats_server.url, "end")
    assert [(m.subject, m.data) for m in messages(ms)] == [(f"{MSG}.alice", b"from alice"),
                                                           (f"{MSG}.alice", b"alice again")]
    assert messages(ms)[0].header("X-By") == "alice"


async def _add_stream(url: str, name: str, subjects: list[str]):
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects)
    finally:
        await nc.close()


def test_publish_subjects_limits_the_subjects_a_caller_may_use(streaming, nats_server):
    cluster = streaming
    asyncio.run(_add_stream(nats_server.url, "ORDERS", ["orders.>"]))
    # Default '': <topic>.>
    e = error_of(cluster, publish_sql("other.x", "'x'"))
    assert e.sqlstate == "42501" and "publish_subjects" in text(e), f"{e.sqlstate} {text(e)}"
    e = error_of(cluster, publish_sql("orders.created", "'x'"))
    assert e.sqlstate == "42501" and "publish_subjects" in text(e), f"{e.sqlstate} {text(e)}"
    cluster.execute(publish_sql("wal_listener.x", "'default allows the topic'"))

    cluster.set(publish_subjects="orders.>, audit.*")
    reload_until(cluster, "wal_listener.publish_subjects", "orders.>, audit.*")
    cluster.execute(publish_sql("orders.created", "'{\"id\": 7}'::jsonb"))
    for subject in ["audit.a.b", "wal_listener.x", "orders", "other.x"]:
        e = error_of(cluster, publish_sql(subject, "'x'"))
        assert e.sqlstate == "42501" and "publish_subjects" in text(e), f"{subject}: {e.sqlstate} {text(e)}"
    with cluster.connect() as conn:
        with conn.transaction(force_rollback=True):  # allowed; no stream stores it, so not committed
            conn.execute(publish_sql("audit.a", "'x'"))
    ms = commit_marker(cluster, nats_server.url, "end")
    assert [(m.subject, m.data) for m in ms if not is_marker(m)] == [("wal_listener.x", b"default allows the topic")]
    orders = wait_for_stored(nats_server.url, lambda ms: ms, "the ORDERS message", stream="ORDERS", timeout=10)
    assert [(m.subject, m.data) for m in orders] == [("orders.created", b'{"id": 7}')]


def test_a_forged_message_is_ignored_and_streaming_continues(streaming, nats_server):
    cluster = streaming
    cluster.execute("CREATE TABLE t (id int)")
    log_before = len(cluster.log())
    cluster.execute("SELECT pg_logical_emit_message(true, 'wal_listener.publish', 'anything')")
    with cluster.connect() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("SELECT pg_logical_emit_message(true, 'wal_listener.publish', '\\x00ff'::bytea)")
            conn.execute("INSERT INTO t VALUES (2)")
    cluster.execute("SELECT pg_logical_emit_message(false, 'wal_listener.publish', 'not transactional')")
    cluster.execute("INSERT INTO t VALUES (3)")
    ms = commit_marker(cluster, nats_server.url, "end")
    assert [(m.subject, m.body["data"]) for m in ms] == [
        ("wal_listener.public_t", {"id": 1}), ("wal_listener.public_t", {"id": 2}),
        ("wal_listener.public_t", {"id": 3}), ("wal_listener.public_marker", {"label": "end"})]
    assert cluster.status()["state"] == "streaming"
    warnings = [line for line in cluster.log()[log_before:].splitlines()
                if "WARNING" in line and "wal_listener.publish" in line]
    print("\n" + "\n".join(warnings))
    # One warning per forged message: two transactional, one not.
    assert len(warnings) == 3, "a forged message ignored without a warning in the server log"


def test_transaction_mode_stores_messages_in_their_transactions_atomic_batch(make_cluster, nats_server):
    cluster = make_cluster(publish_mode="transaction", transaction_end_events="on")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with cluster.connect() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute(publish_sql(f"{MSG}.a", "'first'"))
            conn.execute("INSERT INTO t VALUES (2)")
            conn.execute(publish_sql(f"{MSG}.b", "'{\"k\": 1}'::jsonb", '{"X-A": ["1", "2"]}'))
            conn.execute("INSERT INTO t VALUES (3)")
    cluster.execute(publish_sql(f"{MSG}.c", "'\\x00ff'::bytea"))  # a transaction of one message
    ms = commit_marker(cluster, nats_server.url, "end")
    lsn = ms[0].body["lsn"]
    tx = [m for m in ms if m.commit_lsn() == lsn]
    assert [(m.subject, m.data if m.is_message else m.body["action"]) for m in tx] == [
        ("wal_listener.public_t", "INSERT"), (f"{MSG}.a", b"first"), ("wal_listener.public_t", "INSERT"),
        (f"{MSG}.b", b'{"k": 1}'), ("wal_listener.public_t", "INSERT"), ("wal_listener._transaction", "END")]
    assert ms[:6] == tx, "the transaction is not contiguous"
    assert [m.body["data"]["id"] for m in tx if m.subject == "wal_listener.public_t"] == [1, 2, 3]
    batch_ids = {m.header("Nats-Batch-Id") for m in tx}
    assert len(batch_ids) == 1, [m.headers for m in tx]
    assert tx[3].values("X-A") == ["1", "2"]
    print(f"\nEND event of rows and messages: {tx[-1].body}")
    for m in ms:
        if m.is_message:
            assert m.values("Nats-Batch-Id"), m.headers
        else:
            check_event_headers(m)
    alone = [m for m in ms if m.subject == f"{MSG}.c"]
    assert [m.data for m in alone] == [b"\x00\xff"]
    assert cluster.status()["transactions_unbatched"] == 0


def test_row_events_carry_wl_headers_equal_to_their_body(streaming, nats_server):
    cluster = streaming
    cluster.execute("CREATE SCHEMA shop; CREATE TABLE shop.items (id int PRIMARY KEY, name text); "
                    "CREATE TABLE t (id int PRIMARY KEY)")
    cluster.execute("INSERT INTO shop.items VALUES (1, 'a'), (2, 'b')")
    cluster.execute("UPDATE shop.items SET name = 'c' WHERE id = 1")
    cluster.execute("DELETE FROM shop.items WHERE id = 2")
    cluster.execute("INSERT INTO t VALUES (1)")
    cluster.execute("TRUNCATE shop.items, t")
    cluster.execute("INSERT INTO shop.items VALUES (5, 'e')")
    backfill_whole(cluster, "shop.items")
    ms = commit_marker(cluster, nats_server.url, "end")
    events = [m for m in ms if not is_marker(m)]
    summary = [(m.header("WL-Action"), m.header("WL-Schema"), m.header("WL-Table")) for m in events]
    assert summary[:5] == [
        ("INSERT", "shop", "items"), ("INSERT", "shop", "items"), ("UPDATE", "shop", "items"),
        ("DELETE", "shop", "items"), ("INSERT", "public", "t")], summary
    assert sorted(summary[5:7]) == [("TRUNCATE", "public", "t"), ("TRUNCATE", "shop", "items")], summary
    assert summary[7:] == [("INSERT", "shop", "items"), ("READ", "shop", "items")], summary
    reads = [m for m in events if m.body["action"] == "READ"]
    assert [(m.body["data"], m.header("WL-Action")) for m in reads] == [({"id": 5, "name": "e"}, "READ")]
    for m in events + [ms[-1]]:
        check_event_headers(m)


def test_a_line_break_in_a_name_becomes_an_underscore_in_its_headers(streaming, nats_server):
    """A header value cannot hold a line break (async-nats panicked on it, and
    the worker stalled on that row for good); the body keeps the name."""
    cluster = streaming
    cluster.execute('CREATE SCHEMA "we\nird"; CREATE TABLE "we\nird"."a\r\nb" (id int PRIMARY KEY)')
    cluster.execute('INSERT INTO "we\nird"."a\r\nb" VALUES (1)')
    backfill_whole(cluster, '"we\nird"."a\r\nb"')
    ms = commit_marker(cluster, nats_server.url, "end")
    events = [m for m in ms if not is_marker(m)]
    assert [(m.body["schema"], m.body["table"], m.header("WL-Schema"), m.header("WL-Table"), m.header("WL-Action"))
            for m in events] == [("we\nird", "a\r\nb", "we_ird", "a__b", "INSERT"),
                                 ("we\nird", "a\r\nb", "we_ird", "a__b", "READ")]
    assert cluster.status()["state"] == "streaming"


def test_a_message_no_stream_stores_is_held_not_skipped(make_cluster, nats_server):
    """The row after it (to a stream that exists) waits too. Order against
    later events is checked inside one stream, ORDERS (u's rows go there by
    a filter): JetStream orders each stream, not two streams against each
    other (a row stored in another stream a few µs before is no fault)."""
    cluster = make_cluster(publish_subjects="'orders.>'")
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    cluster.execute("CREATE TABLE t (id int); CREATE TABLE u (id int); CREATE TABLE marker (label text PRIMARY KEY)")
    # With a filter only listed tables are published: t and marker on their default subjects.
    cluster.execute("SELECT wal_listener.add_filter('u', subject => 'orders.u'), wal_listener.add_filter('t'), "
                    "wal_listener.add_filter('marker')")
    cluster.execute(publish_sql("orders.x", "'held'"))
    cluster.execute("INSERT INTO t VALUES (1)")
    cluster.execute("INSERT INTO u VALUES (1)")
    status = wait_until(lambda: (s := cluster.status())["last_error"] and "orders.x" in s["last_error"] and s,
                        15, "last_error naming orders.x")
    print(f"\nwhile held: {status['state']}: {status['last_error']}")
    time.sleep(1)
    assert stream_count(nats_server.url) == 0, "the row after the held message was published"
    asyncio.run(_add_stream(nats_server.url, "ORDERS", ["orders.>"]))
    ms = commit_marker(cluster, nats_server.url, "end", timeout=60)
    assert [(m.subject, m.body["data"]) for m in ms] == [
        ("wal_listener.public_t", {"id": 1}), ("wal_listener.public_marker", {"label": "end"})]
    orders = wait_for_stored(nats_server.url, lambda ms: len(ms) >= 2, "2 messages in ORDERS", stream="ORDERS",
                             timeout=10)
    assert [(m.subject, m.data if m.subject == "orders.x" else m.body["data"]) for m in orders] == [
        ("orders.x", b"held"), ("orders.u", {"id": 1})]
    held_lsn = lsn_int(orders[0].header("WL-Commit-LSN"))
    assert held_lsn < lsn_int(ms[0].body["lsn"]) < lsn_int(orders[1].body["lsn"])
    assert cluster.status()["state"] == "streaming"
