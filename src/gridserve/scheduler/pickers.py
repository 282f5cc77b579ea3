"""Pickers: choose among the ranked eligible nodes."""

import random
from collections.abc import Sequence
from dataclasses import dataclass

from gridserve.scheduler.context import Context
from gridserve.scheduler.plugins import PICKERS, Scored, register


@register(PICKERS, "max-score")
@dataclass
class MaxScorePicker:
    """The best score wins (ties are broken at random upstream). With probability `exploration`, the best
    *new* node (little record) is picked instead, so newcomers earn a record: bounded exploration."""

    exploration: float = 0.05
    name: str = "max-score"

    def pick(self, ctx: Context, ranked: Sequence[Scored], rng: random.Random) -> tuple[int, str]:
        if self.exploration > 0 and len(ranked) > 1 and rng.random() < self.exploration:
            for i, scored in enumerate(ranked):
                rel = scored.node.reliability
                if i > 0 and (rel is None or rel.is_new):
                    return i, f"exploration (p={self.exploration}): newest node with a short record"
        return 0, "highest score"


@register(PICKERS, "random")
@dataclass
class RandomPicker:
    name: str = "random"

    def pick(self, ctx: Context, ranked: Sequence[Scored], rng: random.Random) -> tuple[int, str]:
        return rng.randrange(len(ranked)), "uniformly at random among eligible nodes"
