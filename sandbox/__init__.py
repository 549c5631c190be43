"""aero-sandbox: run any command inside real kernel resource limits."""

__version__ = "0.1.0"
