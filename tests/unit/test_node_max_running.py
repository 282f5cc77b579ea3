"""What a node says it runs at once (`Capability.max_running`): the operator's flag over the engine's word."""

from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from gridserve.cli.main import app
from gridserve.node.agent import NodeAgent
from gridserve.node.config import NodeConfig


def said(flag: int | None, engine: Any) -> int | None:
    config = NodeConfig(gateway_url="http://gw", engine="x", port=9, max_running=flag)
    return NodeAgent._max_running(SimpleNamespace(config=config, engine=engine))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flag", "engine", "expected"),
    [
        (None, SimpleNamespace(), None),  # an engine that does not say (an upstream server): the catalogue's
        (None, SimpleNamespace(max_running=lambda: 8), 8),  # an emulated card with --fifo-slots
        (None, SimpleNamespace(max_running=lambda: 0), 0),  # an emulated card without: no limit
        (256, SimpleNamespace(), 256),  # vLLM's --max-num-seqs, given by the operator
        (4, SimpleNamespace(max_running=lambda: 8), 4),  # the operator's word wins
    ],
)
def test_the_operators_flag_wins_over_what_the_engine_says(flag: int | None, engine: Any, expected: int) -> None:
    assert said(flag, engine) == expected


def test_a_negative_max_running_is_one_readable_line() -> None:
    result = CliRunner().invoke(
        app, ["node", "--gateway", "http://127.0.0.1:9", "--engine", "upstream", "--port", "9", "--max-running", "-1"]
    )
    assert result.exit_code != 0
    assert "--max-running must be 0 (no limit) or more (got -1)" in result.output
    assert "Traceback" not in result.output
