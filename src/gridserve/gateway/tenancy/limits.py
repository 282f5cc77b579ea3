"""Per-key limits that hold across the gateways of one database, decided in memory.

Each gateway counts what it admitted for each key (requests and tokens in the current minute, spend and errors for
ever, requests in flight now) and learns the other gateways' counts from the store every `sync_interval_s`
(gateway/tenancy/sync.py). A request is admitted when its key's total, its own counts plus the others' last known
ones, leaves room: no database round trip on a request's path. What two gateways admit in the same sync interval
can overshoot a limit by that much; the requests-per-minute figure over three gateways is measured by
bench/tenants.py.

- **Requests and tokens per minute** count in fixed windows of the wall clock's minutes. A request reserves its
  prompt and `max_tokens` when admitted (so a burst of long answers cannot pass a tokens limit), and the reservation
  becomes what it used when it ends.
- **Concurrency** counts requests in flight (a stopped gateway's count ages out of the others' sums).
- **Budget** counts settled spend (the settlement ledger's amounts); a key is refused once its spend reaches its
  budget, so it overspends by at most what its requests in flight when it ran out cost.

Refusals are OpenAI's: 429 with `Retry-After` and the `x-ratelimit-*` headers, which admitted answers carry too.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gridserve.gateway.api.errors import APIError
from gridserve.gateway.tenancy.keys import ApiKey

WINDOW_S = 60.0
CONCURRENCY_RETRY_S = 1
LEASE_RETRY_S = 1
"""A budget with room left held elsewhere: an idle gateway gives its unspent lease back within seconds."""


@dataclass
class Counts:
    """One key's counters as one gateway holds them: its own, or the sum of the others'."""

    window: float = 0.0
    requests: int = 0
    tokens: int = 0
    spent_usd: float = 0.0
    errors: int = 0
    inflight: int = 0

    def roll(self, window: float) -> None:
        """Start a new minute: the per-minute counts restart (spend, errors and what is in flight carry on)."""
        if window != self.window:
            self.window, self.requests, self.tokens = window, 0, 0


@dataclass
class KeyCounts:
    own: Counts = field(default_factory=Counts)
    others: Counts = field(default_factory=Counts)
    dirty: bool = False
    """Own counts moved since the store last had them."""
    lease_usd: float | None = None
    """The spend this gateway may reach on the key's budget (gateway/tenancy/leases.py); None: no lease yet."""
    last_admit: float = 0.0
    """When this gateway last admitted a request of the key (an idle key's unspent lease is given back)."""

    def lease_holds(self) -> bool:
        """Whether this gateway may admit another request on the key's budget: spend below its lease."""
        return self.lease_usd is not None and self.own.spent_usd < self.lease_usd


class OverLimit(APIError):
    """A request over one of its key's limits: 429 in OpenAI's shape."""

    def __init__(self, message: str, *, code: str, retry_after_s: int | None, headers: list[tuple[bytes, bytes]]):
        super().__init__(
            429, message, type_="rate_limit_exceeded" if retry_after_s is not None else "insufficient_quota", code=code
        )
        extra = [(b"retry-after", str(retry_after_s).encode())] if retry_after_s is not None else []
        self.headers = [*extra, *headers]


class Admission:
    """One admitted request of a key: what it reserved, and what it used once it ends (`close`)."""

    __slots__ = (
        "closed",
        "counts",
        "failed",
        "headers",
        "key",
        "queue_wait_s",
        "releases",
        "reserved",
        "spent_usd",
        "tokens",
        "window",
    )

    def __init__(self, key: ApiKey, counts: KeyCounts | None, window: float, reserved: int) -> None:
        self.key, self.counts, self.window, self.reserved = key, counts, window, reserved
        self.tokens = 0
        self.spent_usd = 0.0
        self.failed = False
        self.closed = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.queue_wait_s = 0.0
        """How long the request waited at the gateway for room on a node (gateway/tenancy/queue.py)."""
        self.releases: list[Callable[[], None]] = []
        """Run when the request is over (its place in the gateway's queue accounting)."""

    def charge(self, tokens: int, spent_usd: float, *, failed: bool) -> None:
        """What one of the request's answers used (a request with n choices has several); an answer that ends
        after the request (a client that left, its answer abandoned) counts at once."""
        if self.closed:
            self._count(tokens, spent_usd, failed)
            return
        self.tokens += tokens
        self.spent_usd += spent_usd
        self.failed = self.failed or failed

    def close(self) -> None:
        """The request is over: its reservation becomes what it used; its place in flight frees."""
        if self.closed:
            return
        self.closed = True
        for release in self.releases:
            release()
        if self.counts is not None:
            self.counts.own.inflight -= 1
            self._count(self.tokens - self.reserved, self.spent_usd, self.failed)

    def _count(self, tokens: int, spent_usd: float, failed: bool) -> None:
        if self.counts is None:
            return
        own = self.counts.own
        if own.window == self.window:
            own.tokens += tokens
        own.spent_usd += spent_usd
        own.errors += int(failed)
        self.counts.dirty = True


CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("gridserve_caller", default=None)
"""The id of the API key of the request this task serves (what it stores, such as a response, is that key's)."""
CURRENT: contextvars.ContextVar[Admission | None] = contextvars.ContextVar("gridserve_admission", default=None)
"""The admission of the request this task serves (its lifecycle charges what it used to it)."""


class Limiter:
    """Admits requests against their keys' limits; the one owner of the per-key counters."""

    def __init__(self, clock: Callable[[], float] = time.time, *, leases: bool = False) -> None:
        self.clock = clock
        self.keys: dict[str, KeyCounts] = {}
        self.leases = leases
        """Budgets are spent from leases (gateway/tenancy/leases.py): a request on a budget is admitted only within
        this gateway's live lease. Off: only the spend known here and from the others counts."""

    def window(self, now: float) -> float:
        return math.floor(now / WINDOW_S) * WINDOW_S

    def counts(self, key_id: str) -> KeyCounts:
        found = self.keys.get(key_id)
        if found is None:
            found = self.keys[key_id] = KeyCounts()
        return found

    def admit(self, key: ApiKey, tokens: int) -> Admission:
        """Count a request reserving `tokens` against `key`, or raise OverLimit (nothing counted)."""
        if key.static:  # --api-key keys: no limits, and no counts in the store
            return Admission(key, None, 0.0, 0)
        now = self.clock()
        window = self.window(now)
        counts = self.counts(key.key_id)
        own, others = counts.own, counts.others
        own.roll(window)
        others.roll(window)
        reset_in_s = window + WINDOW_S - now
        leased = not self.leases or counts.lease_holds()
        refused = _refusal(key, own, others, tokens, max(1, math.ceil(reset_in_s)), leased=leased)
        if refused is not None:  # the headers as they stand, nothing counted
            message, code, retry_after_s = refused
            headers = _headers(key, own, others, reset_in_s)
            raise OverLimit(message, code=code, retry_after_s=retry_after_s, headers=headers)
        own.requests += 1
        own.tokens += tokens
        own.inflight += 1
        counts.dirty = True
        counts.last_admit = now
        admission = Admission(key, counts, window, tokens)
        admission.headers = _headers(key, own, others, reset_in_s)
        return admission


def _refusal(
    key: ApiKey, own: Counts, others: Counts, tokens: int, reset_s: int, *, leased: bool = True
) -> tuple[str, str, int | None] | None:
    """(message, code, Retry-After seconds or None) for the first of `key`'s limits that a request reserving `tokens`
    is over (the budget checked first); None when it is within them all. `leased`: this gateway holds a lease on the
    budget with room left."""
    p = key.policy
    spent = own.spent_usd + others.spent_usd
    if p.budget_usd is not None and spent >= p.budget_usd:
        message = f"Key {key.name!r} has spent its budget ({spent:.6f} of {p.budget_usd} USD)."
        return message, "insufficient_quota", None
    if p.budget_usd is not None and not leased:
        message = (
            f"Key {key.name!r} has committed its budget: {spent:.6f} of {p.budget_usd} USD spent, the rest held by "
            f"requests in flight or by other gateways. Try again in {LEASE_RETRY_S} s."
        )
        return message, "insufficient_quota", LEASE_RETRY_S
    if p.rpm is not None and own.requests + others.requests + 1 > p.rpm:
        message = f"Rate limit reached for key {key.name!r}: {p.rpm} requests per minute. Try again in {reset_s} s."
        return message, "rate_limit_exceeded", reset_s
    if p.tpm is not None and own.tokens + others.tokens + tokens > p.tpm:
        too_big = tokens > p.tpm
        why = (
            f"this request alone needs {tokens} tokens (prompt and max_tokens)"
            if too_big
            else f"Try again in {reset_s} s"
        )
        message = f"Rate limit reached for key {key.name!r}: {p.tpm} tokens per minute; {why}."
        return message, "rate_limit_exceeded", reset_s
    if p.max_concurrency is not None and own.inflight + others.inflight + 1 > p.max_concurrency:
        message = f"Key {key.name!r} has {p.max_concurrency} requests in flight, its limit."
        return message, "concurrency_limit_exceeded", CONCURRENCY_RETRY_S
    return None


def _headers(key: ApiKey, own: Counts, others: Counts, reset_s: float) -> list[tuple[bytes, bytes]]:
    """OpenAI's rate-limit headers for the limits `key` has."""
    out: list[tuple[bytes, bytes]] = []
    p = key.policy
    if p.rpm is not None:
        left = max(0, p.rpm - own.requests - others.requests)
        out += [
            (b"x-ratelimit-limit-requests", str(p.rpm).encode()),
            (b"x-ratelimit-remaining-requests", str(left).encode()),
            (b"x-ratelimit-reset-requests", _duration(reset_s).encode()),
        ]
    if p.tpm is not None:
        left = max(0, p.tpm - own.tokens - others.tokens)
        out += [
            (b"x-ratelimit-limit-tokens", str(p.tpm).encode()),
            (b"x-ratelimit-remaining-tokens", str(left).encode()),
            (b"x-ratelimit-reset-tokens", _duration(reset_s).encode()),
        ]
    return out


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if round(seconds * 1000) < 1000:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"
