"""The discrete-event simulation. Production code decides: `scheduler.Scheduler` (with the policy's profile,
over a SnapshotTable kept incrementally), `reliability.ReliabilityBook` (job outcomes, incidents, ejection and
quarantine), `perfmodel.predict` (service times, batching: ITL grows with concurrent requests),
`perfmodel.Calibration` (what the gateway learns of each node) and `trust.audit_policy` (how often a node's
work is re-executed). The gateway's timing rules (failure detection, hedge delay, stall guard, failovers) are
`gridserve.policy`'s, the same functions the gateway calls. The simulator supplies the clock, the randomness,
the grid and the load.

What happens to a request: it is routed when it arrives. If its node leaves the grid before the first token,
it is sent again after the hedge delay (the policy's, for a node with no observed TTFT ratios: the simulator
keeps none, so 2 x predicted TTFT); if the node leaves mid-answer, it fails over after the stall guard and
resumes on another node (prefill over prompt + tokens sent); a node that left but is not yet marked down fails
what is sent to it. A request nobody can take, or that failed over more than the gateway allows, fails. Client
TTFT and TPOT include every gap.

Prefix caches (traces with block ids): each node holds the prompt blocks it prefilled (sim/cache.py, LRU within
its KV memory), and a prefill computes only the prompt past the longest prefix it holds; a node that leaves
loses them. The simulated gateway keeps a `PrefixIndex` as the gateway does (gateway/dispatch/prefixes.py): a
prompt's blocks go to the node that opened its answer (its first token), a node marked down or registering again
is dropped, each node's capacity is its KV room; every decision gets the index's `cached_tokens`, whatever the
policy. The index guesses; the node's cache decides the prefill.
"""

import contextlib
import gc
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gridserve.catalog import model_spec
from gridserve.perfmodel import Load, Prediction, predict
from gridserve.prefix import PrefixIndex
from gridserve.reliability import EventKind, NodeEvent, ReliabilityBook, ReliabilitySummary
from gridserve.reliability.events import Severity
from gridserve.scheduler import Profile, Scheduler
from gridserve.scheduler.baselines import ewma
from gridserve.scheduler.table import SnapshotTable
from gridserve.sim.grid import EPOCH, SimConfig, SimNode, build_nodes
from gridserve.sim.trace import TraceRequest, cached_limit
from gridserve.trust.audit_policy import audit_probability
from gridserve.types import NodeState
from gridserve.types.scheduling import ScheduleRequest

WARMUP_CYCLES = 20
CLIENT_TIMEOUT_S = 600.0
"""A request without its whole answer this long after it arrived is abandoned (the OpenAI SDK's default)."""

__all__ = ["EPOCH", "Outcome", "SimConfig", "SimNode", "Simulation", "build_nodes"]


FEW_COLLECTIONS_FROM = 2_000
"""A run of at least this many requests runs under `_few_collections`. A shorter one does not: the full collection
that starts it takes 0.1-0.5 s in a process holding torch (a test worker), more than such a run itself."""


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """A run allocates millions of short-lived objects beside the grid's long-lived ones: the grid is moved out of
    the cyclic collector's reach (gc.freeze) and the young generation collected less often (nothing a run makes
    is cyclic garbage in bulk), so collections stop rescanning the grid. Restored afterwards."""
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@dataclass(frozen=True)
class Outcome:
    """One simulated request as the client saw it."""

    at_s: float
    prompt_tokens: int
    output_tokens: int
    node_id: str | None
    """The node that finished it; None: it failed."""
    accelerator: str
    ttft_s: float
    tpot_s: float
    price_per_mtok: float
    retries: int = 0
    """Times it was sent again (node gone before the first token) or failed over mid-answer."""
    dishonest_tokens: int = 0
    """Tokens of this answer produced by dishonest nodes."""
    cached_tokens: int = 0
    """Prompt tokens the node that finished it found in its prefix cache (not prefilled again)."""

    @property
    def failed(self) -> bool:
        return self.node_id is None


@dataclass(eq=False)
class _Job:
    index: int
    req: TraceRequest
    arrival: float
    sent: int = 0
    """Tokens the client has."""
    first_token_at: float | None = None
    retries: int = 0
    failovers: int = 0
    tried: set[str] = field(default_factory=set)
    dishonest_tokens: int = 0
    attempt: "_Attempt | None" = None


@dataclass(eq=False)
class _Attempt:
    job: _Job
    node: SimNode
    start: float
    """When the gateway sent it."""
    tokens: int
    pred_ttft: float
    """What the scheduler predicted at dispatch (queue included)."""
    pred_itl: float
    price: float
    pred_queue: float = 0.0
    """The part of `pred_ttft` predicted to be spent waiting for a batch slot: calibration leaves it out."""
    slot_at: float = math.inf
    """When it took a batch slot at the node."""
    first_at: float = math.inf
    """Its first token (inf while it waits for a batch slot)."""
    itl: float = 0.0
    alive: bool = True
    running: bool = False
    cached: int = 0
    """Prompt tokens the node held in its prefix cache when the attempt took a batch slot."""
    kv: int = 0
    """KV tokens it holds on the node while it runs."""

    @property
    def finish(self) -> float:
        return self.first_at + self.itl * max(0, self.tokens - 1)

    def delivered(self, now: float) -> int:
        if now < self.first_at:
            return 0
        return min(self.tokens, 1 + int((now - self.first_at) / self.itl))


class Simulation:
    def __init__(self, config: SimConfig, profile: Profile) -> None:
        self.config = config
        self.profile = profile
        self.scheduler = Scheduler(profile)
        self.model = model_spec(config.model)
        # three independent streams from one seed (string seeds are hashed: no stream repeats another's draws,
        # nor those of a neighbouring seed)
        self.rng = random.Random(f"{config.seed}:routing")
        self.world = random.Random(f"{config.seed}:world")
        """Churn and thermal episodes: drawn apart from routing randomness, so every policy meets the same grid."""
        self.nodes = build_nodes(config, self.model, random.Random(f"{config.seed}:grid"))
        self.book = ReliabilityBook()
        self.table = SnapshotTable()
        self.by_id = {n.node_id: n for n in self.nodes}
        self.index = PrefixIndex()
        """The gateway's prefix index (what it sent where), not the nodes' caches."""
        for node in self.nodes:
            self.index.set_capacity(node.node_id, node.cache.capacity)
        self.outcomes: list[Outcome | None] = []
        self.open_jobs = 0
        self.running: dict[str, dict[_Attempt, None]] = {n.node_id: {} for n in self.nodes}
        """Attempts sent to each node (running or queued), in the order sent: iteration order is deterministic."""
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._deadlines: deque[tuple[float, int]] = deque()
        """(client deadline, job index) in arrival order: every request has the same timeout, so deadlines come
        in order and need no heap (a million of them would keep every finished job alive in it)."""
        self._open: dict[int, _Job] = {}
        self.now = EPOCH
        for node in self.nodes:
            node.heartbeat_at = EPOCH
            self.book.add_node(node.node_id, EPOCH)
            self._begin(node)
            self._touch(node)

    # the event queue

    def _at(self, when: float, handler: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (when, next(self._seq), handler, args))

    def _until(self, t: float) -> None:
        while self._step(t):
            pass

    def _step(self, limit: float) -> bool:
        """Handle the earliest event or client deadline at or before `limit`; False if there is none."""
        events, deadlines = self._events, self._deadlines
        while deadlines and deadlines[0][1] not in self._open:  # answered in time: nothing to do
            deadlines.popleft()
        event_at = events[0][0] if events else math.inf
        deadline = deadlines[0][0] if deadlines else math.inf
        if min(event_at, deadline) > limit:
            return False
        if deadline < event_at:
            _, index = deadlines.popleft()
            self.now = deadline
            self._timeout(self._open[index])
            return True
        when, _, handler, args = heapq.heappop(events)
        self.now = when
        handler(*args)
        return True

    def run(self, trace: list[TraceRequest], progress: Callable[[int], None] | None = None) -> list[Outcome]:
        self.scheduler.warm()  # the compiled decision kernel, before the clock starts
        with _few_collections() if len(trace) >= FEW_COLLECTIONS_FROM else contextlib.nullcontext():
            return self._run_trace(trace, progress)

    def _run_trace(self, trace: list[TraceRequest], progress: Callable[[int], None] | None) -> list[Outcome]:
        self._at(EPOCH + self.config.heartbeat_s, self._heartbeat)
        self.outcomes = [None] * len(trace)
        for i, req in enumerate(trace):
            t = EPOCH + req.at_s
            self._until(t)
            self.now = t
            self.open_jobs += 1
            job = _Job(i, req, t)
            self._open[i] = job
            self._deadlines.append((t + CLIENT_TIMEOUT_S, i))
            self._dispatch(job)
            if progress is not None and i % 1000 == 999:
                progress(1000)
        while self.open_jobs and self._step(math.inf):  # the grid goes on until every request has its answer
            pass
        return [o if o is not None else self._failed(trace[i]) for i, o in enumerate(self.outcomes)]

    def _end(self, job: _Job, outcome: Outcome) -> None:
        self.outcomes[job.index] = outcome
        job.attempt = None
        self.open_jobs -= 1
        self._open.pop(job.index, None)

    def _timeout(self, job: _Job) -> None:
        if self.outcomes[job.index] is not None:
            return
        attempt = job.attempt
        if attempt is not None and attempt.alive:  # the client hangs up: the node's work is cancelled
            attempt.alive = False
            self.running[attempt.node.node_id].pop(attempt, None)
            if attempt.running:
                self._release(attempt)
                self._free(attempt.node)
            else:
                attempt.node.queue.remove(attempt)
            self._credit(attempt, attempt.delivered(self.now))
            self._touch(attempt.node)
        self._end(job, self._failed(job.req, job))

    # the grid

    def _begin(self, node: SimNode) -> None:
        """Initial state: the grid as it stands after a long history of sessions (a renewal process run from
        far in the past: a node's current session is length-biased, as in any long-running grid)."""
        config = self.config
        if config.churn:
            t, present = -WARMUP_CYCLES * (config.uptime_mean_s + config.downtime_mean_s), True
            while True:
                t += config.uptime(self.world) if present else config.downtime(self.world)
                if t > 0:
                    break
                present = not present
            if present:
                self._at(EPOCH + t, self._leave, node)
            else:
                node.present, node.state = False, NodeState.DOWN
                self.book.remove_node(node.node_id)
                self._at(EPOCH + t, self._join, node)
        if config.thermal_per_hour > 0:
            self._at(EPOCH + self.world.expovariate(config.thermal_per_hour / 3600.0), self._thermal, node, True)

    def _touch(self, node: SimNode, *, ledger: bool = True, summary: ReliabilitySummary | None = None) -> None:
        """Refresh what the gateway holds of the node (`ledger`: its reliability summary too, `summary` if the
        caller has it already)."""
        node.touched_at = self.now
        if ledger:
            node.summary = summary or self.book.summary(node.node_id, self.now)
        self.table.put(node.snapshot())

    def _heartbeat(self) -> None:
        """Nodes in the grid report; the gateway refreshes what it knows of each (scores decay with time).
        A busy node's snapshot is already refreshed by its own events; an idle one's every other heartbeat."""
        stale = self.now - 1.5 * self.config.heartbeat_s
        for node in self.nodes:
            if node.present:
                node.heartbeat_at = self.now
                if node.touched_at <= stale:
                    self._touch(node)
        self._at(self.now + self.config.heartbeat_s, self._heartbeat)

    def _leave(self, node: SimNode) -> None:
        node.present = False
        node.session += 1
        self.book.remove_node(node.node_id)
        streams = list(self.running[node.node_id])
        for attempt in streams:
            self._lost(attempt)
        node.queue.clear()
        node.cache.clear()  # its KV memory goes with it
        node.clear_kv()
        # the gateway marks it down when a stream to it breaks (stall guard), else when probes and heartbeats fail
        detect = self.config.dispatch.stall_min_s if streams else self.config.detect_s
        self._at(self.now + detect, self._detect, node, node.session)
        self._at(self.now + self.config.downtime(self.world), self._join, node)
        self._touch(node)

    def _detect(self, node: SimNode, session: int) -> None:
        if not node.present and node.session == session and node.state != NodeState.DOWN:
            node.state = NodeState.DOWN
            self.index.drop(node.node_id)  # the gateway forgets what a node marked down held
            self.book.record(NodeEvent(node_id=node.node_id, kind=EventKind.HEARTBEAT_MISSED, at=self.now))
            self._touch(node)

    def _join(self, node: SimNode) -> None:
        node.present = True
        node.heartbeat_at = self.now
        self.index.drop(node.node_id)  # it registers again: the gateway's index of it starts empty
        self.index.set_capacity(node.node_id, node.cache.capacity)
        self.book.add_node(node.node_id, self.now)
        if node.state in (NodeState.DOWN, NodeState.PROBATION):
            node.state = NodeState.PROBATION
            self._at(self.now + self.config.probation_s, self._probation_end, node, node.session)
        self._at(self.now + self.config.uptime(self.world), self._leave, node)
        self._touch(node)

    def _probation_end(self, node: SimNode, session: int) -> None:
        if node.present and node.session == session and node.state == NodeState.PROBATION:
            node.state = NodeState.UP
            self._touch(node)

    def _thermal(self, node: SimNode, on: bool) -> None:
        config = self.config
        node.clock = config.thermal_clock if on else 1.0
        if on:
            self._at(self.now + self.world.expovariate(1.0 / config.thermal_mean_s), self._thermal, node, False)
        else:
            self._at(self.now + self.world.expovariate(config.thermal_per_hour / 3600.0), self._thermal, node, True)
        self._touch(node)

    # requests

    def _dispatch(self, job: _Job) -> None:
        req = job.req
        prompt = req.prompt_tokens + job.sent
        request = ScheduleRequest(
            request_id=f"sim-{job.index}",
            model=self.model.name,
            prompt_tokens=prompt,
            max_tokens=req.output_tokens - job.sent,
            ttft_slo_s=self.config.ttft_slo_s,
            tpot_slo_s=self.config.tpot_slo_s,
            cached_tokens=self._lookup(req.blocks, prompt),
        )
        # a retry decides among the nodes not tried yet (as the gateway's dispatch walks its ranking)
        pool = [s for s in self.table if s.node_id not in job.tried] if job.tried else self.table
        decision = self.scheduler.schedule(request, pool, self.rng, self.now, decision_id=f"d{job.index}")
        chosen = decision.chosen
        if chosen is None:
            self._end(job, self._failed(req, job))
            return
        node = self.by_id[chosen]
        self._start(job, node, node.price_per_mtok, request.reused_by(chosen))

    def _lookup(self, blocks: tuple[int, ...], prompt: int) -> tuple[tuple[str, int], ...]:
        """The gateway's prefix lookup: (node, prompt tokens it probably holds), as ScheduleRequest.cached_tokens."""
        if not blocks or prompt <= 1:
            return ()
        return tuple((node, cached_limit(prompt, n)) for node, n in self.index.match(blocks).items())

    def _predict(self, job: _Job, node: SimNode, load: Load, cached: int = 0) -> Prediction:
        return predict(
            self.model,
            node.hw,
            prompt_tokens=job.req.prompt_tokens + job.sent - cached,
            dtype=node.dtype,
            quantization=node.quant,
            load=load,
        )

    def _start(self, job: _Job, node: SimNode, price: float, cached: int = 0) -> None:
        """Send the job to the node: it runs at once if a batch slot is free, else waits in the node's queue.
        `cached`: prompt tokens the gateway's index expects the node to hold."""
        req = job.req
        # what the gateway predicts: load and queue, throttling as the node's telemetry reports it, the prefix hit
        throttled = node.clock if node.clock < 1.0 else None
        load = Load(active=node.active, queued=len(node.queue), clock_ratio=throttled)
        pred = self._predict(job, node, load, cached)
        job.tried.add(node.node_id)
        if not node.present:  # gone, not yet marked down: the gateway cannot reach it, marks it down, goes on
            self._detect(node, node.session)
            self.book.record(NodeEvent(node_id=node.node_id, kind=EventKind.JOB_FAILED, at=self.now))
            job.retries += 1
            self._at(self.now + self.hedge_delay(pred.ttft_s), self._retry, job)
            return
        tokens = req.output_tokens - job.sent
        attempt = _Attempt(job, node, self.now, tokens, pred.ttft_s, pred.itl_s, price, pred.queue_s + pred.load_s)
        job.attempt = attempt
        self.running[node.node_id][attempt] = None
        if node.active < max(1, node.hw.batch_slots):
            self._run(attempt, self.now + node.rtt_s / 2)
        else:
            node.queue.append(attempt)
        self._touch(node, ledger=False)

    def _run(self, attempt: _Attempt, at: float) -> None:
        """A batch slot takes the attempt at `at`: prefill, then one token per ITL (both set by the requests
        already running), noise and the node's hidden speed; the client sees tokens half a round trip later."""
        node, job = attempt.node, attempt.job
        prompt = job.req.prompt_tokens + job.sent
        blocks = job.req.blocks
        attempt.cached = cached_limit(prompt, node.cache.match(blocks)) if blocks else 0  # what it really holds
        pred = self._predict(job, node, Load(active=node.active), attempt.cached)
        noise, speed = self.config.noise_sigma, node.speed()
        node.active += 1
        attempt.running = True
        attempt.slot_at = at
        attempt.kv = prompt + attempt.tokens
        node.hold_kv(attempt.kv)
        attempt.first_at = at + node.rtt_s / 2 + pred.ttft_s * speed * self.rng.lognormvariate(0.0, noise)
        attempt.itl = pred.itl_s * speed * self.rng.lognormvariate(0.0, noise)
        if blocks:
            self._at(attempt.first_at, self._prefilled, attempt)
        self._at(attempt.finish, self._done, attempt)

    def _prefilled(self, attempt: _Attempt) -> None:
        """The prompt is prefilled and its first token out: the node's cache holds its blocks, and the gateway,
        seeing the answer open on that node, puts them in its index there."""
        if attempt.alive and attempt.node.present:
            blocks = attempt.job.req.blocks
            attempt.node.cache.insert(blocks)
            self.index.insert(attempt.node.node_id, blocks)

    def _release(self, attempt: _Attempt) -> None:
        """A running attempt leaves its batch slot: its KV is no longer in use (its prompt stays cached)."""
        attempt.node.release_kv(attempt.kv)
        attempt.kv = 0

    def _free(self, node: SimNode) -> None:
        """A batch slot is free: the next queued attempt takes it."""
        node.active -= 1
        while node.queue and node.active < max(1, node.hw.batch_slots):
            waiting = node.queue.popleft()
            if waiting.alive:
                self._run(waiting, self.now)

    def _retry(self, job: _Job) -> None:
        if self.outcomes[job.index] is None:
            self._dispatch(job)

    def _lost(self, attempt: _Attempt) -> None:
        """The attempt's node left: what the client got stays; the rest goes elsewhere."""
        attempt.alive = False
        node, job = attempt.node, attempt.job
        self.running[node.node_id].pop(attempt, None)
        if attempt.running:
            node.active -= 1
            self._release(attempt)
        self.book.record(NodeEvent(node_id=node.node_id, kind=EventKind.JOB_FAILED, at=self.now))
        got = min(attempt.delivered(self.now), attempt.tokens - 1)  # its last token would have ended it
        self._credit(attempt, got)
        if got == 0:
            job.retries += 1
            self._at(max(self.now, attempt.start + self.hedge_delay(attempt.pred_ttft)), self._retry, job)
            return
        job.failovers += 1
        if not self.config.dispatch.may_fail_over(job.failovers - 1):  # (this failover is counted: a retry)
            self._end(job, self._failed(job.req, job))
            return
        last = attempt.first_at + attempt.itl * (got - 1)
        self._at(
            max(self.now, last + self.stall_timeout(attempt.pred_itl)), self._stall_due, job, attempt.pred_itl, last
        )

    def _stall_due(self, job: _Job, predicted_itl_s: float, last_token_at: float) -> None:
        """The gateway's stall timer ran out: it fails over when a live node it has not tried could take the
        stream; otherwise it waits the policy's longer timeout first (as the gateway's own patience)."""
        if self._can_take_over(job):
            self._retry(job)
            return
        waited = last_token_at + self.config.dispatch.stall_timeout(predicted_itl_s, takeover=False)
        self._at(max(self.now, waited), self._retry, job)

    def _can_take_over(self, job: _Job) -> bool:
        """Whether the gateway sees a live node it has not tried for this job (it cannot see a departed node
        that it has not yet marked down is gone)."""
        return any(n.node_id not in job.tried and n.state != NodeState.DOWN for n in self.nodes)

    def hedge_delay(self, predicted_ttft_s: float) -> float:
        """When the gateway sends a request again whose node gave no first token: the policy's hedge delay for
        the TTFT it predicted, on a node without observed TTFT ratios (the simulated gateway keeps none)."""
        return self.config.dispatch.hedge_delay(predicted_ttft_s, 1.0, None)

    def stall_timeout(self, predicted_itl_s: float) -> float:
        """How long after a node's last token the gateway declares the stream stalled and fails over."""
        return self.config.dispatch.stall_timeout(predicted_itl_s)

    def _credit(self, attempt: _Attempt, tokens: int) -> None:
        job = attempt.job
        if tokens > 0 and job.first_token_at is None:
            job.first_token_at = attempt.first_at
        job.sent += tokens
        if attempt.node.dishonest:
            job.dishonest_tokens += tokens

    def _done(self, attempt: _Attempt) -> None:
        if not attempt.alive:
            return
        node, job = attempt.node, attempt.job
        self.running[node.node_id].pop(attempt, None)
        self._release(attempt)
        self._free(node)
        ttft, now = attempt.first_at - attempt.start, self.now
        within = ttft <= self.config.ttft_slo_s and attempt.itl <= self.config.tpot_slo_s
        self.book.record(NodeEvent(node_id=node.node_id, kind=EventKind.JOB_COMPLETED, at=now, within_slo=within))
        node.latency_ewma_s = ewma(node.latency_ewma_s, ttft)
        if job.sent == 0:  # as the gateway: a resumed attempt's timings do not calibrate
            # as the gateway: the node's own service time, less the queue wait it reports, against the prediction
            # less its predicted queue wait (a queue prediction's error is not the node's speed)
            waited = max(0.0, attempt.slot_at - attempt.start - node.rtt_s / 2)
            node.calibration = node.calibration.observe(
                predicted_ttft_s=max(0.0, attempt.pred_ttft - attempt.pred_queue),
                observed_ttft_s=ttft - waited,
                predicted_itl_s=attempt.pred_itl,
                observed_itl_s=attempt.itl,
                output_tokens=attempt.tokens,
            )
        summary = self._audit(node)
        self._credit(attempt, attempt.tokens)
        self._touch(node, summary=summary)
        assert job.first_token_at is not None
        tokens = job.req.output_tokens
        tpot = (now - job.first_token_at) / (tokens - 1) if tokens > 1 else 0.0  # one token: no gap to time
        outcome = Outcome(
            job.req.at_s,
            job.req.prompt_tokens,
            tokens,
            node.node_id,
            node.hw.key,
            job.first_token_at - job.arrival,
            tpot,
            attempt.price,
            job.retries + job.failovers,
            job.dishonest_tokens,
            min(attempt.cached, job.req.prompt_tokens),
        )
        self._end(job, outcome)

    def _audit(self, node: SimNode) -> ReliabilitySummary | None:
        """Sampled re-execution at the gateway's rate; a dishonest node's answer fails it: quarantine. Returns the
        node's summary when nothing changed it (None: it changed)."""
        config = self.config
        summary = self.book.summary(node.node_id, self.now)
        rate = audit_probability(
            summary, rate=config.audit_rate, new_rate=config.audit_new_rate, floor=config.audit_floor
        )
        if self.rng.random() < rate and node.dishonest:
            self.book.record(
                NodeEvent(
                    node_id=node.node_id,
                    kind=EventKind.INCIDENT,
                    at=self.now,
                    severity=Severity.SEVERE,
                    detail="integrity: audit re-execution disagrees",
                )
            )
            return None
        return summary

    @staticmethod
    def _failed(req: TraceRequest, job: _Job | None = None) -> Outcome:
        retries = job.retries + job.failovers if job else 0
        dishonest = job.dishonest_tokens if job else 0
        return Outcome(
            req.at_s, req.prompt_tokens, req.output_tokens, None, "", math.inf, math.inf, 0.0, retries, dishonest
        )
