"""A discrete-event simulation of a whole grid that runs the production scheduler, reliability ledger and
performance model with an injected clock and randomness."""
