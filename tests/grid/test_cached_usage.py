"""Prefix caching through the grid: a tiny node's prefix cache serves a follow-up prompt, and the gateway's answers
report it as OpenAI does (`usage.prompt_tokens_details.cached_tokens`), whole and streamed, chat and completions,
while the node's receipts (which carry the count) keep being accepted."""

from collections.abc import Iterator

import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL, TINY_PREFIX_BLOCK

SYSTEM = "You answer questions about the grid of nodes behind one gateway, briefly. " * 3


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    """One tiny node (every request lands on it), canaries off (no request of the gateway's own in between)."""
    found = make_grid(
        tmp_path_factory.mktemp("cached-usage"), ["tiny"], threads=1, extra_gateway_args=["--canary-interval", "0"]
    )
    try:
        found.start(timeout_s=120)
        yield found
    finally:
        found.stop()


def cached(usage: object) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    assert details is not None, usage
    return int(details.cached_tokens)


def test_completions_report_the_cached_prefix(grid: LocalGrid) -> None:
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    first = client.completions.create(model=TINY_MODEL, prompt=SYSTEM + "What is a node?", max_tokens=4, temperature=0)
    assert first.usage is not None and cached(first.usage) == 0
    again = client.completions.create(model=TINY_MODEL, prompt=SYSTEM + "What is a hedge?", max_tokens=4, temperature=0)
    assert again.usage is not None
    shared = 1 + len(SYSTEM) + len("What is a ")  # bos, then a token per byte
    assert cached(again.usage) == shared // TINY_PREFIX_BLOCK * TINY_PREFIX_BLOCK > 0
    assert again.usage.prompt_tokens == 1 + len(SYSTEM) + len("What is a hedge?")
    chunks = list(
        client.completions.create(
            model=TINY_MODEL,
            prompt=SYSTEM + "What is a stall?",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and cached(chunks[-1].usage) == cached(again.usage)


def test_chat_reports_the_cached_prefix_whole_and_streamed(grid: LocalGrid) -> None:
    client = OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    system = {"role": "system", "content": SYSTEM}
    first = client.chat.completions.create(
        model=TINY_MODEL, messages=[system, {"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert first.usage is not None
    again = client.chat.completions.create(
        model=TINY_MODEL, messages=[system, {"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
    )
    assert again.usage is not None and cached(again.usage) >= len(SYSTEM) - TINY_PREFIX_BLOCK
    chunks = list(
        client.chat.completions.create(
            model=TINY_MODEL,
            messages=[system, {"role": "user", "content": "Hey"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and cached(chunks[-1].usage) == cached(again.usage)


def test_receipts_with_the_count_are_accepted(grid: LocalGrid) -> None:
    (node,) = grid.nodes()
    assert node["state"] == "up"  # a refused receipt is a severe incident, which quarantines the node
    found = admin_get(grid, f"/admin/incidents?node_id={node['node_id']}").json()
    assert found["incidents"] == []
