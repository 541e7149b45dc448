"""The `customscripts` command: local stack lifecycle, demo, and running scripts locally."""

from __future__ import annotations

import argparse
import json
import sys

from customscripts import logs
from customscripts.config import settings


def _up(args: argparse.Namespace) -> int:
    from customscripts.local import stack

    stack.up(only=set(args.only) if args.only else None)
    return 0


def _down(args: argparse.Namespace) -> int:
    from customscripts.local import stack

    stack.down(only=set(args.only) if args.only else None)
    return 0


def _status(args: argparse.Namespace) -> int:
    from customscripts.local import status

    report = status.report()
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    return 0 if status.healthy(report) else 1


def _migrate(args: argparse.Namespace) -> int:
    from customscripts import db

    for name in db.create_and_migrate(settings()):
        print(f"migration applied: {name}")
    return 0


def _test(args: argparse.Namespace) -> int:
    """Bring the stack up, then run pytest; extra arguments go to pytest."""
    import subprocess

    from customscripts.local import stack

    stack.up()
    argv = [sys.executable, "-m", "pytest", *(args.pytest_args or [])]
    return subprocess.call(argv, cwd=str(stack.repo_root()))


def _provider(args: argparse.Namespace) -> int:
    from customscripts.local import provider

    return provider.main(args.provider_args)


def _scheduler(args: argparse.Namespace) -> int:
    from customscripts.realtime.scheduler import run_scheduler

    return int(run_scheduler(args.scheduler_args) or 0)


def _demo(args: argparse.Namespace) -> int:
    from customscripts.local.demo import run_demo

    return run_demo()


def _load_data(args: argparse.Namespace) -> int:
    from customscripts.local import stack
    from customscripts.marketdata.loader import load_sample_data

    stack.up(only={"postgres"})
    load_sample_data()
    return 0


def _build(args: argparse.Namespace) -> int:
    """Build images: the platform functions, and script versions (--script, --all-versions)."""
    import dataclasses

    from customscripts.faas import buildqueue
    from customscripts.faas.builder import PLATFORM_FUNCTIONS, BuildFailed, build_platform, builder_for

    cfg = settings()
    kind = args.builder or (cfg.builder if cfg.builder not in ("", "none") else "podman")
    builder = builder_for(dataclasses.replace(cfg, builder=kind))

    def progress(line: str) -> None:
        if not args.json and (args.verbose or not line.startswith(" ")):
            print(f"[build] {line}", file=sys.stderr, flush=True)

    if args.worker:
        return _build_worker(dataclasses.replace(cfg, builder=kind), builder, progress)
    results: list[dict] = []
    try:
        if not args.no_platform:
            results += build_platform(builder, PLATFORM_FUNCTIONS, progress=progress)
        if args.script or args.all_versions:
            from customscripts.registry.service import RegistryService

            wanted = [_version_arg(v) for v in args.script] if args.script else None
            results += buildqueue.build_versions(RegistryService(dataclasses.replace(cfg, builder=kind)), builder,
                                                 wanted, force=args.force, progress=progress)
    except (BuildFailed, LookupError, ValueError) as exc:
        results.append({"status": "failed", "error": str(exc)})
    for result in results:
        if args.json:
            continue
        what = result.get("function") or f"{result.get('script_id')}@{result.get('version')}"
        extra = f" in {result['seconds']} s" if "seconds" in result else ""
        print(f"{what}: {result['status']} {result.get('image') or result.get('error') or ''}{extra}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if all(r["status"] == "built" for r in results) else 1


def _build_worker(cfg, builder, progress) -> int:
    """Drain the build queue until SIGTERM or SIGINT (the cluster's build-worker Deployment)."""
    import signal
    import threading

    from customscripts.faas.buildqueue import serve_worker
    from customscripts.registry.service import RegistryService

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    progress(f"build worker: {builder.name} builder, polling every {cfg.build_poll_s:g} s")
    serve_worker(RegistryService(cfg), builder, poll_s=cfg.build_poll_s, stop=stop, progress=progress)
    return 0


def _version_arg(text: str) -> tuple[str, int]:
    script_id, _, version = text.rpartition("@")
    if not script_id or not version.isdigit():
        raise ValueError(f"--script takes ID@VERSION, not {text!r}")
    return script_id, int(version)


def _replay(args: argparse.Namespace) -> int:
    """Publish sample candle closes on NATS, as the market feed would: the scheduler evaluates the
    subscriptions they make due."""
    from customscripts.cli_scripts import when
    from customscripts.marketdata.replayer import replay

    result = replay(args.instrument, args.timeframe, start=when(args.start) if args.start else None,
                    limit=args.limit, rate=args.rate)
    print(f"replayed {result.published} {args.instrument} {args.timeframe} candle closes"
          f"{f' ({result.duplicates} already sent)' if result.duplicates else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="customscripts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("up", help="start the local stack (installs missing packages)")
    p.add_argument("--only", nargs="*", help="start only these services")
    p.set_defaults(func=_up)
    p = sub.add_parser("down", help="stop what `up` started; data is kept")
    p.add_argument("--only", nargs="*")
    p.set_defaults(func=_down)
    p = sub.add_parser("status", help="health of each local service and component, and the key figures of their "
                                      "/metrics")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=_status)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=_migrate)
    sub.add_parser("demo", help="bring the stack up and run the example scripts on real sample data").set_defaults(
        func=_demo)
    sub.add_parser("load-data", help="load the sample market data and derived metrics (idempotent)").set_defaults(
        func=_load_data)
    # Wrapped tools parse their own arguments, --help included (add_help=False passes it through).
    p = sub.add_parser("scheduler", help="run a realtime scheduler replica in the foreground", add_help=False)
    p.add_argument("scheduler_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_scheduler)
    p = sub.add_parser("provider", help="run the local OpenFaaS-compatible provider in the foreground",
                       add_help=False)
    p.add_argument("provider_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_provider)
    p = sub.add_parser("build", help="build images: registry-fn, gateway-fn and script versions (podman locally)")
    p.add_argument("--script", action="append", default=[], metavar="ID@VERSION", help="a published version")
    p.add_argument("--all-versions", action="store_true", help="every published version not built yet")
    p.add_argument("--force", action="store_true", help="with --all-versions: built versions too")
    p.add_argument("--no-platform", action="store_true", help="skip registry-fn and gateway-fn")
    p.add_argument("--builder", choices=("podman", "kubernetes"), help="default: CS_BUILDER, else podman")
    p.add_argument("--json", action="store_true", help="results as JSON on stdout, no progress lines")
    p.add_argument("--verbose", "-v", action="store_true", help="also the builder's own output")
    p.add_argument("--worker", action="store_true", help="drain the build queue until stopped (no other builds)")
    p.set_defaults(func=_build)
    from customscripts.cli_run import add_run_parser

    add_run_parser(sub)
    p = sub.add_parser("test", help="start the local stack and run the test suite (arguments go to pytest)",
                       add_help=False)
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest")
    p.set_defaults(func=_test)

    p = sub.add_parser("replay", help="publish sample candle closes on NATS (the realtime scheduler evaluates them)")
    p.add_argument("instrument", help="GOOG, EURUSD or BTCUSD")
    p.add_argument("timeframe", help="1d, 1h or 1mo (the sample's)")
    p.add_argument("--start", help="from (epoch or ISO date; default the first sample bar)")
    p.add_argument("--limit", type=int, default=10, help="candles (default 10)")
    p.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as acked)")
    p.set_defaults(func=_replay)

    # The author's verbs over the public API (cli_scripts.py).
    from customscripts.cli_scripts import add_api_parsers

    add_api_parsers(sub)
    return parser


# Long-running services log JSON lines (with call ids); every other command is interactive: plain
# warnings only, so log lines never mix into its human output.
SERVICE_COMMANDS = frozenset({"provider", "scheduler"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in SERVICE_COMMANDS:
        logs.setup()
    else:
        logs.setup_console()
    passthrough = {"test": "pytest_args", "scheduler": "scheduler_args", "provider": "provider_args"}
    if args.command in passthrough:  # everything after the command belongs to the wrapped tool
        setattr(args, passthrough[args.command], [*extra, *(getattr(args, passthrough[args.command]) or [])])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
