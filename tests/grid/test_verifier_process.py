"""The gateway's verifier runs in a child process (gateway/integrity/audit.py Verifier(isolated=True)): it answers
there, and it never outlives the gateway, even one that dies while the child is still starting."""

import os
import subprocess
import sys
import textwrap
import time

PARENT = textwrap.dedent(
    """
    import asyncio, os, sys
    from gridserve.gateway.integrity.audit import Verifier

    def where(verifier):
        return os.getpid(), os.getppid()

    async def main(die_early):
        verifier = Verifier(isolated=True)
        if die_early:  # the child is spawned, and its parent dies while it is still importing
            verifier.pool.submit(os.getpid)
            os._exit(0)
        child, its_parent = await verifier.run(where)
        print(child, its_parent, flush=True)
        os._exit(0)  # as a killed gateway: no shutdown of the pool

    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1] == "early"))
    """
)


def children_of_marker(marker: str) -> list[int]:
    """Processes whose environment carries `marker` (the verifier children of this test's parents)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as env:
                if marker.encode() in env.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def run_parent(tmp_path: object, mode: str, marker: str) -> subprocess.CompletedProcess[str]:
    script = f"{tmp_path}/parent.py"
    with open(script, "w") as out:
        out.write(PARENT)
    env = {**os.environ, "GRIDSERVE_TEST_MARKER": marker}
    return subprocess.run([sys.executable, script, mode], capture_output=True, text=True, timeout=120, env=env)


def gone_within(marker: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while children_of_marker(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_the_verifier_answers_from_a_child_that_dies_with_the_gateway(tmp_path: object) -> None:
    marker = f"verifier-{os.getpid()}-late"
    done = run_parent(tmp_path, "late", marker)
    assert done.returncode == 0, done.stderr
    child, its_parent = map(int, done.stdout.split())
    assert child != its_parent and its_parent > 1
    assert gone_within(marker, 5.0), f"verifier children left: {children_of_marker(marker)}"


def test_a_verifier_still_starting_when_the_gateway_dies_exits_too(tmp_path: object) -> None:
    marker = f"verifier-{os.getpid()}-early"
    done = run_parent(tmp_path, "early", marker)
    assert done.returncode == 0, done.stderr
    assert gone_within(marker, 20.0), f"verifier children left: {children_of_marker(marker)}"
