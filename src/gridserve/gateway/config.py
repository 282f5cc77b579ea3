"""Gateway settings: one flat, keyword-only dataclass; units in the names.

The dispatch, failure-detection and audit numbers are flat fields here (the CLI sets them one by one) whose
defaults come from `gridserve.policy`, the neutral home the simulator reads too; `dispatch`, `health` and
`audit` hand them back as policy values."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from gridserve.policy import AuditRates, DispatchPolicy, HealthTiming
from gridserve.reliability import ReliabilityConfig

_DISPATCH = DispatchPolicy()
_HEALTH = HealthTiming()
_AUDIT = AuditRates()


REDUNDANCY_LOGPROB_TOLERANCE = 0.5
"""Nats: how far two honest nodes' log-probabilities of the same token (after the same tokens) may lie apart in a
redundancy check (integrity/redundancy.py). Two llama.cpp servers (llama-cpp-python, CPU, Gemma 3 270M Q4_K_M) that
saw the jobs in different orders (other prompt-cache histories, so other batch shapes) claimed numbers up to 0.188
nats apart (p99 0.089) over 3,038 tokens of 120 answers, 0.074 over 425 of 20 (bench/redundancy.py --logprobs):
0.5 leaves room; a number invented further off than that is caught. GPU engines were not measured."""


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    port: int = 8000
    host: str = "127.0.0.1"
    data_dir: Path = Path(".gridserve")
    db_url: str | None = None
    """SQLAlchemy URL; default: SQLite file in data_dir (WAL). Gateways on one PostgreSQL database share one state
    (gateway/registry/cluster.py)."""
    gateway_id: str = ""
    """This gateway's name among those sharing a database (default: host:port)."""
    key_file: Path | None = None
    """The gateway's signing key (default: data_dir/gateway.key). Gateways of one grid share one key: a node that
    registered with one accepts work from all."""
    cluster_sync_interval_s: float = 0.5
    """Gateways on a shared PostgreSQL database read each other's writes at least this often (and at once when
    notified)."""
    responses_ttl_s: float = 30 * 86_400.0
    """Stored responses (the Responses API's) are deleted this long after they were made (0: kept for ever)."""
    key_sync_interval_s: float = 0.1
    """How often API keys and their counters are exchanged with the store (gateway/tenancy/sync.py)."""
    queue_shares: Mapping[str, float] = field(default_factory=dict)
    """The share of a model's batch slots each priority class named here may fill when requests wait at the gateway
    (gateway/tenancy/queue.py); the classes not named keep the defaults (SHARES: batch 0.75, the others 1)."""
    queue_deadlines_s: Mapping[str, float] = field(default_factory=dict)
    """How long a waiting request of each priority class named here waits for room before a 503; the classes not
    named keep the defaults (DEADLINES_S: interactive 10 s, standard 30 s, batch 120 s)."""
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    admin_token: str = ""
    max_body_bytes: int = 1_000_000
    """Requests with larger bodies get 413."""
    heartbeat_interval_s: float = _HEALTH.heartbeat_interval_s
    """Interval nodes are asked to heartbeat at."""
    suspect_after_intervals: float = _HEALTH.suspect_after_intervals
    down_after_intervals: float = _HEALTH.down_after_intervals
    """A node whose last heartbeat is older than this many intervals is down (within 3 intervals)."""
    max_skew_s: float = 30.0
    """Allowed clock skew on signed node messages (AWS SigV4 allows 300 s)."""
    max_message_lifetime_s: float = 120.0
    probe_interval_s: float = _HEALTH.probe_interval_s
    """Active /health probes: how often each node is pinged (round-trip time recorded)."""
    probe_timeout_s: float = _HEALTH.probe_timeout_s
    """A probe slower than this fails. A node whose probe fails and whose last heartbeat is older than one
    heartbeat interval is down: a hung node (SIGSTOP) is caught within ~1-2.5 s with the defaults."""
    retire_silent_s: float = 120.0
    """A node down and without a heartbeat for this long is no longer probed (until it heartbeats again)."""
    probes_per_round: int = 256
    """At most this many probes per period: nodes with requests in flight or not UP first, then idle UP nodes in
    turn (a grid of thousands is not pinged every half second; its idle nodes' heartbeats speak for them)."""
    probation_probes: int = _HEALTH.probation_probes
    """A node that comes back serves on probation (ranked lower) until this many probes in a row pass."""
    dispatch_attempts: int = _DISPATCH.dispatch_attempts
    """Nodes tried for one request when a node fails before its first token."""
    connect_timeout_s: float = 3.0
    retry_budget_tokens: float = _DISPATCH.retry_budget_tokens
    """Retry throttling (gRPC): retries and hedges stop while fewer than half of these tokens are left; each
    failure costs one, each success returns 0.1."""
    scheduler_kernel: bool = True
    """Decide in the scheduler's compiled kernel (numba), loaded in the background at start: ~0.1-0.3 ms less per
    decision at every grid size, for ~100 MB of memory and ~0.4 s of CPU once (scheduler/core.py)."""
    prefix_routing: bool = True
    """Route to the nodes that probably hold a prompt's prefix in their KV cache (gateway/dispatch/prefixes.py)."""
    hedging: bool = _DISPATCH.hedging
    """Send a late request to the runner-up too (requests can opt out with `gridserve.hedge: false`)."""
    hedge_min_s: float = _DISPATCH.hedge_min_s
    """The hedge delay is the node's predicted p95 TTFT, never shorter than this."""
    first_token_timeout_s: float = _DISPATCH.first_token_timeout_s
    """An attempt without a first token after max(this, 10 x predicted TTFT) is given up."""
    stall_min_s: float = _DISPATCH.stall_min_s
    stall_itl_multiple: float = _DISPATCH.stall_itl_multiple
    """Mid-stream, no token for max(stall_min_s, stall_itl_multiple x predicted ITL) means the node stalled:
    the generation moves to another node."""
    stall_unpredicted_s: float = _DISPATCH.stall_unpredicted_s
    """The stall timeout for a node whose ITL cannot be predicted (a model or card the catalogue lacks)."""
    stall_unresumable_s: float = _DISPATCH.stall_unresumable_s
    """The stall timeout for a stream no other node could continue (its engine names no token ids): giving up
    early would only end the client's answer."""
    stall_busy_max_s: float = _DISPATCH.stall_busy_max_s
    """How long a node that says it is busy with other streams' work may go without a token (DispatchPolicy)."""
    max_failovers: int = _DISPATCH.max_failovers
    """Mid-stream failovers allowed per request."""
    standby_per_model: int = 1
    """Warm spare nodes kept per model in demand, beyond those its load needs (gateway/dispatch/standby.py)."""
    standby_node_concurrency: int = 4
    """Requests one warm node is counted on to carry when sizing the warm set."""
    standby_idle_s: float = 600.0
    """A model not requested for this long is no longer kept warm."""
    standby_load_timeout_s: float = 120.0
    standby_interval_s: float = 1.0
    decision_cache: int = 1_000
    """Finished decisions kept in memory for `GET /v1/decisions/{id}` (older ones are read from the store)."""
    audit_rate: float = _AUDIT.rate
    """Share of an established, fully reliable node's completions re-executed by the verifier."""
    audit_new_rate: float = _AUDIT.new_rate
    """Audit share for nodes with little history."""
    audit_floor: float = _AUDIT.floor
    redundancy: bool = True
    """Check audited answers of models the verifier cannot run by asking other nodes (integrity/redundancy.py)."""
    redundancy_logprob_tolerance: float = REDUNDANCY_LOGPROB_TOLERANCE
    """Log-probabilities two nodes claim for the same token may differ this much (nats) in a redundancy check."""
    redundancy_strikes: int = 8
    """Consecutive minority verdicts (2-1 splits against the node) that make a severe incident; each one before is
    a minor incident. Honest llama.cpp servers with other prompt-cache histories disagreed on 27 to 40 of 300
    answers in three runs, never more than 3 in a row (bench/redundancy.py): one split is no proof. At 0.133 an
    honest node is in the minority 8 times in a row with probability 0.133^8 = 1e-7 per check."""
    canary_interval_s: float = 60.0
    """Mean seconds between canary requests (0: none)."""
    vetting_checks: int = 3
    """Audits or canaries a new identity passes before it is routed like any node (ReliabilityConfig)."""
    whitewash_checks: int = 6
    """Checks owed on top by a new identity from where a quarantined one was (gateway/registry/whitewash.py)."""
    allow_emulated: bool = False
    """Accept nodes offering emulated models (`emulated:<model>` digests: timings, no weights): tests and demos."""
    allow_unlisted_models: bool = False
    """Accept models with no entry in the allowed digests (a private grid of trusted nodes); else refused."""
    join_tokens_required: bool = False
    """Admit only nodes that register with a join token the admin created (gateway/registry/tokens.py); else
    any node that signs its registration may join."""
    registration_rate: float = 1.0
    """Registrations a second one source address may make, after a burst of `registration_burst`
    (gateway/registry/admission.py)."""
    registration_burst: int = 20
    registration_rate_total: float = 20.0
    """Registrations a second from all addresses together, after a burst of ten times that."""
    rejections_recorded_per_s: float = 5.0
    """Refused node messages written to the store and log a second (bursts of ten times that); the rest counted."""
    canary_timeout_s: float = 20.0
    """A canary not answered in full within this is a failed canary (and `POST /admin/canary` returns by then)."""
    allowed_digests_path: Path | None = None
    """JSON {model: [weights digest, ...]} added to the built-in allowed digests (trust/attestation.py)."""
    profile_path: Path | None = None
    """Scheduling profile (YAML); default: the packaged default profile."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector for request traces (e.g. http://127.0.0.1:4318/v1/traces); None: no tracing."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """Serve HTTPS with this certificate (PEM, the chain after it) and its private key; None: plain HTTP."""
    node_ca_file: Path | None = None
    """Verify nodes that serve HTTPS (an https:// endpoint) against this CA certificate (a private grid's CA)
    instead of the system's trust store."""
    drain_s: int = 3
    """How long a stopping gateway (SIGTERM) lets the requests under way finish, streams over tunnels included,
    before it closes what is left. It takes no new connection meanwhile: in a cluster, clients go to the other
    gateways; alone, the gateway is unavailable that long."""

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    @property
    def reliability(self) -> ReliabilityConfig:
        return ReliabilityConfig(vetting_checks=self.vetting_checks, whitewash_checks=self.whitewash_checks)

    @property
    def name(self) -> str:
        return self.gateway_id or f"{self.host}:{self.port}"

    @property
    def suspect_after_s(self) -> float:
        return self.heartbeat_interval_s * self.suspect_after_intervals

    @property
    def down_after_s(self) -> float:
        return self.heartbeat_interval_s * self.down_after_intervals

    @cached_property
    def dispatch(self) -> DispatchPolicy:
        """The dispatch fields as the policy the dispatcher runs (built once: the config is frozen)."""
        return DispatchPolicy(
            dispatch_attempts=self.dispatch_attempts,
            retry_budget_tokens=self.retry_budget_tokens,
            hedging=self.hedging,
            hedge_min_s=self.hedge_min_s,
            first_token_timeout_s=self.first_token_timeout_s,
            stall_min_s=self.stall_min_s,
            stall_itl_multiple=self.stall_itl_multiple,
            stall_unpredicted_s=self.stall_unpredicted_s,
            stall_unresumable_s=self.stall_unresumable_s,
            stall_busy_max_s=self.stall_busy_max_s,
            max_failovers=self.max_failovers,
        )

    @property
    def health(self) -> HealthTiming:
        return HealthTiming(
            heartbeat_interval_s=self.heartbeat_interval_s,
            suspect_after_intervals=self.suspect_after_intervals,
            down_after_intervals=self.down_after_intervals,
            probe_interval_s=self.probe_interval_s,
            probe_timeout_s=self.probe_timeout_s,
            probation_probes=self.probation_probes,
        )

    @property
    def audit(self) -> AuditRates:
        return AuditRates(rate=self.audit_rate, new_rate=self.audit_new_rate, floor=self.audit_floor)
