"""The author's CLI verbs against the local stack: every verb, tables for people, --json for machines,
and API errors (401, 403, 404, 409, 422) as one clear line naming the API's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from customscripts import cli
from customscripts.client import local_token
from tests.integration.realtime_support import drop_subscriptions
from tests.integration.registry_support import LISTS

pytestmark = [pytest.mark.stack, pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")]

SMA = "import numpy as np\n\ndef run(ctx):\n    return float(np.mean(get_market_data(limit=20).close))\n"
AT = "2013-01-02"


class Cli:
    """Runs `customscripts ...` in this process against the stack, as one user."""

    def __init__(self, api: str, capsys: pytest.CaptureFixture, token: str) -> None:
        self.api, self.capsys, self.token = api, capsys, token

    def __call__(self, *argv: str, ok: bool = True) -> tuple[str, str]:
        self.capsys.readouterr()
        code = cli.main([*argv, "--api-url", self.api, "--token", self.token])
        out, err = self.capsys.readouterr()
        assert (code == 0) == ok, (argv, code, out, err)
        return out, err

    def json(self, *argv: str) -> dict:
        return json.loads(self(*argv, "--json")[0])


@pytest.fixture
def author(api, stack, capsys, uid):
    """One author in a tenant of their own; its subscriptions are dropped afterwards."""
    yield Cli(api, capsys, local_token(f"author-{uid}", f"fund-{uid}"))
    drop_subscriptions(stack, f"fund-{uid}")


def one_error_line(err: str, status: int, code: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {status} {code}: "), err


def test_every_script_verb(author, tmp_path, uid):
    src = tmp_path / "sma.py"
    src.write_text(SMA)
    out, _ = author("scripts", "create", str(src), "--id", f"sma-{uid}", "--description", "mean")
    assert out.startswith(f"created sma-{uid}-") and "(draft;" in out
    out, _ = author("scripts", "edit", f"sma-{uid}", "--name", "Twenty closes", "--file", str(src))
    assert "updated the draft" in out and "name" in out
    out, _ = author("scripts", "publish", f"sma-{uid}")
    assert " published v1 " in out
    out, _ = author("scripts", "list")
    header, row = out.splitlines()[:2]
    assert header.split() == ["ID", "NAME", "VERSION", "STATUS", "ACCESS", "MODE", "DEPRECATED", "OWNER"]
    assert row.startswith(f"sma-{uid}-") and "published" in row and "owner" in row
    listed = author.json("scripts", "list", "--mine", "--status", "published")
    sid = listed["scripts"][0]["script_id"]
    assert author.json("scripts", "list", "--all")["next_cursor"] is None
    out, _ = author("scripts", "show", f"sma-{uid}")
    assert "Twenty closes" in out and "latest version  1" in out
    assert author("scripts", "show", f"sma-{uid}", "--source")[0] == SMA
    assert author.json("scripts", "show", sid, "--version", "1")["version"] == 1
    out, _ = author("scripts", "versions", f"sma-{uid}")
    assert out.splitlines()[0].split()[:3] == ["VERSION", "STATUS", "DEPRECATED"]
    out, _ = author("scripts", "deprecate", f"sma-{uid}", "1", "--reason", "use v2")
    assert "deprecated: no new subscriptions" in out
    assert author.json("scripts", "versions", sid)["versions"][0]["deprecation_reason"] == "use v2"
    assert "DEPRECATED" in author("scripts", "list", "--status", "deprecated")[0]
    assert "no longer deprecated" in author("scripts", "deprecate", sid, "1", "--undo")[0]


def test_execute_subscribe_signals_series(author, stack, tmp_path, uid):
    from customscripts.app import app
    from customscripts.realtime.events import Event

    src = tmp_path / "sma.py"
    src.write_text(SMA)
    assert "published v1" in author("scripts", "create", str(src), "--id", f"s-{uid}", "--publish")[0]
    out, _ = author("execute", f"s-{uid}", "--instrument", "GOOG", "--timeframe", "1d", "--at", AT)
    assert ": ok" in out.splitlines()[0] and out.splitlines()[1].startswith("value")
    result = author.json("execute", f"s-{uid}", "--instrument", "GOOG", "--timeframe", "1d", "--at", AT, "--store")
    assert result["status"] == "ok"
    out, _ = author("subscribe", f"s-{uid}", "--instrument", "GOOG", "--timeframe", "1d")
    assert out.startswith("subscribed: #")
    subs = author.json("subscriptions")["subscriptions"]
    assert len(subs) == 1
    assert author("subscriptions", "--script", f"s-{uid}")[0].splitlines()[0].split()[:2] == ["ID", "SCRIPT"]
    evaluator = app().evaluator(stack)
    try:
        evaluator.process([Event("GOOG", "1d", 1357084800.0)])  # the close of 2013-01-02
    finally:
        evaluator.close()
    out, _ = author("signals", "GOOG", f"s-{uid}", "--timeframe", "1d", "--history", "3")
    assert out.splitlines()[0].startswith("indicator") and "TIME" in out
    check_series(author, f"s-{uid}")
    assert f"unsubscribed #{subs[0]['id']}" in author("unsubscribe", f"s-{uid}", str(subs[0]["id"]))[0]
    assert author("subscriptions")[0].strip() == "no subscriptions"


def check_series(author: Cli, script: str) -> None:
    """`series` prints a table; in a build without the series route (issue 14) one 404 line."""
    author.capsys.readouterr()
    code = cli.main(["series", script, "--instrument", "GOOG", "--timeframe", "1d", "--start", "2012-12-01",
                     "--end", AT, "--api-url", author.api, "--token", author.token])
    out, err = author.capsys.readouterr()
    if code == 0:
        assert out.splitlines()[0].split() == ["TIME", "VALUE"], out
    else:
        one_error_line(err, 404, "no_route")


def test_marketplace_subscribe_verb(api, capsys, tmp_path, uid):
    seller = Cli(api, capsys, local_token(f"seller-{uid}", f"vendor-{uid}", features=LISTS))
    buyer = Cli(api, capsys, local_token(f"buyer-{uid}", f"client-{uid}"))
    src = tmp_path / "listed.py"
    src.write_text(SMA)
    seller("scripts", "create", str(src), "--id", f"listed-{uid}", "--permissions", '{"marketplace": true}',
           "--publish")
    sid = seller.json("scripts", "list")["scripts"][0]["script_id"]
    assert buyer("scripts", "list")[0].strip() == "no scripts"
    assert buyer("marketplace", "subscribe", sid)[0].startswith("subscribed to ")
    assert "marketplace" in buyer("scripts", "list")[0].splitlines()[1]


def test_api_errors_are_one_line_with_the_code(api, capsys, tmp_path, uid):
    me = Cli(api, capsys, local_token(f"author-{uid}", f"fund-{uid}"))
    src = tmp_path / "sma.py"
    src.write_text(SMA)
    me("scripts", "create", str(src), "--id", f"e-{uid}", "--publish")
    cases = [
        (Cli(api, capsys, "not-a-token"), ("scripts", "list"), 401, "unauthorized"),
        (Cli(api, capsys, local_token(f"colleague-{uid}", f"fund-{uid}")), ("scripts", "publish",
                                                                             me.json("scripts", "list")["scripts"][0]
                                                                             ["script_id"]), 403, "not_owner"),
        (Cli(api, capsys, local_token(f"f-{uid}", f"fund-{uid}", "free")), ("scripts", "list"), 403,
         "tier_not_allowed"),
        (me, ("scripts", "show", f"missing-{uid}"), 404, "script_not_found"),
        (me, ("scripts", "deprecate", f"e-{uid}", "7"), 404, "version_not_found"),
        (me, ("scripts", "create", str(src), "--id", f"e-{uid}"), 409, "script_id_taken"),
        (me, ("execute", f"e-{uid}", "--instrument", "GOOG", "--timeframe", "1d", "--at", "2090-01-01"), 422,
         "timestamp_in_future"),
        (me, ("scripts", "edit", f"e-{uid}", "--input-schema", '{"type": 7}'), 422, "invalid_schema"),
    ]
    out, err = me("execute", f"e-{uid}", "--instrument", "GOOG", "--timeframe", "1d", "--param", "x=1",
                  "--at", "2999-01-01", ok=False)
    one_error_line(err, 422, "invalid_body")
    assert "timestamp" in err  # which field, on the same line
    for who, argv, status, code in cases:
        out, err = who(*argv, ok=False)
        assert out == "", out
        one_error_line(err, status, code)
        assert "Traceback" not in err and not err.lstrip().startswith("{")


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("customscripts")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_token_from_environment_or_file_and_no_log_lines(api, tmp_path, uid):
    """The real console script: the token from $CS_TOKEN or $CS_TOKEN_FILE, no JSON log lines."""
    token_file = tmp_path / "token"
    base = {"CS_API_URL": api, "CS_TOKEN_FILE": str(token_file)}
    missing = _run_cli(["scripts", "list"], {**base, "CS_TOKEN": ""})
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("error: 401 unauthorized: ") and "customscripts token --save" in missing.stderr
    saved = _run_cli(["token", "--user", f"cli-{uid}", "--tenant", f"t-{uid}", "--save"], {**base, "CS_TOKEN": ""})
    assert saved.returncode == 0 and token_file.stat().st_mode & 0o777 == 0o600
    from_file = _run_cli(["scripts", "list", "--json"], {**base, "CS_TOKEN": ""})
    assert from_file.returncode == 0 and json.loads(from_file.stdout)["scripts"] == []
    from_env = _run_cli(["scripts", "list"], {**base, "CS_TOKEN": local_token(f"env-{uid}", f"t-{uid}")})
    assert from_env.returncode == 0 and from_env.stdout.strip() == "no scripts"
    for proc in (missing, saved, from_file, from_env):
        assert not any(line.lstrip().startswith("{") for line in proc.stderr.splitlines()), proc.stderr
