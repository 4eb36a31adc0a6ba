"""The HTTP layer: the API handlers, health, metrics and OpenAPI routes."""
