"""Python-level guards (layer c): import allowlist and blocked introspection routes.

Why: defence in depth only. The OS layers (bubblewrap, seccomp, rlimits) must contain a script even
with this layer switched off (settings().sandbox_py_guards / CS_SANDBOX_PY_GUARDS=0, or
SandboxLimits.py_guards=False; tests only - the supervisor decides and passes the flag in). What this layer adds: clean,
early errors for obviously hostile scripts, and no casual route to interpreter internals that would
let a script tamper with the runtime that frames its results.

Mechanism:
  * the script's AST is checked: no dunder attributes/names (except a few harmless ones), no frame,
    code or generator internals (f_back, tb_frame, gi_frame, co_code, ...);
  * every attribute *load* is rewritten to __cs_getattr__(obj, "name"), which refuses module objects
    outside the allowlist and a few dangerous members of allowlisted modules (operator.attrgetter,
    typing.get_type_hints, numpy.ctypeslib, numpy.load, ...);
  * the script's __builtins__ is a private dict: guarded __import__/getattr/setattr/delattr/hasattr;
    no eval/exec/compile/vars/globals/locals/breakpoint/input/memoryview.
Stdlib only (runs in the zygote).
"""

from __future__ import annotations

import ast
import builtins
import types
from collections.abc import Iterable
from typing import Any

from . import pandas_guard

ALLOWED_DUNDERS = frozenset({"__init__", "__name__", "__doc__", "__len__", "__call__", "__iter__",
                             "__next__", "__getitem__", "__setitem__", "__contains__", "__repr__",
                             "__str__", "__eq__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__",
                             "__add__", "__sub__", "__mul__", "__truediv__", "__enter__", "__exit__",
                             "__post_init__", "__slots__"})
BLOCKED_NAMES = frozenset({
    "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "f_trace", "tb_frame", "tb_next",
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
    "ag_await", "co_code", "co_consts", "func_globals", "func_code", "mro", "_getframe",
    "__cs_getattr__", "__cs_import__",
})
REMOVED_BUILTINS = frozenset({"eval", "exec", "compile", "vars", "globals", "locals", "breakpoint",
                              "input", "help", "memoryview", "open_code", "exit", "quit", "copyright",
                              "credits", "license", "__loader__", "__spec__"})
# members of allowlisted modules that lead back to code execution or arbitrary objects
BLOCKED_MODULE_ATTRS: dict[str, frozenset[str]] = {
    "operator": frozenset({"attrgetter", "methodcaller"}),
    "typing": frozenset({"get_type_hints", "ForwardRef", "_eval_type", "sys"}),
    "numpy": frozenset({"ctypeslib", "f2py", "distutils", "testing", "load", "fromregex", "loadtxt",
                        "genfromtxt", "memmap", "DataSource", "_pytesttester"}),
    "functools": frozenset({"_lru_cache_wrapper"}),
    "dataclasses": frozenset({"_create_fn", "sys"}),
    "json": frozenset({"scanner", "decoder"}),
    "pandas": pandas_guard.BLOCKED_FUNCTIONS | pandas_guard.BLOCKED_METHODS,
}
BLOCKED_SUBMODULES = frozenset({"numpy.ctypeslib", "numpy.f2py", "numpy.distutils", "numpy.testing",
                                "numpy.lib.format", "numpy.lib.npyio", *pandas_guard.BLOCKED_SUBMODULES})
# Function and class objects defined in a blocked submodule are refused wherever a script finds them
# (pandas re-exports its readers at the top level; other modules import them by name).
_ORIGIN_CHECKED = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)
_BLOCKED_PREFIXES = tuple(b + "." for b in BLOCKED_SUBMODULES)


class SandboxViolation(ImportError):
    """A script used a route the Python-level guard forbids."""


def _bad_name(name: str) -> bool:
    if name in BLOCKED_NAMES:
        return True
    return name.startswith("__") and name.endswith("__") and name not in ALLOWED_DUNDERS


class _Checker(ast.NodeTransformer):
    def __init__(self, filename: str) -> None:
        self.filename = filename

    def _fail(self, node: ast.AST, what: str) -> None:
        err = SandboxViolation(f"{what} is not allowed in scripts")
        err.lineno = getattr(node, "lineno", None)  # type: ignore[attr-defined]
        raise err

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if _bad_name(node.attr):
            self._fail(node, f"attribute {node.attr!r}")
        self.generic_visit(node)
        if isinstance(node.ctx, ast.Load):
            call = ast.Call(func=ast.Name(id="__cs_getattr__", ctx=ast.Load()),
                            args=[node.value, ast.Constant(node.attr)], keywords=[])
            return ast.copy_location(call, node)
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if _bad_name(node.id) and node.id != "__name__":
            self._fail(node, f"name {node.id!r}")
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        if node.level:
            self._fail(node, "relative import")
        return node

    def _check_def(self, node: ast.AST) -> ast.AST:
        name = getattr(node, "name", "")
        if _bad_name(name) and name not in ALLOWED_DUNDERS:
            self._fail(node, f"definition {name!r}")
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _check_def


def compile_script(source: str, filename: str, guards: bool) -> types.CodeType:
    """Compile once in the zygote; with guards the AST is checked and attribute loads rewritten."""
    if not guards:
        return compile(source, filename, "exec", dont_inherit=True)
    tree = ast.parse(source, filename, "exec")
    tree = _Checker(filename).visit(tree)
    ast.fix_missing_locations(tree)
    return compile(tree, filename, "exec", dont_inherit=True)


def imported_roots(source: str) -> list[str]:
    """Top-level names of the modules a script imports (absolute imports), for warming; [] if it does
    not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".", 1)[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".", 1)[0])
    return sorted(names)


def _blocked_module(name: str) -> bool:
    return name in BLOCKED_SUBMODULES or name.startswith(_BLOCKED_PREFIXES)


def _root_allowed(name: str, allowed: frozenset[str]) -> bool:
    if _blocked_module(name):
        return False
    return name.split(".", 1)[0] in allowed


def _blocked_member(root: str, name: str) -> bool:
    """A member of an allowlisted module that leads to code execution, files or the network."""
    return name in BLOCKED_MODULE_ATTRS.get(root, ()) or (root == "pandas" and name.startswith("read_"))


def _blocked_origin(value: Any) -> bool:
    """A function or class defined in a blocked submodule (wherever the script found it)."""
    if not isinstance(value, _ORIGIN_CHECKED):
        return False
    module = type.__getattribute__(value, "__module__") if isinstance(value, type) else \
        getattr(value, "__module__", None)
    return isinstance(module, str) and "." in module and _blocked_module(module)


def make_builtins(allowed_modules: Iterable[str]) -> dict[str, Any]:
    """The private __builtins__ dict for the script's module."""
    allowed = frozenset(allowed_modules)
    real_import = builtins.__import__
    real_getattr = getattr

    def check_module(mod: types.ModuleType, name: str | None) -> None:
        modname = real_getattr(mod, "__name__", "?")
        if not _root_allowed(modname, allowed):
            raise SandboxViolation(f"access to module {modname!r} is not allowed")
        if name is not None:
            root = modname.split(".", 1)[0]
            if _blocked_member(root, name) or _bad_name(name):
                raise SandboxViolation(f"{modname}.{name} is not allowed in scripts")

    def cs_getattr(obj: Any, name: str, *default: Any) -> Any:
        if not isinstance(name, str):
            raise TypeError("attribute name must be a string")
        if _bad_name(name):
            raise SandboxViolation(f"attribute {name!r} is not allowed in scripts")
        if isinstance(obj, types.ModuleType):
            check_module(obj, name)
        try:
            value = real_getattr(obj, name)
        except AttributeError:
            if default:
                return default[0]
            raise
        if isinstance(value, types.ModuleType):
            check_module(value, None)
        elif _blocked_origin(value):
            raise SandboxViolation(f"{name!r} is not allowed in scripts")
        return value

    def cs_hasattr(obj: Any, name: str) -> bool:
        try:
            cs_getattr(obj, name)
        except AttributeError:
            return False
        return True

    def cs_setattr(obj: Any, name: str, value: Any) -> None:
        if not isinstance(name, str) or _bad_name(name) or isinstance(obj, types.ModuleType | type):
            raise SandboxViolation("setattr on this target is not allowed in scripts")
        setattr(obj, name, value)

    def cs_delattr(obj: Any, name: str) -> None:
        if not isinstance(name, str) or _bad_name(name) or isinstance(obj, types.ModuleType | type):
            raise SandboxViolation("delattr on this target is not allowed in scripts")
        delattr(obj, name)

    def cs_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (),
                  level: int = 0) -> Any:
        if level:
            raise SandboxViolation("relative imports are not allowed")
        if not isinstance(name, str) or not _root_allowed(name, allowed):
            raise SandboxViolation(f"import of {name!r} is not allowed (allowed: {', '.join(sorted(allowed))})")
        root = name.split(".", 1)[0]
        for item in fromlist or ():
            if not isinstance(item, str) or item == "*" or _bad_name(item) or \
                    _blocked_member(root, item) or \
                    not _root_allowed(f"{name}.{item}", allowed):
                raise SandboxViolation(f"from {name} import {item} is not allowed")
        if root == "pandas":
            pandas_guard.load()  # pandas enters a script only disarmed
        mod = real_import(name, None, None, fromlist, 0)
        if fromlist:
            for item in fromlist:
                value = real_getattr(mod, item, None)
                if isinstance(value, types.ModuleType):
                    check_module(value, None)
                elif _blocked_origin(value):
                    raise SandboxViolation(f"from {name} import {item} is not allowed")
        return mod

    safe = {k: v for k, v in vars(builtins).items() if k not in REMOVED_BUILTINS}
    safe.update({"__import__": cs_import, "getattr": cs_getattr, "hasattr": cs_hasattr,
                 "setattr": cs_setattr, "delattr": cs_delattr, "__cs_getattr__": cs_getattr,
                 "__name__": "builtins"})
    return safe


# Allowlisted modules preloaded only into the zygotes of scripts that use them: pandas adds ~45 MB
# to a zygote and makes every fork slower (bench/bench_pandas_zygote.py, README), which scripts that
# never touch it should not pay. A script that reaches it some other way imports it in its child.
LAZY_MODULES = frozenset({"pandas"})


def modules_used(source: str) -> set[str]:
    """The lazily preloaded modules a script uses: imported, or pandas through `bars.df`."""
    used = set(imported_roots(source)) & LAZY_MODULES
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return used
    if any(isinstance(node, ast.Attribute) and node.attr == "df" for node in ast.walk(tree)):
        used.add("pandas")
    return used


def preload(allowed_modules: Iterable[str], source: str | None = None) -> list[str]:
    """Import allowlisted modules in the zygote so children start warm; returns what loaded. Modules
    of LAZY_MODULES only when the script (`source`) uses them."""
    import importlib

    loaded = []
    wanted = modules_used(source) if source is not None else set(LAZY_MODULES)
    for name in sorted(allowed_modules):
        if name in LAZY_MODULES and name not in wanted:
            continue
        try:
            if name == "pandas":
                pandas_guard.load()
            else:
                importlib.import_module(name)
            loaded.append(name)
        except Exception:
            continue
    return loaded
