"""ALTER EXTENSION wal_listener UPDATE from every saved release gives the
same objects as a fresh install (extension/sql/README.md)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PG_VERSION
from harness import pg_bindir

RELEASED = sorted((Path(__file__).resolve().parent.parent / "extension" / "sql" / "released").glob("wal_listener--*.sql"))

# Every object of the extension, with its definition where it has one.
OBJECTS = """
SELECT pg_describe_object(d.classid, d.objid, 0) AS object,
       CASE WHEN d.classid = 'pg_proc'::regclass THEN pg_get_functiondef(d.objid) END AS definition
  FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
 WHERE d.refclassid = 'pg_extension'::regclass AND e.extname = 'wal_listener' AND d.deptype = 'e'
 ORDER BY 1
"""


@pytest.mark.parametrize("script", RELEASED, ids=[p.name for p in RELEASED])
def test_update_from_a_release_matches_a_fresh_install(cluster, script):
    sharedir = subprocess.run([str(pg_bindir(PG_VERSION) / "pg_config"), "--sharedir"],
                              capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(script, Path(sharedir) / "extension" / script.name)
    old_version = script.stem.split("--")[1]

    cluster.execute(f"CREATE EXTENSION wal_listener VERSION '{old_version}'")
    cluster.execute("ALTER EXTENSION wal_listener UPDATE")
    updated = cluster.execute(OBJECTS)
    cluster.execute("DROP EXTENSION wal_listener")
    cluster.execute("CREATE EXTENSION wal_listener")
    assert updated == cluster.execute(OBJECTS)


def test_current_version_is_the_default_and_installs(cluster):
    versions = cluster.execute(
        "SELECT version, installed FROM pg_available_extension_versions WHERE name = 'wal_listener'"
    )
    cluster.execute("CREATE EXTENSION wal_listener")
    default = cluster.execute("SELECT extversion FROM pg_extension WHERE extname = 'wal_listener'")[0]["extversion"]
    assert default in [v["version"] for v in versions]
    cargo = (Path(__file__).resolve().parent.parent / "Cargo.toml").read_text()
    assert f'version = "{default}"' in cargo
