"""pandas is on the allowlist: it must not become a way to the file system, the network or eval.

Every route pandas offers out of the sandbox is tried through the real sandbox (bubblewrap, seccomp,
rlimits), with all layers and with the OS layers alone: its readers of files and URLs (read_csv,
read_json, read_html, read_pickle with a payload, HDFStore, the io layer reached by import, attribute,
string dispatch or a class), its writers (to_csv/to_pickle/to_string to host paths, to_clipboard),
its expression engine (pd.eval, DataFrame.eval/query, reached directly or through `agg`), plotting.
Each case asserts containment: not ok (where the route is refused), no listener contacted, no marker
written, no host data in the answer, and the function keeps serving. Then `bars.df` itself: a UTC
DatetimeIndex, in both modes.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest

from customscripts.sandbox import imports, pandas_guard

from .conftest import GOOG_TS, Listener, make_supervisor, request
from .test_sandbox_attacks import NOT_OK, Case, _host_secrets, _render

pytestmark = pytest.mark.security
BOTH_MODES = pytest.mark.parametrize("guards", [True, False], ids=["all_layers", "os_layers_only"])


class _Touch:
    """Unpickling this runs os.system (what a pickle payload from anywhere would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


PAYLOAD = "@PICKLE@"

CASES: list[Case] = [
    # --- files -----------------------------------------------------------------------------------
    Case("read_csv_host_file", """
import pandas as pd
def run(ctx):
    return {"value": 1, "metadata": {"data": pd.read_csv("/etc/passwd", sep="\\x01", header=None).to_string()}}
"""),
    Case("read_csv_repo_file", """
import pandas as pd
def run(ctx):
    df = pd.read_csv("/work/main/pyproject.toml", sep="\\x01", header=None)
    return {"value": 1, "metadata": {"data": str(df.values.tolist())}}
"""),
    Case("read_table_proc_environ", """
import pandas as pd
def run(ctx):
    return {"value": 1, "metadata": {"data": str(pd.read_table("/proc/1/environ", header=None).values.tolist())}}
"""),
    Case("read_csv_of_a_file_the_sandbox_can_see", """
import pandas as pd
def run(ctx):
    df = pd.read_csv("/usr/lib/os-release", sep="=", header=None)
    return {"value": len(df), "metadata": {"data": str(df.values.tolist())}}
""", policy_only=True),
    Case("read_pickle_payload", """
import pandas as pd
def run(ctx):
    with open("/tmp/p.pkl", "wb") as f:
        f.write(@PAYLOAD@)
    pd.read_pickle("/tmp/p.pkl")
    return 1
"""),
    Case("read_fwf_via_getattr", """
import pandas as pd
def run(ctx):
    reader = getattr(pd, "read_" + "fwf")
    return {"value": 1, "metadata": {"data": str(reader("/etc/passwd").values.tolist())}}
"""),
    Case("from_pandas_import_reader", """
from pandas import read_csv
def run(ctx):
    return {"value": 1, "metadata": {"data": read_csv("/etc/passwd").to_string()}}
"""),
    Case("io_submodule_import", """
import pandas.io.common as c
def run(ctx):
    with c.get_handle("/etc/passwd", "r") as h:
        return {"value": 1, "metadata": {"data": h.handle.read()}}
"""),
    Case("io_submodule_by_attribute", """
import pandas as pd
def run(ctx):
    with pd.io.common.get_handle("/etc/passwd", "r") as h:
        return {"value": 1, "metadata": {"data": h.handle.read()}}
"""),
    Case("io_function_found_elsewhere", """
import pandas as pd
def run(ctx):
    found = [getattr(m, "get_handle", None) for m in (pd.core.frame, pd.core.generic)]
    fn = [f for f in found if f is not None][0]
    with fn("/etc/passwd", "r") as h:
        return {"value": 1, "metadata": {"data": h.handle.read()}}
"""),
    Case("hdfstore", """
import pandas as pd
def run(ctx):
    pd.HDFStore("/tmp/x.h5")
    return 1
"""),
    # --- network ---------------------------------------------------------------------------------
    *[Case(f"{reader}_url", f"""
import pandas as pd
def run(ctx):
    return len(pd.{reader}("http://127.0.0.1:@PORT@/x"))
""") for reader in ("read_csv", "read_json", "read_html", "read_xml", "read_parquet", "read_feather", "read_orc",
                    "read_excel", "read_stata", "read_sas", "read_table", "read_fwf")],
    Case("io_parsers_class_url", """
import pandas as pd
def run(ctx):
    return len(pd.io.parsers.readers.read_csv("http://127.0.0.1:@PORT@/x.csv"))
"""),
    # --- writers -----------------------------------------------------------------------------------
    Case("to_csv_host_path", """
def run(ctx):
    get_market_data(limit=5).df.to_csv("@MARKER@")
    return 1
"""),
    Case("to_pickle_host_path", """
def run(ctx):
    get_market_data(limit=5).df.to_pickle("@MARKER@")
    return 1
"""),
    Case("to_csv_through_the_class", """
import pandas as pd
def run(ctx):
    df = get_market_data(limit=5).df
    type(df).to_csv(df, "@MARKER@")
    return 1
"""),
    Case("to_csv_by_string_dispatch", """
def run(ctx):
    df = get_market_data(limit=5).df
    df.agg("to_csv", "@MARKER@")
    return 1
"""),
    Case("to_string_host_path", """
def run(ctx):
    get_market_data(limit=5).df.to_string("@MARKER@")
    return 1
"""),
    Case("to_clipboard", """
def run(ctx):
    get_market_data(limit=5).df.to_clipboard()
    return 1
"""),
    # --- expression engine and plotting ----------------------------------------------------------
    Case("pd_eval", """
import pandas as pd
def run(ctx):
    return {"value": 1, "metadata": {"r": str(pd.eval("x.__class__", local_dict={"x": 1}))}}
"""),
    Case("dataframe_query_introspection", """
def run(ctx):
    df = get_market_data(limit=5).df
    return {"value": 1, "metadata": {"r": str(df.query("close.__class__.__mro__ == close"))}}
"""),
    Case("dataframe_eval", """
def run(ctx):
    df = get_market_data(limit=5).df
    return float(df.eval("close * 2").iloc[-1])
"""),
    Case("query_by_string_dispatch", """
def run(ctx):
    df = get_market_data(limit=5).df
    return float(df.agg("query", expr="close > 0")["close"].iloc[-1])
"""),
    Case("computation_module", """
import pandas as pd
def run(ctx):
    return float(pd.core.computation.eval.eval("1 + 1"))
"""),
    Case("plot", """
def run(ctx):
    get_market_data(limit=5).df.plot()
    return 1
"""),
    Case("styler_to_html", """
def run(ctx):
    get_market_data(limit=5).df.style.to_html("@MARKER@")
    return 1
"""),
]


def _render_case(src: str, listener: Listener, marker: str) -> str:
    payload = repr(pickle.dumps(_Touch(marker)))
    return _render(src, listener, marker).replace("@PAYLOAD@", payload)


@BOTH_MODES
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_pandas_route_is_contained(case: Case, guards: bool, listener: Listener, tmp_path) -> None:
    if case.policy_only and not guards:
        pytest.skip("what open() may read anyway: the OS layers allow it, the pandas guard refuses it")
    marker = str(tmp_path / "marker")
    hits_before = len(listener.hits)
    with make_supervisor(_render_case(case.src, listener, marker), guards=guards, memory_mb=512) as sup:
        res = sup.execute(request(user="attacker"))
        blob = json.dumps(res.to_dict())
        assert res.status in NOT_OK, blob
        assert not os.path.exists(marker), f"marker written: {blob}"
        assert len(listener.hits) == hits_before, f"listener contacted: {listener.hits} {blob}"
        for secret in _host_secrets():
            assert secret not in blob, f"host data leaked: {secret!r}"
        assert not os.path.exists("/pwned")
        after = sup.execute(request())
        assert (after.error or {}).get("type") not in {"SandboxError", "SandboxProtocolError"}, after.to_dict()


BARS_DF = """
import pandas as pd
def run(ctx):
    df = get_market_data(limit=50).df
    sma = df["close"].rolling(20).mean()
    metric = ctx.get_metric("realized_vol_20", limit=3).df
    return {"value": float(sma.iloc[-1]), "metadata": {
        "tz": str(df.index.tz), "index": str(df.index.dtype),
        "name": df.index.name, "last": df.index[-1].isoformat(), "n": len(df), "columns": list(df.columns),
        "metric_columns": list(metric.columns), "metric_tz": str(metric.index.tz)}}
"""


@BOTH_MODES
def test_bars_df_is_a_utc_frame_in_the_sandbox(guards: bool) -> None:
    with make_supervisor(BARS_DF, guards=guards, memory_mb=512) as sup:
        res = sup.execute(request())
        assert res.status == "ok", res.to_dict()
        assert "pandas" in sup.zygote_info["preloaded"]
    meta = res.output["metadata"]
    assert meta["tz"] == "UTC" and meta["index"].startswith("datetime64[") and meta["index"].endswith(", UTC]")
    assert meta["name"] == "time" and meta["n"] == 50
    assert {"open", "high", "low", "close", "volume"} <= set(meta["columns"]) and "time" not in meta["columns"]
    assert meta["last"] <= "2013-03-01T00:00:00+00:00"  # nothing after the as-of time
    assert meta["metric_columns"][-1] == "value" and meta["metric_tz"] == "UTC"
    assert abs(res.output["timestamp"] - GOOG_TS) < 1e-6


EVERYDAY_PANDAS = """
import numpy as np
import pandas as pd
def run(ctx):
    df = get_market_data(limit=120).df
    r = df["close"].pct_change()
    weekly = df["close"].resample("7D").last().dropna()
    ema = df["close"].ewm(span=10).mean()
    both = pd.concat([df["close"].rename("c"), ema.rename("e")], axis=1).dropna()
    joined = both.merge(df[["volume"]], left_index=True, right_index=True)
    up = (df["close"] > df["open"]).groupby(df.index.dayofweek).mean()
    stats = df.describe().loc["mean"].to_dict()
    days = pd.date_range(df.index[0], periods=3, freq="D")
    span = (df.index[-1] - df.index[0]) / pd.Timedelta(days=1)
    print(df.tail(2).to_string())
    return {"value": float(joined["e"].iloc[-1]), "metadata": {
        "ret": float(r.iloc[-1]), "weekly": len(weekly), "up": len(up), "stats": float(stats["close"]),
        "days": len(days), "span": float(span), "last": df.index[-1].isoformat(), "nan": bool(np.isnan(r.iloc[0]))}}
"""


@BOTH_MODES
def test_everyday_pandas_works_in_the_sandbox(guards: bool) -> None:
    with make_supervisor(EVERYDAY_PANDAS, guards=guards, memory_mb=512) as sup:
        res = sup.execute(request())
    assert res.status == "ok", res.to_dict()
    meta = res.output["metadata"]
    assert meta["weekly"] > 10 and meta["days"] == 3 and meta["nan"] is True and meta["span"] > 100
    assert "close" in res.stdout


def test_scripts_without_pandas_do_not_preload_it() -> None:
    with make_supervisor("import numpy as np\ndef run(ctx):\n    return 1.0\n", guards=True) as sup:
        assert sup.execute(request()).status == "ok"
        assert "pandas" not in sup.zygote_info["preloaded"] and "numpy" in sup.zygote_info["preloaded"]


def test_every_pandas_reader_is_refused_by_name_and_by_origin() -> None:
    """The class of the problem: every `read_*` pandas has now or adds later, and anything defined in
    its io layer, wherever a script finds it."""
    pd = pandas_guard.load()
    readers = [n for n in dir(pd) if n.startswith("read_")]
    assert len(readers) >= 15
    for name in readers:
        assert imports._blocked_member("pandas", name), name
        with pytest.raises(pandas_guard.PandasFeatureDisabled):
            getattr(pd, name)("/etc/passwd")
    import pandas.io.common
    import pandas.io.parsers.readers

    assert imports._blocked_origin(pandas.io.common.get_handle)
    assert imports._blocked_origin(pandas.io.parsers.readers.TextFileReader)
    assert not imports._blocked_origin(pd.DataFrame) and not imports._blocked_origin(pd.to_datetime)
