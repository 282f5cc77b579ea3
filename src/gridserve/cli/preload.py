"""What a local grid's fork server imports once (cli/launch.py), so that the gateways and nodes forked from it do not
import it again: only imports, which start no thread a fork would lose (numpy's BLAS pool, started by torch's import,
handles forks itself) and open nothing. A light install (no torch) preloads what it has.

One thing more than imports: the scheduler's compiled kernel, which every gateway loads at start (~0.4 s of CPU a
process otherwise). Loading it (from numba's disk cache; compiling it the first time on a machine) starts no thread
and leaves nothing open, and a forked gateway finds it ready."""

import contextlib

import gridserve.cli.main
import gridserve.gateway.app
import gridserve.node.main

with contextlib.suppress(ImportError):
    import torch  # noqa: F401
    import transformers.models.gemma3.modeling_gemma3  # noqa: F401

    import gridserve.engines.emulated
    import gridserve.engines.tiny  # noqa: F401

with contextlib.suppress(ImportError):
    from gridserve.scheduler import fused

    fused.compile_kernel()
