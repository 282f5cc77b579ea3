"""The gateway's prefix affinity over the lifecycle's hooks: what it dispatched is what it expects nodes to
hold; a failover's new node holds it too; a node that goes down or registers again holds nothing."""

import dataclasses

import pytest
from tests.unit.test_lifecycle import a_decision, finished
from tests.unit.test_scheduler import Spec, build

from gridserve.catalog import MODELS
from gridserve.gateway.dispatch.prefixes import TOKENS_PER_BLOCK, PrefixAffinity, capacity_blocks
from gridserve.gateway.lifecycle import NodeWork, Scope, Settled
from gridserve.types import ChatMessage, GenerateRequest, NodeId, SamplingParams

SYSTEM = ChatMessage(role="system", content="You are a careful assistant. " * 60)


def chat(*turns: str) -> GenerateRequest:
    messages = [SYSTEM] + [
        ChatMessage(role="user" if i % 2 == 0 else "assistant", content=t) for i, t in enumerate(turns)
    ]
    return GenerateRequest(request_id="r", model="llama-3-8b", messages=tuple(messages), sampling=SamplingParams())


def tokens(job: GenerateRequest) -> int:
    return sum(len(m.content) for m in job.messages or ()) // 4


def serve(affinity: PrefixAffinity, job: GenerateRequest, node: str) -> tuple[tuple[str, int], ...]:
    """One request: looked up, then opened on `node`; returns what the lookup found."""
    scope = Scope("chat")
    found = affinity.lookup(scope, job, tokens(job))
    affinity.opened(scope, a_decision(), node, {})
    return found


def test_a_later_turn_finds_the_node_that_served_the_earlier_one() -> None:
    affinity = PrefixAffinity()
    first = chat("What is a KV cache? " * 10)
    assert serve(affinity, first, "n-a") == ()
    second = chat("What is a KV cache? " * 10, "It keeps attention keys. " * 10, "And prefix caching?")
    found = dict(serve(affinity, second, "n-b"))
    blocks = len(SYSTEM.content + "What is a KV cache? " * 10) // 128  # about: roles and separators add a few chars
    assert set(found) == {"n-a"} and abs(found["n-a"] - blocks * TOKENS_PER_BLOCK) <= TOKENS_PER_BLOCK
    assert found["n-a"] < tokens(second)
    assert dict(serve(affinity, second, "n-b"))["n-b"] >= found["n-a"]  # n-b now holds the longer prompt


def test_down_or_registering_again_empties_a_node_and_a_failover_fills_the_new_one() -> None:
    affinity = PrefixAffinity()
    job = chat("Tell me about the grid. " * 20)
    serve(affinity, job, "n-a")
    affinity.lost("n-a")
    assert affinity.lookup(Scope("chat"), job, tokens(job)) == ()

    scope = Scope("chat")
    affinity.lookup(scope, job, tokens(job))
    decision = a_decision()
    affinity.opened(scope, decision, "n-a", {})
    end = finished(decision)
    moved = dataclasses.replace(
        end,
        served_by=NodeId("n-b"),
        work=(*end.work, NodeWork(node_id=NodeId("n-b"), outcome="ok", tokens=4, price_per_mtok=1.0)),
        failovers=1,
    )
    affinity.finished(scope, moved, Settled())
    assert set(dict(affinity.lookup(Scope("chat"), job, tokens(job)))) == {"n-a", "n-b"}

    snap = build(Spec(accelerator="rtx4090"), "n-a")
    assert snap.capability is not None
    affinity.registered(snap.capability.model_copy(update={"node_id": "n-a"}))
    assert set(dict(affinity.lookup(Scope("chat"), job, tokens(job)))) == {"n-b"}


def test_the_expected_reuse_is_whole_blocks_of_the_nodes_own_cache() -> None:
    """A node that reuses whole blocks of 128 tokens is never expected to reuse a part of one."""
    affinity = PrefixAffinity()
    for node_id, block in (("n-128", 128), ("n-unsaid", None)):
        snap = build(Spec(accelerator="rtx4090"), node_id)
        assert snap.capability is not None
        affinity.registered(snap.capability.model_copy(update={"prefix_block_tokens": block}))
    job = chat("Tell me about the grid. " * 20)
    serve(affinity, job, "n-128")
    serve(affinity, job, "n-unsaid")
    found = dict(affinity.lookup(Scope("chat"), job, tokens(job)))
    assert found["n-unsaid"] % 128 != 0  # the gateway's own estimate: ~32-token text blocks
    assert found["n-128"] == found["n-unsaid"] - found["n-unsaid"] % 128 > 0


def test_capacity_is_the_cards_kv_room_for_its_models() -> None:
    snap = build(Spec(accelerator="rtx4090"), "n-a")  # llama-3-8b at float16 on 24 GiB
    assert snap.capability is not None
    spec = MODELS["llama-3-8b"]
    room = (24 * 2**30 - spec.weight_bytes("float16")) / spec.kv_bytes_per_token()
    assert capacity_blocks(snap.capability) == int(room / TOKENS_PER_BLOCK)


def test_switched_off_it_finds_and_records_nothing() -> None:
    affinity = PrefixAffinity(enabled=False)
    job = chat("Hello there. " * 40)
    serve(affinity, job, "n-a")
    assert serve(affinity, job, "n-a") == ()
    assert affinity.index.stats().holdings == 0


def test_calibration_judges_the_prefill_the_node_ran_not_the_reuse_the_index_guessed() -> None:
    import random

    from tests.unit.test_scheduler import NOW

    from gridserve.gateway.lifecycle.subscribers import _reuse_error_s
    from gridserve.scheduler import default_profile, schedule
    from gridserve.types.scheduling import ScheduleRequest

    node = build(Spec(accelerator="rtx4090"), "n-a")
    request = ScheduleRequest(
        request_id="r", model="llama-3-8b", prompt_tokens=4_000, max_tokens=8, cached_tokens=(("n-a", 3_000),)
    )
    decision = schedule(request, [node], default_profile(), random.Random(0), NOW)
    candidate = decision.candidate("n-a")
    assert candidate is not None and candidate.prefill_s_per_token is not None
    end = finished(decision)  # the node counted 50 prompt tokens: shares of the prompt are compared
    as_expected = dataclasses.replace(end, prompt_tokens=400, cached_tokens=300)
    assert _reuse_error_s(as_expected, candidate) == 0.0
    nothing_cached = dataclasses.replace(end, prompt_tokens=400, cached_tokens=0)
    assert _reuse_error_s(nothing_cached, candidate) == 3_000 * candidate.prefill_s_per_token
    # the predicted TTFT with the guessed reuse, plus that error, is the prediction of a cold prompt
    cold = schedule(
        ScheduleRequest(request_id="r", model="llama-3-8b", prompt_tokens=4_000, max_tokens=8),
        [node],
        default_profile(),
        random.Random(0),
        NOW,
    )
    cold_ttft = cold.candidate("n-a").predicted_ttft_s  # type: ignore[union-attr]
    assert candidate.predicted_ttft_s is not None and cold_ttft is not None
    assert candidate.predicted_ttft_s + _reuse_error_s(nothing_cached, candidate) == pytest.approx(cold_ttft, rel=1e-6)
