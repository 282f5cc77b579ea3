"""Mixtures of experts in the performance model, the scheduler, the price and the planner: a token reads (decode)
and computes with (prefill) its active experts, a batch reads the experts its sequences are routed to, and memory
holds every expert, exactly as for a dense model of the same total size."""

import random
from dataclasses import replace

import pytest

from gridserve.catalog import HARDWARE, MODELS
from gridserve.catalog.models import ModelSpec
from gridserve.perfmodel import Load, derived_price_per_mtok, predict, roofline
from gridserve.perfmodel.roofline import BATCH_ITL_GROWTH, PREFILL_FIXED_S
from gridserve.planner import LayerCosts, PlanNode, Workload, plan
from gridserve.planner.costs import stage_memory, stage_time
from gridserve.scheduler import Scheduler, default_profile
from gridserve.scheduler.context import Context
from gridserve.scheduler.filters import MemoryFitFilter
from gridserve.scheduler.snapshot import M_BASE_ITL, M_MEM_WEIGHTS, NodeSnapshot, NodeStatic
from gridserve.types import Capability, HardwareInfo, ModelOffer, NodeId, NodeState, RuntimeInfo, Telemetry
from gridserve.types.scheduling import ScheduleRequest

MOE = ("qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-120b", "deepseek-v3")
NOW = 1_700_000_000.0


def dense_twin(spec: ModelSpec) -> ModelSpec:
    """The same architecture and total size, every parameter read by every token."""
    return replace(spec, name=f"{spec.name}-dense", active_params=None, experts=0, experts_per_token=0, expert_params=0)


def prefill_s(spec: ModelSpec, hw_key: str, prompt: int) -> float:
    pred = predict(spec, HARDWARE[hw_key], prompt_tokens=prompt)
    return pred.ttft_s - PREFILL_FIXED_S - pred.itl_s


# -- the roofline ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MOE)
def test_moe_decode_and_prefill_are_far_below_a_dense_model_of_the_same_size(name: str) -> None:
    moe = MODELS[name]
    dense = dense_twin(moe)
    hw = HARDWARE["h100-sxm"]
    ratio = moe.token_params / moe.params
    assert ratio < 0.2  # 3.04/30.5, 3.61/20.9, 5.13/116.8, 36.6/671
    moe_itl, dense_itl = predict(moe, hw, prompt_tokens=1).itl_s, predict(dense, hw, prompt_tokens=1).itl_s
    assert moe_itl == pytest.approx(dense_itl * ratio, rel=1e-12)
    assert moe_itl == pytest.approx(2 * moe.token_params / (hw.bandwidth_gbs * 1e9 * hw.decode_efficiency))
    assert prefill_s(moe, "h100-sxm", 4096) == pytest.approx(prefill_s(dense, "h100-sxm", 4096) * ratio, rel=1e-9)


def test_qwen3_30b_a3b_decodes_faster_on_a_4090_than_llama_3_8b() -> None:
    """3.0B parameters read a token against 8.0B, both at q4_k_m: the MoE of nearly four times the size is faster."""
    hw = HARDWARE["rtx4090"]
    qwen = predict(MODELS["qwen3-30b-a3b"], hw, prompt_tokens=1, quantization="q4_k_m").itl_s
    llama = predict(MODELS["llama-3-8b"], hw, prompt_tokens=1, quantization="q4_k_m").itl_s
    assert qwen / llama == pytest.approx(3.042 / 8.030, rel=1e-3)


@pytest.mark.parametrize("name", MOE)
def test_a_batch_reads_the_experts_its_sequences_are_routed_to(name: str) -> None:
    moe, hw = MODELS[name], HARDWARE["h100-sxm"]
    dense = dense_twin(moe)
    slots = hw.batch_slots
    alone = predict(moe, hw, prompt_tokens=64).itl_s
    previous = alone
    for active in range(1, slots):
        itl = predict(moe, hw, prompt_tokens=64, load=Load(active=active)).itl_s
        reads = moe.decode_params(active + 1) / moe.decode_params(1)
        assert itl == pytest.approx(alone * (1 + BATCH_ITL_GROWTH * active) * reads, rel=1e-9)
        assert itl > previous
        previous = itl
    # at a full batch: far more than one sequence reads, never more than every expert
    full = predict(moe, hw, prompt_tokens=64, load=Load(active=slots - 1)).itl_s
    dense_full = predict(dense, hw, prompt_tokens=64, load=Load(active=slots - 1)).itl_s
    assert full / alone > (1 + BATCH_ITL_GROWTH * (slots - 1)) * 1.5
    assert full <= dense_full
    # beyond the slots the batch stays at the slots: ITL grows in proportion to the requests
    double = predict(moe, hw, prompt_tokens=64, load=Load(active=2 * slots - 1)).itl_s
    assert double == pytest.approx(2 * full)


def test_an_interleaved_engine_reads_one_sequence_a_step() -> None:
    moe, hw = MODELS["gpt-oss-20b"], HARDWARE["rtx4090"]
    alone = predict(moe, hw, prompt_tokens=64).itl_s
    busy = predict(moe, hw, prompt_tokens=64, load=Load(active=3, interleaved=True)).itl_s
    assert busy == pytest.approx(4 * alone)


def test_a_dense_model_is_unchanged_by_the_moe_terms() -> None:
    dense = MODELS["llama-3-8b"]
    assert roofline.moe_terms(dense) == (0.0, 0.0, 0.0)
    for batch in (1.0, 2.0, 17.0, 1e6):
        assert roofline.moe_factor(batch, 0.0, 0.0, 0.0) == 1.0
    assert roofline.base_itl_s(dense, HARDWARE["t4"], "float16", "none") == dense.weight_bytes() / (
        roofline.decode_bytes_per_s(HARDWARE["t4"])
    )


# -- memory: every expert is held -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MOE)
def test_moe_memory_need_is_that_of_the_dense_model_of_the_same_size(name: str) -> None:
    moe = MODELS[name]
    dense = dense_twin(moe)
    for dtype, quant in (("float16", "none"), ("float16", "q4_k_m"), ("fp8", "none")):
        assert moe.weight_bytes(dtype, quant) == dense.weight_bytes(dtype, quant)
        assert moe.kv_room_tokens(141 * 2**30, dtype, quant) == dense.kv_room_tokens(141 * 2**30, dtype, quant)
    assert moe.weight_bytes() > moe.decode_bytes(1) * 5


def node(key: str, model: str, *, dtype: str = "float16", quant: str = "none", active: int = 0) -> NodeSnapshot:
    hw = HARDWARE[key]
    total = int(hw.memory_gib * 2**30)
    cap = Capability(
        node_id=NodeId(f"{key}-{active}"),
        public_key=f"pk-{key}",
        endpoint=f"http://{key}.test:8000",
        engine=f"emulated:{key}",
        models=(ModelOffer(name=model, dtype=dtype, quantization=quant, max_context=MODELS[model].max_context),),
        hardware=HardwareInfo(accelerator=key, emulated=True, memory_bytes=total),
        runtime=RuntimeInfo(gridserve="0", python="3.11", engine=f"emulated:{key}"),
    )
    telemetry = Telemetry(
        utilization=min(1.0, active / max(1, hw.batch_slots)),
        memory_used_bytes=total // 2,
        memory_total_bytes=total,
        temperature_c=50.0,
        clock_ratio=None,
        queue_depth=0,
        active_requests=active,
    )
    return NodeSnapshot(
        node_id=cap.node_id, state=NodeState.UP, capability=cap, last_heartbeat=NOW, telemetry=telemetry
    )


def test_the_memory_filter_holds_an_moe_to_its_total_size(monkeypatch: pytest.MonkeyPatch) -> None:
    moe = MODELS["qwen3-30b-a3b"]  # 61 GB at float16: not on a 24 GiB card, on an 80 GiB one
    dense = dense_twin(moe)
    monkeypatch.setitem(MODELS, dense.name, dense)
    for spec in (moe, dense):
        request = ScheduleRequest(request_id="r", model=spec.name, prompt_tokens=1000, max_tokens=100)
        ctx = Context.build(request, NOW)
        small, large = node("rtx4090", spec.name), node("h100-sxm", spec.name)
        reason = MemoryFitFilter().reject(ctx, small)
        assert reason is not None and "weights 56.9 GiB" in reason
        assert MemoryFitFilter().reject(ctx, large) is None
    moe_row = NodeStatic.of(node("h100-sxm", moe.name).capability)._model_row(moe.name)
    dense_row = NodeStatic.of(node("h100-sxm", dense.name).capability)._model_row(dense.name)
    assert moe_row[M_MEM_WEIGHTS] == dense_row[M_MEM_WEIGHTS] == moe.weight_bytes()
    assert moe_row[M_BASE_ITL] == pytest.approx(dense_row[M_BASE_ITL] * moe.token_params / moe.params, rel=1e-12)


# -- the scheduler: column path, compiled kernel and predict agree ---------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "gpt-oss-20b"])
def test_the_scheduler_predicts_an_moe_as_the_roofline_does_in_both_paths(name: str) -> None:
    nodes = [node(key, name, quant="q4_k_m", active=a) for key in ("h100-sxm", "a100-80g", "l40s") for a in (0, 5, 40)]
    request = ScheduleRequest(request_id="r", model=name, prompt_tokens=900, max_tokens=64)
    column = Scheduler(default_profile()).schedule(request, nodes, random.Random(1), NOW, decision_id="d")
    kernel_scheduler = Scheduler(default_profile(), compiled=True)
    assert kernel_scheduler.compiled
    kernel = kernel_scheduler.schedule(request, nodes, random.Random(1), NOW, decision_id="d")
    assert kernel.candidates == column.candidates and len(column.candidates) == len(nodes)
    by_id = {n.node_id: n for n in nodes}
    for candidate in column.candidates:
        snap = by_id[candidate.node_id]
        assert snap.telemetry is not None and snap.capability.hardware.accelerator in HARDWARE
        load = Load(active=snap.telemetry.active_requests, temperature_c=50.0)
        hw = HARDWARE[snap.capability.hardware.accelerator]
        pred = predict(MODELS[name], hw, prompt_tokens=900, quantization="q4_k_m", load=load)
        assert candidate.predicted_itl_s == round(pred.itl_s, 9)


# -- the price ------------------------------------------------------------------------------------------------------


def test_an_moe_is_priced_by_a_full_batchs_reads() -> None:
    moe, hw = MODELS["gpt-oss-120b"], HARDWARE["h100-sxm"]
    dense = dense_twin(moe)
    slots = hw.batch_slots
    per_token = roofline.base_itl_s(moe, hw, "float16", "none") * moe.decode_params(slots) / moe.decode_params(1)
    expected = hw.cost_per_hour / (slots / per_token * 3600.0) * 1e6 * 1.3
    assert derived_price_per_mtok(moe, hw, "float16", "none") == pytest.approx(expected, rel=1e-9)
    moe_price, dense_price = (derived_price_per_mtok(spec, hw, "float16", "none") for spec in (moe, dense))
    assert moe_price == pytest.approx(dense_price * moe.decode_params(slots) / moe.params, rel=1e-9)
    assert moe_price < dense_price * 0.3  # a full batch (8 sequences, 4 of 128 experts each) reads under a quarter


# -- the planner ----------------------------------------------------------------------------------------------------


def test_the_planner_holds_every_expert_and_streams_the_active_ones() -> None:
    moe = MODELS["qwen3-30b-a3b"]
    dense = dense_twin(moe)
    m, d = LayerCosts.of(moe, "float16", "q4_k_m"), LayerCosts.of(dense, "float16", "q4_k_m")
    assert m.weight_bytes == d.weight_bytes and not d.streamed_bytes
    bpp = 4.89 / 8
    assert sum(m.streamed) == pytest.approx(moe.token_params * bpp, rel=1e-12)  # the head, not the input table
    assert sum(m.flops_per_token) == pytest.approx(2 * moe.token_params, rel=1e-12)
    work = Workload(context_tokens=2048)
    assert stage_memory(m, 0, m.layers, work) == stage_memory(d, 0, d.layers, work)
    h100 = PlanNode.of("h100", HARDWARE["h100-sxm"])
    assert stage_time(m, h100, 0, m.layers, work) < stage_time(d, h100, 0, d.layers, work) / 5
    cards = [PlanNode.of(f"4090-{i}", HARDWARE["rtx4090"]) for i in range(2)]
    moe_plan, dense_plan = plan(m, cards, work=work), plan(d, cards, work=work)
    assert len(moe_plan.stages) == len(dense_plan.stages) == 1  # 18.7 GB fits one card, both ways
    assert moe_plan.stages[0].memory_bytes == dense_plan.stages[0].memory_bytes
    assert moe_plan.stages[0].time_s < dense_plan.stages[0].time_s / 5
    assert moe_plan.cost_s < dense_plan.cost_s  # the round trips to the gateway are the same
