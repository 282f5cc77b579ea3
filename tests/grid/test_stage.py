"""Pipeline stages (engines/stage.py): stages run in turn give the whole model's logits, bit for bit."""

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.engines.gemma import default_cache_dir, ensure_cache, load_gemma
from gridserve.engines.stage import StageModule, StageSpan, load_stage, stage_keys, stages_from_model
from gridserve.engines.tiny import build_tiny_model


def whole_run(model: Any, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Greedy decode with the whole model: the last position's logits at every step."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        logits = [out.logits[0, -1]]
        for _ in range(steps):
            token = int(logits[-1].argmax())
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1])
    return logits


def staged_run(stages: list[StageModule], prompt: list[int], steps: int) -> list[torch.Tensor]:
    caches = [stage.new_cache() for stage in stages]
    logits: list[torch.Tensor] = []
    inputs = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(steps + 1):
            hidden = inputs
            for stage, cache in zip(stages, caches, strict=True):
                hidden = stage(hidden, cache)
            logits.append(hidden[0, -1])
            inputs = torch.tensor([[int(logits[-1].argmax())]])
    return logits


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_with_layers(layers: int) -> Any:
    """The tiny test model's shape with `layers` layers (sliding and full attention alternating), seeded."""
    from transformers import Gemma3ForCausalLM

    config = build_tiny_model().model.config
    config.num_hidden_layers = layers
    config.layer_types = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("cuts", [[2], [1, 3]], ids=["2-stage", "3-stage"])
def test_tiny_stages_equal_the_whole_model_bitwise(cuts: list[int]) -> None:
    model = tiny_with_layers(4)
    prompt = [1, *range(40, 110)]  # 71 tokens: decoding passes the 64-token sliding window
    whole = whole_run(model, prompt, 12)
    staged = staged_run(stages_from_model(model, cuts), prompt, 12)
    assert len(staged) == len(whole) == 13
    assert all(torch.equal(a, b) for a, b in zip(whole, staged, strict=True))


def test_a_stage_holds_only_its_layers() -> None:
    model = build_tiny_model().model
    first, last = stages_from_model(model, [1])
    assert len(first.model.layers) == 1 and len(last.model.layers) == 1
    assert first.model.layers[0].self_attn.is_sliding
    assert not last.model.layers[0].self_attn.is_sliding
    assert isinstance(first.model.norm, torch.nn.Identity)  # the final norm is the last stage's
    assert torch.equal(last.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    assert first.new_cache().get_seq_length() == 0


@given(n=st.integers(1, 40), data=st.data())
@settings(max_examples=100, deadline=None)
def test_stage_keys_partition_the_layers(n: int, data: st.DataObject) -> None:
    """Every layer tensor goes to exactly one stage, renumbered from 0; embeddings to the first and last."""
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    keys = [f"model.layers.{i}.{part}" for i in range(n) for part in ("mlp.w", "attn.q")]
    keys += ["model.embed_tokens.weight", "model.norm.weight"]
    bounds = [0, *cuts, n]
    spans = [StageSpan(a, b, n) for a, b in itertools.pairwise(bounds)]
    taken = [source for span in spans for source in stage_keys(span, keys).values()]
    layer_sources = [k for k in taken if k.startswith("model.layers.")]
    assert sorted(layer_sources) == sorted(k for k in keys if k.startswith("model.layers."))
    for span in spans:
        mapping = stage_keys(span, keys)
        local = {int(k.split(".")[2]) for k in mapping if k.startswith("model.layers.")}
        assert local == set(range(span.end - span.start))
        assert ("model.embed_tokens.weight" in mapping) == (span.first or span.last)
        assert ("model.norm.weight" in mapping) == span.last


def test_a_span_outside_the_model_is_refused() -> None:
    for start, end in ((0, 0), (3, 2), (-1, 2), (0, 19)):
        with pytest.raises(ValueError, match="not inside"):
            StageSpan(start, end, 18)


@pytest.mark.slow
@pytest.mark.parametrize("cuts", [[9], [5, 12]], ids=["2-stage", "3-stage"])
def test_gemma_stages_from_the_checkpoint_equal_the_whole_model_bitwise(cuts: list[int]) -> None:
    """The real Gemma 3 270M: each stage reads only its tensors from the safetensors cache."""
    ensure_cache()
    loaded = load_gemma()
    prompt = loaded.codec.encode_prompt("The three primary colours are")
    whole = whole_run(loaded.model.eval(), prompt, 16)
    bounds = [0, *cuts, 18]
    stages = [load_stage(str(default_cache_dir()), a, b) for a, b in itertools.pairwise(bounds)]
    staged = staged_run(stages, prompt, 16)
    assert all(torch.equal(a, b) for a, b in zip(whole, staged, strict=True))
    assert loaded.codec.decode([int(x.argmax()) for x in staged]) == loaded.codec.decode(
        [int(x.argmax()) for x in whole]
    )
