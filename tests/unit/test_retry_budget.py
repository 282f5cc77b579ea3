"""The retry budget (gRPC retry throttling): failures drain it, successes refill it, retries stop at half."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridserve.gateway.dispatch.retry_budget import RetryBudget


@given(st.lists(st.booleans(), max_size=300))
def test_tokens_stay_within_bounds_and_gate_retries_at_half(outcomes: list[bool]) -> None:
    budget = RetryBudget()
    for ok in outcomes:
        budget.success() if ok else budget.failure()
        assert 0.0 <= budget.tokens <= budget.max_tokens
        assert budget.allow_retry() == (budget.tokens > budget.max_tokens / 2)


def test_a_failing_grid_stops_retrying_and_recovers_with_successes() -> None:
    budget = RetryBudget(max_tokens=10, token_ratio=0.1)
    failures = 0
    while budget.allow_retry():
        budget.failure()
        failures += 1
    assert failures == 5  # 10 -> 5 tokens: no longer above half
    successes = 0
    while not budget.allow_retry():
        budget.success()
        successes += 1
    assert successes == 1  # 5.0 -> 5.1 tokens: above half again; a further failure stops retries again


@given(st.lists(st.booleans(), max_size=100), st.booleans())
def test_a_success_never_lowers_and_a_failure_never_raises_the_budget(history: list[bool], ok: bool) -> None:
    budget = RetryBudget()
    for item in history:
        budget.success() if item else budget.failure()
    before = budget.tokens
    budget.success() if ok else budget.failure()
    assert (budget.tokens >= before) if ok else (budget.tokens <= before)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RetryBudget(max_tokens=0)
    with pytest.raises(ValueError):
        RetryBudget(token_ratio=-1)
