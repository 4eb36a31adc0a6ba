"""The version of pushsvc (one place: setup.cfg and the code read it here)."""

__version__ = "0.1.0"
