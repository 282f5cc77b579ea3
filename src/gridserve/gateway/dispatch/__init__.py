"""Getting a request onto a node: ranked attempts, hedging, retries, mid-stream failover, warm standby."""
