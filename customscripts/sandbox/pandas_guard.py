"""pandas for scripts, without its ways out: file and network readers and writers, pickle, eval/query.

Why: pandas is a data library with a file-and-network layer (`read_csv("http://...")`, `read_pickle`,
`HDFStore`, `to_csv(path)`, `to_clipboard`, `DataFrame.plot`) and an expression engine
(`pd.eval`, `DataFrame.eval/query`) that resolves names and attributes on its own, outside the
attribute guard. Scripts need none of it: their data comes from the read APIs. The OS layers
(no network, read-only root, private /tmp, seccomp) contain all of these anyway; this module takes
them out of pandas itself in the sandboxed process, so they fail early and clearly, and so that no
route inside pandas (string dispatch such as `df.agg("query", ...)`, accessors, internal calls)
reaches them either. `load()` imports and disarms pandas once per process: the zygote (preload), the
guarded import and `Bars.df` all go through it. Stdlib + pandas only (runs in the zygote / child).
"""

from __future__ import annotations

import types
from typing import Any

# Submodules a script may not import or reach by attribute (imports.py BLOCKED_SUBMODULES): the I/O
# layer, the expression engine, pandas' own test/compat/options plumbing and its C readers/writers.
BLOCKED_SUBMODULES = frozenset({
    "pandas.io", "pandas.compat", "pandas.util", "pandas.testing", "pandas._testing", "pandas.plotting",
    "pandas.core.computation", "pandas._config", "pandas.core.config_init", "pandas.tests", "pandas.conftest",
    # the C readers and writers under the io layer (the rest of _libs is Timestamp, algorithms, ...)
    "pandas._libs.parsers", "pandas._libs.pandas_parser", "pandas._libs.writers", "pandas._libs.sas",
    "pandas._libs.testing",
})
# Top-level callables taken out of the pandas module (plus every `read_*`). Submodules stay in place
# (pandas imports through them at run time); scripts cannot reach them (BLOCKED_SUBMODULES).
BLOCKED_FUNCTIONS = frozenset({"eval", "HDFStore", "ExcelFile", "ExcelWriter", "to_pickle", "show_versions", "test"})
# Methods and accessors taken off pandas' classes: everything that writes to a path or buffer
# (except to_string, which scripts use for printing) and the expression engine.
BLOCKED_METHODS = frozenset({
    "to_pickle", "to_csv", "to_json", "to_hdf", "to_sql", "to_excel", "to_parquet", "to_feather", "to_orc",
    "to_stata", "to_clipboard", "to_xml", "to_html", "to_latex", "to_markdown", "eval", "query", "plot", "hist",
    "boxplot", "style", "_repr_html_",
})

_disarmed: dict[int, bool] = {}


class PandasFeatureDisabled(PermissionError):
    """A pandas feature that reads or writes files, reaches the network, or evaluates expressions."""


def _refusal(name: str) -> Any:
    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise PandasFeatureDisabled(f"pandas {name} is not available in scripts (no file, network or eval access; "
                                    "read data with get_market_data / get_metric)")

    refused.__name__ = refused.__qualname__ = name
    return refused


def _refused_property(name: str) -> property:
    def getter(_self: Any) -> Any:
        raise PandasFeatureDisabled(f"pandas .{name} is not available in scripts")

    return property(getter)


def disarm(pd: types.ModuleType) -> None:
    """Replace pandas' readers, writers and expression engine with functions that refuse, in this
    process (idempotent)."""
    if _disarmed.get(id(pd)):
        return
    for name, value in list(vars(pd).items()):
        if (name.startswith("read_") or name in BLOCKED_FUNCTIONS) and not isinstance(value, types.ModuleType):
            setattr(pd, name, _refusal(f"pd.{name}"))
    from pandas.core.generic import NDFrame

    classes = [NDFrame, pd.DataFrame, pd.Series, pd.Index]
    for cls in classes:
        for name in BLOCKED_METHODS:
            if name in vars(cls):
                attr = vars(cls)[name]
                is_property = isinstance(attr, property) or not callable(attr)
                setattr(cls, name, _refused_property(name) if is_property else _refusal(f".{name}()"))
    import importlib

    for mod_name in ("pandas.core.computation.eval", "pandas.core.computation.expr"):
        mod = importlib.import_module(mod_name)  # loaded now, so no later import brings the real one back
        if hasattr(mod, "eval"):
            mod.eval = _refusal("eval")
    _disarmed[id(pd)] = True


def load() -> types.ModuleType:
    """pandas, disarmed (the one way the sandbox imports it)."""
    import pandas as pd

    disarm(pd)
    return pd
