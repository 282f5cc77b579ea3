"""`Finished` from each serving path: a whole-model generation (its segments) or a pipeline run (its stages)."""

import time

from gridserve.gateway.dispatch.generation import Generation
from gridserve.gateway.lifecycle.record import Finished, NodeWork, ReceiptInput, Timing
from gridserve.gateway.ops.outcomes import segment_split
from gridserve.gateway.pipeline.serving import Run
from gridserve.types import NodeId, StreamEvent
from gridserve.types.scheduling import Decision


def from_generation(gen: Generation, endpoint: str, *, status: str, error: str, last: StreamEvent) -> Finished:
    decision = gen.decision
    work = []
    for segment in gen.segments:
        candidate = decision.candidate(segment.node_id)
        receipt = None
        if segment.outcome == "ok":
            unnamed = (segment.unnamed_chunks, segment.unnamed_chars) if segment.unnamed_chunks else None
            text = "".join(segment.unnamed_text)
            receipt = ReceiptInput(
                segment.job,
                tuple(segment.ids),
                segment.final,
                unnamed,
                text,
                tuple(segment.logprobs),
                tuple(segment.scored_tokens),
            )
        work.append(
            NodeWork(
                node_id=segment.node_id,
                outcome=segment.outcome,
                tokens=segment.tokens,
                price_per_mtok=candidate.price_per_mtok if candidate else None,
                receipt=receipt,
                detail=segment.detail,
            )
        )
    first, fin = gen.first, gen.segment
    node_ttft = fin.first_at - fin.started
    return Finished(
        decision=decision,
        endpoint=endpoint,
        status=status,
        error=error,
        served_by=fin.node_id,
        work=tuple(work),
        prompt_tokens=int(last.get("prompt_tokens", 0)),
        completion_tokens=int(last.get("completion_tokens", len(gen.emitted))),
        duration_s=time.monotonic() - first.started,
        timing=Timing(
            ttft_s=first.first_at - first.started,
            itl_s=(fin.last_at - fin.first_at) / (fin.tokens - 1) if fin.tokens > 1 else None,
            node_ttft_s=node_ttft,
            fresh_ttft_s=node_ttft if fin.resumed_from == 0 else None,
            split=segment_split(fin),
        ),
        failovers=gen.failovers,
        hedged=gen.stream.hedged,
        cached_tokens=int(last.get("cached_tokens", 0)),
        log_fields={"route": [s.as_dict() for s in gen.segments]},
    )


def from_pipeline(run: Run, decision: Decision, endpoint: str, *, status: str, error: str) -> Finished:
    """Each stage node that served the run is one part of the work: paid for the tokens generated while it was
    in the chain, at its share of the decided price (its layers over the model's)."""
    result, session = run.result, run.session
    count = result.completion_tokens
    chosen = decision.chosen or ""
    candidate = decision.candidate(chosen)
    price = candidate.price_per_mtok if candidate else None
    left = {node: step for node, step, _ in result.failed}
    joined: dict[str, int] = {}
    for replan in session.replans:
        for node in replan.replaced_by:
            joined.setdefault(node, replan.at_step)
    work = []
    for timing in session.timings.values():
        node = timing.node_id
        n_layers = next((r.n_layers for r in session.chain if r.node_id == node), 0) or _layers_of(run, node)
        begin, end = min(joined.get(node, 0), count), min(left.get(node, count), count)
        share = (timing.end - timing.start) / n_layers if n_layers else 0.0
        failed = node in left
        work.append(
            NodeWork(
                node_id=NodeId(node),
                outcome="failed" if failed else (status if status != "ok" else "ok"),
                tokens=max(0, end - begin),
                price_per_mtok=None if price is None else price * share,
                layers=(timing.start, timing.end),
                detail=next((why for n, _, why in result.failed if n == node), ""),
            )
        )
    ttft = None if result.first_at is None else result.first_at - result.started
    itl = None
    if result.first_at is not None and result.last_at is not None and count > 1:
        itl = (result.last_at - result.first_at) / (count - 1)
    return Finished(
        decision=decision,
        endpoint=endpoint,
        status=status,
        error=error,
        served_by=chosen,
        work=tuple(work),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=count,
        duration_s=time.monotonic() - result.started,
        timing=Timing(ttft_s=ttft, itl_s=itl, node_ttft_s=ttft, fresh_ttft_s=None),
        failovers=len(session.replans),
        pipeline=True,
        log_fields={
            "chain": ",".join(r.node_id for r in session.chain),
            "session": session.session,
            "replans": [r.__dict__ for r in session.replans],
        },
    )


def _layers_of(run: Run, node: str) -> int:
    """The model's layer count, from any stage of the chain (a stage that left it still ran the same model)."""
    return next((r.n_layers for r in run.session.chain), 0)


__all__ = ["from_generation", "from_pipeline"]
