"""Keep the cyclic garbage collector off what a node loads once.

A node's process holds hundreds of thousands of long-lived objects once its engine has started (torch, transformers,
the model's modules, the app): a full collection walks them all, about 200 ms on this project's 2-core test machine
for the emulated engine with its tiny text model, and every stream the node serves stops meanwhile (a first token
200 ms late, seen by the gateway as network time). After start and after each load, what is alive is collected once
and then frozen into the permanent generation (`gc.freeze`), which collections skip: what requests make is still
collected as before. vLLM freezes its engine's heap after start-up for the same reason."""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("gridserve.node")


def settle_heap(why: str) -> float:
    """Collect, then freeze everything alive (`why`: what was just loaded, for the log); returns the seconds it
    took."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    took = time.perf_counter() - started
    log.info("froze %d objects after %s (%.0f ms)", gc.get_freeze_count(), why, took * 1e3)
    return took


__all__ = ["settle_heap"]
