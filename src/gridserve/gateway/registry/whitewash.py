"""Whitewashing: what a quarantined identity leaves behind, so a fresh key from the same place starts further back.

A key costs nothing: an operator whose identity is quarantined can make a new one in a second. What he cannot
change as easily is where it comes from: the address it registers from, the endpoint it serves at, and its engine
fingerprint (engine, runtime versions and hardware as its capability document describes them). When an identity
is quarantined or banned these three are marked; a *new* identity (one the reliability book has never seen) that
registers with any of them owes extra vetting checks (`GatewayConfig.whitewash_checks`) and gets a minor incident
naming the match. It is not refused: addresses are shared behind NAT, and many operators run the same card and
engine, so a match is a reason to look harder (it is audited at the new-node rate until vetted), not a verdict.

Bounded: at most `keep` marks and `keep` registrations remembered (oldest forgotten first); a mark lapses after
`ttl_s`. Kept in memory and rebuilt when a gateway starts (ledger_replay.py `restore_marks`): the store keeps each
node's capability document and the address of its latest registration, and the replayed ledger says which
identities fell and when.
"""

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from gridserve.types import Capability

SIGNALS = ("address", "endpoint", "fingerprint")


@dataclass(frozen=True, slots=True)
class Signals:
    """Where an identity comes from ("" where unknown)."""

    address: str
    """The source address its registration came from."""
    endpoint: str
    """host:port of the endpoint it serves at."""
    fingerprint: str
    """Digest of its engine, runtime versions and hardware description."""

    def items(self) -> list[tuple[str, str]]:
        values = (self.address, self.endpoint, self.fingerprint)
        return [(name, value) for name, value in zip(SIGNALS, values, strict=True) if value]


def signals_of(capability: Capability, address: str) -> Signals:
    parts = urlsplit(capability.endpoint)
    endpoint = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}" if parts.hostname else ""
    described = {
        "engine": capability.engine,
        "runtime": capability.runtime.model_dump(mode="json"),
        "hardware": capability.hardware.model_dump(mode="json"),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]
    return Signals(address="" if address == "?" else address, endpoint=endpoint, fingerprint=digest)


@dataclass(frozen=True, slots=True)
class Match:
    signal: str
    value: str
    node_id: str
    """The quarantined identity that left the mark."""

    def describe(self) -> str:
        return f"{self.signal} {self.value} of quarantined identity {self.node_id}"


class Marks:
    """The signals of quarantined identities, and of registrations (to mark them when their identity falls)."""

    def __init__(self, keep: int = 10_000, ttl_s: float = 7 * 86_400.0) -> None:
        self.keep, self.ttl_s = keep, ttl_s
        self._seen: OrderedDict[str, Signals] = OrderedDict()
        self._marked: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def registered(self, node_id: str, signals: Signals) -> None:
        """Remember where the identity registered from (its latest registration)."""
        self._seen[node_id] = signals
        self._seen.move_to_end(node_id)
        while len(self._seen) > self.keep:
            self._seen.popitem(last=False)

    def signals(self, node_id: str) -> Signals | None:
        """Where the identity last registered from (None: not remembered)."""
        return self._seen.get(node_id)

    def fell(self, node_id: str, at: float) -> None:
        """The identity was quarantined or banned: mark its signals."""
        signals = self._seen.get(node_id)
        if signals is None:
            return
        for key in signals.items():
            self._marked[key] = (node_id, at)
            self._marked.move_to_end(key)
        while len(self._marked) > self.keep:
            self._marked.popitem(last=False)

    def matches(self, node_id: str, signals: Signals, now: float) -> list[Match]:
        """The marks of other identities, still in force at `now`, that these signals carry."""
        found = []
        for signal, value in signals.items():
            mark = self._marked.get((signal, value))
            if mark is not None and mark[0] != node_id and now - mark[1] <= self.ttl_s:
                found.append(Match(signal, value, mark[0]))
        return found
