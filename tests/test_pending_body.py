"""PendingBody: body bytes between the HTTP parser and the app."""

from __future__ import annotations

from engine.api.pending_body import PendingBody


def test_single_part_is_handed_over_uncopied() -> None:
    pending = PendingBody()
    part = b"x" * 70_000
    pending.append(part)

    taken = pending.take()

    assert taken is part
    assert pending.size == 0


def test_parts_are_joined_in_order() -> None:
    pending = PendingBody()
    pending.append(b"abc")
    pending.append(b"")
    pending.append(b"defg")

    assert pending.size == 7
    assert pending.take() == b"abcdefg"
    assert pending.size == 0


def test_take_when_empty_returns_no_bytes() -> None:
    pending = PendingBody()
    pending.append(b"abc")
    pending.take()

    assert pending.take() == b""
