"""Tool calls checked like tokens: honest calling answers from the tiny model (at 1 and 2 threads, greedy and
sampled, over tool sets and tool_choice modes) each audited by the verifier (gateway/integrity/audit.py, which
re-executes under the calls' grammar) and checked by the gateway against its tools (gateway/api/tools.py
validate): false accusations counted. Then answers of a node in the `corrupt_tool_args` dishonest mode: the share
caught by the gateway's check (every answer) and by an audit.

Prints JSON; run: `.venv/bin/python bench/tool_audits.py --honest 500` (about 4 minutes on 2 cores)."""

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress

from gridserve.engines.tiny import TINY_MODEL, tiny_engine
from gridserve.engines.torch_engine import TorchEngine
from gridserve.gateway.api.tools import tool_format, validate
from gridserve.gateway.integrity.audit import Verifier
from gridserve.node.dishonest import Dishonesty
from gridserve.trust.testing import unsigned_receipt
from gridserve.types import GenerateRequest, SamplingParams, TokenEvent
from gridserve.types.wire import ResponseFormat


def _function(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {
        "type": "object",
        "properties": properties,
        "required": sorted(properties),
        "additionalProperties": False,
    }
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


NUMBER = {"type": "integer", "minimum": 0, "maximum": 999}
WORD = {"type": "string", "maxLength": 10}
TOOL_SETS = [
    [_function("add", {"a": NUMBER, "b": NUMBER})],
    [_function("weather", {"city": WORD, "unit": {"enum": ["c", "f"]}}), _function("clock", {"zone": WORD})],
    [
        _function("book", {"seats": NUMBER, "name": WORD, "vip": {"type": "boolean"}}),
        _function("cancel", {"ref": NUMBER}),
    ],
]
CHOICES: list[Any] = ["required", "auto", "first"]


def job(i: int, choice: Any = None) -> tuple[GenerateRequest, ResponseFormat]:
    """Request `i`: a tool set, a tool_choice (`choice`, else one of CHOICES in turn), greedy or sampled."""
    tools = TOOL_SETS[i % len(TOOL_SETS)]
    choice = choice or CHOICES[i // len(TOOL_SETS) % len(CHOICES)]
    if choice == "first":
        choice = {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
    fmt, described = tool_format(tools, choice, i % 5 != 0)
    assert fmt is not None
    temperature = 0.0 if i % 2 else (0.7, 1.0, 1.3)[i // 2 % 3]
    sampling = SamplingParams(max_tokens=400, temperature=temperature, seed=i, response_format=fmt)
    prompt = f"{described}\nRequest {i}: "
    return GenerateRequest(request_id=f"tool-{i}", model=TINY_MODEL, prompt=prompt, sampling=sampling), fmt


async def generate(
    engine: TorchEngine, request: GenerateRequest, lies: Dishonesty
) -> tuple[list[int], TokenEvent, str]:
    ids: list[int] = []
    text: list[str] = []
    final: TokenEvent | None = None
    async for event in engine.generate(request):
        event = lies.alter(event, len(ids), calling=True)
        ids.extend(event.token_ids)
        text.append(event.text)
        final = event
    assert final is not None
    return ids, final, "".join(text)


def run(honest: int, cheating: int) -> dict[str, Any]:
    engines = {threads: tiny_engine(threads=threads) for threads in (1, 2)}
    for engine in engines.values():
        engine.load_sync()
    verifier = Verifier(threads=1)
    accused: list[str] = []
    calls = text_answers = truncated = 0
    verify_s: list[float] = []
    console = Console(stderr=True)
    with Progress(console=console) as progress:
        task = progress.add_task("honest calling answers, audited", total=honest)
        for i in range(honest):
            request, fmt = job(i)
            ids, final, text = asyncio.run(generate(engines[1 + i % 2], request, Dishonesty()))
            started = time.perf_counter()
            audit = verifier.check(request, ids, unsigned_receipt(final, TINY_MODEL))
            verify_s.append(time.perf_counter() - started)
            problem = validate(text, fmt) if final.finish_reason == "stop" else ""
            if not audit.ok or problem:
                accused.append(f"{request.request_id}: {'; '.join(audit.problems) or problem}")
            truncated += final.finish_reason != "stop"
            calls += text.startswith("<")
            text_answers += final.finish_reason == "stop" and not text.startswith("<")
            progress.advance(task)
        lying = Dishonesty.of(["corrupt_tool_args"], allowed=True)
        caught_by_check = caught_by_audit = with_digits = 0
        task = progress.add_task("corrupt_tool_args answers", total=cheating)
        for i in range(cheating):
            request, fmt = job(10_000 + i, "required")
            ids, final, text = asyncio.run(generate(engines[1], request, lying))
            if any(ch == "x" for ch in text) and text.startswith("<"):
                with_digits += 1
                caught_by_check += bool(validate(text, fmt))
                caught_by_audit += not verifier.check(request, ids, unsigned_receipt(final, TINY_MODEL)).ok
            progress.advance(task)
    return {
        "honest_answers": honest,
        "honest_calling_answers": calls,
        "honest_text_answers": text_answers,
        "honest_truncated_at_max_tokens": truncated,
        "false_accusations": len(accused),
        "accusations": accused[:5],
        "audit_ms_median": round(statistics.median(verify_s) * 1000, 2),
        "corrupted_answers": with_digits,
        "caught_by_gateway_check": caught_by_check,
        "caught_by_audit": caught_by_audit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--honest", type=int, default=500)
    parser.add_argument("--cheating", type=int, default=60)
    args = parser.parse_args()
    print(json.dumps(run(args.honest, args.cheating), indent=2))


if __name__ == "__main__":
    main()
