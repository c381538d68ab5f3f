"""Backfills and hostile input: a where_clause must stay inside its
parentheses, and must run with the privileges of the role that asked for
the backfill, not those of the worker's superuser session."""

import time

import psycopg
import pytest

from harness import event_bodies, stream_count, wait_until

JOB_TIMEOUT = 60  # seconds a backfill of a few thousand rows may take at most
PASSWD = "root:x:0:0"  # the first line of /etc/passwd
SECRET = "the-secret-value-42"


def job(cluster, backfill_id: int) -> dict:
    return cluster.execute("SELECT * FROM wal_listener.backfills WHERE id = %s", (backfill_id,))[0]


def wait_end(cluster, backfill_id: int, timeout: float = JOB_TIMEOUT) -> dict:
    """The job's row once it is done, failed or cancelled; after `timeout`
    the row as it is then (still pending or running): never hangs."""
    deadline = time.monotonic() + timeout
    while True:
        row = job(cluster, backfill_id)
        if row["state"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return row
        time.sleep(0.5)


def cancel_unfinished(cluster, backfill_id: int | None):
    """Stops a backfill that is still pending or running (a no-op otherwise)."""
    if backfill_id is None:
        return
    try:
        cluster.execute("SELECT wal_listener.cancel_backfill(%s)", (backfill_id,))
    except psycopg.Error as e:  # the cluster may be gone already; cleanup must not mask the result
        print(f"cancel_backfill({backfill_id}): {e}")


# ---------------------------------------------------------------- A. parentheses


ROWS = 5_000


@pytest.mark.parametrize(
    "clause",
    ["true) --", "true) OR (true", "id > 0) OR (id < 0"],
    ids=["comment-out-key-condition", "or-true", "or-key-range"],
)
def test_a_where_clause_cannot_break_out_of_its_parentheses(cluster, nats_server, clause):
    # Rows from before the extension: the stream holds nothing but the backfill's READ events.
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY)")
    cluster.execute("INSERT INTO t SELECT generate_series(1, %s)", (ROWS,))
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)

    started = time.monotonic()
    backfill_id = None
    try:
        try:
            backfill_id = cluster.execute("SELECT wal_listener.backfill('public.t', where_clause => %s) AS id",
                                          (clause,))[0]["id"]
        except psycopg.Error as e:
            print(f"\nclause {clause!r} refused at call time: {str(e).strip()}")
            assert cluster.execute("SELECT count(*) AS n FROM wal_listener.backfills") == [{"n": 0}]
        else:
            row = wait_end(cluster, backfill_id)
            took = time.monotonic() - started
            print(f"\nclause {clause!r}: backfill {backfill_id} after {took:.1f} s: state {row['state']}, "
                  f"rows_done {row['rows_done']}, last_error {row['last_error']!r}")
            unfinished = row["state"] in ("pending", "running")
            assert row["state"] == "done" and row["rows_done"] <= ROWS, (
                f"backfill of the {ROWS:,}-row table t with where_clause {clause!r} "
                f"{f'has not finished after {JOB_TIMEOUT} s' if unfinished else 'ended'}: "
                f"state {row['state']}, rows_done {row['rows_done']:,}, last_error {row['last_error']!r}")
    finally:
        cancel_unfinished(cluster, backfill_id)

    time.sleep(2)  # anything still on its way to JetStream
    stored = stream_count(nats_server.url)
    assert stored <= ROWS, f"the stream holds {stored:,} events for a {ROWS:,}-row table"
    bodies = event_bodies(nats_server.url)
    reads = [b for b in bodies if b["action"] == "READ"]
    assert len(reads) <= ROWS, f"{len(reads):,} READ events for a {ROWS:,}-row table"
    ids = [b["data"]["id"] for b in reads]
    assert len(ids) == len(set(ids)), "a row was sent twice"


# ---------------------------------------------------------------- B. privileges


T_ROWS = 10


@pytest.fixture
def setup(cluster):
    """As superuser: role rs (not a superuser) with its own schema, SELECT on
    public.t and EXECUTE on backfill(); public.secret, which rs may not read;
    role nogrant without EXECUTE on backfill()."""
    cluster.execute("CREATE TABLE public.t (id int PRIMARY KEY)")
    cluster.execute("INSERT INTO public.t SELECT generate_series(1, %s)", (T_ROWS,))
    cluster.execute("CREATE TABLE public.secret (id int PRIMARY KEY, s text)")
    cluster.execute("INSERT INTO public.secret VALUES (1, %s)", (SECRET,))
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.execute("""
        CREATE ROLE rs LOGIN;
        CREATE SCHEMA rs AUTHORIZATION rs;
        GRANT SELECT ON public.t TO rs;
        GRANT EXECUTE ON FUNCTION wal_listener.backfill(regclass, text) TO rs;
        CREATE ROLE nogrant LOGIN;
    """)
    assert cluster.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'rs'") == [{"rolsuper": False}]
    cluster.wait_for_state("streaming", timeout=60)
    return cluster


def connect_as(cluster, user: str) -> psycopg.Connection:
    return psycopg.connect(host=str(cluster.dir), port=cluster.port, user=user, dbname="app", autocommit=True)


def as_rs(cluster, *statements: str):
    with connect_as(cluster, "rs") as conn:
        for sql in statements:
            conn.execute(sql)


def backfill_as(cluster, user: str, table: str, where_clause: str | None = None) -> int:
    with connect_as(cluster, user) as conn:
        return conn.execute("SELECT wal_listener.backfill(%s, where_clause => %s)", (table, where_clause)).fetchone()[0]


def run_job(cluster, backfill_id: int) -> dict:
    """Waits (bounded) for the job to end; cancels it if it did not."""
    try:
        row = wait_end(cluster, backfill_id)
    finally:
        cancel_unfinished(cluster, backfill_id)
    print(f"\nbackfill {backfill_id}: state {row['state']}, rows_done {row['rows_done']}, "
          f"last_error {(row['last_error'] or '')[:300]!r}")
    assert row["state"] not in ("pending", "running"), f"backfill did not end within {JOB_TIMEOUT} s: {row}"
    return row


def assert_worker_unharmed(cluster, nats_url: str):
    """The worker still streams, a new INSERT into t arrives, and its SQL
    session is still the superuser's: a backfill of public.secret (which rs
    may not read) requested by postgres sends the row."""
    status = cluster.wait_for_state("streaming", timeout=30)
    assert status["state"] == "streaming", status
    cluster.execute("INSERT INTO public.t VALUES (1000001)")
    wait_until(lambda: any(b["action"] == "INSERT" and b["table"] == "t" and b["data"]["id"] == 1000001
                           for b in event_bodies(nats_url)),
               30, "the INSERT of id 1000001 into t in the stream", interval=0.5)
    check = cluster.execute("SELECT wal_listener.backfill('public.secret') AS id")[0]["id"]
    row = run_job(cluster, check)
    assert (row["state"], row["rows_done"]) == ("done", 1), (
        f"a superuser's backfill of public.secret after the attack: {row} (the worker's session was left changed?)")
    wait_until(lambda: any(b["action"] == "READ" and b["table"] == "secret" and b.get("backfill") == check
                           for b in event_bodies(nats_url)),
               30, "the READ event of public.secret", interval=0.5)


def test_control_a_harmless_clause_from_rs_is_backfilled(setup, nats_server):
    backfill_id = backfill_as(setup, "rs", "public.t", "id > 2")
    row = run_job(setup, backfill_id)
    assert (row["state"], row["rows_done"], row["last_error"]) == ("done", T_ROWS - 2, None), row
    wait_until(lambda: sum(1 for b in event_bodies(nats_server.url) if b.get("backfill") == backfill_id) >= T_ROWS - 2,
               30, f"{T_ROWS - 2} READ events")
    time.sleep(1)
    reads = [b for b in event_bodies(nats_server.url) if b["action"] == "READ" and b.get("backfill") == backfill_id]
    assert sorted(b["data"]["id"] for b in reads) == list(range(3, T_ROWS + 1))
    assert_worker_unharmed(setup, nats_server.url)


def test_the_clause_runs_as_the_requesting_role(setup, nats_server):
    as_rs(setup, """
        CREATE FUNCTION rs.peek() RETURNS boolean STABLE LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'as % read: %', current_user, pg_read_file('/etc/passwd');
        END $$""")
    backfill_id = backfill_as(setup, "rs", "public.t", "rs.peek()")
    row = run_job(setup, backfill_id)
    assert_worker_unharmed(setup, nats_server.url)
    error = row["last_error"] or ""
    assert PASSWD not in error, f"the clause read /etc/passwd with the worker's privileges: {error[:200]!r}"
    assert row["state"] == "failed", row
    assert "permission denied for function pg_read_file" in error, error


@pytest.mark.parametrize(
    "statement",
    ["RESET ROLE", "PERFORM set_config('role', 'postgres', true)", "SET SESSION AUTHORIZATION postgres"],
    ids=["reset-role", "set_config-role", "set-session-authorization"],
)
def test_the_clause_cannot_take_back_the_workers_role(setup, nats_server, statement):
    # A stable function may call a volatile one, which may change settings.
    as_rs(setup, f"""
        CREATE FUNCTION rs.become() RETURNS text VOLATILE LANGUAGE plpgsql AS $$
        BEGIN
            {statement};
            RETURN pg_read_file('/etc/passwd');
        END $$""", """
        CREATE FUNCTION rs.escape() RETURNS boolean STABLE LANGUAGE plpgsql AS $$
        BEGIN
            RETURN rs.become() IS NOT NULL;
        END $$""")
    backfill_id = backfill_as(setup, "rs", "public.t", "rs.escape()")
    row = run_job(setup, backfill_id)
    assert_worker_unharmed(setup, nats_server.url)
    error = row["last_error"] or ""
    assert PASSWD not in error, f"the clause read /etc/passwd: {error[:200]!r}"
    assert row["state"] == "failed", (
        f"{statement!r} in a function of the clause got the privileges back (pg_read_file succeeded): {row}")


def test_the_clause_cannot_read_a_table_the_role_may_not(setup, nats_server):
    as_rs(setup, """
        CREATE FUNCTION rs.peek_secret() RETURNS boolean STABLE LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'secret: %', (SELECT s FROM public.secret LIMIT 1);
        END $$""")
    backfill_id = backfill_as(setup, "rs", "public.t", "rs.peek_secret()")
    row = run_job(setup, backfill_id)
    assert_worker_unharmed(setup, nats_server.url)
    error = row["last_error"] or ""
    assert SECRET not in error, f"the clause read public.secret: {error!r}"
    assert row["state"] == "failed", row
    assert "permission denied for table secret" in error, error


def test_a_role_cannot_backfill_a_table_it_may_not_select(setup):
    before = setup.execute("SELECT count(*) AS n FROM wal_listener.backfill_jobs")[0]["n"]
    created = None
    try:
        with pytest.raises(psycopg.Error) as raised:
            created = backfill_as(setup, "rs", "public.secret")
    finally:
        cancel_unfinished(setup, created)
        if created is not None:
            print(f"\nbackfill('public.secret') as rs was accepted: job {created}, {job(setup, created)}")
    message = str(raised.value)
    print(f"\nrefused: {message.strip()}")
    assert "SELECT" in message or "permission" in message, message
    assert setup.execute("SELECT count(*) AS n FROM wal_listener.backfill_jobs")[0]["n"] == before, "a job was created"


def test_a_role_without_execute_cannot_backfill(setup):
    with connect_as(setup, "nogrant") as conn:
        with pytest.raises(psycopg.Error, match="permission denied for function backfill"):
            conn.execute("SELECT wal_listener.backfill('public.t')")
    assert setup.execute("SELECT count(*) AS n FROM wal_listener.backfill_jobs") == [{"n": 0}]
