"""Why the reliability book refused a call.

ReliabilityError
 ├── InvalidConfig   a ReliabilityConfig field is out of range        (also a ValueError)
 ├── InvalidEvent    a NodeEvent contradicts itself                   (also a ValueError)
 ├── UnknownNode     an admin action named a node the book never saw  (also a KeyError)
 └── CannotRelease   release() of a banned node: a ban is permanent   (also a ValueError)
"""


class ReliabilityError(Exception):
    """Base of every error raised by `gridserve.reliability`. `detail` is the human-readable reason."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self.detail


class InvalidConfig(ReliabilityError, ValueError):
    """A configuration field is out of its documented range; `field` names it."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


class InvalidEvent(ReliabilityError, ValueError):
    """A node event is inconsistent (non-finite time, a severity on a non-incident, ...)."""


class UnknownNode(ReliabilityError, KeyError):
    """The node id was never added to, nor recorded in, this book."""

    def __init__(self, node_id: str) -> None:
        super().__init__(f"unknown node {node_id!r}")
        self.node_id = node_id


class CannotRelease(ReliabilityError, ValueError):
    """The node is banned (two severe incidents); no admin action or canary brings it back."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(f"node {node_id!r} is banned and cannot be released ({reason})")
        self.node_id = node_id
        self.reason = reason
