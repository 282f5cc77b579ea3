"""Node agent settings."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    gateway_url: str
    engine: str
    port: int
    host: str = "127.0.0.1"
    outbound_only: bool = False
    """Open no listening socket: dial each gateway and take its calls over that connection (node/tunnel.py)."""
    advertise_url: str | None = None
    """URL the gateway uses to reach this node (default http://HOST:PORT, https:// with a certificate)."""
    key_file: Path = Path("node.key")
    gateway_key: str | None = None
    """Pin the gateway's public key (base64). Without it the key from the first registration is trusted."""
    join_token: str | None = None
    """Sent with every registration (header X-Gridserve-Join-Token): a gateway started with --join-tokens admits
    only nodes holding one its admin created."""
    ca_file: Path | None = None
    """Verify an https:// gateway against this CA certificate (a private grid's CA) instead of the system's trust
    store (trust/tls.py)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """Serve this node's port over HTTPS with this certificate (PEM, the chain after it) and its key; the gateway
    verifies it (its --node-ca-file for a private CA). None: plain HTTP."""
    price_per_mtok: float = 0.0
    """USD per million generated tokens."""
    memory_bytes: int | None = None
    max_running: int | None = None
    """The most requests the engine runs at once, as advertised (an upstream server's batch limit: vLLM's
    `--max-num-seqs`, llama.cpp's `--parallel`; 0: no limit); None: what the engine says, else the catalogue's."""
    """Memory the engine may use for weights + KV cache, as advertised (None: what is detected)."""
    heartbeat_interval_s: float | None = None
    """Override the interval the gateway asks for (seconds)."""
    message_lifetime_s: float = 30.0
    max_skew_s: float = 30.0

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls_cert is not None else "http"
        return self.advertise_url or f"{scheme}://{self.host}:{self.port}"
