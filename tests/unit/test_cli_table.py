"""The node table of `gridserve nodes` / `gridserve up`: every header sits over its own value."""

from gridserve.cli.table import node_table

NODE = {
    "node_id": "n0123456789abcdef",
    "state": "up",
    "reliability": {"state": "probation", "score": 0.73},
    "engine": "emulated:h100-sxm",
    "hardware": {"accelerator": "H100 SXM"},
    "emulated": True,
    "models": [{"name": "llama-3-8b"}, {"name": "gemma-3-270m"}],
    "telemetry": {
        "active_requests": 3,
        "tokens_per_s": 41.25,
        "utilization": 0.5,
        "memory_used_bytes": 2 * 2**30,
        "memory_total_bytes": 80 * 2**30,
    },
    "heartbeat_age_s": 1.25,
    "endpoint": "http://10.0.0.7:9001",
}


def test_each_header_holds_its_own_value() -> None:
    table = node_table([NODE])
    cells = {str(column.header): str(next(iter(column.cells))) for column in table.columns}
    assert cells == {
        "node": "n0123456789a",
        "state": "[green]up[/]",
        "trust": "probation 0.73",
        "engine": "emulated:h100-sxm",
        "hardware": "H100 SXM (emulated)",
        "models": "llama-3-8b, gemma-3-270m",
        "active": "3",
        "tok/s": "41.2",
        "util": "50%",
        "mem GiB": "2.0/80.0",
        "hb age s": "1.2",
        "endpoint": "http://10.0.0.7:9001",
    }
    assert all(str(column.header) for column in table.columns)
