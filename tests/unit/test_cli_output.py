"""Interactive commands are quiet and friendly: no JSON log lines among human output, progress on a
terminal only, wrapped tools show their own --help, no setuptools notice box in the bootstrap."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from customscripts import cli, logs
from customscripts.progress import Progress, spinner

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("customscripts")


def _help(command: str) -> str:
    proc = subprocess.run([str(EXE), command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_scheduler_and_provider_help_show_their_options():
    assert "--max-events" in _help("scheduler") and "--idle-exit" in _help("scheduler")
    provider = _help("provider")
    assert "--port" in provider and "--functions-dir" in provider


def test_every_api_verb_has_help_with_its_options(capsys):
    for argv, option in [(["scripts", "list"], "--mine"), (["scripts", "create"], "--publish"),
                         (["scripts", "deprecate"], "--reason"), (["execute"], "--instrument"),
                         (["series"], "--plot"), (["subscribe"], "--timeframe"), (["signals"], "--history"),
                         (["subscriptions"], "--script"), (["token"], "--save"), (["run"], "--plot")]:
        with pytest.raises(SystemExit) as done:
            cli.main([*argv, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert option in out and ("--json" in out or argv[0] in ("token", "run")), argv


def test_run_prints_no_log_lines(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("def run(ctx):\n    print('hello')\n    return 1.5\n")
    proc = subprocess.run([str(EXE), "run", str(script), "--isolation", "process"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["hello", "status: ok"]
    for line in (proc.stdout + proc.stderr).splitlines():
        with pytest.raises(ValueError):
            json.loads(line)  # not one line of it is a JSON log record


def test_interactive_logging_is_plain_and_services_keep_json(capsys):
    logs.setup_console()
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    assert capsys.readouterr().err == "warning: shown\n"
    logging.getLogger().handlers.clear()
    logs.setup()
    logging.getLogger("x").info("service")
    assert json.loads(capsys.readouterr().err)["msg"] == "service"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only():
    quiet = io.StringIO()
    with Progress(3, "load", stream=quiet) as bar:
        bar.advance(3)
    with spinner("wait", stream=quiet):
        pass
    assert quiet.getvalue() == ""
    tty = _Tty()
    with Progress(4, "load", stream=tty) as bar:
        for _ in range(4):
            bar.advance()
    assert "\rload [" in tty.getvalue() and tty.getvalue().endswith("4/4\n")


def test_bootstrap_keeps_setuptools_notices_out():
    text = (ROOT / "deploy/local/bootstrap.sh").read_text()
    pip_lines = [line for line in text.splitlines() if "pip install" in line]
    assert pip_lines and all("PYTHONWARNINGS=ignore" in line for line in pip_lines)
