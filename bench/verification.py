"""Verification: how fast sampled audits catch a cheating node, what they cost, and that honest work passes.

1. Honest completions from the tiny model at 1 and 2 threads (`--honest` of them, half each; half of each greedy,
   half sampled at temperatures 0.7-1.3 and top-p 1 or 0.9 with a seed, as the gateway sends every sampled
   request), every one audited by the verifier (gateway/integrity/audit.py: prompt digest, TOPLOC proof, every
   token): false positives counted, greedy and sampled apart, the largest share of mass by which an honest
   sampled token missed its seeded draw (against SAMPLE_TOLERANCE), proof bytes per token, and the verifier's
   time against the node's generation time.
2. Cheating completions (other weights, a skipped layer, altered tokens, no proof: node/dishonest.py), each
   audited: the share caught when audited, greedy and sampled apart.
3. Detection: for audit rates p and cheat rates f, `--trials` simulated nodes serve n requests each; every
   request cheats with probability f (drawing a real cheating completion), else honest (a real honest one),
   and is audited with probability p, the audit outcome being that completion's real verification result. The
   measured share of nodes caught within n requests is set against the expected 1 - (1 - p f)^n.

Prints JSON; run: `.venv/bin/python bench/verification.py` (about 3 minutes).
"""

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import Progress

from gridserve.engines.sampling import SAMPLE_TOLERANCE
from gridserve.engines.tiny import tiny_engine
from gridserve.engines.torch_engine import TorchEngine
from gridserve.gateway.integrity.audit import Verifier
from gridserve.node.dishonest import ENGINE_MODES, Dishonesty
from gridserve.trust.testing import unsigned_receipt
from gridserve.types import GenerateRequest, SamplingParams, TokenEvent

MODEL = "gridserve-tiny"
CHEATS = ("wrong_model", "lazy_compute", "alter_output", "omit_proof")


def job(i: int) -> GenerateRequest:
    """Odd `i`: greedy; even: sampled, with the temperature and top-p of a mix of clients."""
    temperature = 0.0 if i % 2 else (0.7, 1.0, 1.3)[i // 2 % 3]
    top_p = 1.0 if i // 2 % 2 else 0.9
    return GenerateRequest(
        request_id=f"cmpl-{i}",
        model=MODEL,
        prompt=f"bench prompt {i}: tell me about the grid",
        sampling=SamplingParams(max_tokens=24, temperature=temperature, top_p=top_p, seed=i),
    )


async def generate(engine: TorchEngine, j: GenerateRequest, lies: Dishonesty) -> tuple[list[int], TokenEvent, float]:
    start = time.perf_counter()
    ids: list[int] = []
    final: TokenEvent | None = None
    async for event in engine.generate(j):
        event = lies.alter(event, len(ids))
        ids.extend(event.token_ids)
        final = event
    assert final is not None
    return ids, final, time.perf_counter() - start


def run_pool(
    engine: TorchEngine, lies: Dishonesty, verifier: Verifier, start: int, count: int, progress: Progress, task: Any
) -> list[dict[str, float]]:
    out = []
    for i in range(start, start + count):
        j = job(i)
        ids, final, gen_s = asyncio.run(generate(engine, j, lies))
        t = time.perf_counter()
        result = verifier.check(j, ids, unsigned_receipt(final, MODEL))
        verify_s = time.perf_counter() - t
        picks = max(1, final.completion_tokens)
        out.append(
            {
                "ok": float(result.ok),
                "sampled": float(not j.sampling.greedy),
                "cheated": float(bool(lies.modes) and ("alter_output" not in lies.modes or len(ids) > 3)),
                "miss": result.largest_draw_miss,
                "gen_s": gen_s,
                "verify_s": verify_s,
                "proof_bpt": len(final.proof) / picks,
            }
        )
        progress.advance(task)
    return out


def split(rows: list[dict[str, float]], measure: Callable[[list[dict[str, float]]], float]) -> dict[str, float]:
    """`measure` over the greedy rows and the sampled rows apart."""
    return {
        kind: measure([r for r in rows if r["sampled"] == flag]) for kind, flag in (("greedy", 0.0), ("sampled", 1.0))
    }


def caught_share(rows: list[dict[str, float]]) -> float:
    """Among the answers that did cheat (`alter_output` changes every 4th token: an answer under 4 tokens is
    honest)."""
    cheated = [r for r in rows if r["cheated"]]
    return round(sum(1 for r in cheated if not r["ok"]) / max(1, len(cheated)), 3)


def detection(honest: list[bool], cheating: list[bool], trials: int, rng: random.Random) -> list[dict[str, Any]]:
    """`honest`/`cheating`: each real completion's audit verdict (True = passed)."""
    rows = []
    for p in (0.01, 0.05, 0.10):
        for f in (1.0, 0.10, 0.01):
            for n in (100, 1000):
                caught = 0
                for _ in range(trials):
                    for _ in range(n):
                        cheats = rng.random() < f
                        if rng.random() < p and not rng.choice(cheating if cheats else honest):
                            caught += 1
                            break
                rows.append(
                    {
                        "audit_rate": p,
                        "cheat_rate": f,
                        "requests": n,
                        "caught_share": round(caught / trials, 3),
                        "expected_share": round(1 - (1 - p * f) ** n, 3),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--honest", type=int, default=2000, help="honest audited completions (half at 1 thread, half at 2)"
    )
    parser.add_argument("--cheating", type=int, default=160, help="cheating completions (a quarter per mode)")
    parser.add_argument("--trials", type=int, default=300)
    args = parser.parse_args()
    verifier = Verifier(threads=1)
    honest_rows: list[dict[str, float]] = []
    cheat_rows: dict[str, list[dict[str, float]]] = {}
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("honest completions, audited", total=args.honest)
        for threads, half in ((1, args.honest // 2), (2, args.honest - args.honest // 2)):
            engine = tiny_engine(threads=threads)
            engine.load_sync()
            honest_rows += run_pool(engine, Dishonesty(), verifier, len(honest_rows), half, progress, task)
        task = progress.add_task("cheating completions, audited", total=args.cheating)
        per_mode = args.cheating // len(CHEATS)
        for mode in CHEATS:
            cheat = (mode,) if mode in ENGINE_MODES else ()
            engine = tiny_engine(threads=1, cheat=cheat)
            engine.load_sync()
            lies = Dishonesty(modes=frozenset({mode}))
            cheat_rows[mode] = run_pool(engine, lies, verifier, 10_000, per_mode, progress, task)
    honest_ok = [bool(r["ok"]) for r in honest_rows]
    cheat_ok = [bool(r["ok"]) for rows in cheat_rows.values() for r in rows]
    gen = statistics.median(r["gen_s"] for r in honest_rows)
    ver = statistics.median(r["verify_s"] for r in honest_rows)
    report = {
        "detection": detection(honest_ok, cheat_ok, args.trials, random.Random(0)),
        "honest_audited": split(honest_rows, len),
        "false_positives": split(honest_rows, lambda rows: sum(1 for r in rows if not r["ok"])),
        "largest_honest_draw_miss": max(r["miss"] for r in honest_rows),
        "sample_tolerance": SAMPLE_TOLERANCE,
        "caught_when_audited": {m: split(rows, caught_share) for m, rows in cheat_rows.items()},
        "cheating_answers": {
            m: split(rows, lambda rs: sum(r["cheated"] for r in rs)) for m, rows in cheat_rows.items()
        },
        "proof_bytes_per_token": round(statistics.mean(r["proof_bpt"] for r in honest_rows), 2),
        "audit_overhead_pct": round(100 * ver / gen, 1),
        "audit_overhead_overall_pct_at_5pct_audits": round(5 * ver / gen, 2),
        "median_generation_ms": round(gen * 1e3, 2),
        "median_verification_ms": round(ver * 1e3, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
