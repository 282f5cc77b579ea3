"""An answer's way from a serving path (a whole-model generation or a pipeline run) to the client: its events with
the request's end recorded by the lifecycle (`drain`), tool calls held back and checked (`Calls`), and the
renderer's bytes, streamed (`sse`) or whole (`collect`); `n` > 1 choices merged (`sse_many`, `collect_many`)."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

from gridserve.gateway.api import tools
from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.sse import DONE, ChunkFormatter
from gridserve.gateway.api.sse import usage as usage_of
from gridserve.gateway.api.surface import Answer, CallStreamer, Renderer
from gridserve.gateway.dispatch.generation import Generation, GenerationFailed
from gridserve.gateway.lifecycle import Finished, Scope, from_generation, from_pipeline
from gridserve.gateway.pipeline.serving import Run
from gridserve.reliability import NodeEvent
from gridserve.types import StreamEvent
from gridserve.types.scheduling import Decision
from gridserve.types.wire import ResponseFormat

if TYPE_CHECKING:
    from gridserve.gateway.api.openai_api import ApiContext

log = logging.getLogger("gridserve.gateway")


class Source:
    """One serving path's events, and how the request ended as the lifecycle records it."""

    scope: Scope

    def events(self) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release the work (the client left, or the answer ended)."""

    def ready(self) -> bool:
        """The next event is a token already here (`events` yields it without waiting)."""
        return False

    def finished(self, status: str, error: str, last: StreamEvent) -> Finished:
        raise NotImplementedError

    def served_by(self) -> str:
        raise NotImplementedError


class WholeModel(Source):
    def __init__(self, ctx: "ApiContext", scope: Scope, gen: Generation, kind: str) -> None:
        self.ctx, self.scope, self.gen, self.kind = ctx, scope, gen, kind
        gen.on_failover = lambda failed: ctx.lifecycle.failover(scope, failed.node_id, failed.detail)

    def events(self) -> AsyncIterator[StreamEvent]:
        return self.gen.events()

    async def close(self) -> None:
        self.gen.close()

    def ready(self) -> bool:
        return self.gen.ready()

    def finished(self, status: str, error: str, last: StreamEvent) -> Finished:
        return from_generation(self.gen, self.kind, status=status, error=error, last=last)

    def served_by(self) -> str:
        return self.gen.segment.node_id


class PipelineRun(Source):
    def __init__(self, ctx: "ApiContext", scope: Scope, run: Run, decision: Decision, kind: str) -> None:
        self.ctx, self.scope, self.run, self.decision, self.kind = ctx, scope, run, decision, kind

    def events(self) -> AsyncIterator[StreamEvent]:
        return self.run.events

    async def close(self) -> None:
        aclose = getattr(self.run.events, "aclose", None)
        if aclose is not None:
            await aclose()

    def finished(self, status: str, error: str, last: StreamEvent) -> Finished:
        return from_pipeline(self.run, self.decision, self.kind, status=status, error=error)

    def served_by(self) -> str:
        return self.decision.chosen or ""


async def drain(ctx: "ApiContext", source: Source) -> AsyncGenerator[StreamEvent]:
    """The path's events, with the request's end recorded by the lifecycle whatever happens; a generation that
    cannot go on ends with an `error` event."""
    status, error = "ok", ""
    last: StreamEvent = {}
    try:
        async for event in source.events():
            if "error" in event:
                status, error = "failed", str(event["error"].get("message", "node failed"))
            last = event
            yield event
    except GenerationFailed as exc:
        status, error = "failed", str(exc)
        yield {"error": {"message": error}}
    except (asyncio.CancelledError, GeneratorExit):
        if status == "ok":  # closed after an error event: still the node's failure, not the client's leaving
            status, error = "cancelled", "client disconnected"
        raise
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if status != "ok":
            await _quietly(source.close())
        end = source.finished(status, error, last)
        settled = ctx.lifecycle.finished(source.scope, end)
        if status != "ok":  # no answer to hold back: stored in the background
            await ctx.lifecycle.commit(end, settled)
    await source.close()
    await ctx.lifecycle.commit(end, settled)  # the answer ends only once its tokens are settled


async def _quietly(awaitable: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await awaitable


class Calls:
    """An answer that may be tool calls: once it starts as calls, not text; read as they are made (`deltas`: a
    stream sends each call's start and its arguments as they come, where its API streams calls), then turned into
    the API's calls (finish_reason `tool_calls`) when it ends by itself. A call that its grammar does not allow
    (only a node not decoding under it can send one) is an integrity incident at the node that served it: the
    client gets the answer as text, or, once calls went out in part, the stream's error (`failure`)."""

    def __init__(self, ctx: "ApiContext", source: Source, answer_format: ResponseFormat) -> None:
        self.ctx, self.source, self.format = ctx, source, answer_format
        self.held: list[str] | None = None
        """The answer so far once it is known to be calls (None: not known yet, or text)."""
        self.decided = False
        self.reading = tools.CallStream()
        self.fed = 0
        """Pieces of `held` read so far."""
        self.streamed = False
        """Some of the calls went out (`deltas` taken)."""
        self.failure = ""
        """Why calls that went out in part cannot be completed ("" while they can)."""

    def hold(self, text: str) -> bool:
        """Whether `text` (the next non-empty piece) is held back as part of calls."""
        if not self.decided:
            self.decided = True
            if not self.format.optional or text.startswith("<"):
                self.held = []
        if self.held is None:
            return False
        self.held.append(text)
        return True

    def deltas(self) -> list[tools.CallDelta]:
        """What the calls held so far say that was not taken yet: each call's start, then its arguments' text."""
        if self.held is None or self.reading.broken:
            return []
        fresh, self.fed = self.held[self.fed :], len(self.held)
        made = self.reading.feed("".join(fresh))
        self.streamed = self.streamed or bool(made)
        return made

    def finish(self, reason: str) -> tuple[tuple[tools.ToolCall, ...], str, str]:
        """(the calls, the finish reason, the held text to send as text when the answer is not whole calls)."""
        text = "".join(self.held or [])
        if self.held is None or reason != "stop":
            return (), reason, "" if self.streamed else text
        problem = tools.validate(text, self.format)
        made = (self.reading.made() if self.streamed else None) or (tools.parse_calls(text) if not problem else None)
        if problem or made is None:
            self._incident(problem or "the answer is not tool calls")
        elif self.streamed and not self.reading.done:
            problem = "its calls are not in the form they were streamed in"
        if self.streamed and problem:
            self.failure = f"the node's tool call was not valid ({problem}); the call cannot be completed"
        if made is None or problem:
            return (), reason, "" if self.streamed else text
        return tuple(made), "tool_calls", ""

    def _incident(self, problem: str) -> None:
        node = self.source.served_by()
        log.warning("invalid tool call from %s: %s", node, problem)
        self.ctx.membership.note(NodeEvent.severe(node, f"integrity: tool call outside its grammar: {problem}"))


async def sse(ctx: "ApiContext", source: Source, fmt: Renderer, calls: Calls | None = None) -> AsyncIterator[bytes]:
    """The answer's SSE bytes. What is made while the next token is already here goes out with it in one write
    (`Source.ready`): a gateway behind on a stream catches up in fewer writes (each a system call), and a stream it
    keeps up with goes out token by token as before."""
    out = [fmt.start()]
    said: list[str] = []
    answer: Answer | None = None
    counting = fmt if isinstance(fmt, ChunkFormatter) and fmt.is_continuous else None
    """Every chunk carries the usage so far: the tokens are counted as they come."""
    streams_calls = fmt if calls is not None and isinstance(fmt, CallStreamer) else None
    """Calls go out as they are made."""
    events = drain(ctx, source)
    async for event in events:
        if "error" in event:
            await events.aclose()  # the request's end recorded now, not when the generator is collected
            out.append(fmt.error(str(event["error"].get("message", "node failed")), "node_failed"))
            yield b"".join(out)
            return
        text = event.get("text", "")
        if counting is not None:
            counting.counted(len(event.get("token_ids") or ()))
        if not (text and calls is not None and calls.hold(text)):
            scored = event.get("logprobs")
            if scored and isinstance(fmt, ChunkFormatter):  # only OpenAI's completions ask for them
                out.append(fmt.scored(text, scored))
            elif text:
                out.append(fmt.text(text))
            said.append(text)
        elif streams_calls is not None and calls is not None:
            out.extend(streams_calls.call_delta(delta) for delta in calls.deltas())
        reason = event.get("finish_reason")
        if reason:
            made: tuple[tools.ToolCall, ...] = ()
            if calls is not None:
                made, reason, held = calls.finish(reason)
                if calls.failure:
                    out.append(fmt.error(calls.failure, "node_failed"))
                    yield b"".join(out)
                    return
                if held:
                    said.append(held)
                    out.append(fmt.text(held))
            answer = _answer(event, reason, made, "".join(said))
            out.append(fmt.end(answer))
        if not source.ready():  # the next event is not here yet (or is the last): send what is made
            yield b"".join(out)
            out = []
    if out:
        yield b"".join(out)
    if answer is not None:
        await fmt.keep(answer)
    yield fmt.close()  # on its own: `sse_many` drops each choice's own close


def _answer(
    final: StreamEvent,
    reason: str,
    made: tuple[tools.ToolCall, ...],
    text: str = "",
    scored: tuple[dict[str, Any], ...] = (),
) -> Answer:
    return Answer(
        reason=reason,
        prompt_tokens=int(final.get("prompt_tokens", 0)),
        completion_tokens=int(final.get("completion_tokens", 0)),
        cached_tokens=int(final.get("cached_tokens", 0)),
        text=text,
        calls=made,
        logprobs=scored,
        stop_sequence=final.get("stop_sequence") if reason == "stop" else None,
    )


async def collect(ctx: "ApiContext", source: Source, fmt: Renderer, calls: Calls | None = None) -> dict[str, Any]:
    parts: list[str] = []
    scored: list[dict[str, Any]] = []
    final: StreamEvent = {}
    async for event in drain(ctx, source):
        if "error" in event:
            raise APIError(
                502,
                f"node failed mid-generation: {event['error'].get('message', '')}",
                type_="api_error",
                code="node_failed",
            )
        parts.append(event.get("text", ""))
        scored.extend(event.get("logprobs", ()))
        final = event
    text, reason = "".join(parts), str(final.get("finish_reason") or "stop")
    made: tuple[tools.ToolCall, ...] = ()
    if calls is not None and text:
        calls.hold(text)
        made, reason, _ = calls.finish(reason)
    answer = _answer(final, reason, made, "" if made else text, () if made else tuple(scored))
    await fmt.keep(answer)
    return fmt.whole(answer)


async def sse_many(
    ctx: "ApiContext", sources: list[Source], fmts: list[ChunkFormatter], calls: list[Calls | None], usage: bool
) -> AsyncIterator[bytes]:
    """`n` choices in one stream: each choice's chunks as they come (each formatter writes its own index), then one
    usage chunk over them all when asked, and one [DONE]. A choice that fails ends the stream (its error chunk);
    leaving early cancels the others (and their work on the nodes)."""
    queue: asyncio.Queue[tuple[int, bytes | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for chunk in sse(ctx, sources[i], fmts[i], calls[i]):
                queue.put_nowait((i, chunk))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(sources))]
    try:
        running = len(tasks)
        while running:
            i, chunk = await queue.get()
            if chunk is None:
                running -= 1
                tasks[i].result()  # a choice that raised ends the stream as it would alone
            elif chunk != DONE:
                yield chunk
                if fmts[i].failed:
                    return
        kept = [f.kept for f in fmts if f.kept is not None]
        if usage and kept:
            yield fmts[0].usage(*_counts(kept))
        yield DONE
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_many(
    ctx: "ApiContext", sources: list[Source], fmts: list[ChunkFormatter], calls: list[Calls | None]
) -> dict[str, Any]:
    """`n` choices collected at once into one answer (its choices in index order, the usage over them all)."""
    tasks = [asyncio.ensure_future(collect(ctx, s, f, c)) for s, f, c in zip(sources, fmts, calls, strict=True)]
    try:
        wholes = await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # one failed: the others are not waited for
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    whole = wholes[0]
    whole["choices"] = [w["choices"][0] for w in wholes]
    whole["usage"] = usage_of(*_counts([f.kept for f in fmts if f.kept is not None]))
    return whole


def _counts(answers: list[Answer]) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of `n` answers to one prompt: the prompt counted once, as OpenAI does."""
    return answers[0].prompt_tokens, sum(a.completion_tokens for a in answers), answers[0].cached_tokens


async def abandon(ctx: "ApiContext", source: Source) -> None:
    """Give up a request opened but not wanted (another choice of its `n` could not be placed, or the client left):
    its work released, its end recorded by the lifecycle as cancelled, as a client's leaving records it."""
    await _quietly(source.close())
    end = source.finished("cancelled", "released: another choice of the request could not be placed", {})
    await ctx.lifecycle.commit(end, ctx.lifecycle.finished(source.scope, end))
