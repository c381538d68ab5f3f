"""The pattern wal_listener replaces, for bench.py's write-path comparison:
a relay that polls a trigger-filled outbox table, publishes each row to
JetStream (awaiting the PubAcks) and deletes what it published, in one
transaction per batch.

Usage: outbox_relay.py PG_HOST PG_PORT NATS_URL; runs until killed."""

import asyncio
import sys

import nats
import psycopg

BATCH = 500
IDLE_POLL_S = 0.01


async def main(host: str, port: str, url: str):
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.add_stream(name="outbox", subjects=["outbox.>"])
    except Exception:
        pass  # exists already
    conn = await psycopg.AsyncConnection.connect(host=host, port=int(port), user="postgres", dbname="app")
    while True:
        async with conn.transaction():
            rows = await (await conn.execute(
                "DELETE FROM bench_outbox WHERE id IN (SELECT id FROM bench_outbox ORDER BY id LIMIT %s "
                "FOR UPDATE SKIP LOCKED) RETURNING id, payload::text", (BATCH,))).fetchall()
            acks = [await js.publish("outbox.bench_pgbench", payload.encode(), headers={"Nats-Msg-Id": str(row_id)})
                    for row_id, payload in rows]
            del acks
        if not rows:
            await asyncio.sleep(IDLE_POLL_S)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
