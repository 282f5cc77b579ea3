"""The dispatch policy: how long the gateway waits for a node before it hedges, gives up, or fails over.

One frozen value holds the numbers and the rules that turn a prediction into a deadline. The gateway's
dispatcher (gateway/dispatch/) and the simulator (sim/engine.py) both call these functions, so a simulated
grid hedges and fails over exactly when the gateway would for the same prediction.
"""

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DispatchPolicy:
    dispatch_attempts: int = 3
    """Nodes tried for one request when a node fails before its first token."""
    retry_budget_tokens: float = 100.0
    """Retry throttling (gRPC): retries and hedges stop while fewer than half of these tokens are left."""
    retry_token_ratio: float = 0.1
    """Tokens a success returns to the retry budget (a failure costs one): gRPC's default ratio."""
    hedging: bool = True
    """Send a late request to the runner-up too (requests can opt out with `gridserve.hedge: false`)."""
    hedge_min_s: float = 0.05
    """The hedge delay is the node's predicted p95 TTFT, never shorter than this."""
    hedge_unobserved_multiple: float = 2.0
    """Before a node has enough observed TTFTs for a p95, the hedge delay is this many times its prediction."""
    first_token_timeout_s: float = 10.0
    first_token_ttft_multiple: float = 10.0
    """An attempt without a first token after max(first_token_timeout_s, this x predicted TTFT) is given up."""
    cold_start_s: float = 60.0
    """An attempt on a node that must load the model first waits this much longer for its first token. The
    prediction counts the weights' move, not the engine's start: a lazy CPU node took over 10 s to start its
    torch engine on a busy CI machine, and the gateway gave up on it, though nothing else could serve."""
    stall_min_s: float = 1.0
    stall_itl_multiple: float = 10.0
    """Mid-stream, no token for max(stall_min_s, stall_itl_multiple x predicted ITL) means the node stalled:
    the generation moves to another node."""
    stall_busy_max_s: float = 30.0
    """A node that says its engine is busy with other streams' steps (a `busy` line: another prompt's prefill on a
    CPU node) is not stalled while it keeps saying so, for up to this long without a token; then the stall rule
    applies again (a node cannot hold a stream forever by claiming to be busy)."""
    stall_unpredicted_s: float = 10.0
    """The stall timeout for a node whose ITL cannot be predicted (a model or card the catalogue lacks)."""
    stall_unresumable_s: float = 30.0
    """The stall timeout for a stream no other node could continue (its engine names no token ids): giving up
    early would only end the client's answer."""
    max_failovers: int = 3
    """Mid-stream failovers allowed per request."""
    watch_s: float = 0.1
    """How often an attempt waiting for its first token checks whether its node has been marked down."""

    def first_token_timeout(self, predicted_ttft_s: float | None, *, cold: bool = False) -> float:
        """How long an attempt may wait for its first token: never less than `first_token_timeout_s`, longer
        for a request predicted to take long (a long prompt on a slow card), and `cold_start_s` longer on a node
        that must load the model first (`cold`)."""
        wait = max(self.first_token_timeout_s, self.first_token_ttft_multiple * (predicted_ttft_s or 0.0))
        return wait + (self.cold_start_s if cold else 0.0)

    def hedge_delay(
        self, predicted_ttft_s: float | None, calibration_factor: float, ttft_ratio_p95: float | None
    ) -> float:
        """When the runner-up is sent the same request: the node's predicted p95 TTFT.

        `predicted_ttft_s` is the calibrated prediction; divided by `calibration_factor` it is the raw roofline,
        which times the p95 of the node's observed/raw ratios is its p95 TTFT. A node without enough observations
        (`ttft_ratio_p95` None) gets `hedge_unobserved_multiple` x the calibrated prediction. Bounded below by
        `hedge_min_s` and above by the first-token timeout (hedging after giving up would be pointless)."""
        predicted = predicted_ttft_s or 0.0
        if ttft_ratio_p95 is not None:
            delay = predicted / calibration_factor * ttft_ratio_p95
        else:
            delay = self.hedge_unobserved_multiple * predicted
        return min(max(delay, self.hedge_min_s), self.first_token_timeout(predicted_ttft_s))

    def stall_timeout(self, predicted_itl_s: float | None, *, resumable: bool = True, takeover: bool = True) -> float:
        """No token for this long mid-stream means the node stalled: `stall_itl_multiple` x its predicted ITL,
        at least `stall_min_s` (`stall_unpredicted_s` without a prediction).

        A stream no other node could continue waits at least `stall_unresumable_s`: its engine names no token ids
        (`resumable` False), or no live node is left to take it over (`takeover` False, asked when the shorter
        timeout runs out). Giving up early would only end the client's answer: a lone node slowed by its machine
        is not a dead one."""
        if predicted_itl_s is None:
            stall = self.stall_unpredicted_s
        else:
            stall = max(self.stall_min_s, self.stall_itl_multiple * predicted_itl_s)
        return stall if resumable and takeover else max(stall, self.stall_unresumable_s)

    def may_fail_over(self, failovers_done: int) -> bool:
        """Whether a generation that already moved `failovers_done` times may move once more."""
        return failovers_done < self.max_failovers


__all__ = ["DispatchPolicy"]
