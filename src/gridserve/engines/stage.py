"""Pipeline stages: a contiguous, half-open layer range `[start, end)` of a Gemma 3 text model.

A stage is the same transformers code as the whole model, built from the model's config with only its
layers (`num_hidden_layers = end - start`, `layer_types[start:end]`), so each layer keeps its attention kind
(sliding or full) and a stage's KV cache holds only its own layers. The first stage embeds token ids; later
stages take the hidden states of the one before as `inputs_embeds`; only the last applies the final norm,
the (tied) LM head and Gemma's logit soft-capping. Running the stages in turn is the same arithmetic, on the
same shapes, as running the whole model, so at a fixed thread count the logits are bitwise identical.
"""

import copy
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"
LAYER = "model.layers."


@dataclass(frozen=True)
class StageSpan:
    start: int
    end: int
    n_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.n_layers:
            raise ValueError(f"layer range [{self.start}, {self.end}) is not inside the model's {self.n_layers} layers")

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.n_layers

    def __str__(self) -> str:
        return f"[{self.start}, {self.end}) of {self.n_layers}"


def stage_keys(span: StageSpan, keys: Iterable[str]) -> dict[str, str]:
    """Which tensors of the whole model's state dict a stage needs: {stage key: model key}."""
    wanted: dict[str, str] = {}
    for key in keys:
        if key.startswith(LAYER):
            index, rest = key[len(LAYER) :].split(".", 1)
            if span.start <= int(index) < span.end:
                wanted[f"{LAYER}{int(index) - span.start}.{rest}"] = key
        elif key == EMBED and (span.first or span.last):
            wanted[key] = key  # the last stage's LM head is tied to the embedding
        elif key == NORM and span.last:
            wanted[key] = key
    return wanted


class StageModule(torch.nn.Module):
    """Layers `[start, end)`; `forward` takes token ids (first stage) or hidden states, and returns hidden
    states, or logits on the last stage."""

    def __init__(self, config: Any, span: StageSpan) -> None:
        from transformers import Gemma3TextConfig
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel

        super().__init__()
        if not isinstance(config, Gemma3TextConfig):
            raise TypeError(f"stages run Gemma 3 text models, not {type(config).__name__}")
        if config.num_hidden_layers != span.n_layers:
            raise ValueError(f"the model has {config.num_hidden_layers} layers, the span says {span.n_layers}")
        sub = copy.deepcopy(config)
        sub.num_hidden_layers = span.end - span.start
        types: list[str] = list(config.layer_types or [])
        sub.layer_types = types[span.start : span.end]
        # as `from_pretrained` would choose (a bare config says None, which builds eager attention: other numbers)
        sub._attn_implementation = config._attn_implementation or "sdpa"
        self.span = span
        self.config = sub
        self.model = Gemma3TextModel(sub)
        if not span.first and not span.last:
            self.model.embed_tokens = None  # type: ignore[assignment]
        if not span.last:
            self.model.norm = torch.nn.Identity()  # type: ignore[assignment]
        self.softcap: float | None = config.final_logit_softcapping

    def load_weights(self, tensor: Callable[[str], torch.Tensor], keys: Iterable[str]) -> None:
        """Load the stage's tensors from the whole model's (by name, through `tensor`); strict."""
        wanted = stage_keys(self.span, keys)
        state = {key: tensor(source) for key, source in wanted.items()}
        missing, unexpected = self.model.load_state_dict(
            {k.removeprefix("model."): v for k, v in state.items()}, strict=False
        )
        if missing or unexpected:
            raise ValueError(f"stage {self.span}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, inputs: torch.Tensor, cache: Any) -> torch.Tensor:
        """`inputs`: token ids `[1, n]` (long) on the first stage, else hidden states `[1, n, hidden]`."""
        if self.span.first:
            out = self.model(input_ids=inputs, past_key_values=cache, use_cache=True)
        else:
            out = self.model(inputs_embeds=inputs, past_key_values=cache, use_cache=True)
        hidden: torch.Tensor = out.last_hidden_state
        if not self.span.last:
            return hidden
        embed = self.model.embed_tokens
        assert embed is not None
        logits = torch.nn.functional.linear(hidden, embed.weight)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def stage_from_model(model: Any, start: int, end: int) -> StageModule:
    """Layers `[start, end)` of a loaded `Gemma3ForCausalLM` (weights copied)."""
    config = model.config
    stage = StageModule(config, StageSpan(start, end, config.num_hidden_layers))
    state = model.state_dict()
    stage.load_weights(state.__getitem__, state.keys())
    stage.eval()
    return stage


def stages_from_model(model: Any, cuts: list[int]) -> list[StageModule]:
    """Split a loaded `Gemma3ForCausalLM` at `cuts` (e.g. [9] for two stages of an 18-layer model)."""
    bounds = [0, *cuts, model.config.num_hidden_layers]
    return [stage_from_model(model, start, end) for start, end in itertools.pairwise(bounds)]


def load_stage(model_dir: str, start: int, end: int) -> StageModule:
    """Build layers `[start, end)` from a safetensors checkpoint directory, reading only the stage's tensors."""
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config = getattr(config, "text_config", config)
    stage = StageModule(config, StageSpan(start, end, config.num_hidden_layers))
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir}")
    handles: list[Any] = [safe_open(str(f), framework="pt") for f in files]
    where: dict[str, Any] = {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118 (not a dict)
    stage.load_weights(lambda key: where[key].get_tensor(key), where.keys())
    stage.eval()
    return stage
