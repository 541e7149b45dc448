"""What a draft must satisfy before it is saved or published; every failure is a 4xx naming why.

- schemas are JSON Schema (Draft 2020-12 meta-schema, formats such as `regex` checked);
- script.py is UTF-8, at most MAX_SOURCE_BYTES, compiles, and defines a top-level `run(ctx)`;
- limits stay within the owner's tier caps;
- each `depends_on` entry names an existing *published* version in the owner's tenant that the
  owner may use. Cross-tenant dependencies are rejected outright, marketplace ones included: a
  script's outputs live in its tenant, and a dependency chain must never be a path across tenants;
- the dependency graph over script ids, across the whole transitive graph, has no cycle.
  Versions pin immutable published versions, so a cycle can only appear when the draft being
  saved depends (transitively) on a version of its own script id — that is still rejected,
  because the scheduler orders work by script id.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing.exceptions import Unresolvable

from customscripts.auth import Principal
from customscripts.config import Settings, Tier
from customscripts.errors import Invalid, TooLarge
from customscripts.permissions import Denied, check_can_use
from customscripts.registry.catalog import Catalog, VersionRow
from customscripts.registry.models import MAX_SCHEMA_BYTES, MAX_SOURCE_BYTES, Limits, parse_dependency

MAX_GRAPH_NODES = 5000


def check_schema(schema: object, field: str) -> None:
    if not isinstance(schema, dict):
        raise Invalid(f"{field} must be a JSON object", code="invalid_schema", details={"field": field})
    try:
        size = len(json.dumps(schema))
    except (ValueError, RecursionError):
        raise Invalid(f"{field} is not serialisable JSON", code="invalid_schema",
                      details={"field": field}) from None
    if size > MAX_SCHEMA_BYTES:
        raise Invalid(f"{field} exceeds {MAX_SCHEMA_BYTES} bytes", code="invalid_schema",
                      details={"field": field})
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise Invalid(f"{field} is not a valid JSON Schema: {exc.message[:300]}", code="invalid_schema",
                      details={"field": field, "path": path}) from None
    except (RecursionError, ValueError, TypeError) as exc:
        raise Invalid(f"{field} is not a valid JSON Schema: {type(exc).__name__}",
                      code="invalid_schema", details={"field": field}) from None
    try:  # one trial run: a schema that recurses without end, or names a $ref nowhere, is caught here
        Draft202012Validator(schema).is_valid({})
    except RecursionError:
        raise Invalid(f"{field} recurses without end ($ref cycle)", code="invalid_schema",
                      details={"field": field}) from None
    except Unresolvable as exc:
        raise Invalid(f"{field} has an unresolvable $ref: {str(exc)[:200]}", code="invalid_schema",
                      details={"field": field}) from None


def check_source(source: str) -> None:
    """Size, encoding, syntax (422 with line and column) and a top-level `run(ctx)`."""
    try:
        data = source.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("source must be valid UTF-8 text", code="invalid_source") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise TooLarge(f"source exceeds {MAX_SOURCE_BYTES} bytes", code="source_too_large",
                       details={"max_bytes": MAX_SOURCE_BYTES, "bytes": len(data)})
    try:
        tree = ast.parse(source, filename="script.py")
        compile(tree, "script.py", "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise Invalid(f"syntax error in script.py: {exc.msg}", code="syntax_error",
                      details={"line": exc.lineno, "column": exc.offset, "message": exc.msg}) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise Invalid(f"script.py does not compile: {type(exc).__name__}", code="syntax_error",
                      details={"line": None, "column": None, "message": str(exc)[:200]}) from None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "run":
            if _accepts_one_positional(node.args):
                return
            raise Invalid("run must accept exactly one argument: run(ctx)", code="invalid_run",
                          details={"line": node.lineno, "column": node.col_offset + 1})
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "run":
            raise Invalid("run must be a plain function, not async", code="invalid_run",
                          details={"line": node.lineno, "column": node.col_offset + 1})
    raise Invalid("script.py must define a top-level function run(ctx)", code="missing_run")


def _accepts_one_positional(args: ast.arguments) -> bool:
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    required_kw = sum(1 for d in args.kw_defaults if d is None)
    return required_kw == 0 and required <= 1 and (positional >= 1 or args.vararg is not None)


def check_limits(limits: Limits | None, tier: Tier) -> None:
    if limits is None:
        return
    caps = {"timeout_ms": tier.timeout_ms, "memory_mb": tier.memory_mb, "cpu_seconds": tier.cpu_seconds}
    over = {k: {"requested": getattr(limits, k), "cap": cap} for k, cap in caps.items()
            if getattr(limits, k) is not None and getattr(limits, k) > cap}
    if over:
        raise Invalid(f"limits exceed tier {tier.name!r} caps: {sorted(over)}",
                      code="limits_exceed_tier", details=over)


def walk_versions(catalog: Catalog, roots: Iterable[tuple[str, int]]) -> dict[tuple[str, int], VersionRow]:
    """Every published version reachable from `roots` (roots included); missing ones are absent."""
    found: dict[tuple[str, int], VersionRow] = {}
    frontier = list(dict.fromkeys(roots))
    seen = set(frontier)
    while frontier:
        rows = catalog.get_versions(frontier)
        found.update(rows)
        nxt = []
        for row in rows.values():
            for dep in row.depends_on:
                pair = parse_dependency(dep)
                if pair not in seen:
                    seen.add(pair)
                    nxt.append(pair)
        if len(seen) > MAX_GRAPH_NODES:
            raise Invalid("dependency graph too large", code="dependency_graph_too_large")
        frontier = nxt
    return found


def find_cycle(edges: dict[str, set[str]], start: str) -> list[str] | None:
    """A cycle over script ids reachable from `start`, as its members in order, or None.

    Iterative depth-first search (graphs may be deeper than Python's recursion limit).
    """
    done: set[str] = set()
    path: list[str] = [start]
    on_path = {start}
    iters = [iter(sorted(edges.get(start, ())))]
    while iters:
        nxt = next(iters[-1], None)
        if nxt is None:
            node = path.pop()
            on_path.discard(node)
            done.add(node)
            iters.pop()
            continue
        if nxt in on_path:
            return path[path.index(nxt):]
        if nxt not in done:
            path.append(nxt)
            on_path.add(nxt)
            iters.append(iter(sorted(edges.get(nxt, ()))))
    return None


def check_dependencies(
    catalog: Catalog,
    owner: Principal,
    script_id: str,
    depends_on: list[str],
    *,
    subscribed: Callable[[str], bool] = lambda _sid: False,
    cfg: Settings | None = None,
) -> dict[tuple[str, int], VersionRow]:
    """Validate the draft's dependencies as its owner would use them; return the whole graph."""
    direct = [parse_dependency(d) for d in depends_on]
    if len(set(direct)) != len(direct):
        raise Invalid("depends_on lists a dependency twice", code="invalid_dependency")
    graph = walk_versions(catalog, direct)
    for sid, ver in direct:
        row = graph.get((sid, ver))
        problem = None
        if row is None or (row.tenant != owner.tenant and not row.permissions.marketplace):
            problem = "does not exist or is not accessible to the owner"
        elif row.tenant != owner.tenant:
            problem = "belongs to another tenant (cross-tenant dependencies are not allowed)"
        elif row.status != "published":
            problem = f"is {row.status}"
        else:
            try:
                check_can_use(owner, row, ver, subscribed=subscribed(sid), cfg=cfg)
            except Denied:
                problem = "is not accessible to the owner"
        if problem:
            # One code for every cause; another tenant's private ids read exactly like missing ones.
            raise Invalid(f"dependency {sid}@{ver} {problem}", code="invalid_dependency",
                          details={"dependency": f"{sid}@{ver}"})
    edges: dict[str, set[str]] = {script_id: {sid for sid, _ in direct}}
    for row in graph.values():
        edges.setdefault(row.script_id, set()).update(parse_dependency(d)[0] for d in row.depends_on)
    cycle = find_cycle(edges, script_id)
    if cycle:
        raise Invalid(f"dependency cycle: {' -> '.join([*cycle, cycle[0]])}", code="dependency_cycle",
                      details={"cycle": cycle})
    return graph
