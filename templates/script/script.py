"""Placeholder: the renderer replaces this file with the published version's script.py."""

import numpy as np


def run(ctx):
    bars = get_market_data(limit=200)  # noqa: F821 - provided by the sandbox runtime
    return float(np.mean(bars.close[-int(ctx.params.get("period", 20)):]))
