"""Fault injection for tests and demos: off unless the node is started with `--allow-faults`.

Faults are set at start (`--fault key=value`) or at run time with `POST /faults` (loopback callers only;
`GET /faults` shows them, `DELETE /faults` clears them). Each fault makes the node misbehave the way a real
one does, so the gateway's failover and the latency doctor can be shown to handle it:

- `delay_ms`: added network delay on every answer (health probes and the start of each generation), or on
  a random `delay_share` of them (an intermittent straggler);
- `stall_after_tokens`: each generation stops sending after N tokens and hangs (the connection stays open);
- `crash_after_tokens`: the process dies abruptly after N tokens of a generation (as kill -9);
- `slow_decode_factor`: every token takes this many times longer (a throttled or oversubscribed device);
- `memory_pressure`: the reported device memory use, as a share of the total (e.g. 0.95);
- `thermal`: the device reports 92 C and a 0.55 clock ratio (thermal throttling) and decodes 1/0.55x slower;
- `error_burst`: the next N generations fail with `error_message` (default a CUDA out-of-memory error).
"""

import asyncio
import os
import random
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gridserve.engines import EngineStats
from gridserve.types import TokenEvent

THERMAL_TEMPERATURE_C = 92.0
THERMAL_CLOCK_RATIO = 0.55


class FaultsDisabled(Exception):
    def __init__(self) -> None:
        super().__init__("fault injection is disabled on this node; start it with --allow-faults to use it")


class FaultSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay_ms: float = Field(0.0, ge=0, le=60_000)
    delay_share: float = Field(1.0, gt=0.0, le=1.0)
    stall_after_tokens: int | None = Field(None, ge=0)
    crash_after_tokens: int | None = Field(None, ge=0)
    slow_decode_factor: float = Field(1.0, ge=1.0, le=1000.0)
    memory_pressure: float | None = Field(None, gt=0.0, le=1.0)
    thermal: bool = False
    error_burst: int = Field(0, ge=0, le=10_000)
    error_message: str = "CUDA error: out of memory (injected)"

    def active(self) -> tuple[str, ...]:
        default = FaultSpec()
        return tuple(
            f"{k}={v}" for k, v in self.model_dump().items() if v != getattr(default, k) and k != "error_message"
        )


def parse_fault_options(items: list[str]) -> FaultSpec:
    """`key=value` pairs from the command line; raises ValueError with a readable message."""
    raw: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--fault expects key=value, got {item!r}")
        raw[key.strip()] = value.strip()
    return FaultSpec.model_validate(raw)


class Faults:
    def __init__(self, *, allowed: bool, initial: FaultSpec | None = None) -> None:
        self.allowed = allowed
        self.spec = FaultSpec()
        if initial is not None:
            self.set(initial)

    def set(self, spec: FaultSpec) -> None:
        if not self.allowed:
            raise FaultsDisabled()
        self.spec = spec

    def clear(self) -> None:
        self.spec = FaultSpec()

    async def network_delay(self) -> None:
        if self.spec.delay_ms > 0 and (self.spec.delay_share >= 1.0 or random.random() < self.spec.delay_share):
            await asyncio.sleep(self.spec.delay_ms / 1000.0)

    def take_error(self) -> str | None:
        """An error-burst failure for this generation, if one is left."""
        if self.spec.error_burst <= 0:
            return None
        self.spec = self.spec.model_copy(update={"error_burst": self.spec.error_burst - 1})
        return self.spec.error_message

    def telemetry(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Reported telemetry with memory pressure / thermal throttling applied."""
        out = dict(fields)
        if self.spec.memory_pressure is not None and out.get("memory_total_bytes"):
            out["memory_used_bytes"] = int(out["memory_total_bytes"] * self.spec.memory_pressure)
        if self.spec.thermal:
            out["temperature_c"], out["clock_ratio"] = THERMAL_TEMPERATURE_C, THERMAL_CLOCK_RATIO
        return out

    def slowdown(self) -> float:
        return self.spec.slow_decode_factor / (THERMAL_CLOCK_RATIO if self.spec.thermal else 1.0)

    async def apply(self, events: AsyncIterator[TokenEvent], stats: EngineStats) -> AsyncIterator[TokenEvent]:
        """The engine's events with per-token faults applied (stall, crash). Slow decode is applied by the
        engine itself (`EngineStats.decode_throttle`), where tokens are made."""
        stats.decode_throttle = self.slowdown()
        tokens = 0
        async for event in events:
            tokens += len(event.token_ids)
            spec = self.spec
            if spec.crash_after_tokens is not None and tokens > spec.crash_after_tokens:
                os._exit(137)
            if _stalls(spec.stall_after_tokens, tokens, event):
                stats.note_error(f"generation stalled after {spec.stall_after_tokens} tokens (injected)", "timeout")
                await asyncio.Event().wait()  # hang until the gateway gives up and closes the connection
            yield event


def _stalls(after: int | None, tokens: int, event: TokenEvent) -> bool:
    """Whether a node stalling after `after` tokens withholds `event`, which brings the answer to `tokens`: any
    event past them, and the answer's end once they are sent (an answer of no tokens, as when the first token
    picked is end-of-sequence, never arrives). An answer shorter than `after` tokens is sent whole."""
    if after is None:
        return False
    return tokens > after or (event.finish_reason is not None and tokens >= after)


__all__ = ["FaultSpec", "Faults", "FaultsDisabled", "parse_fault_options"]
