"""The prefix cache's effect on Gemma 3 270M (CPU, in process): time to first token of a ~1,000-token prompt run
cold, then of a follow-up that shares all of it but the question. Each run starts with its own marker, so its cold
prompt shares nothing with earlier runs. Prints JSON on stdout: per run, the wall TTFT (request to first event),
the node's prefill seconds and the cached prompt tokens, cold and warm; and, with --one-pass, the former one-forward
prefill of the whole prompt (all positions' logits), for the cost of chunked prefill on a cold prompt.

    .venv/bin/python bench/prefix_cache.py --runs 3 --tokens 1000 --threads 2
"""

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import torch

from gridserve.engines.gemma import GEMMA_MODEL, ensure_cache, gemma_engine
from gridserve.engines.torch_engine import TorchEngine
from gridserve.types import GenerateRequest, SamplingParams

SENTENCES = (
    "The lighthouse stood on a spit of black rock at the mouth of the bay.",
    "Its keeper climbed the hundred and twelve steps every evening at dusk to light the lamp.",
    "She trimmed the wick, wound the clockwork and watched the great lens begin to turn.",
    "Ships coming in from the north relied on its beam to find the channel between the shoals.",
)


def document(engine: TorchEngine, marker: str, tokens: int) -> str:
    text = marker
    i = 0
    while len(engine.prompt_ids(job(text))) < tokens:
        text += " " + SENTENCES[i % len(SENTENCES)]
        i += 1
    return text


def job(prompt: str) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    return GenerateRequest(request_id="bench", model=GEMMA_MODEL, prompt=prompt, sampling=sampling)


async def measure(engine: TorchEngine, prompt: str) -> dict[str, Any]:
    started = time.perf_counter()
    ttft: float | None = None
    last: Any = None
    async for event in engine.generate(job(prompt)):
        ttft = ttft if ttft is not None else time.perf_counter() - started
        last = event
    return {
        "ttft_s": round(ttft or 0.0, 4),
        "prefill_s": last.prefill_s,
        "prompt_tokens": last.prompt_tokens,
        "cached_tokens": last.cached_tokens,
    }


def one_pass(engine: TorchEngine, prompt: str) -> float:
    """The former prefill: one forward pass over the whole prompt, logits at every position."""
    model = engine._require().model
    ids = torch.tensor([engine.prompt_ids(job(prompt))])
    started = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, output_hidden_states=True)
    return round(time.perf_counter() - started, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1000, help="prompt length (Gemma tokens), about")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-pass", action="store_true", help="also time the former one-pass prefill")
    args = parser.parse_args()
    ensure_cache()
    engine = gemma_engine(threads=args.threads)
    engine.load_sync()
    torch.set_num_threads(args.threads)
    runs = []
    for run in range(args.runs):
        doc = document(engine, f"Report {run + 1}.", args.tokens)
        cold = asyncio.run(measure(engine, doc + " Question: who keeps the lighthouse?"))
        warm = asyncio.run(measure(engine, doc + " Question: how many steps are there?"))
        entry: dict[str, Any] = {"cold": cold, "warm": warm, "speedup_ttft": round(cold["ttft_s"] / warm["ttft_s"], 1)}
        if args.one_pass:
            entry["one_pass_prefill_s"] = one_pass(engine, doc + " Question: what does the beam do?")
        runs.append(entry)
    out = {
        "model": GEMMA_MODEL,
        "threads": args.threads,
        "runs": runs,
        "median_cold_ttft_s": statistics.median(r["cold"]["ttft_s"] for r in runs),
        "median_warm_ttft_s": statistics.median(r["warm"]["ttft_s"] for r in runs),
    }
    print(json.dumps(out, indent=2))
    asyncio.run(engine.aclose())


if __name__ == "__main__":
    main()
