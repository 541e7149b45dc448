"""Dependency waves: order evaluations so a dependency's output for an event is published first.

An evaluation is one (script version, params) for one event; its dependencies are evaluated for the
same event. Wave k holds every evaluation whose dependencies all sit in waves < k, so a wave can run
as one batch per function and the scheduler publishes a whole wave before starting the next.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

Node = TypeVar("Node", bound=Hashable)


class CycleError(ValueError):
    def __init__(self, members: list) -> None:
        super().__init__(f"dependency cycle among: {', '.join(map(str, members))}")
        self.members = members


def waves(nodes: Iterable[Node], deps: Mapping[Node, Iterable[Node]]) -> list[list[Node]]:
    """Kahn's algorithm by levels over `nodes` plus everything they depend on, transitively."""
    graph: dict[Node, set[Node]] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in graph:
            continue
        graph[node] = set(deps.get(node, ()))
        stack.extend(graph[node])
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
