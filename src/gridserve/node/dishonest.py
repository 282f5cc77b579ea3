"""Dishonest node modes, to show that the gateway catches them (tests and demos only): refused unless the
node is started with `--allow-dishonest`.

- `inflate_tokens`: the receipt claims twice the tokens generated (a settlement fraud);
- `replay_receipt`: every receipt after the first is the first one again (an old receipt replayed);
- `spoof_identity`: receipts are signed by another key that claims this node's id (forgery);
- `truncate`: the answer stops after half its tokens but still reports `finish_reason: "length"`;
- `alter_output`: every 4th token is replaced by another (text "?") and the receipt commits to that;
- `wrong_model` / `lazy_compute` (tiny engine): other weights / the last layer skipped, the real digest claimed;
- `corrupt_tool_args`: in answers that call tools, every digit of the calls becomes "x" (the arguments no longer
  match their tool; the kind of tool-call quality providers of one model are found to differ in), other answers
  honest;
- `flatter_logprobs`: every token's log-probability claimed 0 (the model "certain" of it, as a node that invents
  the numbers instead of computing them might), tokens honest;
- `refuse`: every generate call is answered 400 with the node's own text (an advertisement, a link), as if the
  request were invalid.
"""

from dataclasses import dataclass, field

from gridserve.trust import Identity
from gridserve.types import TokenEvent

MODES = (
    "inflate_tokens",
    "replay_receipt",
    "spoof_identity",
    "truncate",
    "alter_output",
    "wrong_model",
    "lazy_compute",
    "refuse",
    "omit_proof",
    "corrupt_tool_args",
    "flatter_logprobs",
)
REFUSAL_TEXT = "this request cannot run here; see http://evil.example/upgrade"
"""What a `refuse` node answers: text no client may see."""
ENGINE_MODES = frozenset({"wrong_model", "lazy_compute"})


class DishonestyRefused(Exception):
    def __init__(self) -> None:
        super().__init__("dishonest modes are for tests only; start the node with --allow-dishonest to use them")


@dataclass
class Dishonesty:
    modes: frozenset[str] = frozenset()
    _first_receipt: bytes | None = None
    _forger: Identity = field(default_factory=Identity.generate)

    @classmethod
    def of(cls, modes: list[str], *, allowed: bool) -> "Dishonesty":
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown dishonest mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
        if modes and not allowed:
            raise DishonestyRefused()
        return cls(modes=frozenset(modes))

    @property
    def refuses(self) -> bool:
        return "refuse" in self.modes

    def claimed_tokens(self, real: int) -> int:
        return 2 * real if "inflate_tokens" in self.modes else real

    def signer(self, honest: Identity) -> Identity:
        return self._forger if "spoof_identity" in self.modes else honest

    def replayed(self, fresh: bytes) -> bytes:
        if "replay_receipt" not in self.modes:
            return fresh
        if self._first_receipt is None:
            self._first_receipt = fresh
        return self._first_receipt

    def alter(self, event: TokenEvent, index: int, calling: bool = False) -> TokenEvent:
        """`alter_output`: token number `index` (0-based) of the answer, replaced if index % 4 == 3;
        `omit_proof`: the last event without its activation proof; `corrupt_tool_args`: in an answer that calls
        tools (`calling`), a digit's token replaced by another, shown as "x"; `flatter_logprobs`: each
        log-probability 0."""
        if "omit_proof" in self.modes and event.proof:
            event = event.model_copy(update={"proof": ""})
        if "flatter_logprobs" in self.modes and event.logprobs:
            event = event.model_copy(
                update={"logprobs": tuple(lp.model_copy(update={"logprob": 0.0}) for lp in event.logprobs)}
            )
        if "corrupt_tool_args" in self.modes and calling and event.token_ids and event.text.isdigit():
            return event.model_copy(update={"token_ids": (event.token_ids[0] ^ 1,), "text": "x" * len(event.text)})
        if "alter_output" not in self.modes or not event.token_ids or index % 4 != 3:
            return event
        return event.model_copy(update={"token_ids": (event.token_ids[0] ^ 1,), "text": "?"})

    def truncate_after(self, max_tokens: int) -> int | None:
        return max(1, max_tokens // 2) if "truncate" in self.modes else None
