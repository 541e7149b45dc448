"""A script function's handler (templates/script) loaded in the test process, as the runner loads it."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from customscripts.config import REPO_ROOT
from customscripts.faas.runner import load_handler


@contextlib.contextmanager
def script_handler(root: Path, name: str, source: str, meta: dict) -> Iterator[ModuleType]:
    """The template's function/handler.py with `source` and `meta` as its script.py and meta.json;
    its sandbox is closed and the `function` package unloaded afterwards."""
    folder = root / name
    shutil.copytree(REPO_ROOT / "templates" / "script", folder)
    (folder / "function" / "script.py").write_text(source)
    (folder / "function" / "meta.json").write_text(json.dumps(meta))
    saved_path = list(sys.path)
    module = load_handler(folder)
    try:
        yield module
    finally:
        if module._supervisor is not None:
            module._supervisor.close()
        for mod in ("function", "function.handler"):
            sys.modules.pop(mod, None)
        sys.path[:] = saved_path
