"""OpenAI response bodies, streamed (SSE) and whole. Chunks are built from pre-encoded pieces so the
per-token cost is one JSON string encoding and a few byte joins."""

import time
from collections.abc import Iterable
from typing import Any

import orjson

from gridserve.gateway.api.surface import Answer
from gridserve.gateway.api.tools import CallDelta

DONE = b"data: [DONE]\n\n"


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached`: prompt tokens the node took from its prefix cache (the node's own count,
    kept within the prompt), as OpenAI reports its prompt caching."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": max(0, min(cached, prompt))},
    }


class ChunkFormatter:
    """OpenAI's chat and text completions (a Renderer: gateway/api/surface.py)."""

    def __init__(
        self,
        *,
        chat: bool,
        response_id: str,
        model: str,
        created: int | None = None,
        include_usage: bool = False,
        index: int = 0,
    ) -> None:
        """`index`: the choice this formatter writes (`n` > 1: one formatter a choice)."""
        self.chat = chat
        self.include_usage = include_usage
        self.index = index
        self.kept: Answer | None = None
        """The answer once it has ended (what the merged usage of `n` choices adds up)."""
        self.failed = False
        self.calls_streamed = False
        """Tool calls went out as they were made (`call_delta`)."""
        self._offset = 0
        """Characters of log-probabilities' tokens so far (the text completions' `text_offset`)."""
        self.id = response_id
        self.model = model
        self.created = created or int(time.time())
        head = {
            "id": response_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": model,
        }
        self._head = orjson.dumps(head)[:-1]  # without the closing brace
        if chat:
            self._pre = b"data: " + self._head + b',"choices":[{"index":%d,"delta":{"content":' % index
            self._post = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._pre = b"data: " + self._head + b',"choices":[{"index":%d,"text":' % index
            self._post = b',"logprobs":null,"finish_reason":null}]}\n\n'
        self._prompt: int | None = None
        """The prompt's tokens when every chunk carries the usage so far (`continuous`), else None."""
        self._completion = 0
        """Tokens streamed so far (`counted`)."""

    def continuous(self, prompt_tokens: int) -> None:
        """Every chunk from now on carries the usage so far (vLLM's `continuous_usage_stats`), counting the prompt as
        `prompt_tokens` (the gateway's count; the last chunk's usage is the node's)."""
        self._prompt = prompt_tokens

    @property
    def is_continuous(self) -> bool:
        return self._prompt is not None

    def counted(self, tokens: int) -> None:
        """`tokens` more of the answer's tokens are in the chunks that follow."""
        self._completion += tokens

    def _chunk(self, body: bytes) -> bytes:
        """A chunk's `data:` line from its JSON object's bytes, with the usage so far when continuous."""
        if self._prompt is None:
            return b"data: " + body + b"\n\n"
        so_far = {
            "prompt_tokens": self._prompt,
            "completion_tokens": self._completion,
            "total_tokens": self._prompt + self._completion,
        }
        return b"data: " + body[:-1] + b',"usage":' + orjson.dumps(so_far) + b"}\n\n"

    def start(self) -> bytes:
        return self.role()

    def end(self, answer: Answer) -> bytes:
        if self._prompt is not None:  # the node's own counts from here on
            self._prompt, self._completion = answer.prompt_tokens or self._prompt, answer.completion_tokens
        whole = answer.calls if not self.calls_streamed else ()
        calls = self.tool_calls([c.openai(index=i) for i, c in enumerate(whole)]) if whole else b""
        counts = (answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens)
        return calls + self.finish(answer.reason) + (self.usage(*counts) if self.include_usage else b"")

    async def keep(self, answer: Answer) -> None:
        self.kept = answer

    def close(self) -> bytes:
        return DONE

    def role(self) -> bytes:
        if not self.chat:
            return b""
        return self._chunk(
            self._head
            + b',"choices":[{"index":%d,"delta":{"role":"assistant","content":""},' % self.index
            + b'"logprobs":null,"finish_reason":null}]}'
        )

    def text(self, text: str) -> bytes:
        if self._prompt is None:
            return self._pre + orjson.dumps(text) + self._post
        return self._chunk(self._pre[6:] + orjson.dumps(text) + self._post[:-2])

    def scored(self, text: str, entries: list[dict[str, Any]]) -> bytes:
        """A chunk of text with its tokens' log-probabilities (the node's chat entries, one per token)."""
        if self.chat:
            choice: dict[str, Any] = {"index": self.index, "delta": {"content": text}, "logprobs": {"content": entries}}
        else:
            choice = {"index": self.index, "text": text, "logprobs": self._legacy(entries)}
        choice["finish_reason"] = None
        return self._chunk(self._head + b',"choices":' + orjson.dumps([choice]) + b"}")

    def _legacy(self, entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """The text completions' shape of log-probabilities (each token's offset counts from the answer's start)."""
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(entry)
            offsets.append(self._offset)
            self._offset += len(entry["token"])
        return {
            "tokens": [e["token"] for e in tokens],
            "token_logprobs": [e["logprob"] for e in tokens],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", ())} for e in tokens],
            "text_offset": offsets,
        }

    def call_delta(self, delta: CallDelta) -> bytes:
        """A streamed call's start (its id and name) or more of its arguments, in OpenAI's chunk shape; the calls
        are then not sent again whole at the end."""
        self.calls_streamed = True
        call: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
        if delta.name is not None:
            call |= {"id": delta.id, "type": "function", "function": {"name": delta.name, "arguments": ""}}
        return self.tool_calls([call])

    def tool_calls(self, calls: list[dict[str, Any]]) -> bytes:
        """One chunk with the answer's tool calls, whole (each with its `index`), as OpenAI streams them."""
        delta = {"tool_calls": calls}
        choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._chunk(self._head + b',"choices":' + orjson.dumps([choice]) + b"}")

    def finish(self, reason: str) -> bytes:
        choice: dict[str, Any] = {"index": self.index, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return self._chunk(self._head + b',"choices":' + orjson.dumps([choice]) + b"}")

    def usage(self, prompt: int, completion: int, cached: int = 0) -> bytes:
        body = orjson.dumps(usage(prompt, completion, cached))
        return b"data: " + self._head + b',"choices":[],"usage":' + body + b"}\n\n"

    def error(self, message: str, code: str) -> bytes:
        self.failed = True
        body = {"error": {"message": message, "type": "api_error", "param": None, "code": code}}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def whole(self, answer: Answer) -> dict[str, Any]:
        text, reason = answer.text, answer.reason
        tool_calls = [c.openai() for c in answer.calls]
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
            scored = {"content": list(answer.logprobs)} if answer.logprobs else None
            choice: dict[str, Any] = {
                "index": self.index,
                "message": message,
                "logprobs": scored,
                "finish_reason": reason,
            }
        else:
            scored = self._legacy(answer.logprobs) if answer.logprobs else None
            choice = {"index": self.index, "text": text, "logprobs": scored, "finish_reason": reason}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens),
        }
