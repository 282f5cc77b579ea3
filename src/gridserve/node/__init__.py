"""The node agent an operator runs beside an engine."""
