"""Dependency order: a dependency's output for an event is published before its dependents run.

An evaluation is one (script version, params) for one event; its dependencies are evaluated for the
same event. `waves` orders a graph in levels: wave k holds every evaluation whose dependencies all sit
in waves < k. The scheduler runs by `Frontier` instead: an evaluation becomes ready the moment its own
dependencies are done, so a slow or retried function delays its own dependents only, never another
tenant's next level.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping
from typing import TypeVar

Node = TypeVar("Node", bound=Hashable)


class CycleError(ValueError):
    def __init__(self, members: list) -> None:
        super().__init__(f"dependency cycle among: {', '.join(map(str, members))}")
        self.members = members


def waves(nodes: Iterable[Node], deps: Mapping[Node, Iterable[Node]]) -> list[list[Node]]:
    """Kahn's algorithm by levels over `nodes` plus everything they depend on, transitively."""
    graph = _closure(nodes, deps)
    remaining = {node: set(d) for node, d in graph.items()}
    order: list[list[Node]] = []
    while remaining:
        ready = [node for node, d in remaining.items() if not d]
        if not ready:
            raise CycleError(sorted(remaining, key=str))
        ready.sort(key=str)
        order.append(ready)
        for node in ready:
            del remaining[node]
        done = set(ready)
        for d in remaining.values():
            d -= done
    return order


def _closure(nodes: Iterable[Node], deps: Mapping[Node, Iterable[Node]]) -> dict[Node, set[Node]]:
    graph: dict[Node, set[Node]] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in graph:
            continue
        graph[node] = set(deps.get(node, ()))
        stack.extend(graph[node])
    return graph


class Frontier:
    """Kahn's algorithm one completion at a time: `ready()` gives the nodes without dependencies,
    `done(node)` the nodes whose last unfinished dependency it was. Nodes on a cycle never become
    ready (`unfinished` names what is left)."""

    def __init__(self, nodes: Iterable[Node], deps: Mapping[Node, Collection[Node]]) -> None:
        self._waiting: dict[Node, int] = {}
        self._dependents: dict[Node, list[Node]] = {}
        stack = list(nodes)
        while stack:  # every node and, transitively, what it depends on (a batch's thousands: one pass)
            node = stack.pop()
            if node in self._waiting:
                continue
            d: Collection[Node] = deps.get(node, ())
            if len(d) > 1:
                d = set(d)
            self._waiting[node] = len(d)
            for dep in d:
                self._dependents.setdefault(dep, []).append(node)
                if dep not in self._waiting:
                    stack.append(dep)
        self._finished: set[Node] = set()

    def ready(self) -> list[Node]:
        return [node for node, n in self._waiting.items() if n == 0]

    def done(self, node: Node) -> list[Node]:
        if node in self._finished:
            return []
        self._finished.add(node)
        now_ready = []
        for dependent in self._dependents.get(node, ()):
            self._waiting[dependent] -= 1
            if self._waiting[dependent] == 0:
                now_ready.append(dependent)
        return now_ready

    def unfinished(self) -> list[Node]:
        return [node for node in self._waiting if node not in self._finished]
