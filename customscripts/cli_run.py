"""`customscripts run SCRIPT.py`: run a script locally in the real sandbox against sample data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PLOT_BATCH = 20  # executions per sandboxed child when plotting (one principal: the local author)


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects name=value, got {text!r}")
    name, raw = text.split("=", 1)
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return name, value


def add_run_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from customscripts.cli_scripts import HelpFormatter

    p = subparsers.add_parser("run", help="run a script file locally in the sandbox against sample data",
                              description="Run a script file locally, in the same sandbox as production, against "
                                          "the sample market data; --plot draws it over the candles.",
                              formatter_class=HelpFormatter)
    p.add_argument("script", type=Path)
    p.add_argument("--instrument", default="GOOG", help="GOOG (1d), EURUSD (1h) or BTCUSD (1mo)")
    p.add_argument("--timeframe", default=None, help="defaults to the sample's native timeframe")
    p.add_argument("--param", action="append", type=_param, default=[], metavar="NAME=VALUE")
    p.add_argument("--timestamp", type=float, default=None, help="as-of epoch seconds (default: last bar)")
    p.add_argument("--isolation", choices=("bwrap", "process"), default=None)
    p.add_argument("--schema", type=Path, default=None, help="output JSON Schema file")
    p.add_argument("--tier", default="pro")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="also run the script at each of the last --bars bar ends and draw candles with its output")
    p.add_argument("--bars", type=int, default=120, help="bars in the plot")
    p.add_argument("--pane", choices=("auto", "overlay", "below"), default="auto",
                   help="the output over the candles, in a pane below, or whichever fits its scale")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    from customscripts.config import settings
    from customscripts.sandbox import ExecutionRequest, SampleDataSource, SandboxLimits, Supervisor
    from customscripts.sandbox.sampledata import SAMPLES

    source = args.script.read_text()
    data = SampleDataSource()
    if args.instrument not in SAMPLES:
        print(f"unknown sample instrument {args.instrument!r}; use one of {', '.join(SAMPLES)}", file=sys.stderr)
        return 2
    timeframe = args.timeframe or SAMPLES[args.instrument][1]
    ts = args.timestamp if args.timestamp is not None else data.latest_time(args.instrument)
    tier = settings().tier(args.tier)
    if tier is None:
        print(f"unknown tier {args.tier!r}", file=sys.stderr)
        return 2
    schema = json.loads(args.schema.read_text()) if args.schema else None
    with Supervisor(source, output_schema=schema, limits=SandboxLimits.from_tier(tier),
                    isolation=args.isolation, data=data, filename=args.script.name, prefork=1) as sup:
        res = sup.execute(ExecutionRequest(args.instrument, timeframe, dict(args.param), ts))
        plotted = _plot(sup, args, timeframe, ts) if args.plot else None
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        if res.stdout:
            print(res.stdout, end="" if res.stdout.endswith("\n") else "\n")
        if res.stderr:
            print(res.stderr, file=sys.stderr, end="" if res.stderr.endswith("\n") else "\n")
        print(f"status: {res.status}")
        if res.output is not None:
            print(f"output: {json.dumps(res.output)}")
        if res.error:
            print(res.error.get("traceback") or f"{res.error.get('type')}: {res.error.get('message')}")
        print(f"duration_ms={res.duration_ms} cpu_ms={res.cpu_ms} memory_mb={res.memory_mb}")
    if plotted:
        print(plotted, file=sys.stderr if args.json else sys.stdout)
    return 0 if res.ok else 1


def _plot(sup: Any, args: argparse.Namespace, timeframe: str, ts: float) -> str:
    """Run the script as of each of the last `--bars` bars (the moment each became visible) and draw
    it over them; matplotlib runs here, on the trusted side, never in the sandbox."""
    from customscripts import plots
    from customscripts.progress import Progress
    from customscripts.sandbox import ExecutionRequest

    cols, visible_at = plots.sample_window(args.instrument, timeframe, ts, args.bars)
    points = []
    with Progress(len(visible_at), f"running {args.script.name} over {len(visible_at)} bars") as bar:
        for start in range(0, len(visible_at), PLOT_BATCH):
            chunk = range(start, min(start + PLOT_BATCH, len(visible_at)))
            results = sup.execute_batch([ExecutionRequest(args.instrument, timeframe, dict(args.param),
                                                          visible_at[i]) for i in chunk])
            points += [(cols["time"][i], r.output.get("value")) for i, r in zip(chunk, results, strict=True)
                       if r.ok and r.output]
            bar.advance(len(chunk))
    out = plots.plot_indicator(cols, points, args.plot, pane=args.pane,
                               title=f"{args.script.name}  {args.instrument} {timeframe}  {dict(args.param) or ''}")
    return f"plot: {out} ({len(points)} of {len(visible_at)} bars with an output)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="customscripts")
    add_run_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
