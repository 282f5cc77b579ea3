"""The scheduling decision: a pure function of request, snapshots, profile, randomness and time."""

from gridserve.scheduler.core import Filter, Picker, Profile, default_profile, schedule

__all__ = ["Filter", "Picker", "Profile", "default_profile", "schedule"]
