"""Build an engine from its name: `tiny`, `gemma-270m`, `emulated:<hardware>`, `openai-upstream`."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gridserve.engines.base import DEFAULT_PREFIX_CACHE_MB, Engine, EngineError
from gridserve.types import DeviceFigures

if TYPE_CHECKING:
    from gridserve.engines.stage import StageSpan

EMULATED_TEXT_CHUNK = 8192
"""An emulated card's text source prefills its (clipped) prompt in one pass and keeps no prefix cache: its worker
thread serves every stream of the node, and a prompt cut into 32-token chunks held the others' tokens back long
enough to slow the emulated schedule (the card's own prefix cache is emulated in its timings). Every emulated node
uses the same chunk, so their texts agree, as audits need."""

ENGINE_NAMES = ("tiny", "gemma-270m", "emulated:<hardware>", "openai-upstream")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    threads: int = 2
    """torch threads for local engines; outputs are bitwise-reproducible for a fixed thread count."""
    models: tuple[str, ...] = field(default_factory=tuple)
    """emulated: catalogue models to serve (default llama-3-8b); upstream: the name to serve under."""
    upstream_url: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    max_context: int = 4096
    """openai-upstream only: the context the upstream server was started with."""
    fixed_ttft_ms: float | None = None
    fixed_itl_ms: float | None = None
    cache_dir: Path | None = None
    slowdown: float = 1.0
    """emulated: run this many times slower than the hardware's prediction (silent throttling)."""
    lazy: bool = False
    """tiny / gemma-270m: do not load the weights at start (the model is loadable: pre-warmed on request)."""
    loadable: tuple[str, ...] = field(default_factory=tuple)
    """emulated: catalogue models on disk, loaded when the gateway asks (pre-warming)."""
    load_gbps: float = 2.0
    """emulated: disk-to-device bandwidth when loading weights, GB/s."""
    fifo_slots: bool = False
    """emulated: at most the card's batch slots run at once; later requests wait first come, first served."""
    layers: tuple[int, int] | None = None
    """tiny / gemma-270m: run only layers [start, end) as a pipeline stage (engines/stage_engine.py)."""
    stage_auto: bool = False
    """tiny / gemma-270m: a pipeline stage whose layer range the gateway's planner assigns (`--layers auto`)."""
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB
    """tiny / gemma-270m: memory for the KV cache of recent prompts, reused by prompts that start the same way
    (engines/prefix_cache.py); 0: none."""
    cheat: tuple[str, ...] = ()
    """tiny: dishonest modes that change the model while it claims the real weights (`wrong_model`: other
    weights, `lazy_compute`: skips its last layer); node/dishonest.py checks they are allowed."""
    device_figures: DeviceFigures | None = None
    """emulated: the card as its driver would describe it (a card in no table: `emulated:<any name>`)."""
    tasks: tuple[str, ...] = ()
    """What to offer the model for: `generate`, `embed` (engines/embedding.py); empty: the engine's own (tiny and
    gemma-270m both, openai-upstream generate, the others generate only)."""


def create_engine(name: str, options: EngineOptions) -> Engine:
    """The engine `name` with `options`. The built-in engines need torch and transformers (the `gemma` extra): a
    light install (`pip install 'gridserve[node]'`, for a node in front of an upstream server) is told so."""
    try:
        return _with_tasks(_create(name, options), options.tasks)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in TORCH_STACK:
            raise
        raise EngineError(
            f"engine {name} needs {exc.name}, which this install lacks: install the built-in engines with "
            "pip install 'gridserve[gemma]' (or use --engine openai-upstream in front of vLLM or llama.cpp)"
        ) from None


TORCH_STACK = frozenset({"torch", "transformers", "accelerate", "gguf", "safetensors", "toploc"})
"""What the built-in engines import that a light node install (the `node` extra) does not have."""


def _create(name: str, options: EngineOptions) -> Engine:
    if name == "openai-upstream" and options.layers is None and not options.stage_auto:
        return _upstream(options)  # the light node: nothing of torch imported
    from gridserve.engines.tiny import tiny_engine

    if options.layers is not None or options.stage_auto:
        return _stage_engine(name, options, options.layers)
    if name == "tiny":
        return tiny_engine(
            threads=options.threads, lazy=options.lazy, cheat=options.cheat, prefix_cache_mb=options.prefix_cache_mb
        )
    if name == "gemma-270m":
        from gridserve.engines.gemma import gemma_engine

        return gemma_engine(
            threads=options.threads, cache=options.cache_dir, lazy=options.lazy, prefix_cache_mb=options.prefix_cache_mb
        )
    if name.startswith("emulated:"):
        from gridserve.engines.emulated import EmulatedEngine, FixedTimings

        fixed = None
        if options.fixed_ttft_ms is not None or options.fixed_itl_ms is not None:
            fixed = FixedTimings(ttft_s=(options.fixed_ttft_ms or 0.0) / 1e3, itl_s=(options.fixed_itl_ms or 0.0) / 1e3)
        return EmulatedEngine(
            hardware=name.split(":", 1)[1],
            device=options.device_figures,
            models=options.models or (() if options.loadable else ("llama-3-8b",)),
            text_engine=tiny_engine(threads=1, prefix_cache_mb=0, prefix_block=EMULATED_TEXT_CHUNK),
            fixed=fixed,
            slowdown=options.slowdown,
            loadable=options.loadable,
            load_gbps=options.load_gbps,
            fifo_slots=options.fifo_slots,
            prefix_cache=options.prefix_cache_mb > 0,
        )
    raise EngineError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")


def _with_tasks(engine: Engine, names: tuple[str, ...]) -> Engine:
    """The engine offering its model for the tasks named (none named: as it is); EngineError for one it cannot
    serve (only gridserve's whole-model engines and an upstream server embed)."""
    if not names:
        return engine
    from gridserve.engines.embedding import parse_tasks

    try:
        tasks = parse_tasks(names)
    except EngineError as exc:
        raise EngineError(f"--tasks: {exc}") from None
    offer_tasks = getattr(engine, "offer_tasks", None)  # TorchEngine, UpstreamEngine
    if offer_tasks is None:
        if tasks != ("generate",):
            raise EngineError(f"--tasks: engine {engine.kind} serves generation only")
        return engine
    offer_tasks(tasks)
    return engine


def _upstream(options: EngineOptions) -> Engine:
    from gridserve.engines.upstream import UpstreamEngine

    if not options.upstream_url:
        raise EngineError("openai-upstream needs --upstream-url")
    return UpstreamEngine(
        url=options.upstream_url,
        served_name=options.models[0] if options.models else None,
        upstream_model=options.upstream_model,
        max_context=options.max_context,
        api_key=options.upstream_api_key,
    )


def _stage_engine(name: str, options: EngineOptions, layers: tuple[int, int] | None) -> Engine:
    """A pipeline stage: layers [start, end), or (`layers` None: `--layers auto`) whatever range the gateway
    assigns."""
    from gridserve.engines.stage import load_stage, stage_from_model
    from gridserve.engines.stage_engine import StageEngine

    if name == "tiny":
        from gridserve.engines.tiny import build_tiny_model, tiny_offer

        model = build_tiny_model().model
        n_layers = model.config.num_hidden_layers
        return StageEngine(
            kind="tiny",
            offer=tiny_offer(),
            span=_span(*layers, n_layers) if layers is not None else None,
            n_layers=n_layers,
            loader=lambda start, end: stage_from_model(model, start, end),
            threads=options.threads,
        )
    if name == "gemma-270m":
        from gridserve.engines.gemma import ensure_cache, gemma_config, gemma_offer

        path = ensure_cache(options.cache_dir)
        n_layers = gemma_config(path).num_hidden_layers
        return StageEngine(
            kind="gemma-270m",
            offer=gemma_offer(path),
            span=_span(*layers, n_layers) if layers is not None else None,
            n_layers=n_layers,
            loader=lambda start, end: load_stage(str(path), start, end),
            threads=options.threads,
        )
    raise EngineError(f"--layers needs a local model engine (tiny or gemma-270m), not {name!r}")


def _span(start: int, end: int, n_layers: int) -> "StageSpan":
    from gridserve.engines.stage import StageSpan

    try:
        return StageSpan(start, end, n_layers)
    except ValueError as exc:
        raise EngineError(f"--layers: {exc}") from None
