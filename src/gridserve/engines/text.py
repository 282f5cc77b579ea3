"""Streaming text helpers shared by engines: stop strings and incremental detokenisation."""

from collections.abc import Callable, Sequence


class StopMatcher:
    """Cuts the stream at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the stream (None: none did)."""

    def feed(self, delta: str) -> str:
        """Returns the text safe to emit now. After a stop string is seen, `stopped` is True."""
        if self.stopped:
            return ""
        text = self._held + delta
        if not self.stops:
            return text
        cut, self.matched = self._first_complete(text)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        hold = self._partial_tail(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def _first_complete(self, text: str) -> tuple[int, str | None]:
        """Start of the stop string that completes first in the stream (earliest end), and that string; or -1.

        Cutting at the earliest *end* rather than the earliest start makes the result independent of how
        the text was split into chunks, also when one stop string contains another."""
        best_end, cut, found = -1, -1, None
        for stop in self.stops:
            i = text.find(stop)
            if i >= 0 and (best_end < 0 or (i + len(stop), i) < (best_end, cut)):
                best_end, cut, found = i + len(stop), i, stop
        return cut, found

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_tail(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    best = max(best, n)
                    break
        return best


class IncrementalDecoder:
    """Emits text for a growing list of token ids, never splitting a multi-byte character."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta

    def finish(self) -> str:
        text = self._decode(self.ids)
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta
