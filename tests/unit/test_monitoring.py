"""The Grafana dashboard and the Prometheus alert rules in deploy/ reference only metrics the package defines
(customscripts/metrics.py), and cover what an operator must be told about."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from customscripts import metrics
from customscripts.config import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "customscripts.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "delta", "deriv", "histogram_quantile",
    "clamp_min", "clamp_max", "absent", "absent_over_time", "and", "or", "unless", "bool", "topk", "bottomk",
    "offset", "vector", "scalar", "time", "humanize", "humanizeDuration",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, label lists, ranges, strings and numbers
    taken out first)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"(?<![\w.])\d+(\.\d+)?([eE][+-]?\d+)?", "", expr)
    return {t for t in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if t not in PROMQL_WORDS}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in _panels(data["panels"]) for t in p.get("targets") or []]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_the_expression_parser_finds_metric_names() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y"}[5m]))) > 1e-9') == {"a_bucket"}
    assert metric_names("max(b) > 500 and delta(max(b)[15m:1m]) > 0 or absent(c{component=\"x\"})") == {"b", "c"}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_referenced_metric_is_defined_by_the_package(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    assert exprs
    defined = metrics.defined_names()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= defined, (expr, names - defined)


def test_the_dashboard_shows_every_metric_family() -> None:
    """Nothing the package measures is left off the dashboard (a family is shown through any of its series)."""
    shown = set().union(*(metric_names(e) for e in dashboard_exprs()))
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in metrics.defined_names()}
    shown_families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in shown}
    assert families - shown_families == set()


def test_the_alerts_cover_the_operators_questions() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    wanted = {
        "CustomScriptsComponentDown": "cs_component_up",
        "CustomScriptsComponentNotReady": "cs_component_ready",
        "CustomScriptsExecuteErrorRate": "cs_executions_total",
        "CustomScriptsExecuteTimeouts": "cs_function_executions_total",
        "CustomScriptsDeadLetters": "cs_realtime_dead_letters_total",
        "CustomScriptsQueueBacklogGrowing": metrics.CONSUMER_PENDING,
        "CustomScriptsAckPendingGrowing": metrics.CONSUMER_ACK_PENDING,
        "CustomScriptsEventToPublishedP99": "cs_realtime_event_to_published_seconds_bucket",
        "CustomScriptsColdStartStorm": "cs_budget_deploys_total",
        "CustomScriptsDependencyFailures": "cs_realtime_evaluations_total",
    }
    for alert, metric in wanted.items():
        assert metric in metric_names(rules[alert]["expr"]), alert
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("critical", "warning", "info") and rule["annotations"]["summary"]


def test_labels_are_bounded() -> None:
    """No metric may be labelled by anything a caller chooses: only these label names exist."""
    allowed = {"component", "status", "tier", "kind", "code", "route", "reason", "source"}
    for value in vars(metrics).values():
        if isinstance(value, metrics.Counter | metrics.Gauge | metrics.Histogram):
            assert set(value._labelnames) <= allowed, value._name


def test_unknown_label_values_fold_into_other() -> None:
    assert metrics.bounded("pro", ("pro", "enterprise")) == "pro"
    assert metrics.bounded("tenant-42", ("pro", "enterprise")) == metrics.OTHER
