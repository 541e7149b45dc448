"""Replayer: candle-close events reach JetStream in order, in the documented shape, deduplicated."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime

import psycopg

from customscripts.marketdata.loader import CsvRow, load_rows
from customscripts.marketdata.replayer import replay
from customscripts.realtime.events import msg_id, subject_for

T0 = 1_700_000_000.0


def _consume(cfg, subject: str, expected: int) -> list:
    import nats

    async def run() -> list:
        nc = await nats.connect(cfg.nats_url)
        try:
            js = nc.jetstream()
            sub = await js.pull_subscribe(subject, durable=None, stream=cfg.nats_stream)
            got: list = []
            while len(got) < expected:
                batch = await sub.fetch(expected - len(got), timeout=5)
                for msg in batch:
                    await msg.ack()
                got.extend(batch)
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):  # nothing beyond those
                got.extend(await sub.fetch(1, timeout=0.5))
            await sub.unsubscribe()
            return got
        finally:
            await nc.close()

    return asyncio.run(run())


def test_replay_publishes_candle_closes_once(stack, uid):
    instrument = f"R{uid}.X"  # a '.' in the key must not split the subject
    rows = [CsvRow(datetime.fromtimestamp(T0 + 60 * i, tz=UTC), "1", "2", "0.5", str(1 + i), "10")
            for i in range(6)]
    with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
        load_rows(conn, instrument, "1m", rows)
    first = replay(instrument, "1m", start=T0 + 60, end=T0 + 240, rate=1000, cfg=stack)
    again = replay(instrument, "1m", start=T0 + 60, end=T0 + 240, speed=1e6, cfg=stack)
    assert (first.published, first.duplicates) == (4, 0)
    assert (again.published, again.duplicates) == (4, 4)  # JetStream dropped the re-sent events
    subject = subject_for(stack, instrument, "1m")
    assert subject == f"market.candle.R{uid}~X.1m"
    msgs = _consume(stack, subject, 4)
    bodies = [json.loads(m.data) for m in msgs]
    # start/end select candles by their end: the candle closing at T0 + 60 is the first
    assert [b["end_time"] for b in bodies] == [T0 + 60 * i for i in range(1, 5)]
    assert bodies[0] == {"instrument_key": instrument, "timeframe": "1m", "time": T0, "end_time": T0 + 60,
                         "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.0, "volume": 10.0}
    assert msgs[0].headers["Nats-Msg-Id"] == msg_id(instrument, "1m", T0)
