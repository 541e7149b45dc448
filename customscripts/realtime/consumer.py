"""The NATS side of a scheduler replica: a JetStream durable pull consumer shared by all replicas.

Per fetched batch: parse the events (events.py), evaluate them (Evaluator.process, on a daemon
thread), then acknowledge — only after everything due is published. A long batch keeps its messages
(`in_progress` beats); a failure of the platform's own publishing (PostgreSQL, Redis) leaves the batch
unacknowledged (nak with delay): publishing is idempotent, so nothing is lost or doubled. A malformed
event can never succeed and is terminated, loudly.

Stopping (SIGTERM, `Scheduler.stop`): nothing more is fetched; the batch under way gets
`scheduler_stop_grace_s` to finish and be acknowledged, else its messages are naked (redelivered to
another replica at once) and the process leaves without waiting for it. NATS gets a bounded flush and
close instead of a drain (which waits out the pull subscription, ~30 s).

Timer events: with `CS_SCHEDULER_TIMERS=1m,1h` every replica publishes a tick at each timeframe
boundary (events.timer_tick: JetStream keeps one per boundary).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from customscripts import ids, logs
from customscripts.bartime import last_close
from customscripts.config import Settings, settings
from customscripts.realtime import metrics
from customscripts.realtime.evaluator import Evaluator
from customscripts.realtime.events import Event, ensure_stream, parse_event, pull_consumer, timer_subject, timer_tick

log = logs.get("customscripts.scheduler")

GIVE_UP_AFTER_DELIVERIES = 50  # a publishing failure that lasts this long is logged and dropped


@dataclass
class RunStats:
    batches: int = 0
    events: int = 0
    evaluations: int = 0
    statuses: Counter = field(default_factory=Counter)
    retries: int = 0  # batches left unacknowledged (publishing failed)
    item_retries: int = 0  # evaluations tried again within their batch
    dead_letters: Counter = field(default_factory=Counter)  # by reason
    latencies_s: list[float] = field(default_factory=list)
    queued_s: list[float] = field(default_factory=list)
    prefetched_reads: int = 0


class Scheduler:
    """Consumes the market stream with a durable pull consumer; acks a batch only once it is published."""

    def __init__(self, evaluator: Evaluator, cfg: Settings | None = None) -> None:
        self.cfg = cfg or settings()
        self.evaluator = evaluator
        self.stats = RunStats()
        self.stopping = threading.Event()  # set by SIGTERM (`stop`): fetch nothing more, then exit
        self._stop_at: float | None = None
        self.handed_back = 0  # events of a batch naked at shutdown because it outlasted the grace

    def stop(self) -> None:
        """Graceful stop (SIGTERM): the batch under way gets `scheduler_stop_grace_s` to finish, then
        its events are handed back; nothing new is fetched. Safe from a signal handler."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self.stopping.set()

    def _grace_left(self) -> float | None:
        """Seconds the batch under way may still take (None: not stopping)."""
        if not self.stopping.is_set():
            return None
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        return self._stop_at + self.cfg.scheduler_stop_grace_s - time.monotonic()

    async def _connect(self):
        import nats

        nc = await nats.connect(self.cfg.nats_url, connect_timeout=2, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.5, allow_reconnect=True)
        js = nc.jetstream()
        await ensure_stream(js, self.cfg)
        return nc, js

    async def run(self, *, max_events: int | None = None, idle_exit_s: float | None = None,
                  until: Callable[[RunStats], bool] | None = None) -> RunStats:
        """Serve until stopped, `max_events` processed, `until(stats)` true, or idle for `idle_exit_s`.

        Batches overlap only under a backlog: while a batch is under way the next one is gathered and
        starts early (up to `scheduler_batches_in_flight` at once) once it is full
        (`scheduler_fetch_batch` events), or at least half full with nothing more waiting (a backlog's
        last batch); otherwise it starts when the replica is free, as one batch. A free replica gives
        a batch `scheduler_fetch_wait_s` from its first event to fill (events published together land
        in one batch). A replica so holds at most that many batches' messages and one batch gathering."""
        nc = js = psub = None
        idle_since = time.monotonic()
        timer_task = None
        fetching: asyncio.Task | None = None
        gathered: list = []  # fetched, waiting for their batch
        first_at = 0.0  # when the first of them arrived
        short = False  # the last fetch got fewer than it asked for: nothing more is waiting
        batches: set[asyncio.Task] = set()
        full = self.cfg.scheduler_fetch_batch
        linger = self.cfg.scheduler_fetch_wait_s
        loop = asyncio.get_running_loop()
        try:
            while not self.stopping.is_set():
                if psub is None:
                    try:
                        nc, js = await self._connect()
                        psub = await pull_consumer(js, self.cfg)
                        if self.cfg.scheduler_timers and timer_task is None:
                            timer_task = asyncio.create_task(self._timers(js))
                    except Exception as exc:  # NATS down: keep trying, bounded by the caller's stop rules
                        logs.event(log, "scheduler cannot reach NATS yet", error=repr(exc)[:200])
                        if nc is not None:
                            with contextlib.suppress(Exception):
                                await nc.close()
                        nc = js = psub = None
                        if idle_exit_s is not None and not batches and time.monotonic() - idle_since > idle_exit_s:
                            break
                        await asyncio.sleep(0.5)
                        continue
                waited = time.monotonic() - first_at
                if gathered and self._starts(len(gathered), len(batches), waited, short):
                    batches.add(asyncio.create_task(self._handle(loop, gathered)))
                    gathered = []
                    idle_since = time.monotonic()
                    continue
                if fetching is None and len(gathered) < full:
                    timeout = 1.0 if not (batches or gathered) else 0.1 if batches else max(0.005, linger - waited)
                    fetching = asyncio.create_task(self._fetch(psub, full - len(gathered), timeout))
                done, _ = await asyncio.wait(batches | ({fetching} if fetching else set()),
                                             return_when=asyncio.FIRST_COMPLETED)
                for finished in batches & done:
                    batches.discard(finished)
                    idle_since = time.monotonic()
                    if not finished.cancelled() and finished.exception() is not None:
                        logs.event(log, "batch task failed", error=repr(finished.exception())[:300])
                if fetching is not None and fetching in done:
                    msgs, fetching = fetching.result(), None
                    if msgs and not gathered:
                        first_at = time.monotonic()
                    short = len(msgs) < full - len(gathered)
                    gathered += msgs
                    if not msgs and not batches and not gathered and idle_exit_s is not None \
                            and time.monotonic() - idle_since > idle_exit_s:
                        break
                if max_events is not None and self.stats.events >= max_events:
                    break
                if until is not None and until(self.stats):
                    break
        finally:
            if fetching is not None:  # a short fetch (batches were under way): what it gets goes back
                with contextlib.suppress(Exception):
                    gathered += await fetching
            for m in gathered:  # fetched but never started: redelivered at once
                with contextlib.suppress(Exception):
                    await m.nak()
            if batches:  # each keeps its own grace (`_handle`): acknowledged, or handed back
                await asyncio.gather(*batches, return_exceptions=True)
            if timer_task is not None:
                timer_task.cancel()
            if nc is not None:
                await self._disconnect(nc, psub)
        return self.stats

    def _starts(self, gathered: int, running: int, waited: float, short: bool) -> bool:
        """Whether the gathered events start their batch now (see `run`)."""
        if not running:
            return gathered >= self.cfg.scheduler_fetch_batch or waited >= self.cfg.scheduler_fetch_wait_s
        if running >= max(1, self.cfg.scheduler_batches_in_flight):
            return False
        return gathered >= self.cfg.scheduler_fetch_batch or (short and 2 * gathered >= self.cfg.scheduler_fetch_batch)

    async def _fetch(self, psub, n: int, timeout: float) -> list:
        """Up to `n` messages, or none after `timeout` without any (short while a batch is under way
        or gathering: the loop looks again soon, and a fetch never outlives a stop by much)."""
        try:
            return await psub.fetch(n, timeout=timeout)
        except TimeoutError:
            return []
        except Exception as exc:  # connection trouble: nats-py reconnects; back off a little
            logs.event(log, "fetch failed", error=repr(exc)[:200])
            await asyncio.sleep(0.2)
            return []

    @staticmethod
    async def _disconnect(nc, psub) -> None:
        """Bounded goodbye: acks and naks already sent are flushed, then the connection closes. (A
        `drain` waits out the pull subscription's outstanding fetch, ~30 s.)"""
        with contextlib.suppress(Exception):
            if psub is not None:
                await asyncio.wait_for(psub.unsubscribe(), timeout=2.0)
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout=3.0)

    async def _handle(self, loop: asyncio.AbstractEventLoop, msgs: list) -> None:
        events: list[Event] = []
        good = []
        for msg in msgs:
            try:
                received = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else time.time()
                events.extend(parse_event(msg.subject, msg.data, received))
                good.append(msg)
            except Exception as exc:  # a malformed event can never succeed: drop it, loudly
                logs.event(log, "dropping malformed event", subject=msg.subject, error=repr(exc)[:200])
                with contextlib.suppress(Exception):
                    await msg.term()
        if not good:
            return
        work = _in_daemon_thread(loop, self.evaluator.process, events)
        try:
            # a long batch (slow scripts) keeps its messages: tell JetStream we are still on them
            beat = max(self.cfg.scheduler_ack_wait_s / 3, 0.5)
            last_beat = time.monotonic()
            while True:
                grace = self._grace_left()
                done, _ = await asyncio.wait({work}, timeout=beat if grace is None else max(0.0, min(beat, grace, 0.2)))
                if done:
                    break
                grace = self._grace_left()
                if grace is not None and grace <= 0:
                    await self._hand_back(good)
                    return
                if time.monotonic() - last_beat >= beat:
                    last_beat = time.monotonic()
                    for m in good:
                        with contextlib.suppress(Exception):
                            await m.in_progress()
            report = work.result()
        except Exception as exc:
            self.stats.retries += 1
            metrics.RETRIES.inc()
            deliveries = max(m.metadata.num_delivered for m in good)
            logs.event(log, "batch failed on the platform side; events will be redelivered", events=len(events),
                       deliveries=deliveries, error=repr(exc)[:300])
            if deliveries >= GIVE_UP_AFTER_DELIVERIES:
                logs.event(log, "giving up on events after repeated platform failures", events=len(events))
                for m in good:
                    with contextlib.suppress(Exception):
                        await m.term()
                return
            for m in good:
                with contextlib.suppress(Exception):
                    await m.nak(delay=1.0)
            await asyncio.sleep(0.5)
            return
        for m in good:  # only now: everything due for these events is published
            with contextlib.suppress(Exception):
                await m.ack()
        s = self.stats
        s.batches += 1
        s.events += len(good)
        s.evaluations += report.evaluations
        s.statuses.update(report.statuses)
        s.item_retries += report.item_retries
        s.dead_letters.update(ev.error["dead_letter"] for ev in report.dead_letters if ev.error)
        s.latencies_s.extend(report.latencies_s)
        s.queued_s.extend(report.queued_s)
        s.prefetched_reads += report.prefetched_reads
        logs.event(log, "batch published", events=len(good), evaluations=report.evaluations,
                   published=report.published, statuses=dict(report.statuses), item_retries=report.item_retries,
                   dead_letters=len(report.dead_letters),
                   prefetched_reads=report.prefetched_reads,
                   timings_ms={k: round(v * 1000, 1) for k, v in report.timings_s.items()})

    async def _hand_back(self, msgs: list) -> None:
        """Stopping and the batch under way outlasted the grace: its events go back to JetStream now
        (nak without delay: another replica takes them at once). Whatever the batch still publishes
        is idempotent, so the redelivery publishes each output once."""
        self.handed_back += len(msgs)
        for m in msgs:
            with contextlib.suppress(Exception):
                await m.nak()
        logs.event(log, "stopping: batch handed back unfinished", events=len(msgs))

    async def _timers(self, js) -> None:
        """Publish a tick per configured timeframe boundary (deduplicated by JetStream across replicas)."""
        frames = [ids.timeframe(tf.strip()) for tf in self.cfg.scheduler_timers.split(",") if tf.strip()]
        last: dict[str, float] = {}
        while True:
            now = time.time()
            for tf in frames:
                boundary = last_close(now, tf)  # the end of the bar that closed last (bartime.py)
                if last.get(tf) != boundary:
                    last[tf] = boundary
                    body, headers = timer_tick(tf, boundary)
                    with contextlib.suppress(Exception):
                        await js.publish(timer_subject(self.cfg, tf), body, stream=self.cfg.nats_stream,
                                         headers=headers)
            await asyncio.sleep(1.0)


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """`fn(*args)` on a daemon thread, as an asyncio future: a batch handed back at shutdown must not
    hold the process (the loop's default executor is joined when asyncio.run ends)."""
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="cs-sched-batch", daemon=True).start()
    return future
