"""Gateway settings: one flat, keyword-only dataclass; units in the names."""

from dataclasses import dataclass, field
from pathlib import Path


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
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    admin_token: str = ""
    max_body_bytes: int = 1_000_000
    """Requests with larger bodies get 413."""
    heartbeat_interval_s: float = 2.0
    """Interval nodes are asked to heartbeat at."""
    suspect_after_intervals: float = 1.5
    down_after_intervals: float = 2.5
    """A node whose last heartbeat is older than this many intervals is down (within 3 intervals)."""
    max_skew_s: float = 30.0
    """Allowed clock skew on signed node messages (AWS SigV4 allows 300 s)."""
    max_message_lifetime_s: float = 120.0
    probe_interval_s: float = 0.5
    """Active /health probes: how often each node is pinged (round-trip time recorded)."""
    probe_timeout_s: float = 1.0
    """A probe slower than this fails. A node whose probe fails and whose last heartbeat is older than one
    heartbeat interval is down: a hung node (SIGSTOP) is caught within ~1-2.5 s with the defaults."""
    probes_per_round: int = 256
    """At most this many probes per period: nodes with requests in flight or not UP first, then idle UP nodes in
    turn (a grid of thousands is not pinged every half second; its idle nodes' heartbeats speak for them)."""
    probation_probes: int = 4
    """A node that comes back serves on probation (ranked lower) until this many probes in a row pass."""
    dispatch_attempts: int = 3
    """Nodes tried for one request when a node fails before its first token."""
    connect_timeout_s: float = 3.0
    retry_budget_tokens: float = 100.0
    """Retry throttling (gRPC): retries and hedges stop while fewer than half of these tokens are left; each
    failure costs one, each success returns 0.1."""
    hedging: bool = True
    """Send a late request to the runner-up too (requests can opt out with `gridserve.hedge: false`)."""
    hedge_min_s: float = 0.05
    """The hedge delay is the node's predicted p95 TTFT, never shorter than this."""
    first_token_timeout_s: float = 10.0
    """An attempt without a first token after max(this, 10 x predicted TTFT) is given up."""
    stall_min_s: float = 1.0
    stall_itl_multiple: float = 10.0
    """Mid-stream, no token for max(stall_min_s, stall_itl_multiple x predicted ITL) means the node stalled:
    the generation moves to another node."""
    stall_unpredicted_s: float = 10.0
    """The stall timeout for a node whose ITL cannot be predicted (a model or card the catalogue lacks)."""
    stall_unresumable_s: float = 30.0
    """The stall timeout for a stream no other node could continue (its engine names no token ids): giving up
    early would only end the client's answer."""
    max_failovers: int = 3
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
    audit_rate: float = 0.05
    """Share of an established, fully reliable node's completions re-executed by the verifier."""
    audit_new_rate: float = 0.5
    """Audit share for nodes with little history."""
    audit_floor: float = 0.01
    canary_interval_s: float = 60.0
    """Mean seconds between canary requests (0: none)."""
    allowed_digests_path: Path | None = None
    """JSON {model: [weights digest, ...]} added to the built-in allowed digests (trust/attestation.py)."""
    profile_path: Path | None = None
    """Scheduling profile (YAML); default: the packaged default profile."""

    @property
    def name(self) -> str:
        return self.gateway_id or f"{self.host}:{self.port}"

    @property
    def suspect_after_s(self) -> float:
        return self.heartbeat_interval_s * self.suspect_after_intervals

    @property
    def down_after_s(self) -> float:
        return self.heartbeat_interval_s * self.down_after_intervals
