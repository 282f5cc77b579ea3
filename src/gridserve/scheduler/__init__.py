"""The scheduling decision: a function of request, snapshots, profile, randomness and time (`Scheduler`)."""

from gridserve.scheduler.context import UnknownTier
from gridserve.scheduler.core import KERNEL_POOL, Scheduler, schedule
from gridserve.scheduler.plugins import FILTERS, PICKERS, SCORERS, Filter, Picker, Scorer
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
    "KERNEL_POOL",
    "PICKERS",
    "SCORERS",
    "Filter",
    "NodeSnapshot",
    "NodeStatic",
    "Picker",
    "Profile",
    "ProfileError",
    "Scheduler",
    "Scorer",
    "UnknownTier",
    "default_profile",
    "load_profile",
    "named_profile",
    "profile_from_dict",
    "schedule",
]
