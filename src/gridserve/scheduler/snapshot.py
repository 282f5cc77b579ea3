"""What the scheduler reads: a node at one instant (capability, telemetry, load, reliability, calibration).

Each snapshot also carries its numeric `row` (computed once, when the snapshot is made) and its static part
caches one `model_row` per model: the vectorised scheduler stacks these instead of walking objects."""

import math
from array import array
from dataclasses import InitVar, dataclass, field

from gridserve.catalog.claims import CardView, card_view
from gridserve.catalog.hardware import HardwareSpec
from gridserve.catalog.models import DTYPE_BYTES, MODELS, QUANT_BYTES_PER_PARAM
from gridserve.perfmodel import Calibration, derived_price_per_mtok, effective_price_per_mtok
from gridserve.perfmodel.calibration import TYPICAL_OUTPUT_TOKENS
from gridserve.perfmodel.roofline import LOAD_BANDWIDTH_GBS, base_itl_s
from gridserve.reliability import BLOCKED, ReliabilitySummary
from gridserve.types import Capability, ModelOffer, NodeId, NodeState, Telemetry

CLASS_CODES = {"datacenter": 0, "consumer-high": 1, "consumer": 2, "apple": 3, "cpu": 4, "unknown": 5}
SERVING = frozenset({NodeState.UP, NodeState.SUSPECT, NodeState.PROBATION})
"""Membership states in which a node receives work (probation: ranked lower). The gateway's registry uses this set."""
BLOCKING = frozenset(state.value for state in BLOCKED)
"""Reliability states (their values) in which a node serves nothing."""
PRICE_DTYPES = frozenset({"float16", "bfloat16", "float32", "fp8"})

# Column indexes of NodeSnapshot.row
(
    C_SERVING,
    C_BLOCKING,
    C_HEARTBEAT,
    C_ACTIVE,
    C_QUEUED,
    C_CLOCK,
    C_TEMP,
    C_REL_SCORE,
    C_REL_PROBATION,
    C_REL_NEW,
    C_CAL_TTFT,
    C_CAL_ITL,
    C_OP_PRICE,
    C_HAS_HW,
    C_BANDWIDTH,
    C_DECODE_EFF,
    C_TFLOPS,
    C_PREFILL_EFF,
    C_SLOTS,
    C_COST,
    C_MEMORY,
    C_CLASS,
    C_OUTSTANDING,
    C_LATENCY_EWMA,
    C_REL_VETTED,
    C_CAL_OUT,
    C_INTERLEAVED,
    C_TIER_BW,
    C_TIER_TFLOPS,
) = range(29)
N_COLUMNS = 29
# Column indexes of NodeStatic.model_row
(
    M_LISTED,
    M_RESIDENT,
    M_CONTEXT,
    M_PRED_BPP,
    M_MEM_WEIGHTS,
    M_KV_PER_TOKEN,
    M_DTYPE_OK,
    M_BASE_ITL,
    M_LOAD_S,
    M_PRICE,
    M_KV_FULL_LAYERS,
    M_KV_SLIDING_LAYERS,
    M_KV_WINDOW,
) = range(13)
N_MODEL_COLUMNS = 13
"""M_KV_PER_TOKEN: KV bytes a token takes in every layer (as if none slid); a sequence of T tokens holds
M_KV_FULL_LAYERS x T + M_KV_SLIDING_LAYERS x min(T, M_KV_WINDOW) (ModelSpec.kv_split and kv_bytes: 0.0 and 0
for a model without windows)."""


def _bytes_per_param(dtype: str, quantization: str) -> float:
    per = QUANT_BYTES_PER_PARAM.get(quantization)
    return per if per is not None else DTYPE_BYTES[dtype]


@dataclass(frozen=True, slots=True)
class NodeStatic:
    """Facts derived once per capability document (not per decision)."""

    hw: HardwareSpec | None
    """The card predictions use (catalog/claims.py: the claimed card at its measured figures)."""
    hw_class: str
    offers: dict[str, ModelOffer]
    loadable: frozenset[str]
    memory_bytes: int
    interleaved: bool = False
    """Its engine runs requests token by token in turn (`Capability.interleaved`): no queue behind batch slots."""
    max_running: int | None = None
    """The most requests its engine runs at once, as it said (`Capability.max_running`; 0: no limit)."""
    source: Capability | None = None
    model_rows: dict[str, bytes] = field(default_factory=dict)
    card: CardView | None = None
    """The card as claimed, measured and observed; its `priced` card sets the class, tier figures and price."""
    tier_card: HardwareSpec | None = None
    """Whose figures the tier floors read, when not the priced card's (a pipeline: its weakest stage's)."""

    @property
    def priced(self) -> HardwareSpec | None:
        return self.card.priced if self.card is not None else self.hw

    @classmethod
    def of(cls, capability: Capability, observed_gap: float = 1.0, observed_evidence: str = "") -> "NodeStatic":
        """`observed_gap`: how much slower than its measured card its answers showed it (the registry's claims
        check, gateway/registry/claims.py); 1.0 until judged."""
        card = card_view(capability.hardware, observed_gap, observed_evidence)
        hw = card.hw if card is not None else None
        memory = capability.hardware.memory_bytes or (int(hw.memory_gib * 2**30) if hw else 0)
        return cls(
            hw=hw,
            hw_class=card.priced.hw_class if card is not None else "unknown",
            offers={offer.name: offer for offer in capability.models if offer.layers is None},  # not stages
            loadable=frozenset(capability.loadable_models),
            memory_bytes=memory,
            interleaved=capability.interleaved,
            max_running=capability.max_running,
            source=capability,
            card=card,
        )

    def model_row(self, model: str) -> bytes:
        """Per-model numbers (cached, packed float64): listed, resident, context limit, bytes/param for the
        prediction and for the price, weight bytes and KV bytes/token (full and sliding layers, the window) for
        the memory filter, dtype supported."""
        row = self.model_rows.get(model)
        if row is None:
            row = array("d", self._model_row(model)).tobytes()
            self.model_rows[model] = row
        return row

    def _model_row(self, model: str) -> tuple[float, ...]:
        offer = self.offers.get(model)
        spec = MODELS.get(model)
        # listed for generation: an embedding-only offer serves no completion (an embedding request's own
        # listing is read from the offer by the model-served filter: filters.py)
        listed = (offer is not None and offer.serves("generate")) or model in self.loadable
        limit = offer.max_context if offer else (spec.max_context if spec else math.inf)
        dtype = offer.dtype if offer and offer.dtype in DTYPE_BYTES else "float16"
        pred_quant = offer.quantization if offer and offer.quantization in QUANT_BYTES_PER_PARAM else "none"
        mem_quant = offer.quantization if offer and offer.quantization != "unknown" else "none"
        weights = spec.weight_bytes(dtype, mem_quant) if spec else 0.0
        kv_dtype = dtype if dtype != "fp8" else "float16"
        kv = spec.kv_bytes_per_token(kv_dtype) if spec else 0.0
        kv_full, kv_sliding, window = spec.kv_split(kv_dtype) if spec else (0.0, 0.0, 0)
        dtype_ok = True
        hw = self.hw
        if offer is not None and hw is not None:
            if offer.dtype in DTYPE_BYTES and offer.dtype not in hw.dtypes:
                dtype_ok = False
            if offer.quantization not in ("none", "unknown") and offer.quantization not in hw.quantizations:
                dtype_ok = False
        nan = math.nan
        base_itl, load_s = nan, nan
        if spec is not None and hw is not None:  # as perfmodel.predict computes them for this offer
            base_itl = base_itl_s(spec, hw, dtype, pred_quant)
            load_s = 0.0 if offer is not None else spec.weight_bytes(dtype, pred_quant) / (LOAD_BANDWIDTH_GBS * 1e9)
        return (
            float(listed),
            float(offer is not None),
            float(limit),
            _bytes_per_param(dtype, pred_quant),
            weights,
            kv,
            float(dtype_ok),
            base_itl,
            load_s,
            self.price_per_mtok(model),
            kv_full,
            kv_sliding,
            float(window),
        )

    def price_per_mtok(self, model: str) -> float:
        """USD per million generated tokens of `model` on this node: derived from the hardware's running cost and
        throughput, the operator's price clamped to a band around it (NaN: unknown)."""
        spec, offer = MODELS.get(model), self.offers.get(model)
        operator = self.source.price_per_mtok if self.source is not None else 0.0
        hw = self.priced
        if spec is None or hw is None:
            return operator or math.nan
        dtype = offer.dtype if offer else "float16"
        quant = offer.quantization if offer else "none"
        quant = quant if quant in QUANT_BYTES_PER_PARAM else "none"
        derived = derived_price_per_mtok(spec, hw, dtype if dtype in PRICE_DTYPES else "float16", quant)
        return effective_price_per_mtok(derived, operator)


def _row(snap: "NodeSnapshot") -> tuple[float, ...]:
    tele, rel = snap.telemetry, snap.reliability
    return row_values(
        state=snap.state,
        last_heartbeat=snap.last_heartbeat,
        outstanding=snap.outstanding,
        active=tele.active_requests if tele else 0,
        queued=tele.queue_depth if tele else 0,
        clock_ratio=tele.clock_ratio if tele else None,
        temperature_c=tele.temperature_c if tele else None,
        reliability=(rel.state.value, rel.score, rel.is_new, rel.vetted) if rel is not None else None,
        calibration=snap.calibration,
        price_per_mtok=snap.capability.price_per_mtok,
        static=snap.static,
        latency_ewma_s=snap.latency_ewma_s,
    )


def row_values(
    *,
    state: NodeState,
    last_heartbeat: float,
    outstanding: int,
    active: int,
    queued: int,
    clock_ratio: float | None,
    temperature_c: float | None,
    reliability: tuple[str, float, bool, bool] | None,
    calibration: Calibration | None,
    price_per_mtok: float,
    static: NodeStatic,
    latency_ewma_s: float | None,
) -> tuple[float, ...]:
    """A node's C_* columns from plain values: what a snapshot of it would carry as its `row`, for a keeper of
    rows (the gateway's registry) that does not build a snapshot per change. `reliability`: (state value, score,
    is_new, vetted) of its summary, None without one (a node without a summary is not vetted: no record yet)."""
    hw, tier = static.hw, static.tier_card or static.priced
    nan = math.nan
    rel_state = reliability[0] if reliability is not None else None
    return (
        float(state in SERVING),
        float(rel_state in BLOCKING),
        last_heartbeat,
        float(max(outstanding, active)),
        float(queued),
        clock_ratio if clock_ratio is not None else nan,
        temperature_c if temperature_c is not None else nan,
        reliability[1] if reliability is not None else nan,
        float(state == NodeState.PROBATION or rel_state == "probation"),
        float(reliability is None or reliability[2]),
        calibration.ttft_factor if calibration else 1.0,
        calibration.itl_factor if calibration else 1.0,
        price_per_mtok,
        float(hw is not None),
        hw.bandwidth_gbs if hw else nan,
        hw.decode_efficiency if hw else nan,
        hw.fp16_tflops if hw else nan,
        hw.prefill_efficiency if hw else nan,
        float(hw.batch_slots) if hw else 1.0,
        hw.cost_per_hour if hw else nan,
        float(static.memory_bytes),
        float(CLASS_CODES.get(static.hw_class, CLASS_CODES["unknown"])),
        float(outstanding),
        latency_ewma_s if latency_ewma_s is not None else nan,
        float(reliability is not None and reliability[3]),
        calibration.output_tokens if calibration else TYPICAL_OUTPUT_TOKENS,
        float(static.interleaved),
        tier.bandwidth_gbs if tier else nan,
        tier.fp16_tflops if tier else nan,
    )


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    node_id: NodeId
    state: NodeState
    capability: Capability
    last_heartbeat: float
    telemetry: Telemetry | None = None
    outstanding: int = 0
    """Requests the gateway has in flight on this node."""
    reliability: ReliabilitySummary | None = None
    """None: no record yet (scored with the ledger's priors)."""
    calibration: Calibration | None = None
    static: NodeStatic = field(default=None)  # type: ignore[assignment]
    latency_ewma_s: float | None = None
    """Moving average of this node's observed time to first token (None: not observed yet)."""
    row: bytes = field(default=b"", init=False, compare=False, repr=False)
    """The numeric columns (C_*), packed float64: stacked with one join per decision."""
    known_row: InitVar[bytes] = b""
    """The row, when the caller holds it already (a table that keeps rows: `row_values` of these same fields);
    else computed. Not a field: `dataclasses.replace` computes the row of the replaced snapshot afresh."""

    def __post_init__(self, known_row: bytes) -> None:
        if self.static is None or self.static.source is not self.capability:
            object.__setattr__(self, "static", NodeStatic.of(self.capability))
        object.__setattr__(self, "row", known_row or array("d", _row(self)).tobytes())
