"""Persistence for gridserve: nodes, node events and scheduling decisions (SQLite or PostgreSQL)."""

from gridserve.store.db import Store, default_sqlite_url
from gridserve.store.writer import StoreWriter

__all__ = ["Store", "StoreWriter", "default_sqlite_url"]
