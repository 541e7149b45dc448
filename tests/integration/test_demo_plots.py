"""The demo leaves one PNG per example script, says where, and prints no log lines among its output;
each PNG is a valid image of the expected size whose plot area holds candles and the script's line."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from customscripts import plots
from customscripts.local.demo import DEMO_SCRIPTS

pytestmark = [pytest.mark.stack, pytest.mark.slow]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_SIZE = (int(plots.FIGSIZE[0] * plots.DPI), int(plots.FIGSIZE[1] * plots.DPI))  # (width, height)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature and the chunk's CRC."""
    import zlib

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert zlib.crc32(kind + body) == crc, "IHDR checksum"
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), "truncated PNG"
    return struct.unpack(">II", body[:8])


def _has_color(pixels: np.ndarray, hex_color: str, tolerance: float = 0.06) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(pixels[..., :3] - rgb).max(axis=-1) < tolerance).sum())


def check_plot(path: Path) -> None:
    import matplotlib.image as mpimg

    assert png_size(path) == EXPECTED_SIZE
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (EXPECTED_SIZE[1], EXPECTED_SIZE[0])
    h, w = pixels.shape[:2]
    area = pixels[int(h * 0.1):int(h * 0.85), int(w * 0.1):int(w * 0.95)]  # inside the axes
    assert area[..., :3].std() > 0.05, "blank plot area"
    assert (area[..., :3].min(axis=-1) < 0.9).mean() > 0.02, "almost nothing drawn"
    assert _has_color(area, plots.UP) > 200 and _has_color(area, plots.DOWN) > 200, "no candles"
    assert _has_color(area, plots.LINE_COLORS[0]) > 200, "no indicator line"


def test_demo_writes_one_valid_png_per_example_script(stack):
    exe = Path(sys.executable).with_name("customscripts")
    proc = subprocess.run([str(exe), "demo"], capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stream in (proc.stdout, proc.stderr):
        assert not [line for line in stream.splitlines() if line.lstrip().startswith("{")], stream[-2000:]
    written = re.findall(r"plot: (\S+\.png)", proc.stdout)
    assert [Path(p).stem for p in written] == [sid for sid, _f, _x in DEMO_SCRIPTS]
    for path in written:
        check_plot(Path(path))


def test_plot_overlays_price_scaled_outputs_and_puts_others_below(tmp_path):
    t = [1.0e9 + 86400 * i for i in range(40)]
    close = [100 + np.sin(i / 5) * 5 for i in range(40)]
    bars = {"time": t, "open": [c - 1 for c in close], "high": [c + 2 for c in close],
            "low": [c - 2 for c in close], "close": close}
    sma = [(ti, c) for ti, c in zip(t, close, strict=True)]
    rsi = [(ti, 50 + i) for i, ti in enumerate(t)]
    assert plots.overlays_price(plots.numeric_lines(sma), 90, 110)
    assert not plots.overlays_price(plots.numeric_lines(rsi), 90, 110)
    for name, points in (("over", sma), ("below", rsi), ("dict", [(ti, {"a": 1.0, "b": None}) for ti in t])):
        out = plots.plot_indicator(bars, points, tmp_path / f"{name}.png", title=name)
        assert png_size(out) == EXPECTED_SIZE


@pytest.mark.parametrize("example, pane_rows", [("sma.py", 1), ("rsi.py", 2)])
def test_run_plot_draws_the_script_over_or_below_the_candles(tmp_path, example, pane_rows):
    """`customscripts run FILE --plot`: the script runs in the sandbox at each bar, the plot is drawn
    on this side; an SMA lives on the price scale (over the candles), an RSI in a pane below."""
    from customscripts.local.demo import EXAMPLES

    out = tmp_path / "plot.png"
    exe = Path(sys.executable).with_name("customscripts")
    proc = subprocess.run([str(exe), "run", str(EXAMPLES / example), "--plot", str(out), "--bars", "60"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"plot: {out} (60 of 60 bars with an output)" in proc.stdout
    check_plot(out)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(out)[..., :3]
    column = pixels[:, int(pixels.shape[1] * 0.5)]
    dark = np.flatnonzero((column < 0.25).all(axis=-1))  # frame lines (and title text) down the middle
    groups = len(np.flatnonzero(np.diff(dark) > 20)) + 1
    assert groups <= 2 if pane_rows == 1 else groups >= 3, groups  # a second axes adds its own frame
