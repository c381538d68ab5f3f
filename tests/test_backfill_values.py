"""Backfilled values: a READ event carries a row exactly as an INSERT of the
same row would (each column through its type's output function, as
pgoutput sends it), and keys whose `::text` cast differs from their output
(char(n), inet) still match the live changes inside a chunk's watermark
window (DBLog)."""

import json
import os
import random
import threading
import time

import psycopg
from psycopg.types.string import TextLoader

from harness import event_bodies, wait_for_count
from test_backfill import caught_up, wait_done

# (column, type, value of the ordinary row, value of the row of specials),
# each value as the text the column is cast from (None: NULL).
COLUMNS = [
    ("b", "bool", "true", "false"),
    ("b2", "bool", "false", "true"),
    ("i2", "int2", "12", "-32768"),
    ("i4", "int4", "-7", "2147483647"),
    ("i8", "int8", "9007199254740993", "-9223372036854775808"),
    ("o", "oid", "16384", "4294967295"),
    ("f4", "float4", "1.5", "NaN"),
    ("f4b", "float4", "0.1", "-Infinity"),
    ("f8", "float8", "0.1", "Infinity"),
    ("f8b", "float8", "1e308", "-Infinity"),
    ("f8c", "float8", "-0", "5e-324"),
    ("n", "numeric", "123456789012345678901234567890.1234567890", "NaN"),
    ("nb", "numeric", "-0.000000001", "Infinity"),
    ("nc", "numeric(10,3)", "1.5", "0"),
    ("j", "json", '{"a": [1, 2.5, "x"], "b": {"c": null}}', '"q \\" b \\\\ \\u00e9 ü 🎉"'),
    ("jb", "jsonb", '{"b": [true, {"d": "é"}], "n": 1.10}', "[]"),
    ("ba", "bytea", "\\xdeadbeef00", ""),
    ("tz", "timestamptz", "2026-11-24 23:43:42.5+02", "infinity"),
    ("tzb", "timestamptz", "2000-01-01 00:00:00+00", "-infinity"),
    ("ts", "timestamp", "2026-11-24 21:43:42.123456", "infinity"),
    ("d", "date", "2026-11-24", "-infinity"),
    ("tm", "time", "12:34:56.789", "24:00:00"),
    ("ttz", "timetz", "12:34:56+02", "23:59:59.999999-12"),
    ("iv", "interval", "1 day 02:03:04", "-1 years -2 mons +3 days -04:05:06.789"),
    ("tx", "text", "hello", 'q " b \\ tab \t nl \n ünï 🎉 \'s'),
    ("tx2", "text", "x", ""),
    ("vc", "varchar(20)", "abc", ""),
    ("ch", "char(5)", "ab", ""),  # padded; the special is all blanks
    ("chf", "char(3)", "abc", " a"),
    ("nm", "name", "pg_class", ""),
    ("u", "uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "00000000-0000-0000-0000-000000000000"),
    ("m", "money", "12.34", "-92233720368547758.08"),
    ("ip", "inet", "192.168.0.1", "::1"),
    ("ipn", "inet", "192.168.0.1/24", "2001:db8::1/64"),
    ("cd", "cidr", "10.0.0.0/8", "::/0"),
    ("mac", "macaddr", "08:00:2b:01:02:03", "ff:ff:ff:ff:ff:ff"),
    ("mac8", "macaddr8", "08:00:2b:01:02:03:04:05", "00:00:00:00:00:00:00:00"),
    ("bt", "bit(4)", "1010", "0000"),
    ("vb", "varbit", "1", ""),
    ("tsv", "tsvector", "a fat cat", ""),
    ("tsq", "tsquery", "fat & (rat | cat)", "!a"),
    ("pt", "point", "(1,2)", "(-0,1e-300)"),
    ("bx", "box", "(1,1),(0,0)", "(0,0),(0,0)"),
    ("ls", "lseg", "[(0,0),(1,1)]", "[(0,0),(0,0)]"),
    ("pg", "polygon", "((0,0),(1,0),(1,1))", "((0,0))"),
    ("ci", "circle", "<(0,0),1.5>", "<(0,0),0>"),
    ("r", "int4range", "[1,5)", "empty"),
    ("mr", "int4multirange", "{[1,2),[5,6)}", "{}"),
    ("tr", "tstzrange", "[2026-01-01 00:00+00,2026-02-01 12:30+02)", "(,infinity]"),
    ("e", "mood", "happy", "it's \"q\""),
    ("db", "booldom", "true", "false"),
    ("dt", "textdom", "dom", ""),
    ("dc", "chardom", "x", "abcd"),
    ("p", "pair", '(1,"x y",t,ab,10.0.0.1)', '(,"q\\"b\\\\",f,"   ",)'),
    ("a_b", "bool[]", "{t,f,NULL}", "{}"),
    ("a_ch", "char(3)[]", '{a,"b ",NULL}', '{"   ",""}'),
    ("a_ip", "inet[]", "{10.0.0.1,10.0.0.0/24,::1,NULL}", "{}"),
    ("a_cd", "cidr[]", "{10.0.0.0/8,192.168.1.0/24}", "{::/0}"),
    ("a_bt", "bit(2)[]", "{01,10}", "{}"),
    ("a_i4", "int4[]", "{1,NULL,3}", "{}"),
    ("a_i4lb", "int4[]", "{5}", "[0:1]={1,2}"),
    ("a_tx", "text[]", '{"a b","q\\"","",NULL,"NULL"}', '{"back\\\\slash","ünï","{}",",", " "}'),
    ("a_jb", "jsonb[]", '{"{\\"a\\": 1}",NULL}', '{"[]","\\"s\\"","null"}'),
    ("a_n", "numeric[]", "{1.10,2,NaN}", "{Infinity,-Infinity}"),
    ("a_f8", "float8[]", "{NaN,1.5,-0}", "{Infinity,-Infinity,5e-324}"),
    ("a_f4", "float4[]", "{0.1,NaN}", "{}"),
    ("a_i8", "int8[]", "{-9223372036854775808,9007199254740993}", "{}"),
    ("a_by", "bytea[]", '{"\\\\x00ff",NULL}', '{"\\\\x"}'),
    ("a_tz", "timestamptz[]", '{"2026-11-24 21:43:42+00",infinity}', "{-infinity}"),
    ("a_d", "date[]", "{2026-11-24,infinity}", "{}"),
    ("a_iv", "interval[]", '{"1 day",NULL}', '{"-00:00:00.000001"}'),
    ("a_u", "uuid[]", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", "{}"),
    ("a_m", "money[]", "{1.5,-2}", "{}"),
    ("a2", "int4[][]", "{{1,2},{3,4}}", "{{NULL,1},{2,3}}"),
    ("a2b", "bool[][]", "{{t,f},{f,t}}", "{{t},{NULL}}"),
    ("a2tx", "text[][]", '{{a,"b c"},{"",NULL}}', "{}"),
    ("a_e", "mood[]", '{happy,"so sad"}', '{"it\'s \\"q\\""}'),
    ("a_p", "pair[]", '{"(1,a,t,x,10.0.0.1)",NULL}', "{}"),
    ("a_db", "booldom[]", "{t,f}", "{}"),
    ("a_r", "int4range[]", '{"[1,5)",empty}', "{}"),
]

TYPES = """
    CREATE TYPE mood AS ENUM ('happy', 'so sad', 'it''s "q"');
    CREATE DOMAIN booldom AS bool;
    CREATE DOMAIN textdom AS text CHECK (length(VALUE) < 10);
    CREATE DOMAIN chardom AS char(4);
    CREATE TYPE pair AS (a int, b text, c bool, d char(3), e inet);
"""


def _insert_row(conn, row_id: int, values: list):
    casts = ", ".join(f"%s::{t}" for _, t, _, _ in COLUMNS)
    conn.execute(f"INSERT INTO t VALUES (%s, {casts})", [row_id, *values])


def _strict(value) -> str:
    """A value's exact JSON (True is not 1, 1.0 is not 1, key order counts)."""
    return json.dumps(value, ensure_ascii=False)


def _short(value) -> str:
    text = _strict(value)
    return text if len(text) <= 160 else f"{text[:120]}… ({len(text)} chars)"


def test_a_read_event_says_what_an_insert_of_the_same_row_says(cluster, nats_server):
    columns = ", ".join(f"{name} {sql_type}" for name, sql_type, _, _ in COLUMNS)
    cluster.execute(TYPES + f"CREATE TABLE t (id int PRIMARY KEY, {columns});"
                    "ALTER TABLE t ALTER COLUMN tx SET STORAGE EXTERNAL, ALTER COLUMN ba SET STORAGE EXTERNAL")
    rng = random.Random(11)
    big_text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(300_000))
    big_bytes = os.urandom(200_000)
    ordinary = [v for _, _, v, _ in COLUMNS]
    with cluster.connect() as conn:
        _insert_row(conn, 1, ordinary)
        _insert_row(conn, 2, [v for _, _, _, v in COLUMNS])
        conn.execute("INSERT INTO t (id) VALUES (3)")  # every other column NULL
        huge = [big_text if name == "tx" else big_bytes if name == "ba" else v
                for (name, _, _, _), v in zip(COLUMNS, ordinary)]
        _insert_row(conn, 4, huge)
    toasted = cluster.execute(
        "SELECT pg_column_size(tx) AS tx, pg_column_size(ba) AS ba, "
        "(SELECT reltoastrelid <> 0 FROM pg_class WHERE relname = 't') AS has_toast FROM t WHERE id = 4")[0]
    # Out of line and not compressed: an inline value's size would count its 4-byte header.
    assert toasted == {"tx": 300_000, "ba": 200_000, "has_toast": True}, toasted
    rows = cluster.execute("SELECT count(*) AS n FROM t")[0]["n"]
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)

    backfill = cluster.execute("SELECT wal_listener.backfill('t') AS id")[0]["id"]
    wait_done(cluster, backfill, timeout=60)
    others = ", ".join(name for name, _, _, _ in COLUMNS)
    cluster.execute(f"INSERT INTO t SELECT id + 1000, {others} FROM t")
    assert wait_for_count(nats_server.url, 2 * rows) == 2 * rows

    bodies = event_bodies(nats_server.url)
    reads = {b["data"]["id"]: b for b in bodies if b["action"] == "READ"}
    inserts = {b["data"]["id"]: b for b in bodies if b["action"] == "INSERT"}
    assert len([b for b in bodies if b["action"] == "READ"]) == rows
    assert sorted(reads) == [1, 2, 3, 4]
    assert sorted(inserts) == [1001, 1002, 1003, 1004]
    assert all(len(json.dumps(b).encode()) < 1_000_000 for b in bodies)

    differences = []  # (row id, column, type, READ value, INSERT value)
    for k, read in sorted(reads.items()):
        insert = inserts[k + 1000]
        assert (read["schema"], read["table"], read["primaryKey"], read["dataOld"], read["backfill"]) == (
            insert["schema"], insert["table"], insert["primaryKey"], {}, backfill)
        read_data = {c: v for c, v in read["data"].items() if c != "id"}
        insert_data = {c: v for c, v in insert["data"].items() if c != "id"}
        assert list(read_data) == list(insert_data), f"row {k}: READ columns {list(read_data)}, INSERT {list(insert_data)}"
        for name, sql_type, _, _ in COLUMNS:
            if _strict(read_data.get(name)) != _strict(insert_data.get(name)):
                differences.append((k, name, sql_type, read_data.get(name), insert_data.get(name)))
    if differences:
        k, name, sql_type, read_value, insert_value = differences[0]
        listing = "; ".join(f"row {k} {name} ({t}): READ {_short(r)} INSERT {_short(i)}"
                            for k, name, t, r, i in differences)
        raise AssertionError(
            f"READ of row {k} and INSERT of row {k + 1000} differ first in column {name} ({sql_type}): "
            f"READ {_short(read_value)}, INSERT {_short(insert_value)}. "
            f"All {len(differences)} differences: {listing}")
    assert reads[4]["data"]["tx"] == big_text


# Keys whose `::text` differs from their output function: char(6) loses its
# blanks, an inet host gains '/32'. The events carry the output.
KEYED = {
    "kc": ("char(6)", lambda n: f"k{n}", lambda n: f"{'az'[n % 2]}{n}"),
    "ki": ("inet", lambda n: f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
           lambda n: f"{(9, 11)[n % 2]}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"),
}
ROWS = 4000


def _connect(cluster, dbname="app"):
    conn = psycopg.connect(host=str(cluster.dir), port=cluster.port, user="postgres", dbname=dbname, autocommit=True)
    # Keys as their output function prints them (what pgoutput sends), not as Python objects.
    conn.adapters.register_loader("inet", TextLoader)
    return conn


class KeyWriter(threading.Thread):
    """Updates `val`, deletes rows, inserts rows and updates keys of the
    KEYED tables, one statement per transaction, until stopped."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.keys = {table: [fresh(n) for n in range(1, ROWS + 1)] for table, (_, fresh, _) in KEYED.items()}
        self.next = ROWS + 1
        self.stopped = threading.Event()
        self.operations = 0
        self.rng = random.Random(5)
        self.error = None

    def new_key(self, table):
        self.next += 1
        return KEYED[table][2](self.next)

    def run(self):
        try:
            with _connect(self.cluster) as conn:
                while not self.stopped.is_set():
                    self.step(conn)
        except Exception as e:  # reported by the test
            self.error = e

    def step(self, conn):
        time.sleep(0.0003)
        table = self.rng.choice(list(KEYED))
        sql_type = KEYED[table][0]
        keys = self.keys[table]
        pick = self.rng.choice(keys)
        op = self.rng.random()
        if op < 0.35:
            conn.execute(f"UPDATE {table} SET val = val + 1 WHERE k = %s::{sql_type}", (pick,))
        elif op < 0.55:
            conn.execute(f"DELETE FROM {table} WHERE k = %s::{sql_type}", (pick,))
        elif op < 0.75:
            key = self.new_key(table)
            conn.execute(f"INSERT INTO {table} VALUES (%s::{sql_type}, %s)", (key, self.rng.randrange(1000)))
            keys.append(key)
        else:
            key = self.new_key(table)
            conn.execute(f"UPDATE {table} SET k = %s::{sql_type} WHERE k = %s::{sql_type}", (key, pick))
            keys.append(key)
        self.operations += 1


def _replay(bodies: list[dict], table: str, normal=lambda key: key):
    """The table as the stream says, keys passed through `normal`; and the
    READs that are older than a live event of their key before them (a
    live change after the READ's snapshot sent ahead of it: stale)."""
    copy, touched, stale = {}, set(), []
    for body in bodies:
        if body["table"] != table:
            continue
        action, data, old = body["action"], body["data"], body["dataOld"]
        if action == "READ":
            key = normal(data["k"])
            if key in touched and copy.get(key) != data["val"]:
                stale.append((data["k"], data["val"], copy.get(key, "deleted")))
            copy[key] = data["val"]
        elif action == "INSERT":
            touched.add(normal(data["k"]))
            copy[normal(data["k"])] = data["val"]
        elif action == "UPDATE":
            if "k" in old and old["k"] != data["k"]:
                touched.add(normal(old["k"]))
                copy.pop(normal(old["k"]), None)
            touched.add(normal(data["k"]))
            copy[normal(data["k"])] = data["val"]
        elif action == "DELETE":
            touched.add(normal(old["k"]))
            copy.pop(normal(old["k"]), None)
        else:
            raise AssertionError(f"unexpected {action} event of {table}: {body}")
    return copy, stale


def _normal(key: str) -> str:
    """The key whichever of `::text` and output printed it."""
    return key.rstrip(" ").removesuffix("/32")


def _differences(table_rows: dict, copy: dict) -> tuple[list, list, list]:
    missing = sorted(k for k in table_rows.keys() - copy.keys())
    extra = sorted(k for k in copy.keys() - table_rows.keys())
    different = sorted((k, table_rows[k], copy[k]) for k in table_rows.keys() & copy.keys() if table_rows[k] != copy[k])
    return missing, extra, different


def test_keys_whose_cast_differs_from_their_output_match_inside_the_window(cluster, nats_server):
    cluster.execute("""
        CREATE FUNCTION public.slow(anyelement) RETURNS bool LANGUAGE plpgsql STABLE AS
            $$ BEGIN PERFORM pg_sleep(0.0005); RETURN true; END $$""")
    for table, (sql_type, fresh, _) in KEYED.items():
        cluster.execute(f"CREATE TABLE {table} (k {sql_type} PRIMARY KEY, val int)")
        with _connect(cluster) as conn:
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} VALUES (%s::{sql_type}, %s)",
                                [(fresh(n), n % 1000) for n in range(1, ROWS + 1)])
    cluster.execute("CREATE EXTENSION wal_listener")
    cluster.wait_for_state("streaming", timeout=60)

    writer = KeyWriter(cluster)
    writer.start()
    time.sleep(0.5)
    started = time.monotonic()
    backfills = [cluster.execute(f"SELECT wal_listener.backfill('{table}', where_clause => 'public.slow(k)') AS id")[0]["id"]
                 for table in KEYED]
    jobs = [wait_done(cluster, backfill, timeout=60) for backfill in backfills]
    took = time.monotonic() - started
    writer.stopped.set()
    writer.join(30)
    assert writer.error is None, f"the writer failed: {writer.error!r}"
    caught_up(cluster)
    bodies = event_bodies(nats_server.url)

    problems = []
    for (table, _), job in zip(KEYED.items(), jobs):
        with _connect(cluster) as conn:
            table_rows = dict(conn.execute(f"SELECT k, val FROM {table}").fetchall())
        copy, _ = _replay(bodies, table)
        normal_copy, stale = _replay(bodies, table, _normal)
        missing, extra, different = _differences(table_rows, copy)
        normal_missing, normal_extra, normal_different = _differences(
            {_normal(k): v for k, v in table_rows.items()}, normal_copy)
        reads = sum(1 for b in bodies if b["table"] == table and b["action"] == "READ")
        print(f"\n{table}: {job['rows_done']} rows read, {reads} READs, {len(table_rows)} rows now; replayed: "
              f"{len(missing)} missing, {len(extra)} extra, {len(different)} different; keys normalised "
              f"(blanks, /32): {len(normal_missing)} missing, {len(normal_extra)} extra, "
              f"{len(normal_different)} different, {len(stale)} stale READs")
        if missing or extra or different:
            problems.append(
                f"{table}: the replayed stream has {len(missing)} rows missing (e.g. {missing[:3]}), "
                f"{len(extra)} extra (e.g. {extra[:3]}), {len(different)} with another val "
                f"(key, table, copy: e.g. {different[:3]}); with keys normalised, "
                f"{len(normal_missing) + len(normal_extra) + len(normal_different)} differ and "
                f"{len(stale)} READs are older than a live event before them (key, READ val, val then: "
                f"e.g. {stale[:3]})")
        elif stale:
            problems.append(f"{table}: {len(stale)} READs are older than a live event of their key before them "
                            f"(key, READ val, val then: e.g. {stale[:3]})")
    print(f"backfills took {took:.1f} s under {writer.operations} concurrent writes")
    assert not problems, "\n".join(problems)


def test_a_where_clause_means_the_same_whatever_the_callers_settings(streaming, nats_server):
    """The stored condition is the server's re-print of the clause, with its
    constants written as the worker reads them back: under the caller's
    DateStyle 'SQL, DMY' '01/02/2025' is 1 February, and under
    extra_float_digits 0 a float8 constant would print rounded."""
    cluster = streaming
    cluster.execute("CREATE TABLE d (id int PRIMARY KEY, day date, x float8)")
    cluster.execute("INSERT INTO d VALUES (1, '2025-01-02', 0.3), (2, '2025-02-01', 0.30000000000000004)")
    with cluster.connect() as conn:
        conn.execute("SET DateStyle = 'SQL, DMY'")
        conn.execute("SET extra_float_digits = 0")
        backfill = conn.execute(
            "SELECT wal_listener.backfill('d', where_clause => "
            "'day = ''01/02/2025'' AND x = ''0.30000000000000004''::float8') AS id").fetchone()["id"]
    stored = cluster.execute("SELECT where_clause FROM wal_listener.backfill_jobs WHERE id = %s", (backfill,))
    print(f"\nstored condition: {stored[0]['where_clause']}")
    assert wait_done(cluster, backfill)["rows_done"] == 1
    reads = [b["data"] for b in event_bodies(nats_server.url) if b["action"] == "READ"]
    assert reads == [{"id": 2, "day": "2025-02-01", "x": 0.30000000000000004}], reads
