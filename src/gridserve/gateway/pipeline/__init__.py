"""Models split layer-wise over stage nodes: sessions, planning a chain, serving it through the API."""
