"""Child processes that must not outlive the process that started them."""

import os
import signal
import threading
import time

PARENT_POLL_S = 1.0


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM if its parent dies (even by SIGKILL), so nothing is left orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def watch_parent(parent: int) -> None:
    """In a child process: exit as soon as `parent` is gone. The death signal covers a parent that dies from now
    on; a parent that died before it was set (while this child was still starting: a spawned Python imports for
    seconds) is caught at once, and a thread checks every PARENT_POLL_S whatever happens."""
    die_with_parent()
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
