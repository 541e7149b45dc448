"""A script version's function loaded in the test process from its real build context (rendered from
templates/ as publish renders it), imported as the runner imports it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from customscripts.faas import build, script_function
from customscripts.faas.runner import load_handler


@contextlib.contextmanager
def script_handler(root: Path, name: str, source: str, meta: dict) -> Iterator[ModuleType]:
    """The context's function/handler.py with `source` and `meta` as its script.py and meta.json; its
    sandbox is closed and the `function` package unloaded afterwards. `module.function` is the
    ScriptFunction it serves."""
    built = build.render_context(str(meta.get("script_id", name)), int(meta.get("version", 1)), source, meta,
                                 functions_dir=root)
    saved_path = list(sys.path)
    module = load_handler(built.path)
    try:
        yield module
    finally:
        module.function.close()
        for mod in ("function", "function.handler"):
            sys.modules.pop(mod, None)
        sys.path[:] = saved_path


def configure(monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    """Settings changed for the script functions of this test (what a deployment's envVars would set)."""
    import dataclasses

    from customscripts.config import settings

    cfg = dataclasses.replace(settings(), **changes)
    monkeypatch.setattr(script_function, "settings", lambda: cfg)
