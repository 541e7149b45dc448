"""The market event stream contract: subjects, message ids, the stream and consumer, and Event.

Producers (the replayer, the platform's market feed, the scheduler's own timer ticks) and the
scheduler's consumer meet here and nowhere else. Subjects are `{nats_subject_prefix}.{instrument}.
{timeframe}` on stream `nats_stream`; a candle-close message is the JSON candle `{instrument_key,
timeframe, time (its start, epoch s), end_time, open, high, low, close, volume}` and closes at its end
(customscripts/bartime.py), which is the event's time. Every message carries a `Nats-Msg-Id` of the
event identity, so JetStream drops a re-sent event inside its duplicate window and replicas never see
it twice. A timer tick `{"timer": true, "timeframe", "time"}` on `{prefix}._timer.{tf}` evaluates every
subscription on that timeframe as of the boundary; its event identity equals a candle close at the
same time, so both at once publish once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from customscripts import ids
from customscripts.bartime import bar_end
from customscripts.config import Settings

DUPLICATE_WINDOW_S = 600
TIMER_TOKEN = "_timer"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}


@dataclass(frozen=True)
class Event:
    """A candle close (or timer tick) for one instrument and timeframe at `time` (epoch s): the closed
    bar's end, which evaluations read as of and outputs are stamped with."""

    instrument_key: str
    timeframe: str
    time: float
    received: float = field(default=0.0, compare=False)  # when it entered JetStream (latency origin)


def subject_for(cfg: Settings, instrument_key: str, timeframe: str) -> str:
    """NATS subject of an instrument's candle closes. '.' splits subject tokens, so it becomes '~'
    (which instrument keys cannot contain); the payload always carries the real instrument key."""
    ids.instrument_key(instrument_key)
    ids.timeframe(timeframe)
    return f"{cfg.nats_subject_prefix}.{instrument_key.replace('.', '~')}.{timeframe}"


def msg_id(instrument_key: str, timeframe: str, epoch: float) -> str:
    """The Nats-Msg-Id of a candle close (`epoch`: the candle's start, as the message's `time`)."""
    return f"candle:{instrument_key}:{timeframe}:{epoch:.0f}"


def timer_subject(cfg: Settings, timeframe: str) -> str:
    return f"{cfg.nats_subject_prefix}.{TIMER_TOKEN}.{timeframe}"


def timer_tick(timeframe: str, boundary: float) -> tuple[bytes, dict[str, str]]:
    """A timer tick's body and headers (its Nats-Msg-Id is the boundary: one per boundary)."""
    body = json.dumps({"timer": True, "timeframe": timeframe, "time": boundary}).encode()
    return body, {"Nats-Msg-Id": f"timer:{timeframe}:{boundary:.0f}"}


async def ensure_stream(js, cfg: Settings) -> None:
    """Create the market stream if missing; an existing stream (maybe made by another replica or the
    replayer) is left as is."""
    from nats.js.api import StreamConfig
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info(cfg.nats_stream)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=cfg.nats_stream, subjects=[f"{cfg.nats_subject_prefix}.>"],
                                         duplicate_window=DUPLICATE_WINDOW_S))


async def pull_consumer(js, cfg: Settings):
    """The durable pull subscription every replica shares (same durable name: they share the work);
    explicit acks, so an event is acknowledged only once its outputs are published."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    config = ConsumerConfig(durable_name=cfg.scheduler_durable, ack_policy=AckPolicy.EXPLICIT,
                            deliver_policy=DeliverPolicy.ALL, ack_wait=cfg.scheduler_ack_wait_s,
                            max_deliver=cfg.scheduler_max_deliver, max_ack_pending=20_000)
    return await js.pull_subscribe(f"{cfg.nats_subject_prefix}.>", durable=cfg.scheduler_durable,
                                   stream=cfg.nats_stream, config=config)


def parse_event(subject: str, data: bytes, received: float = 0.0) -> list[Event]:
    """A candle-close message → one event at the candle's end (its `end_time`, else computed from its
    start `time`: bartime.bar_end, the one rule); a timer tick (its time is a boundary, the end of the
    bar that just closed) → one event per instrument resolved later (instrument_key "")."""
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("event is not a JSON object")
    t = float(body["time"])
    if not math.isfinite(t):
        raise ValueError("event time is not finite")
    timeframe = ids.timeframe(body["timeframe"])
    if body.get("timer"):
        return [Event("", timeframe, t, received)]
    end = bar_end(t, timeframe)
    if body.get("end_time") is not None and abs(float(body["end_time"]) - end) >= 1e-6:
        raise ValueError(f"event end_time {body['end_time']!r} is not its bar's end {end!r}")
    return [Event(ids.instrument_key(body["instrument_key"]), timeframe, end, received)]


def timeframe_seconds(tf: str) -> int:
    """A timeframe's nominal length (a month counts 30 days)."""
    ids.timeframe(tf)
    unit = "mo" if tf.endswith("mo") else tf[-1]
    return int(tf[: -len(unit)]) * _UNITS[unit]
