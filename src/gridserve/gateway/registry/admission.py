"""Admission limits on what a sender the gateway does not yet trust can make it do.

- **Registrations** pass two token buckets: one per source address (`registration_rate` a second, bursts of
  `registration_burst`) and one for all sources together (`registration_rate_total`, bursts ten times that). A
  registration over either limit is refused with 429 and a `Retry-After` before its signature is even checked.
  Re-registrations count too: a node agent retries with backoff, so a limited fleet comes back within seconds.
- **Refused messages** are written to the store and the log at most `rejections_recorded_per_s` a second
  (bursts ten times that); the rest are only counted (`gridserve_protocol_rejections_total`), and the next record
  says how many went unrecorded. A flood of garbage costs the gateway counters, not disk.

Owners: the node routes (gateway/app.py) hold `Admission` and ask it before registering; Membership holds the
`RefusalRecorder` and asks it before recording a refusal.
"""

from dataclasses import dataclass, field

MAX_ADDRESSES = 10_000
"""Per-address buckets kept at most; beyond it, buckets that have refilled (the same as a fresh one) are dropped."""


@dataclass
class Bucket:
    rate: float
    """Tokens a second."""
    burst: float
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> "Bucket":
        return cls(rate=rate, burst=burst, tokens=burst, at=now)

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)

    def take(self, now: float) -> float:
        """0.0 when a token was taken; else the seconds until one is there (none taken)."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else float("inf")

    def give_back(self) -> None:
        self.tokens = min(self.burst, self.tokens + 1.0)


@dataclass
class RefusalRecorder:
    """How many refused messages get written down (owned by Membership, which records them)."""

    rate: float
    bucket: Bucket | None = None
    unrecorded: int = 0
    """Refusals counted but not written down since the last one that was."""

    def admit(self, now: float) -> int | None:
        """None: count this refusal only; else write it down, with this many unrecorded since the last record."""
        bucket = self.bucket = self.bucket or Bucket.full(self.rate, 10 * self.rate, now)
        if bucket.take(now):
            self.unrecorded += 1
            return None
        skipped, self.unrecorded = self.unrecorded, 0
        return skipped


@dataclass
class Admission:
    """Registration buckets (owned by the gateway's node routes)."""

    registration_rate: float
    registration_burst: float
    registration_rate_total: float
    per_address: dict[str, Bucket] = field(default_factory=dict)
    total: Bucket | None = None

    def registration(self, address: str, now: float) -> float:
        """0.0: admitted; else the seconds to wait before the next registration from `address` can be."""
        total = self.total = self.total or Bucket.full(
            self.registration_rate_total, 10 * self.registration_rate_total, now
        )
        own = self.per_address.get(address)
        if own is None:
            self._prune(now)
            own = self.per_address[address] = Bucket.full(self.registration_rate, self.registration_burst, now)
        wait = own.take(now)
        if wait:
            return wait
        wait = total.take(now)
        if wait:
            own.give_back()  # (refused for the others' sake: this address keeps its turn)
        return wait

    def _prune(self, now: float) -> None:
        if len(self.per_address) < MAX_ADDRESSES:
            return
        for address, bucket in list(self.per_address.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.burst:
                del self.per_address[address]
        while len(self.per_address) >= MAX_ADDRESSES:  # all still limited: forget the longest known
            del self.per_address[next(iter(self.per_address))]
