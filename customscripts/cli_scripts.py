"""The author's CLI verbs over the public API: `scripts list|show|create|edit|publish|versions|deprecate`,
`execute`, `series`, `subscribe|unsubscribe|subscriptions`, `signals`, `marketplace subscribe`, `token`.

Why a module of its own: cli.py only wires verbs; these all speak to the API through
customscripts.client. Why one module: every verb is a few lines of argument wiring over the client and
the same output helpers, one per API operation; split, each part would be a list of the same shape.
People get tables and short lines; `--json` prints the API's answer as is, for
machines. An API error is one line on stderr, `error: <status> <code>: <message>`, and exit code 1.
The token comes from --token, $CS_TOKEN or the file $CS_TOKEN_FILE (~/.config/customscripts/token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from customscripts.client import ApiError, Client, ClientError, TransportError, default_token_file, read_token

Handler = Callable[[Client, argparse.Namespace], Any]


# ----------------------------------------------------------------- output


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, empty: str = "(none)") -> str:
    """Plain aligned columns (header, then one line per row); `columns` are (key, heading)."""
    if not rows:
        return empty
    cells = [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    heads = [head for _, head in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _when(epoch: Any) -> str:
    try:
        return datetime.fromtimestamp(float(epoch), UTC).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OverflowError):
        return "-"


def _fields(pairs: Iterable[tuple[str, Any]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs)


# ----------------------------------------------------------------- argument types


def param(text: str) -> tuple[str, Any]:
    """NAME=VALUE, the value read as JSON when it is JSON (numbers, true, lists), else as text."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def when(text: str) -> float:
    """Epoch seconds, or an ISO date/time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epoch seconds or an ISO date, got {text!r}") from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def json_or_file(text: str) -> Any:
    """A JSON value given inline, or @FILE / a path to a JSON file."""
    path = Path(text[1:] if text.startswith("@") else text)
    if text.startswith("@") or (not text.lstrip().startswith(("{", "[")) and path.is_file()):
        text = path.read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


# ----------------------------------------------------------------- verbs: scripts

LIST_COLUMNS = [("script_id", "ID"), ("name", "NAME"), ("latest_version", "VERSION"), ("status", "STATUS"),
                ("access", "ACCESS"), ("runtime_mode", "MODE"), ("deprecated_versions", "DEPRECATED"),
                ("owner_id", "OWNER")]


def scripts_list(api: Client, args: argparse.Namespace) -> Any:
    filters = {"mine": True if args.mine else None, "owner": args.owner, "status": args.status,
               "runtime_mode": args.mode, "marketplace": args.marketplace, "q": args.search}
    if args.all:
        scripts = list(api.iter_scripts(limit=args.limit, **filters))
        page = {"scripts": scripts, "next_cursor": None}
    else:
        page = api.list_scripts(limit=args.limit, cursor=args.cursor, **filters)
    if args.json:
        return page
    out = table(page["scripts"], LIST_COLUMNS, empty="no scripts")
    if page.get("next_cursor"):
        out += f"\nmore: --cursor {page['next_cursor']}  (or --all)"
    return out


def scripts_show(api: Client, args: argparse.Namespace) -> Any:
    info = api.get_version(args.script_id, args.version) if args.version else api.get_script(args.script_id)
    if args.json:
        return info
    if args.source:
        return (info.get("source") or "(the source is shown to the owner only)").rstrip("\n")
    perms = info.get("permissions") or {}
    shared = [f"{k}={','.join(map(str, v))}" for k, v in perms.items() if isinstance(v, list) and v]
    pairs = [("id", info.get("script_id")), ("name", info.get("name")), ("version", info.get("version")),
             ("latest version", info.get("latest_version")), ("status", info.get("status")),
             ("mode", info.get("runtime_mode")), ("owner", f"{info.get('owner_id')} ({info.get('tenant')})"),
             ("marketplace", perms.get("marketplace")), ("shared with", shared or None),
             ("depends on", info.get("depends_on")), ("code sha256", info.get("code_sha256")),
             ("updated", info.get("updated_at"))]
    if info.get("description"):
        pairs.insert(2, ("description", info["description"]))
    return _fields(pairs)


def _draft_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key in ("name", "description", "input_schema", "output_schema", "permissions", "limits"):
        value = getattr(args, key, None)
        if value is not None:
            fields[key] = value
    if getattr(args, "mode", None):
        fields["runtime_mode"] = args.mode
    if getattr(args, "depends_on", None) is not None:
        fields["depends_on"] = args.depends_on
    return fields


def scripts_create(api: Client, args: argparse.Namespace) -> Any:
    source = args.file.read_text()
    script_id = args.id or args.file.stem.replace("_", "-").lower()
    fields = _draft_fields(args)
    fields.setdefault("name", script_id)
    meta = api.create_script(script_id, source, **fields)
    if args.publish:
        published = api.publish(meta["script_id"])
        return published if args.json else f"created {published['script_id']} and published v{published['version']}"
    return meta if args.json else f"created {meta['script_id']} (draft; publish with: customscripts scripts publish " \
                                  f"{script_id})"


def scripts_edit(api: Client, args: argparse.Namespace) -> Any:
    fields = _draft_fields(args)
    if args.file:
        fields["source"] = args.file.read_text()
    if not fields:
        raise SystemExit("error: nothing to change (give --file, --name, --description, ...)")
    meta = api.edit_script(args.script_id, **fields)
    return meta if args.json else f"updated the draft of {meta['script_id']} ({', '.join(sorted(fields))})"


def scripts_publish(api: Client, args: argparse.Namespace) -> Any:
    info = api.publish(args.script_id)
    if args.json:
        return info
    what = "unchanged, still" if info.get("unchanged") else "published"
    return f"{info['script_id']} {what} v{info['version']} (sha256 {info['code_sha256'][:12]})"


def scripts_versions(api: Client, args: argparse.Namespace) -> Any:
    info = api.versions(args.script_id)
    if args.json:
        return info
    rows = [{**v, "deprecated": bool(v.get("deprecated_at")), "note": v.get("deprecation_reason")}
            for v in info["versions"]]
    return table(rows, [("version", "VERSION"), ("status", "STATUS"), ("deprecated", "DEPRECATED"),
                        ("created_at", "CREATED"), ("code_sha256", "SHA256"), ("depends_on", "DEPENDS ON"),
                        ("note", "NOTE")], empty="no published versions")


def scripts_deprecate(api: Client, args: argparse.Namespace) -> Any:
    info = api.deprecate(args.script_id, args.version, reason=args.reason, undo=args.undo)
    if args.json:
        return info
    if not info["deprecated"]:
        return f"{info['script_id']} v{info['version']} is no longer deprecated"
    return (f"{info['script_id']} v{info['version']} deprecated: no new subscriptions to it; "
            "running ones go on")


def marketplace_subscribe(api: Client, args: argparse.Namespace) -> Any:
    info = api.marketplace_subscribe(args.script_id)
    if args.json:
        return info
    return f"{'subscribed to' if info.get('created') else 'already subscribed to'} {info['script_id']}"


# ----------------------------------------------------------------- verbs: running


def execute(api: Client, args: argparse.Namespace) -> Any:
    result = api.execute(args.script_id, instrument_key=args.instrument, timeframe=args.timeframe,
                         params=dict(args.param), version=args.version, timestamp=args.at, store=args.store)
    if args.json:
        return result
    output = result.get("output") or {}
    metrics = result.get("metrics") or {}
    lines = [f"{result.get('script_id')} v{result.get('version')} {result.get('instrument_key')} "
             f"{result.get('timeframe')} as of {_when(output.get('timestamp') or result.get('timestamp'))}: "
             f"{result.get('status')}"]
    if output:
        lines.append(f"value     {_cell(output.get('value'))}")
        if output.get("metadata"):
            lines.append(f"metadata  {_cell(output['metadata'])}")
    err = result.get("error") or {}
    if err:
        lines.append(err.get("traceback") or f"{err.get('type')}: {err.get('message')}")
    for stream in ("stdout", "stderr"):
        if result.get(stream):
            lines.append(f"{stream}:\n{result[stream].rstrip()}")
    lines.append(f"{metrics.get('duration_ms')} ms, cpu {metrics.get('cpu_ms')} ms, {metrics.get('memory_mb')} MB,"
                 f" call {result.get('call_id')}")
    return "\n".join(lines)


def series(api: Client, args: argparse.Namespace) -> Any:
    from customscripts.progress import spinner

    with spinner(f"computing {args.script_id} over {args.instrument} {args.timeframe}"):
        result = api.series(args.script_id, instrument_key=args.instrument, timeframe=args.timeframe,
                            start=args.start, end=args.end, params=dict(args.param), version=args.version)
    if args.plot:
        from customscripts import plots

        points = plots.points_from_series(result)
        bars = plots.bars_for(args.instrument, args.timeframe, points)
        plots.plot_indicator(bars, points, args.plot, title=f"{args.script_id} {args.instrument} {args.timeframe}")
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        return result
    rows = [{"time": _when(p[0]), "value": p[1]} for p in _series_points(result)]
    return table(rows[-args.tail:] if args.tail else rows, [("time", "TIME"), ("value", "VALUE")],
                 empty="no outputs in that range")


def _series_points(result: dict[str, Any]) -> list[tuple[float, Any]]:
    from customscripts.plots import points_from_series

    return points_from_series(result)


def subscribe(api: Client, args: argparse.Namespace) -> Any:
    sub = api.subscribe(args.script_id, instrument_key=args.instrument, timeframe=args.timeframe,
                        params=dict(args.param), version=args.version, backfill=args.backfill)
    if args.json:
        return sub
    verb = "subscribed" if sub.get("created") else "already subscribed"
    filled = sub.get("backfill") or {}
    history = f"; {filled['published']} past outputs backfilled" if isinstance(filled.get("published"), int) else ""
    return (f"{verb}: #{sub['id']} {sub['script_id']} v{sub['version']} on {sub['instrument_key']} "
            f"{sub['timeframe']} params {_cell(sub.get('params') or {})}{history}")


def unsubscribe(api: Client, args: argparse.Namespace) -> Any:
    api.unsubscribe(args.script_id, args.subscription_id)
    return {"deleted": True} if args.json else f"unsubscribed #{args.subscription_id}"


def subscriptions(api: Client, args: argparse.Namespace) -> Any:
    info = api.subscriptions(args.script)
    if args.json:
        return info
    return table(info["subscriptions"], [("id", "ID"), ("script_id", "SCRIPT"), ("version", "VERSION"),
                                         ("instrument_key", "INSTRUMENT"), ("timeframe", "TF"),
                                         ("params", "PARAMS")], empty="no subscriptions")


def signals(api: Client, args: argparse.Namespace) -> Any:
    info = api.signal(args.instrument, args.script_id, timeframe=args.timeframe,
                      params=dict(args.param) or None, history=args.history)
    if args.json:
        return info
    out = _fields([("indicator", info.get("indicator")), ("value", info.get("value")),
                   ("as of", _when(info.get("timestamp"))), ("metadata", info.get("metadata") or None)])
    hist = info.get("history") or {}
    times = hist.get("time") or hist.get("timestamp")
    if times:
        rows = [{"time": _when(t), "value": v, "version": ver} for t, v, ver in
                zip(times, hist.get("value") or [], hist.get("version") or [None] * len(times), strict=False)]
        out += "\n\n" + table(rows, [("time", "TIME"), ("value", "VALUE"), ("version", "VERSION")])
    return out


# ----------------------------------------------------------------- token (local stack)


def token(args: argparse.Namespace) -> int:
    """Sign a token with the local stack's JWT secret (development: production tokens come from the
    product's identity service)."""
    from customscripts.client import local_token

    value = local_token(args.user, args.tenant, args.tier, teams=args.team, orgs=args.org, features=args.feature,
                        ttl_s=args.ttl)
    if not args.save:
        print(value)
        return 0
    path = default_token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    print(f"token for {args.user} of {args.tenant} ({args.tier}) saved to {path}")
    return 0


# ----------------------------------------------------------------- wiring


def run_verb(handler: Handler, args: argparse.Namespace) -> int:
    """Call one verb; print its answer; an API or transport error is one line on stderr (exit 1)."""
    tok = args.token if args.token is not None else read_token()
    api = Client(args.api_url, tok) if args.api_url else Client.from_settings(tok)
    try:
        out = handler(api, args)
    except ApiError as exc:
        hint = " (no token: set CS_TOKEN or run `customscripts token --save`)" if exc.status == 401 and not tok else ""
        print(f"error: {exc.status} {exc.code}: {exc.message}{_detail(exc.details)}{hint}", file=sys.stderr)
        return 1
    except TransportError as exc:
        print(f"error: {exc} (is the stack up? `customscripts up`)", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename}" if exc.filename else f"error: {exc}", file=sys.stderr)
        return 1
    if out is None:
        return 0
    print(json.dumps(out, indent=2, sort_keys=True) if args.json else out)
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS) or action.help is None:
            return action.help
        return super()._get_help_string(action)


def _detail(details: Any) -> str:
    """The first validation problems of a 422, on the same line: `(body.timestamp: ...)`."""
    if not isinstance(details, list):
        return ""
    parts = [f"{'.'.join(map(str, d.get('loc') or [])) or 'body'}: {d.get('msg')}" for d in details[:2]
             if isinstance(d, dict) and d.get("msg")]
    return f" ({'; '.join(parts)})".replace("\n", " ") if parts else ""


def _api_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("API")
    g.add_argument("--json", action="store_true", help="print the API's JSON answer (for machines)")
    g.add_argument("--api-url", default=None, metavar="URL",
                   help="the API (default $CS_API_URL, else the local stack's registry-fn)")
    g.add_argument("--token", default=None,
                   help="bearer token (default $CS_TOKEN, else the file $CS_TOKEN_FILE, ~/.config/customscripts/token)")
    return common


def _verb(sub: argparse._SubParsersAction, name: str, handler: Handler, help_text: str,
          parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                       parents=parents, formatter_class=HelpFormatter)
    p.set_defaults(func=lambda args: run_verb(handler, args))
    return p


def _run_options(p: argparse.ArgumentParser, *, instrument_required: bool = True) -> None:
    p.add_argument("--instrument", required=instrument_required, help="instrument key, e.g. GOOG")
    p.add_argument("--timeframe", required=instrument_required, help="candle timeframe, e.g. 1d")
    p.add_argument("--param", action="append", type=param, default=[], metavar="NAME=VALUE",
                   help="a script parameter (repeatable; values read as JSON when they are)")
    p.add_argument("--version", type=int, default=None, help="published version (default: the latest)")


def _draft_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="display name")
    p.add_argument("--description")
    p.add_argument("--mode", choices=("onetime", "realtime"), help="runtime mode")
    p.add_argument("--input-schema", type=json_or_file, metavar="JSON|@FILE", help="JSON Schema of params")
    p.add_argument("--output-schema", type=json_or_file, metavar="JSON|@FILE", help="JSON Schema of the output")
    p.add_argument("--permissions", type=json_or_file, metavar="JSON|@FILE",
                   help='who else may use it, e.g. \'{"teams": ["research"]}\'')
    p.add_argument("--limits", type=json_or_file, metavar="JSON|@FILE", help="timeout_ms, memory_mb, cpu_seconds")
    p.add_argument("--depends-on", action="append", metavar="ID@VERSION", help="a dependency (repeatable)")


def add_api_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the API verbs on the `customscripts` command's subparsers."""
    api = [_api_options()]

    scripts = sub.add_parser("scripts", help="list, show, create, edit, publish, version and deprecate scripts",
                             description="Your scripts through the API.")
    ssub = scripts.add_subparsers(dest="scripts_command", required=True, metavar="VERB")
    p = _verb(ssub, "list", scripts_list, "scripts you may see: yours, shared with you, marketplace ones you "
              "subscribed to", api)
    p.add_argument("--mine", action="store_true", help="only your own")
    p.add_argument("--owner", help="only this owner's")
    p.add_argument("--status", choices=("draft", "published", "deprecated"))
    p.add_argument("--mode", choices=("onetime", "realtime"))
    p.add_argument("--marketplace", action=argparse.BooleanOptionalAction, default=None,
                   help="only listed (or, with --no-marketplace, unlisted) scripts")
    p.add_argument("--search", metavar="TEXT", help="text in the name or id")
    p.add_argument("--limit", type=int, default=50, help="page size (1-200)")
    p.add_argument("--cursor", help="continue after this id (`more:` of the previous page)")
    p.add_argument("--all", action="store_true", help="every page")
    p = _verb(ssub, "show", scripts_show, "one script (the draft for its owner) or one version", api)
    p.add_argument("script_id")
    p.add_argument("--version", help="a version number, or `draft`")
    p.add_argument("--source", action="store_true", help="print the source (owner only)")
    p = _verb(ssub, "create", scripts_create, "create a script from a file (a draft)", api)
    p.add_argument("file", type=Path, help="the script, a .py file defining run(ctx)")
    p.add_argument("--id", help="the script id you choose (default: the file name)")
    _draft_options(p)
    p.add_argument("--publish", action="store_true", help="publish it at once")
    p = _verb(ssub, "edit", scripts_edit, "change the draft (source and/or fields)", api)
    p.add_argument("script_id")
    p.add_argument("--file", type=Path, help="new source")
    _draft_options(p)
    p = _verb(ssub, "publish", scripts_publish, "freeze the draft into the next immutable version", api)
    p.add_argument("script_id")
    p = _verb(ssub, "versions", scripts_versions, "published versions", api)
    p.add_argument("script_id")
    p = _verb(ssub, "deprecate", scripts_deprecate, "deprecate a version: no new subscriptions, running ones go on",
              api)
    p.add_argument("script_id")
    p.add_argument("version", type=int)
    p.add_argument("--reason", help="shown with the version, e.g. 'use v3'")
    p.add_argument("--undo", action="store_true", help="withdraw the deprecation")

    p = _verb(sub, "execute", execute, "run a published script once through the API", api)
    p.add_argument("script_id")
    _run_options(p)
    p.add_argument("--at", type=when, default=None, metavar="TIME", help="as of (epoch or ISO; default now)")
    p.add_argument("--store", action="store_true", help="keep the result (GET /executions/{call_id})")
    p = _verb(sub, "series", series, "a script's outputs at every bar end of a range", api)
    p.add_argument("script_id")
    _run_options(p)
    p.add_argument("--start", type=when, default=None, metavar="TIME", help="from (epoch or ISO)")
    p.add_argument("--end", type=when, default=None, metavar="TIME", help="until (epoch or ISO)")
    p.add_argument("--tail", type=int, default=20, help="rows shown in the table (0: all)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="draw candles with the output")
    p = _verb(sub, "subscribe", subscribe, "evaluate a script on every candle close (realtime)", api)
    p.add_argument("script_id")
    _run_options(p)
    p.add_argument("--backfill", type=int, default=None, metavar="N",
                   help="first fill the history with the outputs at the last N bar ends (default: your tier's)")
    p = _verb(sub, "unsubscribe", unsubscribe, "delete one of your realtime subscriptions", api)
    p.add_argument("script_id")
    p.add_argument("subscription_id")
    p = _verb(sub, "subscriptions", subscriptions, "your realtime subscriptions", api)
    p.add_argument("--script", default=None, help="only this script's")
    p = _verb(sub, "signals", signals, "a script's latest realtime value, like a built-in indicator", api)
    p.add_argument("instrument")
    p.add_argument("script_id")
    p.add_argument("--timeframe", required=True)
    p.add_argument("--param", action="append", type=param, default=[], metavar="NAME=VALUE",
                   help="the subscription's params (repeatable)")
    p.add_argument("--history", type=int, default=None, metavar="N", help="also the last N outputs")

    market = sub.add_parser("marketplace", help="subscribe to marketplace scripts of any tenant",
                            description="The marketplace.")
    msub = market.add_subparsers(dest="marketplace_command", required=True, metavar="VERB")
    p = _verb(msub, "subscribe", marketplace_subscribe, "subscribe to a listed script (then use it as your own)",
              api)
    p.add_argument("script_id")

    p = sub.add_parser("token", help="sign a token for the local stack (development)",
                       description=token.__doc__, formatter_class=HelpFormatter)
    p.add_argument("--user", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--tier", default="pro")
    p.add_argument("--team", action="append", default=[])
    p.add_argument("--org", action="append", default=[])
    p.add_argument("--feature", action="append", default=[])
    p.add_argument("--ttl", type=int, default=8 * 3600, help="seconds")
    p.add_argument("--save", action="store_true", help="write it to $CS_TOKEN_FILE instead of printing it")
    p.set_defaults(func=token)
