"""Realtime demo: subscribe a script, replay candles through JetStream, and watch outputs arrive.

`run_realtime_demo()` needs the local stack (`customscripts up`) and the sample data. It uses its own
JetStream stream and durable consumer, runs one scheduler replica in a background thread, replays
`limit` GOOG daily candles at `rate` events/s, and prints each output as it lands on the Redis stream
(the built-in streaming path), then the signal endpoint's answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis

from customscripts.app import app
from customscripts.auth import issue_user_token
from customscripts.client import Client, ClientError
from customscripts.config import Settings, settings
from customscripts.marketdata.replayer import replay
from customscripts.realtime.consumer import Scheduler
from customscripts.realtime.publisher import stream_key

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rsi.py"


def run_realtime_demo(cfg: Settings | None = None, *, instrument_key: str = "GOOG", timeframe: str = "1d",
                      start: str = "2012-06-01", limit: int = 20, rate: float = 5.0,
                      echo: Callable[[str], None] = print) -> int:
    base = cfg or settings()
    uid = uuid.uuid4().hex[:8]
    cfg = dataclasses.replace(base, nats_stream=f"DEMO{uid.upper()}", nats_subject_prefix=f"demo{uid}.candle",
                              scheduler_durable=f"demo-{uid}")
    user, tenant, sid = f"demo-{uid}", f"demo-tenant-{uid}", f"rsi-live-{uid}"
    api = Client(cfg.registry_url, issue_user_token(user, tenant, "pro"))
    api.create_script(sid, EXAMPLE.read_text(), name="RSI (live)", runtime_mode="realtime")
    api.publish(sid)
    sub = api.subscribe(sid, instrument_key=instrument_key, timeframe=timeframe, params={"period": 14},
                         backfill=0)  # the demo shows live outputs
    echo(f"[realtime] subscribed {sid}@1 on {instrument_key} {timeframe} (subscription {sub['id']})")
    evaluator = app().evaluator(cfg)
    scheduler = Scheduler(evaluator, cfg)
    worker = threading.Thread(target=lambda: asyncio.run(scheduler.run(until=lambda s: s.events >= limit,
                                                                       idle_exit_s=30)), daemon=True)
    worker.start()
    start_epoch = datetime.fromisoformat(start).replace(tzinfo=UTC).timestamp()
    feeder = threading.Thread(target=lambda: replay(instrument_key, timeframe, start=start_epoch, limit=limit,
                                                    rate=rate, cfg=cfg), daemon=True)
    feeder.start()
    r_client = redis.Redis(host=cfg.redis_host, port=cfg.redis_port)
    key, last_id, seen = stream_key(tenant, instrument_key, timeframe), "0", 0
    while seen < limit and (worker.is_alive() or feeder.is_alive()):
        for _stream, entries in r_client.xread({key: last_id}, block=1000, count=100) or []:
            for entry_id, fields in entries:
                last_id = entry_id
                payload = json.loads(fields[b"payload"])
                day = datetime.fromtimestamp(payload["timestamp"], UTC).date()
                echo(f"[realtime] {day} {fields[b'indicator'].decode()} = {payload['value']:.2f}")
                seen += 1
    worker.join(timeout=60)
    evaluator.close()
    try:
        signal = api.signal(instrument_key, sid, timeframe=timeframe, params={"period": 14}, history=3)
        kept = len((signal.get("history") or {}).get("value") or [])
        echo(f"[realtime] GET /signals/{instrument_key}/custom/{sid}: value {signal['value']:.2f} as of "
             f"{datetime.fromtimestamp(signal['timestamp'], UTC).date()}, the last {kept} from its history")
    except ClientError as exc:
        echo(f"[realtime] GET /signals/{instrument_key}/custom/{sid}: {exc}")
    api.unsubscribe(sid, sub["id"])
    drop_stream(cfg)
    return 0 if seen == limit else 1


def drop_stream(cfg: Settings) -> None:
    """Delete `cfg.nats_stream`: a run's own stream (this demo's, a bench run's), never the platform's."""
    import nats

    async def go() -> None:
        nc = await nats.connect(cfg.nats_url)
        try:
            await nc.jetstream().delete_stream(cfg.nats_stream)
        finally:
            await nc.close()

    asyncio.run(go())
