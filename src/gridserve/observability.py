"""Logging and metric conventions shared by the gateway and the node agent.

Logs are JSON lines (python-json-logger) when `--log-format json` is chosen: every record has `time`,
`level`, `logger` and `message`, plus the ids it was given (`request_id`, `decision_id`, `node_id`, ...)
through `extra=`, so one request can be followed across gateway and node logs.
"""

import logging
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Histogram buckets (seconds) for time to first token."""
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
"""Histogram buckets (seconds) for inter-token latency."""

LogFormat = Literal["text", "json"]


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
