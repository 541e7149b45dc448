from __future__ import annotations

import pytest

from customscripts.realtime.waves import CycleError, Frontier, waves


def test_chain_runs_in_dependency_order():
    assert waves(["c"], {"c": ["b"], "b": ["a"]}) == [["a"], ["b"], ["c"]]


def test_independent_nodes_share_a_wave_and_diamond_joins_last():
    order = waves(["d", "x"], {"d": ["b", "c"], "b": ["a"], "c": ["a"]})
    assert order == [["a", "x"], ["b", "c"], ["d"]]


def test_dependencies_are_added_transitively():
    assert waves(["z"], {"z": ["y"], "y": ["w"]}) == [["w"], ["y"], ["z"]]


def test_cycle_is_reported_with_its_members():
    with pytest.raises(CycleError) as err:
        waves(["a"], {"a": ["b"], "b": ["c"], "c": ["a"]})
    assert err.value.members == ["a", "b", "c"]


def test_frontier_releases_a_node_when_its_own_dependencies_are_done():
    frontier = Frontier(["d", "x"], {"d": ["b", "c"], "b": ["a"], "c": ["a"]})
    assert sorted(frontier.ready()) == ["a", "x"]
    assert frontier.done("x") == []  # an unrelated node finishing releases nothing
    assert sorted(frontier.done("a")) == ["b", "c"]
    assert frontier.done("b") == [] and frontier.done("c") == ["d"]
    assert frontier.done("c") == []  # done twice: counted once
    assert frontier.unfinished() == ["d"]


def test_frontier_never_releases_a_cycle():
    frontier = Frontier(["a"], {"a": ["b"], "b": ["a"]})
    assert frontier.ready() == [] and sorted(frontier.unfinished()) == ["a", "b"]
