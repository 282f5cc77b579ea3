"""What a local grid's fork server imports once (cli/launch.py), so that the gateways and nodes forked from it do not
import it again: only imports, which start no thread a fork would lose (numpy's BLAS pool, started by torch's import,
handles forks itself) and open nothing. A light install (no torch) preloads what it has."""

import contextlib

import gridserve.cli.main
import gridserve.gateway.app
import gridserve.node.main

with contextlib.suppress(ImportError):
    import torch  # noqa: F401
    import transformers.models.gemma3.modeling_gemma3  # noqa: F401

    import gridserve.engines.emulated
    import gridserve.engines.tiny  # noqa: F401
