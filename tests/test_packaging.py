"""What Dockerfile.pg does, proven on this machine: the server runs the
packaged files (scripts/package.sh), and a data directory initialised the
way the postgres image does it (docker/postgresql.conf.add in the sample,
docker/initdb-wal-listener.sh as an init script) streams with no further step."""

import hashlib
import os
import subprocess
from pathlib import Path

from conftest import PG_VERSION
from harness import Postgres, _as_postgres_user, pg_bindir, wait_for_count, read_stream

ROOT = Path(__file__).resolve().parent.parent


def pg_config(flag: str) -> Path:
    out = subprocess.run([str(pg_bindir(PG_VERSION) / "pg_config"), flag], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_server_runs_the_packaged_files():
    package = ROOT / "target" / "package" / f"pg{PG_VERSION}"
    installed = [
        pg_config("--pkglibdir") / "wal_listener.so",
        pg_config("--sharedir") / "extension" / "wal_listener.control",
        *sorted((pg_config("--sharedir") / "extension").glob("wal_listener--*.sql")),
    ]
    assert len(installed) >= 3
    for path in installed:
        packaged = package / path.relative_to("/")
        assert digest(path) == digest(packaged), f"{path} is not the packaged file"


def test_a_data_directory_initialised_like_the_image_streams(nats_server):
    # Undo the harness's own preload settings; the image's lines come last and win.
    cluster = Postgres(PG_VERSION, {"shared_preload_libraries": "''", "wal_level": "replica"})
    try:
        with open(cluster.data / "postgresql.conf", "a") as conf:
            conf.write((ROOT / "docker" / "postgresql.conf.add").read_text())
        cluster.start()
        # The entrypoint creates POSTGRES_DB, then runs the init scripts.
        cluster.execute("CREATE DATABASE shop", dbname="postgres")
        env = {
            **os.environ,
            "PATH": f"{pg_bindir(PG_VERSION)}:{os.environ['PATH']}",
            "PGHOST": str(cluster.dir),
            "PGPORT": str(cluster.port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "shop",
            "WAL_LISTENER_NATS_URL": nats_server.url,
        }
        subprocess.run([str(ROOT / "docker" / "initdb-wal-listener.sh")], env=env, check=True, cwd="/", **_as_postgres_user())
        cluster.restart()  # as the entrypoint does after the init scripts
        status = cluster.execute("SELECT * FROM wal_listener.status()", dbname="shop")[0]
        assert status["state"] in ("connecting", "streaming"), status
        cluster.execute("CREATE TABLE orders (id int PRIMARY KEY)", dbname="shop")
        cluster.execute("INSERT INTO orders VALUES (1)", dbname="shop")
        assert wait_for_count(nats_server.url, 1) == 1
        event = read_stream(nats_server.url)[0]
        assert (event.subject, event.body["data"]) == ("wal_listener.public_orders", {"id": 1})
    finally:
        cluster.destroy()
