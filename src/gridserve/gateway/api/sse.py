"""OpenAI response bodies, streamed (SSE) and whole. Chunks are built from pre-encoded pieces so the
per-token cost is one JSON string encoding and a few byte joins."""

import time
from collections.abc import Iterable
from typing import Any

import orjson

from gridserve.gateway.api.surface import Answer

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

    def start(self) -> bytes:
        return self.role()

    def end(self, answer: Answer) -> bytes:
        calls = self.tool_calls([c.openai(index=i) for i, c in enumerate(answer.calls)]) if answer.calls else b""
        counts = (answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens)
        return calls + self.finish(answer.reason) + (self.usage(*counts) if self.include_usage else b"")

    async def keep(self, answer: Answer) -> None:
        self.kept = answer

    def close(self) -> bytes:
        return DONE

    def role(self) -> bytes:
        if not self.chat:
            return b""
        return (
            b"data: "
            + self._head
            + b',"choices":[{"index":%d,"delta":{"role":"assistant","content":""},' % self.index
            + b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def text(self, text: str) -> bytes:
        return self._pre + orjson.dumps(text) + self._post

    def scored(self, text: str, entries: list[dict[str, Any]]) -> bytes:
        """A chunk of text with its tokens' log-probabilities (the node's chat entries, one per token)."""
        if self.chat:
            choice: dict[str, Any] = {"index": self.index, "delta": {"content": text}, "logprobs": {"content": entries}}
        else:
            choice = {"index": self.index, "text": text, "logprobs": self._legacy(entries)}
        choice["finish_reason"] = None
        return b"data: " + self._head + b',"choices":' + orjson.dumps([choice]) + b"}\n\n"

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

    def tool_calls(self, calls: list[dict[str, Any]]) -> bytes:
        """One chunk with the answer's tool calls, whole (each with its `index`), as OpenAI streams them."""
        delta = {"tool_calls": calls}
        choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}
        return b"data: " + self._head + b',"choices":' + orjson.dumps([choice]) + b"}\n\n"

    def finish(self, reason: str) -> bytes:
        choice: dict[str, Any] = {"index": self.index, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return b"data: " + self._head + b',"choices":' + orjson.dumps([choice]) + b"}\n\n"

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
