"""The `gridserve` command."""
