"""`customscripts demo`: the local stack running real example scripts on the real sample data.

Everything goes through the public path a client would use: registry-fn behind the local
OpenFaaS-compatible provider, each published version running as its own sandboxed function, reads
served by gateway-fn from PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from customscripts.auth import issue_user_token
from customscripts.client import Client, ClientError, Conflict
from customscripts.config import Settings, settings
from customscripts.local import stack

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO_TENANT = "demo-fund"
DEMO_USER = "quant-1"

# (script_id, example file, extra create fields)
DEMO_SCRIPTS: list[tuple[str, str, dict[str, Any]]] = [
    ("demo-sma", "sma.py", {"input_schema": {"type": "object", "properties": {
        "period": {"type": "integer", "minimum": 2, "maximum": 200}}}}),
    ("demo-rsi", "rsi.py", {"output_schema": {"type": "object", "properties": {
        "value": {"type": "number", "minimum": 0, "maximum": 100}}}}),
    ("demo-rsi-regime", "rsi_regime.py", {"depends_on": ["demo-rsi@{demo-rsi}"]}),
]

DEMO_TIMES = ["2012-06-01", "2012-12-03", "2013-03-01"]
PLOT_BARS = 90  # GOOG daily bars drawn per example script, ending at the last demo time


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo_client(cfg: Settings) -> Client:
    return Client(cfg.registry_url, issue_user_token(DEMO_USER, DEMO_TENANT, "pro"))


def publish_example(client: Client, script_id: str, filename: str, extra: dict[str, Any],
                    versions: dict[str, int]) -> tuple[str, int]:
    """Create or update the draft, then publish; an unchanged draft keeps its version. Returns the
    script's platform-wide id (the chosen id plus the tenant's tag) and the version."""
    fields = json.loads(json.dumps(extra).replace("{demo-rsi}", str(versions.get("demo-rsi", 1))))
    source = (EXAMPLES / filename).read_text()
    name = script_id.replace("-", " ")
    try:
        client.create_script(script_id, source, name=name, **fields)
    except Conflict:
        client.edit_script(script_id, name=name, source=source, **fields)
    info = client.publish(script_id)
    say(f"{script_id:16} v{info['version']} {'(unchanged)' if info.get('unchanged') else 'published'}"
        f"  sha256 {info['code_sha256'][:12]}  id {info['script_id']}")
    return str(info["script_id"]), int(info["version"])


def _publish_realtime(cfg: Settings, client: Client, script_id: str, times: list[float]) -> None:
    """Evaluate `script_id` for GOOG 1d closes at `times` the way the scheduler does on a candle close
    (subscription, evaluation, publish), then drop the subscription. A one-time execute never writes
    a script's history: the realtime publish is the value of record for its event."""
    from customscripts.app import app
    from customscripts.realtime.events import Event

    sub = client.subscribe(script_id, instrument_key="GOOG", timeframe="1d", backfill=0)
    evaluator = app().evaluator(cfg)
    try:
        evaluator.process([Event("GOOG", "1d", t) for t in times])
    finally:
        evaluator.close()
        client.unsubscribe(script_id, sub["id"])


def write_plots(client: Client, ids: dict[str, str], out_dir: Path, times: list[float],
                cols: dict[str, list[float]]) -> list[Path]:
    """One PNG per example script: GOOG daily candles with the script's one-time outputs at each bar's
    close (executed through the API), drawn on this side with matplotlib."""
    from customscripts import plots
    from customscripts.progress import Progress

    written = []
    params = {"demo-sma": {"period": 20}, "demo-rsi-regime": {"rsi_script": ids["demo-rsi"]}}
    for script_id, _filename, _extra in DEMO_SCRIPTS:
        points = []
        with Progress(len(times), f"[demo] {script_id}: executing at {len(times)} closes") as bar:
            for start, t in zip(cols["time"], times, strict=True):
                result = client.execute(script_id, instrument_key="GOOG", timeframe="1d",
                                        params=params.get(script_id), timestamp=t)
                if result["status"] == "ok":
                    points.append((start, result["output"]["value"]))
                bar.advance()
        written.append(plots.plot_indicator(cols, points, out_dir / f"{script_id}.png",
                                            title=f"{script_id}  GOOG 1d  (one-time executes over the API)"))
    return written


def _epoch(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()


def _show(result: dict[str, Any], day: str) -> None:
    output = result.get("output") or {}
    value = output.get("value")
    shown = f"{value:.4f}" if isinstance(value, float) else json.dumps(value)
    meta = json.dumps(output.get("metadata") or {}, separators=(",", ":"))
    metrics = result["metrics"]
    say(f"  {result['script_id']:28} {result['instrument_key']:7} as of {day}: {result['status']:6} "
        f"value={shown:>10} {meta}  [{metrics['duration_ms']} ms, cpu {metrics['cpu_ms']} ms, "
        f"{metrics['memory_mb']} MB]")


def run_demo(cfg: Settings | None = None) -> int:
    """The demo; an API error ends it with one line naming the API's code."""
    try:
        return _run_demo(cfg or settings())
    except ClientError as exc:
        say(f"error: {exc}")
        return 1


def _run_demo(cfg: Settings) -> int:
    say("bringing the local stack up")
    stack.up(cfg)
    from customscripts.marketdata.loader import load_sample_data

    load_sample_data(cfg, echo=lambda msg: say(msg))
    client = demo_client(cfg)
    say(f"publishing example scripts as {DEMO_USER} of tenant {DEMO_TENANT}")
    versions: dict[str, int] = {}
    ids: dict[str, str] = {}
    for script_id, filename, extra in DEMO_SCRIPTS:
        ids[script_id], versions[script_id] = publish_example(client, script_id, filename, extra, versions)

    from customscripts.plots import sample_window

    cols, plot_times = sample_window("GOOG", "1d", _epoch(DEMO_TIMES[-1]), PLOT_BARS)
    say("realtime evaluates demo-rsi at the demo's closes: its published outputs are what demo-rsi-regime reads")
    _publish_realtime(cfg, client, ids["demo-rsi"], sorted({*(_epoch(day) for day in DEMO_TIMES), *plot_times}))
    say("one-time executions through registry-fn -> script functions -> gateway-fn (real GOOG daily bars)")
    for day in DEMO_TIMES:
        ts = _epoch(day)
        _show(client.execute("demo-sma", instrument_key="GOOG", timeframe="1d", params={"period": 20},
                             timestamp=ts), day)
        _show(client.execute("demo-rsi", instrument_key="GOOG", timeframe="1d", timestamp=ts, store=True), day)
        _show(client.execute("demo-rsi-regime", instrument_key="GOOG", timeframe="1d", timestamp=ts,
                             params={"rsi_script": ids["demo-rsi"]}), day)
    day = "2017-06-01"
    _show(client.execute("demo-rsi", instrument_key="EURUSD", timeframe="1h", timestamp=_epoch(day)), day)

    say("a failing script is contained and reported, not published")
    with contextlib.suppress(Conflict):
        client.create_script("demo-escape", "import socket\n\ndef run(ctx):\n    return 1\n", name="demo escape")
    client.publish("demo-escape")
    result = client.execute("demo-escape", instrument_key="GOOG", timeframe="1d")
    say(f"  demo-escape: status={result['status']}: {(result.get('error') or {}).get('message', '')}")

    say(f"plotting each example over {PLOT_BARS} GOOG daily candles")
    for path in write_plots(client, ids, cfg.state_dir / "demo", plot_times, cols):
        say(f"  plot: {path}")

    from customscripts.local.realtime_demo import run_realtime_demo

    say("realtime: replaying GOOG candle closes through NATS JetStream to the scheduler")
    run_realtime_demo(cfg, echo=say)
    return 0
