"""The demo: nats-server plus Postgres with wal_listener, a few rows changed
and a message published from SQL in the transaction of an INSERT, printed
as a NATS subscriber receives them."""

import asyncio
import json
import os

import nats

from harness import Nats, Postgres, wait_until

PG_VERSION = os.environ.get("WAL_LISTENER_PG", "15")

CHANGES = [
    "CREATE TABLE users (id int PRIMARY KEY, email text, plan text, profile jsonb, signed_up timestamptz)",
    """INSERT INTO users VALUES (1, 'ada@example.com', 'free', '{"lang": "en"}', '2026-11-24 09:30:00+00'),
                         (2, 'linus@example.com', 'pro', NULL, now())""",
    "UPDATE users SET plan = 'team' WHERE id = 1",
    "DELETE FROM users WHERE id = 2",
    "TRUNCATE users",
    # An outbox without a table: the message goes out at this commit, after the INSERT's event.
    """BEGIN;
  INSERT INTO users VALUES (3, 'grace@example.com', 'pro', NULL, now());
  SELECT wal_listener.publish('wal_listener.users.signed_up', jsonb_build_object('user_id', 3, 'plan', 'pro'),
                              '{"Type": "UserSignedUp"}');
  COMMIT""",
]
EXPECTED = 7
SHOWN_STATUS = ["state", "pid", "slot", "confirmed_flush_lsn", "lag_bytes", "events_published", "nats_connected"]


async def print_events(url: str, expected: int):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe("wal_listener.>", ordered_consumer=True)
    for _ in range(expected):
        msg = await sub.next_msg(timeout=30)
        print(f"\n{msg.subject}  headers: {dict(sorted(msg.headers.items()))}")
        print(json.dumps(json.loads(msg.data), indent=2, ensure_ascii=False))
    await nc.close()


def main():
    nats_server = Nats()
    cluster = Postgres(PG_VERSION, {"wal_listener.nats_url": f"'{nats_server.url}'"})
    try:
        print(f"nats-server with JetStream on {nats_server.url}")
        cluster.start()
        print(f"PostgreSQL {PG_VERSION} with wal_listener preloaded, socket {cluster.dir}, port {cluster.port}")
        cluster.execute("CREATE DATABASE app", dbname="postgres")
        cluster.execute("CREATE EXTENSION wal_listener")
        cluster.wait_for_state("streaming", timeout=60)
        print("worker is streaming; committing, each in its own transaction:")
        for statement in CHANGES:
            print(f"  {statement};")
            cluster.execute(statement)
        asyncio.run(print_events(nats_server.url, expected=EXPECTED))
        wait_until(lambda: cluster.status()["events_published"] == EXPECTED, 10, "status to count the events")
        status = cluster.status()
        print(f"\nSELECT {', '.join(SHOWN_STATUS)} FROM wal_listener.status();")
        for key in SHOWN_STATUS:
            print(f"  {key:20} {status[key]}")
    finally:
        cluster.destroy()
        nats_server.destroy()


if __name__ == "__main__":
    main()
