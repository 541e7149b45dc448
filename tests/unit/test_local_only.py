"""`customscripts/local/` is local-only: no image holds it (faas/build.py leaves it out of every build
context, templates/python3-http/.dockerignore out of a plain faas-cli build, scheduler/Dockerfile.dockerignore
out of the scheduler image), so nothing an image runs may import it. Only the CLI's local commands do,
lazily, inside the command that needs it."""

from __future__ import annotations

import ast
from pathlib import Path

from customscripts.config import REPO_ROOT
from customscripts.faas import build

PACKAGE = REPO_ROOT / "customscripts"
LOCAL = PACKAGE / "local"
CLI = PACKAGE / "cli.py"


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, at module level) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    found = []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*parts[:len(parts) - node.level], *([base] if base else [])])
            found += [(f"{base}.{alias.name}" if base else alias.name, node.lineno, id(node) in top)
                      for alias in node.names]
    return found


def _is_local(module: str) -> bool:
    return module == "customscripts.local" or module.startswith("customscripts.local.")


def test_nothing_an_image_runs_imports_the_local_subpackage() -> None:
    shipped = [p for p in PACKAGE.rglob("*.py") if LOCAL not in p.parents and p != CLI]
    assert len(shipped) > 50
    offenders = [f"{p.relative_to(REPO_ROOT)}:{line} imports {mod}" for p in shipped
                 for mod, line, _ in _imports(p) if _is_local(mod)]
    assert not offenders, offenders
    for handler in ("registry-fn", "gateway-fn", "templates/script", "templates/python3-http", "scheduler"):
        for path in (REPO_ROOT / handler).rglob("*.py"):
            assert not [m for m, _, _ in _imports(path) if _is_local(m)], path


def test_the_cli_imports_local_commands_only_when_they_run() -> None:
    """`customscripts migrate` and `build --worker` run in the scheduler image, which has no local/."""
    local = [(mod, line) for mod, line, top in _imports(CLI) if _is_local(mod)]
    assert local, "the CLI's local commands import customscripts.local"
    assert not [(mod, line) for mod, line, top in _imports(CLI) if _is_local(mod) and top]


def test_every_build_context_leaves_the_local_subpackage_out(tmp_path: Path) -> None:
    meta = {"script_id": "lo", "version": 1, "tier": "pro", "output_schema": {"type": "number"}}
    contexts = [build.render_context("lo", 1, "def run(ctx):\n    return 1.0\n", meta, functions_dir=tmp_path).path,
                *(build.render_stack_function(name, functions_dir=tmp_path).path
                  for name in ("registry-fn", "gateway-fn"))]
    for context in contexts:
        package = context / "function" / "customscripts"
        assert (package / "http.py").is_file()
        assert not (package / "local").exists()
        # the template's .dockerignore says the same to a plain `faas-cli build` of the context
        assert (context / ".dockerignore").read_text().count("function/customscripts/local") == 1


def test_the_scheduler_image_leaves_the_local_subpackage_out() -> None:
    lines = (REPO_ROOT / "scheduler" / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert "customscripts/local/" in rules
    assert rules.index("customscripts/local/") > rules.index("!customscripts/")  # the later rule wins
