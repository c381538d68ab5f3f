"""The pgrx-free core on its own: the standalone example binary streams from
a Postgres that does not load the extension at all."""

import subprocess
from pathlib import Path

import pytest

from conftest import PG_VERSION
from harness import Postgres, read_stream, wait_for_count, wait_until

BINARY = Path(__file__).resolve().parent.parent / "target" / "release" / "examples" / "standalone"


@pytest.fixture
def plain_cluster(request):
    cluster = Postgres(PG_VERSION, {"shared_preload_libraries": "''"})
    cluster.start()
    cluster.execute("CREATE DATABASE app", dbname="postgres")
    yield cluster
    cluster.destroy()


def test_core_streams_without_the_extension(plain_cluster, nats_server, tmp_path):
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: cargo build --release -p wal_listener_core --example standalone")
    log = open(tmp_path / "standalone.log", "w+")
    process = subprocess.Popen(
        [str(BINARY), "--socket-dir", str(plain_cluster.dir), "--port", str(plain_cluster.port),
         "--database", "app", "--nats-url", nats_server.url],
        stderr=log,
    )
    try:
        wait_until(lambda: "state: streaming" in (tmp_path / "standalone.log").read_text(), 60, "streaming")
        plain_cluster.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
        plain_cluster.execute("INSERT INTO t SELECT g, 'n' || g FROM generate_series(1, 100) g")
        plain_cluster.execute("DELETE FROM t WHERE id <= 10")
        assert wait_for_count(nats_server.url, 110) == 110
        events = read_stream(nats_server.url)
        assert [e.body["action"] for e in events] == ["INSERT"] * 100 + ["DELETE"] * 10
        assert events[0].body["data"] == {"id": 1, "note": "n1"}
        assert events[-1].body["dataOld"] == {"id": 10}
    except BaseException:
        print((tmp_path / "standalone.log").read_text()[-3000:])
        raise
    finally:
        process.kill()
        process.wait()
