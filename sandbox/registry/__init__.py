"""The registry of running sandboxes: entries, `list` and `gc`."""
