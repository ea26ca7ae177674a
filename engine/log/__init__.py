"""The append-only SQL event log."""

from engine.log.store import append, head, read, read_all, row_to_event

__all__ = ["append", "head", "read", "read_all", "row_to_event"]
