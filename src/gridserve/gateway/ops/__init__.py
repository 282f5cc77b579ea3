"""What operators read: metrics, the decision log, request outcomes and traces, GC pause watch."""
