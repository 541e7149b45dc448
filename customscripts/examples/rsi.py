"""Wilder's relative strength index over `period` bars."""

import numpy as np


def run(ctx):
    period = int(ctx.params.get("period", 14))
    bars = ctx.get_market_data(limit=200)
    close = np.asarray(bars.close, dtype=float)
    delta = np.diff(close)
    gains = np.clip(delta, 0, None)
    losses = np.clip(-delta, 0, None)
    avg_gain = gains[:period].mean()
    avg_loss = losses[:period].mean()
    for gain, loss in zip(gains[period:], losses[period:], strict=True):
        avg_gain = (avg_gain * (period - 1) + gain) / period
        avg_loss = (avg_loss * (period - 1) + loss) / period
    if avg_loss == 0:
        return 100.0
    return float(100 - 100 / (1 + avg_gain / avg_loss))
