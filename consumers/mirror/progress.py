"""Progress of a mirror: one rewritten line on a terminal, log lines elsewhere."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from typing import Final, Literal, TextIO

import structlog

from consumers.mirror.copier import Stats

log = structlog.get_logger(__name__)

ProgressMode = Literal["auto", "line", "log", "none"]

LINE_INTERVAL: Final = 0.25
LOG_INTERVAL: Final = 10.0
# Rates are measured since the last sample at least this many seconds old,
# or since the start.
RATE_WINDOW: Final = 10.0


class Progress:
    def __init__(
        self, stats: Stats, mode: ProgressMode = "auto", stream: TextIO = sys.stderr
    ) -> None:
        if mode == "auto":
            mode = "line" if stream.isatty() else "log"
        self.stats = stats
        self.mode = mode
        self.stream = stream
        self.position = 0
        self.head = 0
        self._last_report = float("-inf")
        self._last_reported: tuple[int, int, int] | None = None
        # The first sample is the start, so that the copies done before the
        # first update count in the first rates.
        self._samples: deque[tuple[float, int, int]] = deque(
            [(time.monotonic(), stats.bytes_sent, stats.applied)]
        )
        self._line_shown = False
        if mode == "line":
            self._clear_before_log_lines()

    def _clear_before_log_lines(self) -> None:
        """Make every log line erase the progress line first.

        Log lines and the progress line share standard error; the progress
        line is drawn again at the next update.
        """
        processors = structlog.get_config()["processors"]

        def clear_line(
            _logger: object, _method: str, event_dict: structlog.types.EventDict
        ) -> structlog.types.EventDict:
            self.clear()
            return event_dict

        # In place, so that loggers cached before this call, which keep a
        # reference to the list, clear the line too.
        processors.insert(0, clear_line)
        structlog.configure(processors=processors)

    def clear(self) -> None:
        if self._line_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._line_shown = False

    @property
    def lag(self) -> int:
        return max(self.head - self.position, 0)

    def update(
        self, position: int, head: int | None = None, force: bool = False
    ) -> None:
        self.position = position
        if head is not None:
            self.head = max(self.head, head)
        self.head = max(self.head, position)
        now = time.monotonic()
        self._samples.append((now, self.stats.bytes_sent, self.stats.applied))
        # Keep the last sample from before the window as its baseline, so a
        # copy that finished inside the window counts in full.
        while len(self._samples) > 1 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        interval = LINE_INTERVAL if self.mode == "line" else LOG_INTERVAL
        if not force and now - self._last_report < interval:
            return
        self._last_report = now
        self._report()

    async def tick(self) -> None:
        """Report on a timer too, so that a long blob copy shows its bytes."""
        interval = LINE_INTERVAL if self.mode == "line" else LOG_INTERVAL
        while True:
            await asyncio.sleep(interval)
            self.update(self.position)

    def _rates(self) -> tuple[float, float]:
        if len(self._samples) < 2:
            return 0.0, 0.0
        first, last = self._samples[0], self._samples[-1]
        seconds = last[0] - first[0]
        if seconds <= 0:
            return 0.0, 0.0
        return (last[1] - first[1]) / seconds, (last[2] - first[2]) / seconds

    def _report(self) -> None:
        reported = (self.position, self.head, self.stats.applied)
        if self.mode == "log" and reported == self._last_reported:
            return
        self._last_reported = reported
        bytes_rate, event_rate = self._rates()
        if self.mode == "line":
            line = (
                f"position {self.position}/{self.head}  "
                f"{self.stats.applied} applied, {self.stats.skipped} skipped, "
                f"{self.stats.not_copied} not copied  "
                f"{_size(self.stats.bytes_copied)} copied  "
                f"{_size(bytes_rate)}/s  {event_rate:.1f} events/s  lag {self.lag}"
            )
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
            self._line_shown = True
        elif self.mode == "log":
            log.info(
                "mirror_progress",
                position=self.position,
                head=self.head,
                lag=self.lag,
                applied=self.stats.applied,
                skipped=self.stats.skipped,
                not_copied=self.stats.not_copied,
                bytes_copied=self.stats.bytes_copied,
                bytes_sent=self.stats.bytes_sent,
                bytes_per_second=round(bytes_rate),
                events_per_second=round(event_rate, 1),
            )

    def finish(self) -> None:
        """Write a last report and end the terminal line."""
        self.update(self.position, force=True)
        if self._line_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._line_shown = False


def _size(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    index = 0
    while count >= 1024 and index < len(units) - 1:
        count /= 1024
        index += 1
    return f"{count:.0f} B" if index == 0 else f"{count:.1f} {units[index]}"
