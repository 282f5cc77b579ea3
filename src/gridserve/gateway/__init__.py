"""The OpenAI-compatible front door: membership, scheduling, dispatch, decisions, admin and metrics."""
