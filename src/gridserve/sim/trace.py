"""Request traces: the Azure LLM inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens) and JSONL with
`timestamp` (ms), `input_length`, `output_length`."""

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class TraceRequest:
    at_s: float
    """Seconds since the trace's first request."""
    prompt_tokens: int
    output_tokens: int


def _azure_time(text: str) -> float:
    whole, _, frac = text.strip().partition(".")
    return datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp() + (float("0." + frac) if frac else 0.0)


def load_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """Read a trace, sorted by time and shifted to start at 0; TraceError with a readable reason."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from exc
    rows: list[tuple[float, int, int]] = []
    try:
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    r = json.loads(line)
                    rows.append((float(r["timestamp"]) / 1e3, int(r["input_length"]), int(r["output_length"])))
        else:
            for r in csv.DictReader(text.splitlines()):
                rows.append((_azure_time(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    except (KeyError, ValueError, TypeError) as exc:
        raise TraceError(f"{path}: not an Azure CSV or a JSONL trace ({type(exc).__name__}: {exc})") from exc
    if not rows:
        raise TraceError(f"{path}: no requests")
    rows.sort()
    start = rows[0][0]
    out = [TraceRequest(t - start, max(1, p), max(1, o)) for t, p, o in rows]
    return out[:limit] if limit else out


def scaled(trace: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same requests arriving `factor` times faster."""
    return [TraceRequest(r.at_s / factor, r.prompt_tokens, r.output_tokens) for r in trace]
