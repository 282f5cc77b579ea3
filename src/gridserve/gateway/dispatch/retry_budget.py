"""A retry budget, as gRPC's retry throttling: a token bucket that failures drain and successes refill.

Each failed attempt costs 1 token, each success adds `token_ratio`; retries and hedges are allowed
only while the bucket holds more than half of `max_tokens`. A failing grid therefore stops multiplying its
own load: with the defaults (10 tokens, 0.1 per success) retries stop after ~5 net failures and resume after
~10 successes per missing token.
"""

from dataclasses import dataclass


@dataclass
class RetryBudget:
    max_tokens: float = 10.0
    token_ratio: float = 0.1
    tokens: float = 10.0

    def __post_init__(self) -> None:
        if self.max_tokens <= 0 or self.token_ratio <= 0:
            raise ValueError("max_tokens and token_ratio must be positive")
        self.tokens = min(self.tokens, self.max_tokens)

    def allow_retry(self) -> bool:
        return self.tokens > self.max_tokens / 2

    def failure(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def success(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)
