"""`customscripts demo`: the local stack running real example scripts on the real sample data.

Everything goes through the public path a client would use: registry-fn behind the local
OpenFaaS-compatible provider, each published version running as its own sandboxed function, reads
served by gateway-fn from PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from customscripts import localstack
from customscripts.auth import issue_user_token
from customscripts.config import Settings, settings

EXAMPLES = Path(__file__).parent / "examples"
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


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class DemoClient:
    def __init__(self, cfg: Settings) -> None:
        self.base = cfg.registry_url
        self.http = requests.Session()
        token = issue_user_token(DEMO_USER, DEMO_TENANT, "pro")
        self.http.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self.http.request(method, self.base + path, json=body, timeout=60)

    def publish_example(self, script_id: str, filename: str, extra: dict[str, Any],
                        versions: dict[str, int]) -> tuple[str, int]:
        """Create or update the draft, then publish; an unchanged draft keeps its version. Returns the
        script's platform-wide id (the chosen id plus the tenant's tag) and the version."""
        fields = json.loads(json.dumps(extra).replace("{demo-rsi}", str(versions.get("demo-rsi", 1))))
        source = (EXAMPLES / filename).read_text()
        body = {"name": script_id.replace("-", " "), "source": source, **fields}
        created = self.call("POST", "/scripts", {"script_id": script_id, **body})
        if created.status_code == 409:
            updated = self.call("PUT", f"/scripts/{script_id}", body)
            updated.raise_for_status()
        elif created.status_code != 201:
            raise SystemExit(f"creating {script_id} failed: {created.status_code} {created.text}")
        published = self.call("POST", f"/scripts/{script_id}/publish")
        if published.status_code not in (200, 201):
            raise SystemExit(f"publishing {script_id} failed: {published.status_code} {published.text}")
        info = published.json()
        say(f"{script_id:16} v{info['version']} {'(unchanged)' if info.get('unchanged') else 'published'}"
            f"  sha256 {info['code_sha256'][:12]}  id {info['script_id']}")
        return str(info["script_id"]), int(info["version"])

    def execute(self, script_id: str, **body: Any) -> dict[str, Any]:
        resp = self.call("POST", f"/scripts/{script_id}/execute", body)
        if resp.status_code != 200:
            raise SystemExit(f"execute {script_id} failed: {resp.status_code} {resp.text}")
        return resp.json()


def _publish_realtime(cfg: Settings, client: DemoClient, script_id: str, times: list[float]) -> None:
    """Evaluate `script_id` for GOOG 1d closes at `times` the way the scheduler does on a candle close
    (subscription, evaluation, publish), then drop the subscription. A one-time execute never writes
    a script's history: the realtime publish is the value of record for its event."""
    from customscripts.realtime.scheduler import Event, build_evaluator

    sub = client.call("POST", f"/scripts/{script_id}/subscribe", {"instrument_key": "GOOG", "timeframe": "1d",
                                                                 "backfill": 0})
    if sub.status_code not in (200, 201):
        raise SystemExit(f"subscribing {script_id} failed: {sub.status_code} {sub.text}")
    evaluator = build_evaluator(cfg)
    try:
        evaluator.process([Event("GOOG", "1d", t) for t in times])
    finally:
        evaluator.close()
        client.call("DELETE", f"/scripts/{script_id}/subscriptions/{sub.json()['id']}")


def _epoch(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()


def _show(result: dict[str, Any], day: str) -> None:
    output = result.get("output") or {}
    value = output.get("value")
    shown = f"{value:.4f}" if isinstance(value, float) else json.dumps(value)
    meta = json.dumps(output.get("metadata") or {}, separators=(",", ":"))
    metrics = result["metrics"]
    say(f"  {result['script_id']:16} {result['instrument_key']:7} as of {day}: {result['status']:6} "
        f"value={shown:>10} {meta}  [{metrics['duration_ms']} ms, cpu {metrics['cpu_ms']} ms, "
        f"{metrics['memory_mb']} MB]")


def run_demo(cfg: Settings | None = None) -> int:
    cfg = cfg or settings()
    say("bringing the local stack up")
    localstack.up(cfg)
    from customscripts.marketdata.loader import load_sample_data

    load_sample_data(cfg, echo=lambda msg: say(msg))
    client = DemoClient(cfg)
    say(f"publishing example scripts as {DEMO_USER} of tenant {DEMO_TENANT}")
    versions: dict[str, int] = {}
    ids: dict[str, str] = {}
    for script_id, filename, extra in DEMO_SCRIPTS:
        ids[script_id], versions[script_id] = client.publish_example(script_id, filename, extra, versions)

    say("realtime evaluates demo-rsi at the demo's closes: its published outputs are what demo-rsi-regime reads")
    _publish_realtime(cfg, client, ids["demo-rsi"], [_epoch(day) for day in DEMO_TIMES])
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
    bad = client.call("POST", "/scripts", {"script_id": "demo-escape", "name": "demo escape",
                                           "source": "import socket\n\ndef run(ctx):\n    return 1\n"})
    if bad.status_code in (201, 409):
        client.call("POST", "/scripts/demo-escape/publish")
        result = client.execute("demo-escape", instrument_key="GOOG", timeframe="1d")
        say(f"  demo-escape: status={result['status']}: {(result.get('error') or {}).get('message', '')}")

    try:
        from customscripts.realtime.demo import run_realtime_demo
    except ImportError:
        return 0
    say("realtime: replaying GOOG candle closes through NATS JetStream to the scheduler")
    run_realtime_demo(cfg, echo=say)
    return 0
