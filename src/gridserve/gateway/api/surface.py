"""One client-facing API over the chat core.

OpenAI's chat and text completions, Anthropic's Messages and OpenAI's Responses all run the same way: the request
becomes a chat (or text) completion request, which becomes the node's job (so routing, receipts, audits, failover and
tool grammars are the same for all of them), and the node's events come back through a `Renderer` in the API's own
shapes. A `Surface` names the three things that differ: how a body is read, how the answer is written, how an
error is written."""

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.api.tools import CallDelta, ToolCall

if TYPE_CHECKING:
    from gridserve.gateway.api.openai_api import ApiContext, Reply
    from gridserve.gateway.api.schemas import SamplingFields
    from gridserve.gateway.tenancy import ApiKey


@dataclass(frozen=True)
class Answer:
    """How an answer ended, with what it said (`text`: the whole answer's text; "" when it is calls)."""

    reason: str
    """OpenAI's finish reason: stop, length or tool_calls."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    text: str = ""
    calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[dict[str, Any], ...] = ()
    """One OpenAI chat logprob entry per token of the text, when the request asked for them."""
    stop_sequence: str | None = None
    """The request's stop string that ended the answer (reason `stop`), as the node reported it."""


class Renderer(Protocol):
    """One answer in an API's shapes: streamed (`start`, `text`..., `end`, `close`) or whole."""

    def start(self) -> bytes:
        """What opens the stream (before the first token)."""
        ...

    def text(self, text: str) -> bytes: ...

    def end(self, answer: Answer) -> bytes:
        """What follows the last text once the answer has ended (its calls, finish reason, usage)."""
        ...

    async def keep(self, answer: Answer) -> None:
        """What the API keeps of the answer (whole text), once its tokens are settled and before the stream's last
        bytes or the whole answer go out (the Responses API stores it for `previous_response_id`)."""
        ...

    def close(self) -> bytes:
        """The stream's last bytes, sent once the answer's tokens are settled and kept."""
        ...

    def error(self, message: str, code: str) -> bytes:
        """The stream cannot go on (its node failed and no other could continue it)."""
        ...

    def whole(self, answer: Answer) -> dict[str, Any]: ...


@runtime_checkable
class CallStreamer(Protocol):
    """A Renderer that sends tool calls as they are made: each call's start, then its arguments' text
    (`tools.CallDelta`); its `end` then closes the calls streamed instead of sending them whole."""

    def call_delta(self, delta: CallDelta) -> bytes: ...


@dataclass(frozen=True)
class Surface:
    name: str
    """The route's label (logs)."""
    kind: str
    """The core request it becomes: `chat` or `text`."""
    id_prefix: str
    read: "Callable[[ApiContext, bytes], Awaitable[SamplingFields]]"
    """The body as the core request (a 4xx APIError when it cannot be)."""
    renderer: "Callable[[ApiContext, SamplingFields, str, str], Renderer]"
    """(context, request, response id, model) -> how its answer is written."""
    error: Callable[[APIError], bytes]
    """An error's body in the API's own format."""
    params: tuple[tuple[str, str], ...] = ()
    """(chat completions' name, this API's name) of the parameters it names otherwise, longest first: an error the
    core raises after the translation names the parameter the client sent."""
    detached: "Callable[[ApiContext, SamplingFields, Surface, ApiKey | None], Awaitable[Reply | None]] | None" = None
    """Answers a request it runs in the background itself (the Responses API's `background`), else None: the
    request is answered as it runs."""

    def renamed(self, exc: APIError) -> APIError:
        """`exc` naming this API's parameter where it names a chat completions one (the same error otherwise)."""
        param = exc.param or ""
        for chat, own in self.params:
            if param == chat or param.startswith(chat + ".") or param.startswith(chat + "["):
                message = re.sub(rf"(?<![\w.]){re.escape(chat)}(?![\w])", own, exc.message)
                out = APIError(exc.status, message, type_=exc.type, code=exc.code, param=own + param[len(chat) :])
                out.headers = exc.headers
                return out
        return exc


def openai_error(exc: APIError) -> bytes:
    return bytes(exc.response().body)
