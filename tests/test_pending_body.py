"""PendingBody: body bytes between the HTTP parser and the app."""

from __future__ import annotations

from engine.api.pending_body import MAX_PENDING_BYTES, MAX_PENDING_PARTS, PendingBody


def test_single_part_is_handed_over_uncopied() -> None:
    pending = PendingBody()
    part = b"x" * 70_000
    pending.append(part)

    received = pending.take()

    assert received is part
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


def test_full_after_max_bytes() -> None:
    pending = PendingBody()
    pending.append(b"x" * MAX_PENDING_BYTES)
    assert not pending.full

    pending.append(b"x")

    assert pending.full


def test_full_after_max_parts_of_one_byte() -> None:
    # A chunked body of one-byte chunks would otherwise keep a bytes object
    # of about 34 bytes, plus a list slot, for every byte received.
    pending = PendingBody()
    for _ in range(MAX_PENDING_PARTS):
        pending.append(b"x")
    assert not pending.full

    pending.append(b"x")

    assert pending.full


def test_take_empties_a_full_body() -> None:
    pending = PendingBody()
    for _ in range(MAX_PENDING_PARTS + 1):
        pending.append(b"x")

    assert pending.take() == b"x" * (MAX_PENDING_PARTS + 1)
    assert not pending.full
