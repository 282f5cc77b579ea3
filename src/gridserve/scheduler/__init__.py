"""The scheduling decision: a pure function of request, snapshots, profile, randomness and time."""

from gridserve.scheduler.context import UnknownTier
from gridserve.scheduler.core import schedule
from gridserve.scheduler.plugins import FILTERS, PICKERS, SCORERS, Filter, Picker, Score, Scorer
from gridserve.scheduler.profile import (
    Profile,
    ProfileError,
    default_profile,
    load_profile,
    named_profile,
    profile_from_dict,
)
from gridserve.scheduler.snapshot import NodeSnapshot, NodeStatic

__all__ = [
    "FILTERS",
    "PICKERS",
    "SCORERS",
    "Filter",
    "NodeSnapshot",
    "NodeStatic",
    "Picker",
    "Profile",
    "ProfileError",
    "Score",
    "Scorer",
    "UnknownTier",
    "default_profile",
    "load_profile",
    "named_profile",
    "profile_from_dict",
    "schedule",
]
