"""Fixtures: real Postgres (version from WAL_LISTENER_PG, default 15) and
real nats-server, fresh for every test."""

import os

import pytest

from harness import Nats, Postgres

PG_VERSION = os.environ.get("WAL_LISTENER_PG", "15")


def on_one_version(version: str):
    """For a slow test whose subject does not depend on the PostgreSQL
    version (NATS behaviour, memory bounds): run it on one of the versions
    CI tests, to keep CI under an hour."""
    return pytest.mark.skipif(PG_VERSION != version,
                              reason=f"version-independent and slow: runs on PostgreSQL {version} only")


def pytest_report_header(config):
    return f"PostgreSQL {PG_VERSION}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def nats_server():
    server = Nats()
    yield server
    server.destroy()


def _failed(request) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


@pytest.fixture
def make_cluster(request, nats_server):
    """Builds a started cluster with database `app`; keyword arguments set
    `wal_listener.*` GUCs, `server_settings` any other."""
    clusters = []

    def make(server_settings: dict | None = None, **wal_listener_settings):
        conf = {"wal_listener.nats_url": f"'{nats_server.url}'"}
        conf.update({f"wal_listener.{k}": v for k, v in wal_listener_settings.items()})
        conf.update(server_settings or {})
        cluster = Postgres(PG_VERSION, conf)
        clusters.append(cluster)
        cluster.start()
        cluster.execute("CREATE DATABASE app", dbname="postgres")
        return cluster

    yield make
    for cluster in clusters:
        if _failed(request):
            print(f"---- server log of {cluster.dir} ----\n{cluster.log()[-6000:]}")
        cluster.destroy()


@pytest.fixture
def cluster(make_cluster):
    return make_cluster()


@pytest.fixture
def streaming(cluster):
    """A cluster whose worker is streaming to `nats_server`."""
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    return cluster
