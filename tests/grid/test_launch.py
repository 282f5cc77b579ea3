"""Processes forked from the local grid's fork server (cli/launch.py) behave as new `python -m gridserve` processes:
their own pid and session, their output in their log, the environment they were given, Popen's exit statuses."""

import os
import signal
import subprocess
from pathlib import Path

import pytest
from tests.conftest import ADMIN, make_grid

from gridserve.cli import launch


def test_a_bad_command_exits_2_with_its_one_line_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    args = ["node", "--engine", "nonsense", "--gateway", "http://127.0.0.1:1", "--port", "1"]
    proc = launch.fork(args, log, dict(os.environ))
    assert proc.wait(timeout=60) == 2 and proc.returncode == 2 and proc.poll() == 2
    assert log.read_text().strip() == (
        "error: unknown engine 'nonsense'; choose one of: tiny, gemma-270m, emulated:<hardware>, openai-upstream"
    )
    proc.kill()  # (gone already: nothing to signal)


def test_forked_processes_are_sessions_of_their_own_with_their_environment_and_exit_statuses(tmp_path: Path) -> None:
    grid = make_grid(tmp_path, ["emulated:rtx4090"], threads=1)
    assert grid.forked
    try:
        grid.start(timeout_s=120)
        gateway, node = grid.procs["gateway"], grid.procs["node-0"]
        assert isinstance(node, launch.Forked) and isinstance(gateway, launch.Forked)
        assert len({gateway.pid, node.pid, os.getpid()}) == 3
        assert os.getsid(node.pid) == node.pid and os.getsid(gateway.pid) == gateway.pid
        node_id = grid.nodes()[0]["node_id"]
        # the admin token reaches `gridserve nodes` only through the environment it is given (the fork server
        # started before it was set, and the data dir given holds no token)
        table = tmp_path / "nodes.log"
        command = ["nodes", "--gateway", grid.url, "--data-dir", str(tmp_path / "empty"), "--json"]
        listed = launch.fork(command, table, {**os.environ, "GRIDSERVE_ADMIN_TOKEN": ADMIN})
        assert listed.wait(timeout=60) == 0, table.read_text()
        assert node_id in table.read_text()
        refused = launch.fork(command, tmp_path / "refused.log", {**os.environ, "GRIDSERVE_ADMIN_TOKEN": "wrong"})
        assert refused.wait(timeout=60) != 0 and node_id not in (tmp_path / "refused.log").read_text()
        with pytest.raises(subprocess.TimeoutExpired):
            node.wait(timeout=0.1)
        assert node.poll() is None
        node.send_signal(signal.SIGKILL)
        assert node.wait(timeout=10) == -signal.SIGKILL
        assert "registered as" in (tmp_path / "logs" / "node-0.log").read_text()
    finally:
        grid.stop()
    assert gateway.returncode is not None
