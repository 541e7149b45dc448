"""Replay stored candles as candle-close events on NATS JetStream, at a chosen speed.

A producer of the market event stream whose contract (subjects, message ids, the stream) is
customscripts/realtime/events.py: each candle is sent at its end, as the JSON candle with its
`Nats-Msg-Id`; `start`/`end` select candles by their end (customscripts/bartime.py). This is how the
local stack feeds the realtime scheduler.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from customscripts import ids
from customscripts.config import Settings, settings
from customscripts.realtime.events import ensure_stream, msg_id, subject_for


@dataclass(frozen=True)
class ReplayResult:
    published: int
    duplicates: int  # events JetStream already had (same Nats-Msg-Id inside its window)
    first_time: float | None  # the first and last events' times (their candles' ends)
    last_time: float | None


def load_candles(cfg: Settings, instrument_key: str, timeframe: str, start: float | None,
                 end: float | None, limit: int | None) -> list[dict]:
    sql = ("SELECT extract(epoch FROM time)::float8, extract(epoch FROM end_time)::float8, open, high, low,"
           " close, volume FROM candles WHERE instrument_key = %s AND timeframe = %s")
    args: list[object] = [ids.instrument_key(instrument_key), ids.timeframe(timeframe)]
    if start is not None:
        sql += " AND end_time >= %s"
        args.append(datetime.fromtimestamp(start, tz=UTC))
    if end is not None:
        sql += " AND end_time <= %s"
        args.append(datetime.fromtimestamp(end, tz=UTC))
    sql += " ORDER BY end_time" + (" LIMIT %s" if limit else "")
    if limit:
        args.append(int(limit))
    with psycopg.connect(cfg.pg_dsn) as conn:
        rows = conn.execute(sql, args).fetchall()
    keys = ("time", "end_time", "open", "high", "low", "close", "volume")
    return [{"instrument_key": instrument_key, "timeframe": timeframe, **dict(zip(keys, r, strict=True))}
            for r in rows]


async def replay_async(instrument_key: str, timeframe: str, *, start: float | None = None,
                       end: float | None = None, limit: int | None = None, rate: float | None = None,
                       speed: float | None = None, cfg: Settings | None = None) -> ReplayResult:
    """Publish the range's candles in time order. `rate` = events per second; `speed` = market seconds
    per wall second (e.g. 86400 replays one daily bar per second); neither = as fast as acks allow."""
    import nats

    cfg = cfg or settings()
    if (rate is not None and rate <= 0) or (speed is not None and speed <= 0):
        raise ValueError("rate and speed must be positive")
    candles = load_candles(cfg, instrument_key, timeframe, start, end, limit)
    subject = subject_for(cfg, instrument_key, timeframe)
    nc = await nats.connect(cfg.nats_url, connect_timeout=5)
    published = duplicates = 0
    try:
        js = nc.jetstream()
        await ensure_stream(js, cfg)
        started = time.monotonic()
        for i, candle in enumerate(candles):
            if rate is not None:
                due = started + i / rate
            elif speed is not None:
                due = started + (candle["end_time"] - candles[0]["end_time"]) / speed
            else:
                due = 0.0
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            ack = await js.publish(subject, json.dumps(candle, separators=(",", ":")).encode(),
                                   stream=cfg.nats_stream,
                                   headers={"Nats-Msg-Id": msg_id(instrument_key, timeframe, candle["time"])})
            published += 1
            duplicates += int(bool(ack.duplicate))
    finally:
        await nc.drain()
    return ReplayResult(published, duplicates, candles[0]["end_time"] if candles else None,
                        candles[-1]["end_time"] if candles else None)


def replay(instrument_key: str, timeframe: str, **kwargs: object) -> ReplayResult:
    """Blocking wrapper of replay_async (CLI, tests)."""
    return asyncio.run(replay_async(instrument_key, timeframe, **kwargs))  # type: ignore[arg-type]
