"""Shared fixtures: real grids of processes on 127.0.0.1."""

__all__ = ["free_port_block"]

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gridserve.cli.grid import LocalGrid, free_port_block

API_KEY = "test-key"
ADMIN = "test-admin"


def make_grid(tmp: Path, engines: list[str], **kwargs: object) -> LocalGrid:
    return LocalGrid(
        data_dir=tmp,
        port=free_port_block(len(engines) + 4),
        api_key=API_KEY,
        admin_token=ADMIN,
        engines=engines,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGrid]:
    """A gateway with two tiny nodes and one emulated node, shared by the API tests."""
    grid = make_grid(
        tmp_path_factory.mktemp("tiny-grid"),
        ["tiny", "tiny", "emulated:rtx4090"],
        extra_gateway_args=["--max-body-bytes", "20000"],
        threads=1,
    )
    try:
        grid.start(timeout_s=120)
        yield grid
    finally:
        grid.stop()


def admin_get(grid: LocalGrid, path: str) -> httpx.Response:
    return httpx.get(grid.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
