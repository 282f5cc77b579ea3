"""The reliability book: per-node ledger, decayed scores and state, for a whole pool. Pure: no I/O, no clock.

Every method takes time as `now` (unix seconds); events carry their own `at`. The book is not thread-safe: one
owner (the gateway's event loop, or the simulator) calls it.
"""

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from gridserve.reliability.config import DEFAULT_CONFIG, ReliabilityConfig
from gridserve.reliability.errors import UnknownNode
from gridserve.reliability.events import EventKind, NodeEvent
from gridserve.reliability.scores import DecayedCounts, Scores, prior_scores, scores
from gridserve.reliability.state import (
    EXCLUDED,
    NodeStatus,
    ReliabilityState,
    Transition,
    admin_quarantine,
    admin_release,
    expire,
    on_event,
)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class ReliabilitySummary:
    """A node's standing at one instant, as the scheduler reads it."""

    state: ReliabilityState
    availability: float
    """Heartbeats kept vs missed: decayed Beta posterior mean, in [0, 1]."""
    completion: float
    """Jobs completed vs failed, timed out or stalled, in [0, 1]."""
    latency: float
    """Completed jobs within their SLO vs not (unmeasured ones ignored), in [0, 1]."""
    clean: float
    """Messages without protocol errors or minor incidents, in [0, 1]."""
    score: float
    """Weighted mean of the four, in [0, 1]; 0.0 when QUARANTINED or BANNED."""
    samples: float
    """Decayed number of job outcomes observed."""
    is_new: bool
    """samples < exploration_samples: too little evidence to rank on (the scheduler may explore it)."""
    vetted: bool
    """Passed `vetting_checks` audits or canaries (plus any it owes): an established identity. Until then the
    scheduler sends it only its exploration share wherever an established node is eligible."""
    ejected_until: float | None
    """Unix time the current ejection ends; None unless EJECTED."""
    ejections: int
    """Ejections so far (the next lasts base_ejection_s × (ejections + 1), capped)."""
    reason: str
    """Why the node is in its state, naming the evidence; "" when HEALTHY."""

    def packed(self) -> "SummaryRow":
        """The summary as a tuple of atoms: once the cyclic collector has seen it, it tracks it no more (the gateway
        keeps one per node between heartbeats; a dataclass would be one more object per node for every full
        collection to walk)."""
        return (
            self.state.value,
            self.availability,
            self.completion,
            self.latency,
            self.clean,
            self.score,
            self.samples,
            self.is_new,
            self.vetted,
            self.ejected_until,
            self.ejections,
            self.reason,
        )

    @classmethod
    def unpacked(cls, row: "SummaryRow") -> "ReliabilitySummary":
        """The summary `packed` gave (equal to it). Its fields are set directly: a decision builds one per node it
        reads, and the frozen dataclass's own __init__ costs several times as much."""
        summary = object.__new__(cls)
        fields = summary.__dict__
        fields.update(zip(_SUMMARY_FIELDS, row, strict=True))
        fields["state"] = ReliabilityState(row[0])
        return summary

    def signals(self) -> dict[str, float]:
        """The four signals by name, for a decision's explanation."""
        return {
            "availability": self.availability,
            "completion": self.completion,
            "latency": self.latency,
            "clean": self.clean,
        }


SummaryRow = tuple[str, float, float, float, float, float, float, bool, bool, float | None, int, str]
"""ReliabilitySummary.packed(): its fields in order, the state as its value."""
_SUMMARY_FIELDS = tuple(ReliabilitySummary.__dataclass_fields__)


@dataclass(slots=True)
class _Node:
    status: NodeStatus
    counts: DecayedCounts
    ledger: deque[tuple[int, NodeEvent]]
    """Routine (non-incident) events, bounded; oldest evicted first. Kept heartbeats only count (scores): a node
    heartbeats every few seconds, so they would evict its job outcomes, and a 10,000-node grid would hold millions
    of them (the cyclic GC's full passes over them stalled heartbeat ingestion for hundreds of ms)."""
    incidents: list[tuple[int, NodeEvent]]
    """Every incident, never evicted."""
    transitions: list[tuple[int, Transition]]


class ReliabilityBook:
    """Ledger, scores and state machine of every node in a pool.

    A node joins the pool with `add_node` or with its first recorded event, and leaves it with `remove_node`.
    Leaving keeps the node's record (state, scores, ledger): a quarantined or banned node cannot clear it by
    leaving and rejoining under the same id; `add_node` brings it back with its record. Events recorded for a
    node that left (late results of jobs in flight) are kept but do not bring it back into the pool.
    The pool (nodes added and not removed, minus banned ones) is what `max_ejected_share` is a share of.
    """

    def __init__(self, config: ReliabilityConfig = DEFAULT_CONFIG) -> None:
        self._config = config
        self._prior = prior_scores(config)
        self._nodes: dict[str, _Node] = {}
        self._pool: dict[str, None] = {}  # an ordered set
        self._ejected: set[str] = set()
        self._banned: set[str] = set()
        self._seq = itertools.count()

    @property
    def config(self) -> ReliabilityConfig:
        return self._config

    def nodes(self) -> list[str]:
        """The ids of the nodes in the pool, in the order they joined."""
        return list(self._pool)

    def knows(self, node_id: str) -> bool:
        """Whether the node has a record (it joined, or an event about it was recorded), in the pool or not."""
        return node_id in self._nodes

    def add_node(self, node_id: str, now: float) -> None:
        """Put a node in the pool (idempotent). A node seen before keeps its record."""
        self._node(node_id, now)
        self._pool[node_id] = None

    def remove_node(self, node_id: str) -> None:
        """Take a node out of the pool (idempotent); its record is kept. See the class docstring."""
        self._pool.pop(node_id, None)

    def record(self, event: NodeEvent) -> list[Transition]:
        """Append an event to the ledger, update the node's scores and state; return the state changes.

        An ejection that ended before `event.at` first becomes PROBATION (that transition is returned too).
        """
        if event.node_id not in self._nodes:
            self.add_node(event.node_id, event.at)
        node = self._nodes[event.node_id]
        if event.kind is not EventKind.HEARTBEAT_KEPT:  # kept heartbeats are counted, not listed: `_Node.ledger`
            (node.incidents if event.kind is EventKind.INCIDENT else node.ledger).append((next(self._seq), event))
        node.counts.add(event)
        changes = expire(node.status, event.at, self._config)
        changes += on_event(node.status, event, self._config, lambda: self._may_eject(event.node_id, event.at))
        return self._log(node, changes)

    def quarantine(self, node_id: str, *, reason: str, now: float) -> list[Transition]:
        """Admin action: quarantine a node from any state; a no-op if already quarantined or banned.

        A node never seen is added (quarantining errs on the safe side).
        """
        if node_id not in self._nodes:
            self.add_node(node_id, now)
        node = self._nodes[node_id]
        changes = expire(node.status, now, self._config)
        return self._log(node, changes + admin_quarantine(node.status, reason, now))

    def release(self, node_id: str, *, reason: str, now: float) -> list[Transition]:
        """Admin action: end a quarantine (or an ejection) into PROBATION; a no-op if HEALTHY or in PROBATION.

        Raises `CannotRelease` (a ValueError) if the node is banned, `UnknownNode` (a KeyError) if never seen.
        """
        node = self._nodes.get(node_id)
        if node is None:
            raise UnknownNode(node_id)
        changes = self._log(node, expire(node.status, now, self._config))
        return changes + self._log(node, admin_release(node.status, reason, now))

    def state(self, node_id: str, now: float) -> ReliabilityState:
        """The node's state at `now` (an expired ejection becomes PROBATION). HEALTHY for a node never seen."""
        node = self._nodes.get(node_id)
        if node is None:
            return ReliabilityState.HEALTHY
        self._log(node, expire(node.status, now, self._config))
        return node.status.state

    def summary(self, node_id: str, now: float) -> ReliabilitySummary:
        """Scores and state at `now`, in O(1). A node never seen gets the fresh-node summary (and is not added)."""
        node = self._nodes.get(node_id)
        if node is None:
            return self._summarise(self._prior, NodeStatus(node_id=node_id))
        self._log(node, expire(node.status, now, self._config))
        return self._summarise(scores(node.counts, now, self._config), node.status)

    def ejections_ended(self, now: float) -> list[str]:
        """Nodes whose ejection has ended by `now` though no read or event has moved them to PROBATION yet: whoever
        keeps summaries between events (the gateway's registry) refreshes these. O(ejected nodes)."""
        ended = []
        for node_id in self._ejected:
            until = self._nodes[node_id].status.ejected_until
            if until is not None and until <= now:
                ended.append(node_id)
        return ended

    def summary_row(self, node_id: str, now: float) -> SummaryRow:
        """`summary(node_id, now).packed()`, without building the summary (the gateway's registry reads one per
        heartbeat)."""
        node = self._nodes.get(node_id)
        if node is None:
            s, status = self._prior, NodeStatus(node_id=node_id)
        else:
            self._log(node, expire(node.status, now, self._config))
            s, status = scores(node.counts, now, self._config), node.status
        return (
            status.state.value,
            s.availability,
            s.completion,
            s.latency,
            s.clean,
            0.0 if status.state in EXCLUDED else s.score,
            s.samples,
            s.samples < self._config.exploration_samples,
            status.vetted(self._config),
            status.ejected_until,
            status.ejections,
            status.reason,
        )

    def events(
        self, node_id: str | None = None, *, kinds: set[EventKind] | None = None, limit: int = 100
    ) -> list[NodeEvent]:
        """Recorded events, newest (most recently recorded) first; of one node or of all, optionally by kind.

        Routine events are the last `ledger_events_per_node` per node (kept heartbeats are only counted, never
        listed); incidents are all kept.
        """
        want_incidents = kinds is None or EventKind.INCIDENT in kinds

        def of(node: _Node) -> Iterator[tuple[int, NodeEvent]]:
            routine = (entry for entry in reversed(node.ledger) if kinds is None or entry[1].kind in kinds)
            return _newest_first([routine, reversed(node.incidents)] if want_incidents else [routine])

        return self._take((of(node) for node in self._select(node_id)), limit)

    def incidents(self, node_id: str | None = None, limit: int = 100) -> list[NodeEvent]:
        """INCIDENT events (never evicted), newest first."""
        return self._take((reversed(node.incidents) for node in self._select(node_id)), limit)

    def transitions(self, node_id: str | None = None, limit: int = 100) -> list[Transition]:
        """State changes, newest first."""
        return self._take((reversed(node.transitions) for node in self._select(node_id)), limit)

    # internals

    def _node(self, node_id: str, now: float) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = _Node(
                status=NodeStatus(node_id=node_id),
                counts=DecayedCounts(half_life_s=self._config.half_life_s, updated_at=now),
                ledger=deque(maxlen=self._config.ledger_events_per_node),
                incidents=[],
                transitions=[],
            )
            self._nodes[node_id] = node
        return node

    def _select(self, node_id: str | None) -> list[_Node]:
        if node_id is None:
            return list(self._nodes.values())
        node = self._nodes.get(node_id)
        return [] if node is None else [node]

    def _log(self, node: _Node, changes: list[Transition]) -> list[Transition]:
        for change in changes:
            node.transitions.append((next(self._seq), change))
            if change.new is ReliabilityState.EJECTED:
                self._ejected.add(change.node_id)
            else:
                self._ejected.discard(change.node_id)
            if change.new is ReliabilityState.BANNED:
                self._banned.add(change.node_id)
        return changes

    def _may_eject(self, node_id: str, now: float) -> bool:
        """Whether one more node may be ejected at `now` without the pool's ejected share passing the limit."""
        pool = len(self._pool) - sum(1 for banned in self._banned if banned in self._pool)
        ejected = 0
        for other in self._ejected:
            until = self._nodes[other].status.ejected_until
            if other != node_id and other in self._pool and until is not None and until > now:
                ejected += 1
        return ejected < self._config.ejection_limit(pool)

    def _summarise(self, s: Scores, status: NodeStatus) -> ReliabilitySummary:
        return ReliabilitySummary(
            state=status.state,
            availability=s.availability,
            completion=s.completion,
            latency=s.latency,
            clean=s.clean,
            score=0.0 if status.state in EXCLUDED else s.score,
            samples=s.samples,
            is_new=s.samples < self._config.exploration_samples,
            vetted=status.vetted(self._config),
            ejected_until=status.ejected_until,
            ejections=status.ejections,
            reason=status.reason,
        )

    @staticmethod
    def _take(sources: Iterable[Iterator[tuple[int, T]]], limit: int) -> list[T]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return [item for _, item in itertools.islice(_newest_first(list(sources)), limit)]


def _newest_first(sources: list[Iterator[tuple[int, T]]]) -> Iterator[tuple[int, T]]:
    """Merge streams that are each newest first (descending sequence number) into one."""
    if len(sources) == 1:
        return sources[0]
    return heapq.merge(*sources, key=lambda entry: entry[0], reverse=True)
