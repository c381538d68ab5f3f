"""The SQL API: validation, permissions and secret settings, in one shared
cluster (each test leaves the filter set empty)."""

import psycopg
import pytest

from conftest import PG_VERSION
from harness import Nats, Postgres, has_module


@pytest.fixture(scope="module")
def db():
    nats_server = Nats()
    cluster = Postgres(PG_VERSION, {"wal_listener.nats_url": f"'{nats_server.url}'",
                                    "wal_listener.nats_password": "'s3cret-pw'",
                                    "wal_listener.nats_token": "'s3cret-token'"})
    cluster.start()
    cluster.execute("CREATE DATABASE app", dbname="postgres")
    cluster.execute(
        """
        CREATE EXTENSION wal_listener;
        CREATE TABLE orders (id int PRIMARY KEY);
        CREATE TABLE lines (id int PRIMARY KEY);
        CREATE VIEW order_view AS SELECT * FROM orders;
        CREATE SEQUENCE order_seq;
        CREATE TABLE parted (id int) PARTITION BY RANGE (id);
        CREATE ROLE plain LOGIN;
        CREATE ROLE monitor LOGIN IN ROLE pg_monitor;
        CREATE ROLE operator LOGIN;
        GRANT EXECUTE ON FUNCTION wal_listener.add_filter(regclass, text[], text),
                                  wal_listener.remove_filter(regclass) TO operator;
        """
    )
    yield cluster
    cluster.destroy()
    nats_server.destroy()


def error_of(cluster, sql, user="postgres", dbname="app") -> str:
    """Runs `sql` in a transaction that is rolled back; returns the error text."""
    with psycopg.connect(host=str(cluster.dir), port=cluster.port, user=user, dbname=dbname) as conn:
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(sql)
        conn.rollback()
    return str(raised.value)


def filters(cluster):
    return cluster.execute('SELECT "table"::text AS tbl, actions, subject FROM wal_listener.filters ORDER BY 1')


@pytest.mark.parametrize(
    "call, message",
    [
        ("add_filter('orders', '{insert,upsert}')", 'unknown action "upsert"; allowed: insert, update, delete, truncate'),
        ("add_filter('orders', '{}')", "actions must not be empty; allowed: insert, update, delete, truncate"),
        ("add_filter('orders', '{insert,INSERT}')", 'action "insert" is listed twice'),
        ("add_filter('orders', NULL)", "actions must not be NULL; allowed: insert"),
        ("add_filter('orders', '{insert,NULL}')", "actions must not contain NULL"),
        ("add_filter(NULL)", "tbl must not be NULL"),
        ("remove_filter(NULL)", "tbl must not be NULL"),
        ("add_filter('orders', subject => '')", 'subject "" is empty'),
        ("add_filter('orders', subject => 'a b')", "whitespace and control characters are not allowed"),
        ("add_filter('orders', subject => 'a..b')", "has an empty token"),
        ("add_filter('orders', subject => '.a')", "has an empty token"),
        ("add_filter('orders', subject => 'a.*')", "contains a wildcard"),
        ("add_filter('orders', subject => 'a.>')", "contains a wildcard"),
        ("add_filter('orders', subject => repeat('a', 256))", "is 256 bytes long; the limit is 255"),
        ("add_filter('no_such_table')", 'relation "no_such_table" does not exist'),
        ("add_filter('order_view')", "order_view is not a table (relkind v)"),
        ("add_filter('order_seq')", "order_seq is not a table (relkind S)"),
        ("add_filter('parted')", "parted is not a table (relkind p); filters apply to ordinary tables; add a filter"),
        ("add_filter('wal_listener.config_changes')", "belongs to wal_listener, whose tables are never published"),
    ],
)
def test_bad_input_is_refused_with_what_is_allowed_and_changes_nothing(db, call, message):
    assert message in error_of(db, f"SELECT wal_listener.{call}")
    assert filters(db) == []
    assert db.execute("SELECT count(*) AS n FROM wal_listener.config_changes") == [{"n": 0}]


def test_add_replace_and_remove_filters(db):
    with db.connect() as conn:
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT wal_listener.add_filter('orders')")
            conn.execute("SELECT wal_listener.add_filter('lines', '{DELETE,insert}', 'audit.lines')")
            rows = conn.execute('SELECT "table"::text, actions, subject FROM wal_listener.filters ORDER BY 1').fetchall()
            assert rows == [
                {"table": "lines", "actions": ["insert", "delete"], "subject": "audit.lines"},
                {"table": "orders", "actions": ["insert", "update", "delete", "truncate"], "subject": None},
            ]
            conn.execute("SELECT wal_listener.add_filter('orders', '{update}')")  # replaces
            assert conn.execute(
                "SELECT actions FROM wal_listener.filters WHERE \"table\" = 'orders'::regclass"
            ).fetchall() == [{"actions": ["update"]}]
            assert conn.execute("SELECT wal_listener.remove_filter('orders') AS r").fetchone() == {"r": True}
            assert conn.execute("SELECT wal_listener.remove_filter('orders') AS r").fetchone() == {"r": False}
            assert [r["table"] for r in conn.execute('SELECT "table"::text FROM wal_listener.filters')] == ["lines"]
            versions = conn.execute("SELECT version FROM wal_listener.config_changes ORDER BY 1").fetchall()
            assert [v["version"] for v in versions] == [1, 2, 3, 4]  # the no-op remove wrote nothing


def test_plain_roles_can_neither_configure_nor_read(db):
    for sql in [
        "SELECT wal_listener.add_filter('orders')",
        "SELECT wal_listener.remove_filter('orders')",
        "SELECT wal_listener.restart()",
        "SELECT * FROM wal_listener.status()",
    ]:
        assert "permission denied for function" in error_of(db, sql, user="plain"), sql
    assert "permission denied for view filters" in error_of(db, "SELECT * FROM wal_listener.filters", user="plain")
    for sql in ["SELECT * FROM wal_listener.config_changes", "DELETE FROM wal_listener.config_changes"]:
        assert "permission denied for table config_changes" in error_of(db, sql, user="plain"), sql


def test_pg_monitor_members_read_status_and_filters_only(db):
    with psycopg.connect(host=str(db.dir), port=db.port, user="monitor", dbname="app") as conn:
        assert conn.execute("SELECT state FROM wal_listener.status()").fetchone()[0] in ("connecting", "streaming", "backoff")
        assert conn.execute("SELECT count(*) FROM wal_listener.filters").fetchone() == (0,)
    assert "permission denied for function" in error_of(db, "SELECT wal_listener.add_filter('orders')", user="monitor")
    assert "permission denied for table" in error_of(
        db, "INSERT INTO wal_listener.config_changes (version) VALUES (9)", user="monitor"
    )


def test_roles_granted_execute_may_configure(db):
    with psycopg.connect(host=str(db.dir), port=db.port, user="operator", dbname="app", autocommit=True) as conn:
        conn.execute("SELECT wal_listener.add_filter('orders', '{insert}')")
        assert db.execute("SELECT changed_by FROM wal_listener.config_changes ORDER BY version DESC LIMIT 1") == [
            {"changed_by": "operator"}
        ]
        assert conn.execute("SELECT wal_listener.remove_filter('orders')").fetchone() == (True,)
    assert filters(db) == []
    assert "permission denied for function restart" in error_of(db, "SELECT wal_listener.restart()", user="operator")


@pytest.mark.parametrize("guc", ["wal_listener.nats_password", "wal_listener.nats_token"])
def test_secret_settings_never_show_their_value(db, guc):
    # Plain roles: SHOW is refused and pg_settings has no row.
    assert f'to examine "{guc}"' in error_of(db, f"SHOW {guc}", user="plain")
    with psycopg.connect(host=str(db.dir), port=db.port, user="plain", dbname="app") as conn:
        assert conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (guc,)).fetchall() == []
    # Superusers and pg_read_all_settings members (pg_monitor) see only that
    # it is set; pg_settings, whose reset_val bypasses the mask, has no row.
    for user in ["postgres", "monitor"]:
        with psycopg.connect(host=str(db.dir), port=db.port, user=user, dbname="app") as conn:
            assert conn.execute(f"SHOW {guc}").fetchone() == ("********",)
            assert conn.execute("SELECT reset_val FROM pg_settings WHERE name = %s", (guc,)).fetchall() == []


@pytest.mark.skipif(not has_module(PG_VERSION, "pg_stat_statements"), reason="this PostgreSQL build has no contrib modules (pg_stat_statements)")
def test_errors_raised_under_an_earlier_processutility_hook_leave_every_session_standing(make_cluster):
    """With pg_stat_statements loaded first, our hook calls its hook; an
    ERROR raised there (inside a PL/pgSQL exception block too) unwinds
    through our frame as a caught error, not a longjmp: no crash, no
    cluster restart, the worker keeps its pid."""
    cluster = make_cluster(server_settings={"shared_preload_libraries": "'pg_stat_statements,wal_listener'"})
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)
    worker, postmaster = cluster.worker_pid(), cluster.postmaster_pid()
    with cluster.connect() as conn:
        for i in range(200):
            with pytest.raises(psycopg.Error):
                conn.execute(f"DROP TABLE no_such_table_{i}")
        conn.execute("""
            DO $$ DECLARE n int := 0; BEGIN
                FOR i IN 1..500 LOOP
                    BEGIN EXECUTE format('DROP TABLE no_such_table_%s', i);
                    EXCEPTION WHEN undefined_table THEN n := n + 1; END;
                END LOOP;
                RAISE NOTICE 'caught %', n;
            END $$""")
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    assert (cluster.worker_pid(), cluster.postmaster_pid()) == (worker, postmaster)
    assert "terminated by signal" not in cluster.log() and "terminating any other active server processes" not in cluster.log()
    assert cluster.status()["state"] == "streaming"
