"""SampleDataSource: real OHLCV sample data (the CSVs shipped with the `backtesting` package).

Why: tests and `customscripts run` need realistic bars without the local stack. It honours the
as-of contract exactly like the gateway: a bar is returned only when its end (`end_time`,
customscripts/bartime.py) is at or before `end`, and metrics are stamped with their bar's end.
Instruments: GOOG (1d, 2004-2013), EURUSD (1h), BTCUSD (1mo). Bar time = the CSV index (UTC).
"""

from __future__ import annotations

import bisect
import csv
import importlib.util
import math
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from customscripts.bartime import bar_end

from .datasource import DataAccessError, DataDenied, DependencyUnavailable

SAMPLES = {"GOOG": ("GOOG.csv", "1d"), "EURUSD": ("EURUSD.csv", "1h"), "BTCUSD": ("BTCUSD.csv", "1mo")}
PERIODS_PER_YEAR = {"1d": 252, "1h": 24 * 260, "1mo": 12}
METRICS = ("realized_vol_20", "volume_z_20", "return_1")


def _csv_path(name: str) -> Path:
    """The CSV inside the installed `backtesting` package, located without importing it (importing
    it pulls in pandas and bokeh: half a second)."""
    spec = importlib.util.find_spec("backtesting")
    if spec is None or not spec.submodule_search_locations:
        raise DataAccessError("sample data needs the 'backtesting' package")
    return Path(next(iter(spec.submodule_search_locations))) / "test" / name


def _parse_time(text: str) -> float:
    fmt = "%Y-%m-%d %H:%M:%S" if " " in text else "%Y-%m-%d"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()


class _Series:
    def __init__(self, path: Path, timeframe: str) -> None:
        self.timeframe = timeframe
        rows = []
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            next(reader)
            for row in reader:
                if len(row) >= 6 and row[0]:
                    rows.append((_parse_time(row[0]), *(float(x) for x in row[1:6])))
        rows.sort()
        arr = np.array(rows, dtype=np.float64)
        self.time = np.array([bar_end(t, timeframe) for t in arr[:, 0]], dtype=np.float64)  # visible from
        self.cols = {"time": arr[:, 0], "end_time": self.time, "open": arr[:, 1], "high": arr[:, 2],
                     "low": arr[:, 3], "close": arr[:, 4], "volume": arr[:, 5]}
        self.metrics = self._metrics()

    def _metrics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        close, vol = self.cols["close"], self.cols["volume"]
        ret = np.diff(np.log(close))
        w = 20
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if len(ret) >= w:
            win = np.lib.stride_tricks.sliding_window_view(ret, w)
            rv = win.std(axis=1, ddof=1) * math.sqrt(PERIODS_PER_YEAR.get(self.timeframe, 252))
            out["realized_vol_20"] = (self.time[w:], rv)
        if len(vol) >= w:
            vw = np.lib.stride_tricks.sliding_window_view(vol, w)
            sd = vw.std(axis=1, ddof=1)
            z = np.where(sd > 0, (vol[w - 1:] - vw.mean(axis=1)) / np.where(sd > 0, sd, 1), 0.0)
            out["volume_z_20"] = (self.time[w - 1:], z)
        out["return_1"] = (self.time[1:], ret)
        return out

    def window(self, times: np.ndarray, limit: int | None, start: float | None, end: float | None) -> slice:
        hi = int(np.searchsorted(times, end, side="right")) if end is not None else len(times)
        lo = int(np.searchsorted(times, start, side="left")) if start is not None else 0
        if limit is not None:
            lo = max(lo, hi - limit)
        return slice(lo, max(lo, hi))


class SampleDataSource:
    """A DataSource over the sample CSVs; outputs of other scripts can be registered in memory."""

    _cache: dict[str, _Series] = {}
    _cache_lock = threading.Lock()

    def __init__(self, *, denied_instruments: frozenset[str] = frozenset()) -> None:
        self.denied = frozenset(denied_instruments)
        self.outputs: dict[tuple[str, str, str], list[dict]] = {}

    def _series(self, key: str) -> _Series:
        if key in self.denied:
            raise DataDenied(f"not entitled to instrument {key!r}")
        if key not in SAMPLES:
            raise DataAccessError(f"no sample data for instrument {key!r} (have: {', '.join(SAMPLES)})")
        with self._cache_lock:
            if key not in self._cache:
                name, tf = SAMPLES[key]
                self._cache[key] = _Series(_csv_path(name), tf)
            return self._cache[key]

    def preload(self) -> SampleDataSource:
        """Parse every sample now (a function serving sample data does this at startup)."""
        for key in SAMPLES:
            if key not in self.denied:
                self._series(key)
        return self

    @staticmethod
    def instruments() -> dict[str, str]:
        return {k: tf for k, (_n, tf) in SAMPLES.items()}

    def latest_time(self, instrument_key: str) -> float:
        """The end of the newest bar: the earliest as-of time that sees every bar."""
        return float(self._series(instrument_key).time[-1])

    def get_market_data(self, instrument_key: str, timeframe: str, *, limit: int | None = None,
                        start: float | None = None, end: float | None = None) -> dict:
        s = self._series(instrument_key)
        if timeframe != s.timeframe:
            raise DataAccessError(f"sample {instrument_key} has timeframe {s.timeframe!r}, not {timeframe!r}")
        sl = s.window(s.time, limit, start, end)
        return {"instrument_key": instrument_key, "timeframe": timeframe,
                "columns": {k: v[sl].tolist() for k, v in s.cols.items()}}

    def get_metric(self, instrument_key: str, name: str, *, limit: int | None = None,
                   start: float | None = None, end: float | None = None) -> dict:
        s = self._series(instrument_key)
        if name not in s.metrics:
            raise DataAccessError(f"unknown metric {name!r} (have: {', '.join(METRICS)})")
        times, values = s.metrics[name]
        sl = s.window(times, limit, start, end)
        return {"instrument_key": instrument_key, "name": name,
                "columns": {"time": times[sl].tolist(), "value": values[sl].tolist()}}

    def register_output(self, script_id: str, instrument_key: str, timeframe: str, value: object,
                        timestamp: float, metadata: dict | None = None) -> None:
        items = self.outputs.setdefault((script_id, instrument_key, timeframe), [])
        bisect.insort(items, {"value": value, "timestamp": timestamp, "metadata": metadata or {}},
                      key=lambda o: o["timestamp"])

    def get_script_output(self, script_id: str, instrument_key: str, timeframe: str, *,
                          params: dict | None = None, history: int | None = None) -> dict:
        items = self.outputs.get((script_id, instrument_key, timeframe))
        if not items:
            raise DependencyUnavailable(script_id)
        if history:
            return {"script_id": script_id, "items": items[-history:]}
        return dict(items[-1])
