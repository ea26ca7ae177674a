"""cairn: a container registry whose storage is an event log."""

__version__ = "0.1.0"
