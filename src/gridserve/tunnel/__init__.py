"""Outbound-only nodes: a node behind NAT dials the gateway and keeps one WebSocket open, and the gateway sends it
over that connection everything it sends other nodes over HTTP (docs/protocol.md, "The tunnel").

`wire` is the frame format both ends speak; `handshake` the mutual, signed greeting that opens a tunnel. The node's
end is `gridserve.node.tunnel`, the gateway's `gridserve.gateway.transport.tunnel`."""
