"""Persistence for gridserve: nodes, node events and scheduling decisions (SQLite or PostgreSQL)."""

from gridserve.store.db import Store, default_sqlite_url
from gridserve.store.keys import KeyStore
from gridserve.store.writer import StoreWriter

__all__ = ["KeyStore", "Store", "StoreWriter", "default_sqlite_url"]
