"""The shared retry policy: how many attempts, how long between them."""

from __future__ import annotations

import pytest

from customscripts.retry import RetryPolicy


def test_pauses_double_up_to_the_cap_with_half_of_each_random() -> None:
    policy = RetryPolicy(attempts=6, backoff_s=0.1, max_backoff_s=0.5)
    for failures, step in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (5, 0.5)):
        pauses = {policy.pause(failures) for _ in range(50)}
        assert all(step / 2 <= p <= step for p in pauses), (failures, pauses)
        assert len(pauses) > 1  # jitter: callers that failed together spread out


def test_without_jitter_the_pause_is_the_step() -> None:
    policy = RetryPolicy(attempts=3, backoff_s=0.2, max_backoff_s=1.0, jitter=False)
    assert [policy.pause(n) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]


def test_gives_up_after_its_attempts() -> None:
    policy = RetryPolicy(attempts=3)
    assert [policy.gives_up(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"backoff_s": -1.0}, {"max_backoff_s": -0.1}])
def test_a_policy_that_cannot_work_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)
