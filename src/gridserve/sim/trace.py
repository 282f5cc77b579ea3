"""Request traces: the Azure LLM inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens) and JSONL with
`timestamp` (ms), `input_length`, `output_length` and, in the Mooncake format, `hash_ids`: the ids of the
prompt's 512-token blocks, chained (equal ids, equal prefix), from which the simulator models prefix caches. A
trace without them has no reuse."""

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

TOKENS_PER_BLOCK = 512
"""Prompt tokens per block id (Mooncake's `hash_ids`); the simulated prefix caches hold blocks of this size."""


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class TraceRequest:
    at_s: float
    """Seconds since the trace's first request."""
    prompt_tokens: int
    output_tokens: int
    blocks: tuple[int, ...] = ()
    """Ids of the prompt's blocks of TOKENS_PER_BLOCK tokens, chained: block i's id names blocks 0..i (empty: the
    trace does not say, and nothing is reused)."""


def _azure_time(text: str) -> float:
    whole, _, frac = text.strip().partition(".")
    return datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp() + (float("0." + frac) if frac else 0.0)


def _blocks(row: dict[str, object]) -> tuple[int, ...]:
    ids = row.get("hash_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list):
        raise TypeError(f"hash_ids must be a list, got {type(ids).__name__}")
    return tuple(int(i) for i in ids)


def load_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """Read a trace, sorted by time and shifted to start at 0; TraceError with a readable reason."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from exc
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    try:
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    r = json.loads(line)
                    at = float(r["timestamp"]) / 1e3
                    rows.append((at, int(r["input_length"]), int(r["output_length"]), _blocks(r)))
        else:
            for r in csv.DictReader(text.splitlines()):
                rows.append((_azure_time(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]), ()))
    except (KeyError, ValueError, TypeError) as exc:
        raise TraceError(f"{path}: not an Azure CSV or a JSONL trace ({type(exc).__name__}: {exc})") from exc
    if not rows:
        raise TraceError(f"{path}: no requests")
    rows.sort()
    start = rows[0][0]
    out = [TraceRequest(t - start, max(1, p), max(1, o), b) for t, p, o, b in rows]
    return out[:limit] if limit else out


def scaled(trace: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same requests arriving `factor` times faster."""
    return [replace(r, at_s=r.at_s / factor) for r in trace]


def cached_limit(prompt_tokens: int, blocks: int) -> int:
    """Prompt tokens `blocks` leading blocks spare a prefill: the last prompt token is always computed."""
    return max(0, min(prompt_tokens - 1, blocks * TOKENS_PER_BLOCK))


def prefix_ceiling(trace: Sequence[TraceRequest]) -> tuple[float, float]:
    """What any cache could reuse at most: (share of prompt blocks whose prefix an earlier request sent, share of
    prompt tokens those leading blocks cover, capped as `cached_limit` caps them). A cache as large as the
    trace, shared by all, with no churn: the cache-hit rate no routing can beat."""
    seen: set[int] = set()
    blocks = repeated = tokens = cached = 0
    for r in sorted(trace, key=lambda r: r.at_s):
        lead = 0
        for block in r.blocks:
            if block not in seen:
                break
            lead += 1
        blocks += len(r.blocks)
        repeated += lead
        tokens += r.prompt_tokens
        cached += cached_limit(r.prompt_tokens, lead)
        seen.update(r.blocks)
    return (repeated / blocks if blocks else 0.0), (cached / tokens if tokens else 0.0)
