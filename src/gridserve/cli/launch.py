"""How a local grid starts its gateway and nodes: each as `python -m gridserve ...` (a new interpreter), or forked
from a fork server that imported gridserve, torch and transformers once (`forked=True`).

A node that serves the tiny model or an emulated card spends about 4 s of CPU importing torch and transformers
before it does anything (measured: a process that imports them and builds the tiny model took 4.1 s to start, 0.05 s
forked from a server that had imported them). A test suite that starts some 350 nodes on 2 cores spends most of its
time there. The forked process is still a process of its own: its own pid (kill -9 works), session, log file,
environment and exit status; only the imports are shared, copy-on-write.

The fork server is multiprocessing's (`forkserver` context): one per process that starts grids, started on first
use, with `PRELOAD` imported. Whatever `PRELOAD` imports must not start threads or open anything a fork would leave
half-done; it only imports modules.
"""

import atexit
import multiprocessing
import os
import signal
import subprocess
import sys
from functools import cache
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

from gridserve.processes import die_with_parent

PRELOAD = ["gridserve.cli.preload"]


class Proc(Protocol):
    """What a local grid needs of a process it started (`subprocess.Popen` is one)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def popen(args: list[str], log: Path, env: dict[str, str], module: str, wrapper: list[str]) -> Proc:
    """`python -m module args...` (under `wrapper` where given), its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*wrapper, sys.executable, "-m", module, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a killed `gridserve up` leaves no orphaned nodes
        )


class Forked:
    """A process forked from the fork server, with Popen's calls (exit status as Popen's: -N for signal N)."""

    def __init__(self, process: BaseProcess, args: list[str]) -> None:
        self._process, self._args = process, args

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(["gridserve", *self._args], timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@cache
def _context() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    # what `gridserve node` sets before torch loads OpenMP (cli/main.py): in a forked node, OpenMP was loaded by
    # the server, so the server's environment decides
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    atexit.register(_kill_leftovers)  # (runs before multiprocessing's own exit hook, which would wait for them)
    return context


def _kill_leftovers() -> None:
    for child in multiprocessing.active_children():
        if child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)


def fork(args: list[str], log: Path, env: dict[str, str]) -> Proc:
    """`gridserve args...` forked from the fork server, its output appended to `log`."""
    process = _context().Process(target=_forked_main, args=(args, str(log), env), name=" ".join(args[:1]))
    process.start()
    return Forked(process, args)


def _forked_main(args: list[str], log: str, env: dict[str, str]) -> None:
    """In the forked child: what a new `python -m gridserve args...` process would have been given, then the CLI."""
    os.setsid()
    die_with_parent()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=True)  # (PYTHONUNBUFFERED)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["gridserve", *args]
    from gridserve.cli.main import app

    try:
        app(args=args, prog_name="gridserve")
    finally:
        atexit._run_exitfuncs()  # (multiprocessing ends its children with os._exit, past the interpreter's own)
