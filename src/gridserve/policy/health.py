"""Failure detection timings: how often nodes heartbeat and are probed, and when a silent node is down.

The gateway's membership applies them to real heartbeats and probes; the simulator uses the derived delays
(`quiet_detect_s`, `probation_s`) to mark a departed node down when the gateway would.
"""

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class HealthTiming:
    heartbeat_interval_s: float = 2.0
    """Interval nodes are asked to heartbeat at."""
    suspect_after_intervals: float = 1.5
    down_after_intervals: float = 2.5
    """A node whose last heartbeat is older than this many intervals is down (within 3 intervals)."""
    probe_interval_s: float = 0.5
    """Active /health probes: how often each node is pinged (round-trip time recorded)."""
    probe_timeout_s: float = 1.0
    """A probe slower than this fails. A node whose probe fails and whose last heartbeat is older than one
    heartbeat interval is down: a hung node (SIGSTOP) is caught within ~1-2.5 s with the defaults."""
    probation_probes: int = 4
    """A node that comes back serves on probation (ranked lower) until this many probes in a row pass."""

    @property
    def quiet_detect_s(self) -> float:
        """How long after a node with no stream open vanishes it is marked down: its last heartbeat is one
        interval old, and the next probe then fails."""
        return self.heartbeat_interval_s + self.probe_interval_s

    @property
    def probation_s(self) -> float:
        """How long a node that came back serves on probation: `probation_probes` probes passed in a row."""
        return self.probe_interval_s * self.probation_probes


__all__ = ["HealthTiming"]
