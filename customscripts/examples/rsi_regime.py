"""Reads the RSI script's output and the derived volatility metric: a regime label as metadata."""


def run(ctx):
    rsi = ctx.get_script_output(ctx.params.get("rsi_script", "demo-rsi"))["value"]
    vol = ctx.get_metric("derived.realized_vol_20", limit=1)
    regime = "overbought" if rsi > 70 else "oversold" if rsi < 30 else "neutral"
    return {"value": rsi - 50.0, "metadata": {"regime": regime, "vol": float(vol.value[-1])}}
