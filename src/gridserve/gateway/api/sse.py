"""OpenAI response bodies, streamed (SSE) and whole. Chunks are built from pre-encoded pieces so the
per-token cost is one JSON string encoding and a few byte joins."""

import time
from typing import Any

import orjson

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
    def __init__(self, *, chat: bool, response_id: str, model: str, created: int | None = None) -> None:
        self.chat = chat
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
            self._pre = b"data: " + self._head + b',"choices":[{"index":0,"delta":{"content":'
            self._post = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._pre = b"data: " + self._head + b',"choices":[{"index":0,"text":'
            self._post = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        if not self.chat:
            return b""
        return (
            b"data: " + self._head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def text(self, text: str) -> bytes:
        return self._pre + orjson.dumps(text) + self._post

    def tool_calls(self, calls: list[dict[str, Any]]) -> bytes:
        """One chunk with the answer's tool calls, whole (each with its `index`), as OpenAI streams them."""
        delta = {"tool_calls": calls}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return b"data: " + self._head + b',"choices":' + orjson.dumps([choice]) + b"}\n\n"

    def finish(self, reason: str) -> bytes:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return b"data: " + self._head + b',"choices":' + orjson.dumps([choice]) + b"}\n\n"

    def usage(self, prompt: int, completion: int, cached: int = 0) -> bytes:
        body = orjson.dumps(usage(prompt, completion, cached))
        return b"data: " + self._head + b',"choices":[],"usage":' + body + b"}\n\n"

    @staticmethod
    def error(message: str, code: str) -> bytes:
        body = {"error": {"message": message, "type": "api_error", "param": None, "code": code}}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def whole(
        self,
        text: str,
        reason: str,
        prompt: int,
        completion: int,
        cached: int = 0,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(prompt, completion, cached),
        }
