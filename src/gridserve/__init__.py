"""gridserve: LLM inference from a grid of heterogeneous nodes behind one OpenAI-compatible endpoint."""

__version__ = "0.1.0"
