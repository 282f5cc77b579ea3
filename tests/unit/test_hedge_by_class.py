"""Which requests the gateway may hedge (gateway/api/openai_api.py `_hedges`): a batch key's are not unless the
client asks (a hedge holds a second node's slot that the fair queue does not count: under a batch flood, 203 hedges
in 80 s took the slots kept for interactive requests); every other request is, unless the client opts out."""

from types import SimpleNamespace
from typing import Any

import pytest

from gridserve.gateway.api.openai_api import _hedges


def _admission(priority: str) -> Any:
    return SimpleNamespace(key=SimpleNamespace(policy=SimpleNamespace(priority=priority)))


@pytest.mark.parametrize(
    ("asked", "priority", "hedged"),
    [
        (None, "batch", False),
        (None, "standard", True),
        (None, "interactive", True),
        (None, None, True),  # an --api-key key: no admission, no class
        (True, "batch", True),  # asked for: honoured
        (False, "interactive", False),
        (False, None, False),
    ],
)
def test_a_batch_keys_requests_are_not_hedged_unless_asked(
    asked: bool | None, priority: str | None, hedged: bool
) -> None:
    admission = None if priority is None else _admission(priority)
    assert _hedges(asked, admission) is hedged
