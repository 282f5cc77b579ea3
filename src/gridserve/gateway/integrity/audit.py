"""Sampled verification: the gateway re-executes a sample of completions itself and checks the node's work.

A verifier (an engine in the gateway's own process, loaded on first use, for the models it can run: the
tiny model and Gemma 3 270M) runs one prefill over prompt + output and checks:

1. the prompt as the verifier tokenises it has the digest the node committed to;
2. the activation proof (trust/proofs.py) against the verifier's own hidden states;
3. every token: for greedy requests the verifier's argmax must be the node's token, unless the two logits are
   within `TIE_TOLERANCE` (honest float differences may flip a near tie); for sampled ones (the gateway fixes a
   seed for every one: gateway/api/openai_api.py) the token must be the seed's draw from the verifier's own
   distribution within `SAMPLE_TOLERANCE` of the mass (engines/sampling.py).

A torch engine sends an activation proof with every answer: a missing one fails the audit.

Any failure is a severe integrity incident with the evidence. The audit rate is per node: `audit_new_rate` for
nodes with little history, otherwise `audit_rate` raised for low reliability (x (1 + 4 (1 - score))), never
below `audit_floor`. Audits run off the request path, one at a time on a worker thread.

Canaries (`CanaryRunner`): now and then a node gets a request built like any client's (sampling settings drawn
from recent traffic), checked the same way; a wrong answer is an integrity incident.
"""

import asyncio
import functools
import logging
import multiprocessing
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from gridserve.gateway.config import GatewayConfig
from gridserve.gateway.integrity.canary_prompts import canary_prompt
from gridserve.gateway.ops.metrics import GatewayMetrics
from gridserve.gateway.registry.membership import Membership
from gridserve.processes import watch_parent
from gridserve.reliability import EventKind, NodeEvent, Severity
from gridserve.trust.audit_policy import audit_probability
from gridserve.trust.commitments import token_commitment
from gridserve.types import ChatMessage, GenerateRequest, Receipt, SamplingParams

if TYPE_CHECKING:  # torch is imported by the first audit (Verifier), not at gateway start
    import torch

    from gridserve.engines.sampling import TokenRule
    from gridserve.engines.torch_engine import LoadedModel
    from gridserve.gateway.integrity.redundancy import RedundancyChecker

log = logging.getLogger("gridserve.gateway")
TIE_TOLERANCE = 1e-3
"""Relative logit gap below which a different greedy token is an honest near tie, not a wrong answer."""
VERIFIABLE = ("gridserve-tiny", "gemma-3-270m")
P = ParamSpec("P")
T = TypeVar("T")
Claimed = tuple[tuple[float, tuple[float, ...]], ...]
"""Each token's claimed log-probability with its alternatives'."""
LOGPROB_TOLERANCE = 1e-2
"""How far (in nats) a claimed log-probability may be from the verifier's: honest differences between a node's
batched, cached decode and the verifier's single prefill are ~1e-5 (the logits' own)."""


def _load(model: str) -> "LoadedModel":
    if model == "gridserve-tiny":
        from gridserve.engines.tiny import build_tiny_model

        loaded = build_tiny_model()
    else:
        from gridserve.engines.gemma import load_gemma

        loaded = load_gemma()
    loaded.model.eval()
    return loaded


_CHILD: "Verifier | None" = None
"""The verifier of an isolated Verifier's child process."""


def _start_child(threads: int, parent: int) -> None:
    global _CHILD
    watch_parent(parent)
    _CHILD = Verifier(threads)


def _in_child(fn: "Callable[Concatenate[Verifier, P], T]", *args: "P.args", **kwargs: "P.kwargs") -> T:
    assert _CHILD is not None, "started by the pool's initializer"
    return fn(_CHILD, *args, **kwargs)


@dataclass(frozen=True)
class AuditResult:
    node_id: str
    request_id: str
    problems: tuple[str, ...]
    proof_checked: bool
    largest_draw_miss: float = 0.0
    """Sampled answers: the largest share of mass by which a token missed its seeded draw (0: all inside)."""

    @property
    def ok(self) -> bool:
        return not self.problems


class Verifier:
    """Re-executes requests (torch and the models load on first use): on one worker thread of this process, or,
    `isolated`, in a child process of its own (the gateway's: loading a tokenizer holds the GIL for seconds, which
    would stop the gateway's event loop, its heartbeat intake and probes with it)."""

    def __init__(self, threads: int = 1, *, isolated: bool = False) -> None:
        self.threads = threads
        self.isolated = isolated
        self.models: dict[str, LoadedModel] = {}
        self.pool = self._pool()

    def _pool(self) -> Executor:
        if not self.isolated:
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier")
        spawn = multiprocessing.get_context("spawn")  # not fork: the gateway has threads
        return ProcessPoolExecutor(
            max_workers=1, mp_context=spawn, initializer=_start_child, initargs=(self.threads, os.getpid())
        )

    async def run(self, fn: "Callable[Concatenate[Verifier, P], T]", *args: "P.args", **kwargs: "P.kwargs") -> T:
        """`fn(verifier, *args)` where the models live: on the verifier's thread, or in its process (`fn` then is a
        module-level function or a method of this class, and its arguments are pickled)."""
        loop = asyncio.get_running_loop()
        if not self.isolated:
            return await loop.run_in_executor(self.pool, functools.partial(fn, self, *args, **kwargs))
        try:
            return await loop.run_in_executor(self.pool, functools.partial(_in_child, fn, *args, **kwargs))
        except BrokenProcessPool:  # the child died (out of memory, killed): the next audit starts another
            self.pool = self._pool()
            raise

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def supports(self, model: str) -> bool:
        return model in VERIFIABLE

    def _model(self, model: str) -> "LoadedModel":
        if model not in self.models:
            import torch

            torch.set_num_threads(self.threads)
            self.models[model] = _load(model)
        return self.models[model]

    def prompt_ids(self, loaded: "LoadedModel", job: GenerateRequest) -> list[int]:
        if job.messages is not None:
            return loaded.codec.encode_chat(job.messages)
        return loaded.codec.encode_prompt(job.prompt or "")

    def check(self, job: GenerateRequest, ids: list[int], receipt: Receipt, logprobs: "Claimed" = ()) -> AuditResult:
        """Runs on the verifier thread. `logprobs`: what the node claimed for each of `ids` (when asked)."""
        import torch

        from gridserve.engines.sampling import TokenRule
        from gridserve.trust import proofs

        loaded = self._model(job.model)
        prompt = self.prompt_ids(loaded, job)
        problems: list[str] = []
        if token_commitment(prompt) != receipt.prompt_digest:
            problems.append("audit: prompt digest differs from the verifier's tokenisation of the request")
        picks = receipt.completion_tokens - receipt.resumed
        with torch.inference_mode():
            out = loaded.model(input_ids=torch.tensor([[*prompt, *job.resume, *ids]]), output_hidden_states=True)
        start = len(prompt) + len(job.resume) - 1
        hidden = out.hidden_states[-1][0]
        picks = max(0, min(picks, hidden.shape[0] - start))
        proof_checked = bool(receipt.proof) and proofs.AVAILABLE
        if proof_checked:
            verdict = proofs.verify([hidden[start + i] for i in range(picks)], receipt.proof, job.model)
            if not verdict.ok:
                problems.append(f"audit: activation proof fails ({verdict.evidence()})")
        elif proofs.AVAILABLE and picks:
            problems.append("audit: no activation proof (the engine gives one with every answer)")
        largest = 0.0
        rule = TokenRule(
            job.sampling, loaded.codec.eos_ids, loaded.logit_mask, [*prompt, *job.resume], loaded.codec, job.resume
        )
        if job.sampling.ignore_eos and picks > len(ids):
            problems.append("audit: the answer ended on end-of-sequence, which the request's ignore_eos does not end")
        elif job.sampling.greedy:
            problems += self._greedy(rule, out.logits[0], start, ids, picks, len(job.resume))
        elif job.sampling.seed is not None:
            found, largest = self._sampled(rule, out.logits[0], start, ids, picks, job)
            problems += found
        else:
            problems.append("audit: a sampled answer without a seed cannot be checked (the gateway fixes one)")
        if job.sampling.logprobs is not None:
            problems += self._logprobs(out.logits[0], loaded.logit_mask, start, ids, logprobs)
        return AuditResult(str(receipt.node_id), job.request_id, tuple(problems), proof_checked, largest)

    def _sampled(
        self,
        rule: "TokenRule",
        logits: "torch.Tensor",
        start: int,
        ids: list[int],
        picks: int,
        job: GenerateRequest,
    ) -> tuple[list[str], float]:
        """Each token must be the one the request's seed draws from the verifier's own distribution (the scores of
        the request's TokenRule), within SAMPLE_TOLERANCE of the mass; the position after an answer that ended on
        end-of-sequence must draw one. Also returns the largest miss among the tokens checked
        (bench/verification.py calibrates on it)."""
        from gridserve.engines.sampling import SAMPLE_TOLERANCE, draw_miss

        seed = job.sampling.seed
        assert seed is not None
        largest = 0.0
        for i in range(picks):
            step = len(job.resume) + i
            row = rule.scores(logits[start + i].float(), step)
            tokens = [ids[i]] if i < len(ids) else sorted(rule.eos_ids)
            miss = min((draw_miss(row, job.sampling, seed, step, t) for t in tokens), default=0.0)
            largest = max(largest, miss)
            if miss > SAMPLE_TOLERANCE:
                return [f"audit: sampled token {i} is {tokens[0]}, not the seed's draw (misses it by {miss:.4f})"], miss
            if i < len(ids):
                rule.note(ids[i])
        return [], largest

    @staticmethod
    def _logprobs(
        logits: "torch.Tensor", mask: "torch.Tensor | None", start: int, ids: list[int], claimed: "Claimed"
    ) -> list[str]:
        """Each token's claimed log-probability, and its alternatives' (the likeliest first), must be the model's
        own (engines/sampling.py `log_probs`) within LOGPROB_TOLERANCE; one claim per token."""
        import torch

        from gridserve.engines.sampling import log_probs

        if len(claimed) != len(ids):
            return [f"audit: {len(claimed)} log-probabilities for {len(ids)} tokens"]
        for i, (token, (value, tops)) in enumerate(zip(ids, claimed, strict=True)):
            own = log_probs(logits[start + i].float(), mask)
            mine = max(float(own[token]), -9999.0)
            if abs(mine - value) > LOGPROB_TOLERANCE:
                return [f"audit: token {i}'s log-probability is claimed {value:.4f}, the model gives {mine:.4f}"]
            best = torch.topk(own, len(tops)).values.clamp(min=-9999.0).tolist() if tops else []
            told = sorted(tops, reverse=True)
            if any(abs(a - b) > LOGPROB_TOLERANCE for a, b in zip(best, told, strict=True)):
                return [
                    f"audit: token {i}'s alternatives are claimed {told[:3]}..., the model's likeliest {best[:3]}..."
                ]
        return []

    def _greedy(
        self, rule: "TokenRule", logits: "torch.Tensor", start: int, ids: list[int], picks: int, resumed: int
    ) -> list[str]:
        import torch

        eos = sorted(rule.eos_ids)
        for i in range(picks):
            row = rule.scores(logits[start + i].float(), resumed + i)
            token = ids[i] if i < len(ids) else (eos[0] if eos else -1)
            best = int(torch.argmax(row).item())
            if i < len(ids):
                rule.note(ids[i])
            if best == token or token < 0:
                continue
            gap = float(row[best] - row[token])
            if gap > TIE_TOLERANCE * max(1.0, abs(float(row[best]))):
                return [f"audit: greedy token {i} is {token}, the model gives {best} (logit gap {gap:.4f})"]
        return []

    def greedy_answer(self, job: GenerateRequest) -> list[int]:
        """The reference answer for a canary (runs on the verifier thread)."""
        import torch

        loaded = self._model(job.model)
        ids = self.prompt_ids(loaded, job)
        out_ids: list[int] = []
        with torch.inference_mode():
            for _ in range(job.sampling.max_tokens):
                logits = loaded.model(input_ids=torch.tensor([[*ids, *out_ids]])).logits[0, -1].float()
                if loaded.logit_mask is not None:
                    logits = logits + loaded.logit_mask
                token = int(torch.argmax(logits).item())
                if token in loaded.codec.eos_ids:
                    break
                out_ids.append(token)
        return out_ids


class Auditor:
    def __init__(
        self,
        config: GatewayConfig,
        membership: Membership,
        metrics: GatewayMetrics,
        verifier: Verifier,
        redundancy: "RedundancyChecker | None" = None,
    ) -> None:
        self.config = config
        self.redundancy = redundancy
        """Checks answers of models the verifier cannot run against other nodes' (None: not checked)."""
        self.membership = membership
        self.metrics = metrics
        self.verifier = verifier
        self.rng = random.Random()
        self.pending: set[asyncio.Task[None]] = set()
        self.results: list[AuditResult] = []
        self.mix = TrafficMix()

    def rate(self, node_id: str) -> float:
        summary = self.membership.book.summary(node_id, time.time())
        config = self.config
        return audit_probability(
            summary, rate=config.audit_rate, new_rate=config.audit_new_rate, floor=config.audit_floor
        )

    def maybe_audit(
        self,
        node_id: str,
        job: GenerateRequest,
        ids: list[int],
        receipt: Receipt,
        text: str = "",
        logprobs: "Claimed" = (),
        scored_tokens: Sequence[str] = (),
    ) -> bool:
        """`text`: the answer's text (compared by redundancy where the engine does not name its tokens);
        `logprobs`: each token's, as the node claimed them (when the request asked for them), for `scored_tokens`
        as the node wrote them."""
        self.mix.note(job)
        if not self.verifier.supports(job.model):
            return self._redundant(node_id, job, ids, text, ([lp for lp, _ in logprobs], scored_tokens))
        if self.rng.random() >= self.rate(node_id):
            return False
        task = asyncio.create_task(self._audit(node_id, job, list(ids), receipt, logprobs))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return True

    def _redundant(
        self,
        node_id: str,
        job: GenerateRequest,
        ids: list[int],
        text: str,
        claimed: tuple[list[float], Sequence[str]] = ([], ()),
    ) -> bool:
        """A model the verifier cannot run: audited (at the same rate) by asking other nodes (redundancy.py), with
        its claimed log-probabilities (values, and the tokens as the node wrote them)."""
        if self.redundancy is None or self.rng.random() >= self.rate(node_id):
            return False
        from gridserve.gateway.integrity.redundancy import Answer, scored

        return self.redundancy.check(node_id, job, Answer(tuple(ids), text, scored(ids, *claimed)))

    async def _audit(
        self, node_id: str, job: GenerateRequest, ids: list[int], receipt: Receipt, logprobs: "Claimed" = ()
    ) -> None:
        try:
            result = await self.verifier.run(Verifier.check, job, ids, receipt, logprobs)
        except Exception:  # a verifier bug must not accuse a node: logged, counted, no incident
            log.exception("audit of %s on %s could not run", job.request_id, node_id)
            self.metrics.audits.labels(result="error").inc()
            return
        self.record(result)

    def record(self, result: AuditResult, passed: EventKind = EventKind.AUDIT_PASSED) -> None:
        """Count the verdict; a pass goes on the node's record as `passed` (what vets a new identity), a failure as
        one severe integrity incident, however many checks failed."""
        self.results.append(result)
        del self.results[:-1000]
        self.metrics.audits.labels(result="pass" if result.ok else "fail").inc()
        if result.ok:
            detail = f"request {result.request_id}" + (" (proof checked)" if result.proof_checked else "")
            self.membership.note(NodeEvent(node_id=result.node_id, kind=passed, at=time.time(), detail=detail))
        if result.problems:
            self.membership.note(
                NodeEvent(
                    node_id=result.node_id,
                    kind=EventKind.INCIDENT,
                    at=time.time(),
                    severity=Severity.SEVERE,
                    detail=f"integrity: {'; '.join(result.problems)} (request {result.request_id})",
                )
            )

    def summary(self) -> dict[str, Any]:
        return {
            "audited": len(self.results),
            "failed": sum(1 for r in self.results if not r.ok),
            "proof_checked": sum(1 for r in self.results if r.proof_checked),
            "recent": [r.__dict__ for r in self.results[-20:]],
            "redundancy": self.redundancy.summary() if self.redundancy is not None else None,
        }


DEFAULT_MIX = ((0.0, 1.0, 16), (1.0, 1.0, 16), (0.0, 1.0, 24), (1.0, 1.0, 12))
"""(temperature, top_p, max_tokens) a canary draws from before any client traffic is seen: greedy, or OpenAI's
default sampling."""
CANARY_MAX_TOKENS = 64
"""A canary asks for at most this many tokens, whatever the traffic's (the verifier re-executes every one)."""


class TrafficMix:
    """The sampling settings and lengths of recent client requests, per model: a canary takes one of them, so a
    node cannot tell canaries by their settings (a greedy-only canary lets a node answer greedy requests and no
    others) or by a length of their own."""

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self.seen: dict[str, deque[tuple[float, float, int]]] = {}

    def note(self, job: GenerateRequest) -> None:
        settings = self.seen.setdefault(job.model, deque(maxlen=self.keep))
        sampling = job.sampling
        settings.append((sampling.temperature, sampling.top_p, min(sampling.max_tokens, CANARY_MAX_TOKENS)))

    def draw(self, model: str, rng: random.Random) -> tuple[float, float, int]:
        return rng.choice(self.seen.get(model) or DEFAULT_MIX)


def canary_job(model: str, rng: random.Random, mix: TrafficMix | None = None) -> GenerateRequest:
    """A chat request like a client's (same id format, a prompt from the grammar of ordinary requests, sampling
    settings and length drawn from recent traffic, and a seed whenever it samples, as the gateway gives every
    sampled request)."""
    temperature, top_p, max_tokens = (mix or TrafficMix()).draw(model, rng)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    if not sampling.greedy:
        sampling = sampling.model_copy(update={"seed": rng.getrandbits(63)})
    return GenerateRequest(
        request_id="chatcmpl-" + secrets.token_hex(12),
        model=model,
        messages=(ChatMessage(role="user", content=canary_prompt(rng)),),
        sampling=sampling,
    )


__all__ = ["AuditResult", "Auditor", "TrafficMix", "Verifier", "canary_job"]
