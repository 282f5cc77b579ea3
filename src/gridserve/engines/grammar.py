"""Structured output: a request's `response_format` as a grammar over the model's own tokens (llguidance), applied
to every position's scores by the TokenRule (engines/sampling.py), so the engine, the gateway's pipeline sampler
and the verifier all draw from the tokens the grammar allows next. A `json_schema` answer that ends by itself
(finish_reason stop) therefore parses and validates; one cut by max_tokens is a prefix of such an answer.

JSON is generated compact (no optional whitespace): a small model given the choice loops on newlines."""

import functools
import json
from typing import TYPE_CHECKING, Any, Protocol

from gridserve.types.wire import TOOL_CALL_TAG, ResponseFormat

if TYPE_CHECKING:  # the gateway checks formats (`check`) without torch
    import torch

JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarCodec(Protocol):
    """A model's tokenizer as llguidance reads it (engines/tiny.py ByteCodec, engines/gemma.py HFCodec)."""

    def grammar_tokenizer(self) -> Any: ...


class GrammarError(ValueError):
    """The format cannot be made a grammar (a schema llguidance does not accept)."""


@functools.lru_cache(maxsize=256)
def grammar_of(fmt: ResponseFormat) -> str:
    """The llguidance grammar of `fmt` (cached: one compile per distinct schema)."""
    from llguidance import LLMatcher

    try:
        if fmt.type == "tool_calls":
            grammar = LLMatcher.grammar_from_lark(_tool_calls_lark(fmt))
        else:
            grammar = LLMatcher.grammar_from_json_schema(fmt.answer_schema(), overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        problem = LLMatcher.validate_grammar(grammar)
    except Exception as exc:  # the library's own errors on a schema it cannot compile (ValueError, RuntimeError)
        raise GrammarError(str(exc)) from exc
    if problem:
        raise GrammarError(problem)
    return str(grammar)


def _tool_calls_lark(fmt: ResponseFormat) -> str:
    """TOOL_CALL_TAG then the calls (compact JSON); with `optional`, or text that does not start with "<"."""
    schema = {**fmt.answer_schema(), "x-guidance": JSON_OPTIONS}
    calls = f"calls: {json.dumps(TOOL_CALL_TAG)} %json {json.dumps(schema)}\n"
    if not fmt.optional:
        return "start: calls\n" + calls
    return "start: calls | free\n" + calls + 'free: /[^<](.|\\n)*/ | ""\n'


def check(fmt: ResponseFormat) -> str:
    """Why `fmt` cannot be generated ("" when it can): the gateway refuses such a request with a 400."""
    try:
        grammar_of(fmt)
    except GrammarError as exc:
        return str(exc).strip() or "the schema is not one gridserve can generate"
    return ""


class Constraint:
    """One answer's place in its grammar: which tokens may come next (`restrict`), advanced by each token picked
    (`accept`). Deterministic: the same tokens give the same masks on every node and on the verifier."""

    def __init__(self, fmt: ResponseFormat, codec: GrammarCodec) -> None:
        from llguidance import LLMatcher

        tokenizer = codec.grammar_tokenizer()
        self._matcher = LLMatcher(tokenizer, grammar_of(fmt))
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        self._vocab = int(tokenizer.vocab_size)

    def restrict(self, scores: "torch.Tensor") -> "torch.Tensor":
        """`scores` (1-D, written in place) with every token the grammar does not allow next at -inf (and every id
        past the grammar's vocabulary). The mask is llguidance's bitmask unpacked with numpy (its torch helper
        compiles a TorchScript kernel on import: seconds on a busy machine, on the first structured request)."""
        import numpy as np
        import torch

        packed = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(packed, bitorder="little")[: self._vocab].astype(bool)
        size = scores.shape[0]
        keep = torch.zeros(size, dtype=torch.bool)
        keep[: min(size, self._vocab)] = torch.from_numpy(allowed[:size])
        return scores.masked_fill_(~keep, float("-inf"))

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar does not allow it (the answer left its format)."""
        return bool(self._matcher.consume_token(token))

    @property
    def error(self) -> str:
        return str(self._matcher.get_error()) if self._matcher.is_error() else ""
