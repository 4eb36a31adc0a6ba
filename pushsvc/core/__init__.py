"""The service core, transport-neutral: sessions, the hub, keepalive, rate limits, the node."""
