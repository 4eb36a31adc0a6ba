"""Transports: the WebSocket engine (codec, upgrade, connection) and the per-pass outbox."""
