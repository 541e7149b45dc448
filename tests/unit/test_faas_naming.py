"""Function names are DNS-1123, <= 63 chars, deterministic and collision-resistant."""

from __future__ import annotations

import pytest

from customscripts.errors import Invalid
from customscripts.faas.naming import function_name, is_dns1123, label_value


def test_plain_names_are_readable() -> None:
    assert function_name("rsi-14", 3) == "cs-rsi-14-v3"
    assert function_name("s-0a1b2c3d4e5f", "12") == "cs-s-0a1b2c3d4e5f-v12"


def test_deterministic() -> None:
    assert function_name("abc_def", 7) == function_name("abc_def", 7)


@pytest.mark.parametrize("sid", ["a" * 63, "x_y", "trailing-", "a__b", "9" * 60 + "_z"])
@pytest.mark.parametrize("version", [1, 999_999_999])
def test_rewritten_names_are_valid(sid: str, version: int) -> None:
    name = function_name(sid, version)
    assert is_dns1123(name), name
    assert len(name) <= 63


def test_no_collisions_between_rewritten_and_plain() -> None:
    names = {
        function_name("a_b", 1), function_name("a-b", 1), function_name("a__b", 1),
        function_name("a_b", 11), function_name("a-b", 11),
        function_name("a" * 63, 1), function_name("a" * 62 + "b", 1), function_name("a" * 62, 1),
    }
    assert len(names) == 8


def test_many_long_ids_do_not_collide() -> None:
    names = {function_name(f"{'long-prefix-' * 4}{i:06d}", v) for i in range(500) for v in (1, 2)}
    assert len(names) == 1000
    assert all(is_dns1123(n) for n in names)


@pytest.mark.parametrize("bad", ["../x", "A", "a/b", "", "a\x00"])
def test_invalid_ids_rejected(bad: str) -> None:
    with pytest.raises(Invalid):
        function_name(bad, 1)


@pytest.mark.parametrize("bad", [0, -1, "1.0", True])
def test_invalid_versions_rejected(bad: object) -> None:
    with pytest.raises(Invalid):
        function_name("abc", bad)  # type: ignore[arg-type]


def test_is_dns1123() -> None:
    assert is_dns1123("a") and is_dns1123("a-1") and is_dns1123("a" * 63)
    assert not is_dns1123("a" * 64) and not is_dns1123("-a") and not is_dns1123("a-")
    assert not is_dns1123("A") and not is_dns1123("a_b") and not is_dns1123("a.b") and not is_dns1123(3)


def test_label_values() -> None:
    assert label_value("user-1") == "user-1"
    assert label_value("alice@example.com") != "alice@example.com"
    for raw in ["alice@example.com", "x" * 100, "@@@", "-a-", "a" * 63 + "b"]:
        value = label_value(raw)
        assert len(value) <= 63
        assert value[0].isalnum() and value[-1].isalnum()
        assert label_value(value) == value
    assert label_value("x" * 100) != label_value("x" * 101)
