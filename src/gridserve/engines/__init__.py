"""Engines compute tokens behind one protocol (`Engine`)."""

from gridserve.engines.base import Engine, EngineError, EngineStats, InvalidRequest
from gridserve.engines.registry import create_engine

__all__ = ["Engine", "EngineError", "EngineStats", "InvalidRequest", "create_engine"]
