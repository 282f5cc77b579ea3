"""Child processes that must not outlive the process that started them."""

import signal


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM if its parent dies (even by SIGKILL), so nothing is left orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
