"""Usage per key: requests, tokens, spend, errors, refusals and TTFT, as this gateway served them.

The lifecycle tells it how each request ended (`UsageSubscriber`): the tokens and the settled spend are charged to
the request's admission (its key's limits) and added here. `/metrics` shows the `TOP_KEYS` keys with the most
requests by id and name and the rest as `other`, so the label set stays bounded however many keys there are;
`GET /admin/usage` shows every key.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from gridserve.gateway.lifecycle.record import Finished, Settled
from gridserve.gateway.lifecycle.subscribers import Scope, Subscriber
from gridserve.gateway.tenancy.keys import ApiKey
from gridserve.gateway.tenancy.limits import CURRENT

TOP_KEYS = 10
LABELS = ["key", "name"]
"""A key's id (names need not be unique) and its name; `other` for the keys past the top TOP_KEYS."""
TTFT_SAMPLES = 1024


@dataclass
class KeyStats:
    name: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spent_usd: float = 0.0
    errors: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    ttfts: deque[float] = field(default_factory=lambda: deque(maxlen=TTFT_SAMPLES))
    ttft_sum_s: float = 0.0
    ttft_count: int = 0

    def view(self) -> dict[str, Any]:
        ordered = sorted(self.ttfts)

        def at(q: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 6) if ordered else None

        return {
            "name": self.name,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "spent_usd": round(self.spent_usd, 9),
            "errors": self.errors,
            "refused": dict(self.refused),
            "ttft_p50_s": at(0.5),
            "ttft_p99_s": at(0.99),
        }


class Usage:
    """The one owner of per-key usage on this gateway."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyStats] = {}

    def _stats(self, key: ApiKey) -> KeyStats:
        found = self.keys.get(key.key_id)
        if found is None:
            found = self.keys[key.key_id] = KeyStats(key.name)
        return found

    def refused(self, key: ApiKey, code: str) -> None:
        stats = self._stats(key)
        stats.refused[code] = stats.refused.get(code, 0) + 1

    def served(self, key: ApiKey, end: Finished, spent_usd: float) -> None:
        stats = self._stats(key)
        stats.requests += 1
        stats.prompt_tokens += end.prompt_tokens
        stats.completion_tokens += end.completion_tokens
        stats.spent_usd += spent_usd
        stats.errors += int(end.status == "failed")
        if end.timing.ttft_s is not None:
            stats.ttfts.append(end.timing.ttft_s)
            stats.ttft_sum_s += end.timing.ttft_s
            stats.ttft_count += 1

    def view(self) -> dict[str, dict[str, Any]]:
        return {key_id: stats.view() for key_id, stats in self.keys.items()}


class UsageSubscriber(Subscriber):
    """Charges each finished request to its key: its admission (limits) and this gateway's usage."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage

    def finished(self, scope: Scope, end: Finished, settled: Settled) -> None:
        admission = CURRENT.get()
        if admission is None:
            return
        spent = sum(float(e["amount_usd"]) for e in settled.entries)
        admission.charge(end.prompt_tokens + end.completion_tokens, spent, failed=end.status == "failed")
        self.usage.served(admission.key, end, spent)


class UsageCollector(Collector):
    """`/metrics` families per key, the top TOP_KEYS by requests by name, the rest summed as `other`."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage

    def collect(self) -> Iterator[CounterMetricFamily | SummaryMetricFamily]:
        ranked = sorted(self.usage.keys.items(), key=lambda item: item[1].requests, reverse=True)
        named, rest = ranked[:TOP_KEYS], [s for _, s in ranked[TOP_KEYS:]]
        rows = [([key_id, s.name], [s]) for key_id, s in named] + ([(["other", "other"], rest)] if rest else [])
        families: list[tuple[str, str, Any]] = [
            ("gridserve_key_requests", "Requests served per API key", lambda s: s.requests),
            ("gridserve_key_errors", "Requests that failed per API key", lambda s: s.errors),
            ("gridserve_key_prompt_tokens", "Prompt tokens per API key", lambda s: s.prompt_tokens),
            ("gridserve_key_completion_tokens", "Generated tokens per API key", lambda s: s.completion_tokens),
            ("gridserve_key_spend_usd", "Settled spend per API key (US dollars)", lambda s: s.spent_usd),
            ("gridserve_key_refused", "Requests refused by a limit per API key", lambda s: sum(s.refused.values())),
        ]
        for name, help_text, value in families:
            family = CounterMetricFamily(name, help_text, labels=LABELS)
            for labels, group in rows:
                family.add_metric(labels, float(sum(value(s) for s in group)))
            yield family
        ttft = SummaryMetricFamily("gridserve_key_ttft_seconds", "Time to first token per API key", labels=LABELS)
        for labels, group in rows:
            ttft.add_metric(labels, sum(s.ttft_count for s in group), sum(s.ttft_sum_s for s in group))
        yield ttft
