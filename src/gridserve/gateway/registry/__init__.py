"""Node state: intake of registrations and heartbeats, the failure detector, probes, cluster sync, replay."""
