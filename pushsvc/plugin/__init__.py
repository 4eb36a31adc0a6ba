"""The plugin platform: the public API, the hook specifications, the plugin manager."""
