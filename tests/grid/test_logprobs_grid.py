"""Log-probabilities through the official openai SDK on a running grid: chat's `logprobs`/`top_logprobs` streamed
and whole, the text completions' legacy shape; and, on a grid auditing every answer, a node that invents its
numbers (`flatter_logprobs`, tokens honest) is caught with the evidence and quarantined (or banned), while an
honest node's answers all pass."""

import math
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
from openai import OpenAI
from tests.conftest import API_KEY, admin_get, make_grid

from gridserve.cli.grid import LocalGrid
from gridserve.engines.tiny import TINY_MODEL

ASK: Any = [{"role": "user", "content": "Count: one, two,"}]


def _client(grid: LocalGrid) -> OpenAI:
    return OpenAI(base_url=grid.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("model", [TINY_MODEL, "llama-3-8b"])
def test_chat_logprobs_cover_every_token_streamed_and_whole(tiny_grid: LocalGrid, model: str) -> None:
    client = _client(tiny_grid)
    asked: dict[str, Any] = {"model": model, "messages": ASK, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**asked, logprobs=True, top_logprobs=3).choices[0]
    assert whole.logprobs is not None and whole.logprobs.content
    entries = whole.logprobs.content
    assert "".join(e.token for e in entries) == whole.message.content, "one entry per token, in order"
    for entry in entries:
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 3
        assert entry.logprob == entry.top_logprobs[0].logprob, "greedy: the likeliest token is the one picked"
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and math.fsum(math.exp(v) for v in tops) <= 1.0 + 1e-9
    assert b"".join(bytes(e.bytes or []) for e in entries).decode() == whole.message.content, "bytes spell it"
    plain = client.chat.completions.create(**asked).choices[0]
    assert plain.logprobs is None and plain.message.content == whole.message.content, "asking changes no token"
    streamed: list[Any] = []
    text = ""
    for chunk in client.chat.completions.create(**asked, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == whole.message.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_text_completions_get_openais_legacy_logprobs(tiny_grid: LocalGrid) -> None:
    client = _client(tiny_grid)
    answer = client.completions.create(model=TINY_MODEL, prompt="one, two,", max_tokens=10, temperature=0, logprobs=2)
    scored = answer.choices[0].logprobs
    assert scored is not None and scored.tokens and scored.token_logprobs and scored.top_logprobs
    assert "".join(scored.tokens) == answer.choices[0].text
    assert scored.text_offset == [sum(len(t) for t in scored.tokens[:i]) for i in range(len(scored.tokens))]
    pairs = zip(scored.top_logprobs, scored.token_logprobs, strict=True)
    assert all(len(top) <= 2 and max(top.values()) == lp for top, lp in pairs), "greedy: the likeliest picked"


# --- audited -----------------------------------------------------------------------------------------------------

FLATTERER, HONEST = 0, 1


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGrid, str]]:
    """A grid auditing every answer, with the flattering node's id."""
    # round robin: of any two requests one goes to the flattering node. (Ranked by score, the test counted on the
    # first node up, with heartbeats kept before the second registered, to serve first; a fresh clone's run had the
    # honest node serve the first answer and, its record then the better, all twelve.)
    round_robin = resources.files("gridserve.scheduler").joinpath("profiles/round-robin.yaml")
    gateway = ["--audit-rate", "1", "--canary-interval", "0", "--vetting-checks", "0", "--profile", str(round_robin)]
    grid = make_grid(tmp_path_factory.mktemp("logprobs"), ["tiny"] * 2, threads=1, extra_gateway_args=gateway)
    try:
        grid.start_gateway()
        grid.start_node(FLATTERER, "tiny", ["--allow-dishonest", "--dishonest", "flatter_logprobs"])
        grid.wait_nodes(1, 120)
        (flatterer,) = grid.nodes()
        grid.start_node(HONEST, "tiny")
        grid.wait_nodes(2, 120)
        yield grid, flatterer["node_id"]
    finally:
        grid.stop()


def _reliability(grid: LocalGrid, node_id: str) -> str:
    node = next(n for n in grid.nodes() if n["node_id"] == node_id)
    return str((node.get("reliability") or {}).get("state", ""))


def _ask(client: OpenAI, i: int) -> str:
    """A sampled answer with log-probabilities; the node that served it."""
    raw = client.chat.completions.with_raw_response.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": f"Story {i}:"}],
        max_tokens=8,
        seed=i,
        logprobs=True,
        extra_body={"gridserve": {"hedge": False}, "ignore_eos": True},
    )
    assert raw.parse().choices[0].logprobs is not None
    return str(raw.headers["x-gridserve-node"])


def _audited_at_least(grid: LocalGrid, count: int) -> dict[str, Any]:
    """The audit summary once `count` answers in all have been audited (every answer is: audit rate 1)."""
    deadline = time.monotonic() + 120
    summary = admin_get(grid, "/admin/audits").json()
    while time.monotonic() < deadline and summary["audited"] < count:
        time.sleep(0.2)
        summary = admin_get(grid, "/admin/audits").json()
    assert summary["audited"] >= count, summary
    return dict(summary)


def test_a_node_inventing_logprobs_is_caught_and_an_honest_one_is_not(audited: tuple[LocalGrid, str]) -> None:
    grid, flatterer = audited
    client = _client(grid)
    served: list[str] = []
    while flatterer not in served and len(served) < 2:
        served.append(_ask(client, len(served)))
    assert flatterer in served, f"round robin, and two answers, none from the flattering node: {served}"
    out = {"quarantined", "banned"}  # each of its audited answers is a severe incident: a second one bans it
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _reliability(grid, flatterer) not in out:
        time.sleep(0.3)
    incidents = admin_get(grid, f"/admin/incidents?node_id={flatterer}").json()["incidents"]
    assert incidents and incidents[0]["severity"] == "severe", incidents
    assert "log-probability is claimed 0.0000" in incidents[0]["detail"], incidents
    assert _reliability(grid, flatterer) in out
    before = _audited_at_least(grid, len(served))  # the first round's audits all counted
    after_quarantine = [_ask(client, i) for i in range(len(served), len(served) + 6)]
    assert flatterer not in after_quarantine
    summary = _audited_at_least(grid, before["audited"] + len(after_quarantine))
    assert (summary["audited"] - before["audited"], summary["failed"] - before["failed"]) == (6, 0), summary
    for honest in set(after_quarantine):
        assert admin_get(grid, f"/admin/incidents?node_id={honest}").json()["incidents"] == []
