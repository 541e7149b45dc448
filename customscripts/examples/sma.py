"""Simple moving average of the close over `period` bars."""

import numpy as np


def run(ctx):
    period = int(ctx.params.get("period", 20))
    bars = get_market_data(limit=max(period, 200))  # noqa: F821 - provided by the runtime
    close = np.asarray(bars.close, dtype=float)
    if len(close) < period:
        return {"value": None, "metadata": {"reason": "not enough bars", "bars": len(close)}}
    return {"value": float(close[-period:].mean()), "metadata": {"period": period, "bars": len(close)}}
