"""Sliding-window attention in KV sizing: a sequence's sliding layers keep at most their window of its tokens
(ModelSpec.kv_bytes), in the spec, the scheduler's memory filter (column path and compiled kernel alike), the
emulated node, the simulator and the pipeline planner; a model without windows is sized as before, to the bit."""

import random
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.catalog import HARDWARE, MODELS
from gridserve.catalog.models import DTYPE_BYTES, ModelSpec
from gridserve.catalog.spec import TYPICAL_SEQUENCE_TOKENS
from gridserve.engines.emulated import EmulatedEngine
from gridserve.planner import LayerCosts, PlanNode, Workload, plan
from gridserve.planner.costs import stage_memory, stage_time
from gridserve.scheduler import Scheduler, default_profile
from gridserve.scheduler.context import Context
from gridserve.scheduler.filters import MemoryFitFilter
from gridserve.scheduler.snapshot import (
    M_KV_FULL_LAYERS,
    M_KV_PER_TOKEN,
    M_KV_SLIDING_LAYERS,
    M_KV_WINDOW,
    M_MEM_WEIGHTS,
    NodeSnapshot,
    NodeStatic,
)
from gridserve.scheduler.vector import Columns
from gridserve.sim.engine import SimConfig
from gridserve.sim.grid import build_nodes
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo
from gridserve.types.scheduling import ScheduleRequest

GIB = 2**30
NOW = 1_700_000_000.0
OSS = MODELS["gpt-oss-20b"]
WINDOWED = sorted(name for name, spec in MODELS.items() if spec.sliding_layers)
PLAIN = sorted(name for name, spec in MODELS.items() if not spec.sliding_layers)


def node(key: str, model: str, *, quant: str = "none", memory_gib: float | None = None) -> NodeSnapshot:
    hw = HARDWARE[key]
    memory = int((memory_gib if memory_gib is not None else hw.memory_gib) * GIB)
    cap = Capability(
        node_id=NodeId(f"{key}-{quant}"),
        public_key=f"pk-{key}",
        endpoint=f"http://{key}.test:8000",
        engine=f"emulated:{key}",
        models=(ModelOffer(name=model, dtype="float16", quantization=quant, max_context=MODELS[model].max_context),),
        hardware=HardwareInfo(accelerator=key, emulated=True, memory_bytes=memory),
        runtime=RuntimeInfo(gridserve="0", python="3.11", engine=f"emulated:{key}"),
    )
    return NodeSnapshot(node_id=cap.node_id, state=NodeState.UP, capability=cap, last_heartbeat=NOW)


def request(model: str, tokens: int) -> ScheduleRequest:
    return ScheduleRequest(request_id="r", model=model, prompt_tokens=tokens - 1000, max_tokens=1000)


# -- the spec -------------------------------------------------------------------------------------------------------


def test_the_catalogue_reads_its_windowed_models() -> None:
    assert WINDOWED == ["gpt-oss-120b", "gpt-oss-20b"]
    assert OSS.sliding_at == tuple(range(0, 24, 2))  # layer_types: sliding first, then alternating
    assert OSS.layer_windows() == (128, 0) * 12
    assert OSS.kv_split() == (12 * 2 * 8 * 64 * 2, 12 * 2 * 8 * 64 * 2, 128)


def test_gpt_oss_20b_holds_about_half_the_kv_of_full_attention_at_32k_tokens() -> None:
    tokens = 32768
    full = OSS.kv_bytes_per_token() * tokens  # the figure before: every layer keeps every token
    assert full == 1.5 * GIB
    windowed = OSS.kv_bytes(tokens)
    assert windowed == 12 * 2048 * tokens + 12 * 2048 * 128  # 12 full layers x 32,768 + 12 sliding layers x 128
    assert windowed / full == pytest.approx(0.5, abs=0.005)
    assert OSS.kv_bytes(100) == OSS.kv_bytes_per_token() * 100  # within the window: every layer keeps every token
    assert OSS.kv_bytes(tokens, "fp8") == windowed / 2


@pytest.mark.parametrize("name", PLAIN)
def test_a_model_without_windows_is_sized_as_before_to_the_bit(name: str) -> None:
    spec = MODELS[name]
    for dtype in DTYPE_BYTES:
        per_token = spec.kv_bytes_per_token(dtype)
        assert spec.kv_split(dtype) == (per_token, 0.0, 0)
        assert spec.layer_windows() == (0,) * spec.layers
        for tokens in (0, 1, 127, 128, 4097, 32768, 131072, spec.max_context):
            assert spec.kv_bytes(tokens, dtype) == per_token * tokens
        assert spec.kv_bytes_per_held_token(dtype) == per_token
    for memory in (16 * GIB, 80 * GIB, 141 * GIB):
        free = memory - spec.weight_bytes("float16", "q4_k_m")
        assert spec.kv_room_tokens(memory, "float16", "q4_k_m") == max(0, int(free / spec.kv_bytes_per_token()))


@st.composite
def windowed_specs(draw: st.DrawFn) -> ModelSpec:
    layers = draw(st.integers(1, 128))
    sliding = draw(st.integers(0, layers))
    return ModelSpec(
        name="m",
        params=1e9,
        layers=layers,
        hidden=4096,
        kv_heads=draw(st.integers(1, 16)),
        head_dim=draw(st.sampled_from((64, 128, 256))),
        vocab=32000,
        max_context=131072,
        kv_latent=draw(st.sampled_from((0, 0, 576))),
        sliding_window=draw(st.integers(1, 200_000)) if sliding else draw(st.sampled_from((None, 4096))),
        sliding_layers=sliding,
    )


@settings(max_examples=300, deadline=None)
@given(
    spec=st.one_of(windowed_specs(), st.sampled_from(sorted(MODELS.values(), key=lambda s: s.name))),
    a=st.integers(0, 2_000_000),
    b=st.integers(0, 2_000_000),
    dtype=st.sampled_from(sorted(DTYPE_BYTES)),
)
def test_windowed_kv_is_at_most_full_kv_and_grows_with_the_sequence(
    spec: ModelSpec, a: int, b: int, dtype: str
) -> None:
    short, long = sorted((a, b))
    for tokens in (short, long):
        assert spec.kv_bytes(tokens, dtype) <= spec.kv_bytes_per_token(dtype) * tokens
        full, _, _ = spec.kv_split(dtype)
        assert spec.kv_bytes(tokens, dtype) >= full * tokens  # the full-attention layers keep every token
    assert spec.kv_bytes(short, dtype) <= spec.kv_bytes(long, dtype)
    window = spec.sliding_window if spec.sliding_layers else None
    if window is None or long <= window:  # within the window nothing is dropped
        assert spec.kv_bytes(long, dtype) == spec.kv_bytes_per_token(dtype) * long
    assert sum(w > 0 for w in spec.layer_windows()) == (spec.sliding_layers if window else 0)


def test_a_spec_refuses_sliding_layers_it_cannot_place() -> None:
    with pytest.raises(ValueError, match="window"):
        replace(OSS, sliding_window=None)
    with pytest.raises(ValueError, match="sliding_at"):
        replace(OSS, sliding_at=(0, 1))
    spread = replace(OSS, sliding_at=())  # no positions: spread evenly, as many
    assert spread.layer_windows() == (0, 128) * 12 and spread.kv_bytes(32768) == OSS.kv_bytes(32768)


# -- the scheduler's memory filter ----------------------------------------------------------------------------------


def test_the_memory_filter_admits_a_long_gpt_oss_request_the_full_kv_figure_would_not() -> None:
    """gpt-oss-20b at q4_k_m on a 16 GiB T4: 11.9 GiB of weights. For 65,536 tokens every layer's KV would be
    3.0 GiB (16.4 GiB with the margin: refused); its sliding layers keep 128 tokens, so 1.5 GiB (14.8 GiB: fits).
    At 131,072 tokens even the windowed KV (3.0 GiB) does not fit, and the reason says so in the same numbers."""
    t4 = node("t4", OSS.name, quant="q4_k_m")
    weights = OSS.weight_bytes("float16", "q4_k_m")
    have = 16 * GIB
    tokens = 65536
    assert (weights + OSS.kv_bytes_per_token() * tokens) * 1.1 > have  # the premise: full KV would not fit
    assert (weights + OSS.kv_bytes(tokens)) * 1.1 <= have
    admitted = request(OSS.name, tokens)
    assert MemoryFitFilter().reject(Context.build(admitted, NOW), t4) is None
    too_long = request(OSS.name, 131072)
    reason = MemoryFitFilter().reject(Context.build(too_long, NOW), t4)
    kv = OSS.kv_bytes(131072)
    need = (weights + kv) * 1.1
    assert reason == (
        f"needs {need / GIB:.1f} GiB (gpt-oss-20b q4_k_m weights {weights / GIB:.1f} GiB + KV for 131072 tokens "
        f"(sliding layers keep the last 128) {kv / GIB:.2f} GiB + 10%), has 16.0 GiB"
    )
    assert "needs 16.4 GiB" in reason and "3.00 GiB" in reason  # not the 6.00 GiB of full attention
    # both paths decide alike: the column path and the compiled kernel
    nodes = [t4, node("rtx4090", OSS.name, quant="q8_0"), node("h100-sxm", OSS.name)]
    for req in (admitted, too_long):
        column = Scheduler(default_profile()).schedule(req, nodes, random.Random(0), NOW, decision_id="d")
        kernel = Scheduler(default_profile(), compiled=True)
        assert kernel.compiled
        fused = kernel.schedule(req, nodes, random.Random(0), NOW, decision_id="d")
        assert fused.verdicts == column.verdicts and fused.candidates == column.candidates
        t4_verdict = next(v for v in column.verdicts if v.node_id == t4.node_id)
        assert t4_verdict.eligible == (req is admitted)
    assert column.requirements["kv_bytes_fp16"] == kv  # what the request needs, windowed
    assert column.requirements["kv_bytes_per_token_fp16"] == OSS.kv_bytes_per_token()


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b", "llama-3-8b", "qwen3-30b-a3b", "deepseek-v3"])
def test_the_model_row_holds_the_specs_kv_split_and_the_filter_its_kv_bytes(name: str) -> None:
    spec = MODELS[name]
    snap = node("h100-sxm", name, quant="q4_k_m")
    row = np.frombuffer(NodeStatic.of(snap.capability).model_row(name))
    full, sliding, window = spec.kv_split()
    assert (row[M_KV_FULL_LAYERS], row[M_KV_SLIDING_LAYERS], row[M_KV_WINDOW]) == (full, sliding, window)
    assert row[M_KV_PER_TOKEN] == spec.kv_bytes_per_token() == full + sliding
    for tokens in (1, 128, 129, 8192, 100_000):
        ctx = Context.build(request(name, tokens + 1000), NOW)
        kv, need = MemoryFitFilter()._need(ctx, Columns.of(ctx, [snap]))
        assert kv[0] == spec.kv_bytes(tokens + 1000)  # bit for bit
        if not spec.sliding_layers:  # as the filter computed it before windows were read
            before = (row[M_MEM_WEIGHTS] + row[M_KV_PER_TOKEN] * (tokens + 1000)) * 1.1
            assert need[0] == before


# -- where else KV is sized -----------------------------------------------------------------------------------------


def test_the_emulated_node_sizes_its_prefix_cache_and_telemetry_by_the_window() -> None:
    text: Any = object()  # the text source is not started: sizing only
    oss = EmulatedEngine(hardware="h100-sxm", models=[OSS.name], text_engine=text)
    no_window = replace(OSS, name="gpt-oss-20b-full", sliding_window=None, sliding_layers=0, sliding_at=())
    free = 80 * GIB - OSS.weight_bytes("float16", "none")
    per_token = OSS.kv_bytes(TYPICAL_SEQUENCE_TOKENS) / TYPICAL_SEQUENCE_TOKENS
    assert oss.prefix_cache_tokens() == int(free / per_token)
    assert oss.prefix_cache_tokens() > 1.8 * int(free / no_window.kv_bytes_per_token())
    oss.stats.active = 3
    used = oss.telemetry_override()["memory_used_bytes"]
    assert used == int(OSS.weight_bytes("float16", "none") + 3 * OSS.kv_bytes(TYPICAL_SEQUENCE_TOKENS))
    llama = EmulatedEngine(hardware="h100-sxm", models=["llama-3-8b"], text_engine=text)
    spec = MODELS["llama-3-8b"]
    llama.stats.active = 3
    assert llama.telemetry_override()["memory_used_bytes"] == int(
        spec.weight_bytes("float16", "none") + 3 * 2048 * spec.kv_bytes_per_token()  # as before
    )


def test_a_simulated_node_reports_the_kv_its_sequences_keep() -> None:
    config = SimConfig(nodes=1, model=OSS.name, cards=("h100-sxm",))
    (sim_node,) = build_nodes(config, OSS, random.Random(0))
    weights = sim_node.weight_bytes
    for tokens in (65536, 1000):
        sim_node.hold_kv(tokens)
    used = sim_node.snapshot().telemetry
    assert used is not None
    # 66,536 tokens in the full layers (130 blocks of 512), 128 + 128 in the sliding ones (1 block)
    full, sliding, _ = OSS.kv_split()
    assert used.memory_used_bytes == int(weights + 130 * 512 * full + 1 * 512 * sliding)
    assert used.memory_used_bytes - weights < 0.52 * OSS.kv_bytes_per_token() * 66536
    sim_node.release_kv(65536)
    sim_node.release_kv(1000)
    assert (sim_node.kv_tokens, sim_node.kv_window_tokens) == (0, 0)


def test_the_planner_holds_a_windowed_models_sequences_in_about_half_the_memory() -> None:
    costs = LayerCosts.of(OSS)
    assert costs.kv_window == OSS.layer_windows()
    full = replace(costs, kv_window=())
    work = Workload(context_tokens=32768, sessions=4)
    windowed_kv = stage_memory(costs, 0, costs.layers, work) - sum(costs.weight_bytes)
    assert windowed_kv == pytest.approx(OSS.kv_bytes(32768) * 4, rel=1e-12)
    assert windowed_kv / (stage_memory(full, 0, costs.layers, work) - sum(costs.weight_bytes)) < 0.51
    # a stage of the first 3 layers holds two sliding and one full layer
    per_layer = OSS.kv_bytes_per_token() / OSS.layers
    assert costs.kv_bytes(0, 3, 32768) == pytest.approx(per_layer * (2 * 128 + 32768), rel=1e-12)
    h100 = PlanNode.of("h100", HARDWARE["h100-sxm"])
    assert stage_time(costs, h100, 0, costs.layers, work) < stage_time(full, h100, 0, costs.layers, work)
    # the planner's prefix sums agree with stage_memory: its stages are what evaluate() says they hold
    cards = [PlanNode.of(f"4090-{i}", HARDWARE["rtx4090"]) for i in range(3)]
    found = plan(costs, cards, work=work)
    for stage in found.stages:
        assert stage.memory_bytes == pytest.approx(stage_memory(costs, stage.start, stage.end, work), rel=1e-12)


KERNEL: list[Scheduler] = []


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["gpt-oss-20b", "gpt-oss-120b", "qwen3-30b-a3b"]),
    tokens=st.integers(1001, 131072),
    cards=st.lists(
        st.tuples(st.sampled_from(sorted(HARDWARE)), st.sampled_from(("none", "q8_0", "q4_k_m", "awq"))),
        min_size=1,
        max_size=8,
        unique=True,
    ),
)
def test_long_requests_are_fitted_alike_by_the_column_path_and_the_kernel(
    name: str, tokens: int, cards: list[tuple[str, str]]
) -> None:
    if not KERNEL:
        KERNEL.append(Scheduler(default_profile(), compiled=True))
    nodes = [node(key, name, quant=quant) for key, quant in cards]
    req = request(name, tokens)
    column = Scheduler(default_profile()).schedule(req, nodes, random.Random(0), NOW, decision_id="d")
    fused = KERNEL[0].schedule(req, nodes, random.Random(0), NOW, decision_id="d")
    assert fused.verdicts == column.verdicts and fused.candidates == column.candidates
    assert fused.explanation == column.explanation
