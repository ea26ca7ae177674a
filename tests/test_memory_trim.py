"""When the server hands freed upload memory back to the operating system."""

from __future__ import annotations

import platform

import pytest

from engine.api.memory import MemoryTrimmer, _load_malloc_trim

MiB = 1024 * 1024


class Calls:
    """Records each malloc_trim call the trimmer makes."""

    def __init__(self) -> None:
        self.pads: list[int] = []

    def __call__(self, pad: int) -> int:
        self.pads.append(pad)
        return 1


def test_trim_waits_for_last_upload() -> None:
    calls = Calls()
    trimmer = MemoryTrimmer(calls, after_bytes=64 * MiB)
    trimmer.upload_started()
    trimmer.upload_started()
    trimmer.upload_finished(48 * MiB)
    assert calls.pads == []

    trimmer.upload_finished(48 * MiB)
    assert calls.pads == [0]
    assert trimmer.trims == 1


def test_trim_needs_enough_bytes() -> None:
    calls = Calls()
    trimmer = MemoryTrimmer(calls, after_bytes=64 * MiB)
    for _ in range(63):
        trimmer.upload_started()
        trimmer.upload_finished(MiB)
    assert calls.pads == []

    trimmer.upload_started()
    trimmer.upload_finished(MiB)
    assert calls.pads == [0]


def test_trim_counts_from_zero_again() -> None:
    calls = Calls()
    trimmer = MemoryTrimmer(calls, after_bytes=10)
    for size in (10, 5, 5):
        trimmer.upload_started()
        trimmer.upload_finished(size)
    assert calls.pads == [0, 0]


def test_trim_absent_does_nothing() -> None:
    trimmer = MemoryTrimmer(None, after_bytes=1)
    trimmer.upload_started()
    trimmer.upload_finished(100)
    assert trimmer.trims == 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_malloc_trim_runs() -> None:
    trim = _load_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)
