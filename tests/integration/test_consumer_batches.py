"""The scheduler's consumer over a real JetStream stream: how fetched events become batches.

Under a backlog a replica overlaps at most `scheduler_batches_in_flight` full batches; without one
it runs one batch at a time with everything that arrived meanwhile; whatever it fetched and did not
start when it stops goes back to JetStream at once (nothing is left held until the ack wait). The
evaluator here only records what it was given: these tests are about the consumer, and the real
evaluator's batches are covered by test_realtime*.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Sequence

import pytest

from customscripts.realtime.consumer import Scheduler
from customscripts.realtime.events import Event
from customscripts.realtime.recording import BatchReport
from tests.integration.realtime_support import isolated_stream, publish_candles

DAY = 86_400.0


class RecordingEvaluator:
    """Holds each batch for `hold_s` (so batches can overlap) and records what it saw."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.batches: list[list[Event]] = []

    def process(self, events: Sequence[Event]) -> BatchReport:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.batches.append(list(events))
        time.sleep(self.hold_s)
        with self.lock:
            self.running -= 1
        return BatchReport(events=len(events))

    def seen(self) -> Counter:
        return Counter((e.instrument_key, e.time) for batch in self.batches for e in batch)


def _candles(n: int, instruments: int = 1) -> list[dict]:
    start = 1_600_000_000.0
    return [{"instrument_key": f"CB{i:02d}", "timeframe": "1d", "time": start + DAY * k, "open": 1, "high": 1,
             "low": 1, "close": 1, "volume": 1} for k in range(n) for i in range(instruments)]


def _run(cfg, evaluator: RecordingEvaluator, events: int) -> Scheduler:
    scheduler = Scheduler(evaluator, cfg)  # type: ignore[arg-type]
    asyncio.run(scheduler.run(until=lambda s: s.events >= events, idle_exit_s=20))
    return scheduler


def _ack_pending(cfg) -> tuple[int, int]:
    """(delivered but not acknowledged, not delivered yet) on the test's durable consumer."""
    import nats

    async def go() -> tuple[int, int]:
        nc = await nats.connect(cfg.nats_url, connect_timeout=5)
        try:
            info = await nc.jetstream().consumer_info(cfg.nats_stream, cfg.scheduler_durable)
            return info.num_ack_pending, info.num_pending
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_backlog_runs_at_most_the_allowed_full_batches_at_once_and_every_event_once(stack, uid, in_flight):
    with isolated_stream(stack, uid, scheduler_fetch_batch=5, scheduler_batches_in_flight=in_flight) as cfg:
        publish_candles(cfg, _candles(20))  # four full batches waiting before the replica starts
        evaluator = RecordingEvaluator(hold_s=0.3)
        scheduler = _run(cfg, evaluator, 20)
        assert scheduler.stats.events == 20
        assert sorted(evaluator.seen().values()) == [1] * 20  # each event in exactly one batch
        assert evaluator.most_at_once == in_flight
        assert all(len(b) <= 5 for b in evaluator.batches)
        assert _ack_pending(cfg) == (0, 0)  # every event acknowledged, nothing left behind


def test_without_a_backlog_one_batch_at_a_time_takes_everything_that_arrived(stack, uid):
    with isolated_stream(stack, uid, scheduler_fetch_batch=50, scheduler_batches_in_flight=2) as cfg:
        evaluator = RecordingEvaluator(hold_s=0.5)
        scheduler = Scheduler(evaluator, cfg)  # type: ignore[arg-type]

        def trickle() -> None:  # a few events, then more while the first batch is under way
            publish_candles(cfg, _candles(3))
            while not evaluator.batches:
                time.sleep(0.01)
            publish_candles(cfg, [c for c in _candles(3, instruments=4) if c["instrument_key"] != "CB00"])
        feeder = threading.Thread(target=trickle)
        feeder.start()
        asyncio.run(scheduler.run(until=lambda s: s.events >= 12, idle_exit_s=20))
        feeder.join()
        assert evaluator.most_at_once == 1  # not full: the next batch waits for the replica
        assert sum(evaluator.seen().values()) == 12 and len(evaluator.seen()) == 12
        # what arrived during the first batch went into one batch, not one per fetch
        assert len(evaluator.batches) <= 3 and len(evaluator.batches[-1]) > 1


def test_a_replica_stopping_mid_backlog_hands_back_what_it_fetched_and_did_not_start(stack, uid):
    with isolated_stream(stack, uid, scheduler_fetch_batch=5, scheduler_batches_in_flight=2,
                         scheduler_ack_wait_s=60) as cfg:
        publish_candles(cfg, _candles(30))
        first = RecordingEvaluator(hold_s=0.3)
        _run(cfg, first, 5)  # stops after its first acknowledged batch, others fetched or under way
        acked_first = sum(first.seen().values())
        assert acked_first >= 5
        # what it fetched and did not start went back at once: a second replica gets every other
        # event long before the 60 s ack wait would have released them (it gives up after 20 s idle)
        second = RecordingEvaluator(hold_s=0.0)
        _run(dataclasses.replace(cfg), second, 30 - acked_first)
        assert set(first.seen()) | set(second.seen()) == {(c["instrument_key"], c["time"] + DAY)
                                                          for c in _candles(30)}
        assert not set(first.seen()) & set(second.seen())  # acknowledged once, never redone
        assert _ack_pending(cfg) == (0, 0)


def test_when_gathered_events_start_their_batch():
    from customscripts.config import settings

    cfg = dataclasses.replace(settings(), scheduler_fetch_batch=10, scheduler_batches_in_flight=2,
                              scheduler_fetch_wait_s=0.02)
    starts = Scheduler(RecordingEvaluator(0), cfg)._starts  # type: ignore[arg-type]
    # a free replica: a full batch at once, else after the short wait for the rest of a burst
    assert starts(10, 0, 0.0, short=False) and not starts(3, 0, 0.0, short=True) and starts(3, 0, 0.03, short=True)
    # one under way: only full batches, or a backlog's last one (half full, nothing more waiting)
    assert starts(10, 1, 0.0, short=False) and starts(5, 1, 0.0, short=True)
    assert not starts(5, 1, 5.0, short=False) and not starts(4, 1, 5.0, short=True)
    # as many under way as allowed: nothing more starts
    assert not starts(10, 2, 5.0, short=True)
