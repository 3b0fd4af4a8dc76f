"""What a long evaluation run tells the user as it goes: a rich progress bar with a rate and an ETA, and plain
status lines. One place for both, so that every stage of a run reports the same way."""

from __future__ import annotations

import time
from typing import Any


class Progress:
    """A rich progress bar with items/s and an ETA, or nothing."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), TextColumn("{task.fields[note]}"), transient=False)
            self.bar.start()
        self.tasks: dict[str, Any] = {}
        self.start: dict[str, tuple[float, int]] = {}

    def update(self, desc: str, done: int, total: int, unit: str, note: str = "") -> None:
        """`done` of `total`; the rate counts only what this run computed (not items reused from disk); `note`
        is shown after the ETA (e.g. the LLM cache hits)."""
        if self.bar is None:
            return
        now = time.perf_counter()
        if desc not in self.tasks:
            self.tasks[desc] = self.bar.add_task(desc, total=total, rate="", note="")
            self.start[desc] = (now, done)  # the first item's start is unknown: the rate counts from its end
        t0, done0 = self.start[desc]
        self.bar.update(self.tasks[desc], completed=done, rate=rate_text(done - done0, now - t0, unit), note=note)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def rate_text(count: int, seconds: float, unit: str) -> str:
    """"12.5 neurons/s", or per hour when slower than one a second ("340 neurons/h"); "" before any timing."""
    if seconds <= 0 or count <= 0:
        return ""
    rate = count / seconds
    return f"{rate:,.1f} {unit}/s" if rate >= 1 else f"{rate * 3600:,.0f} {unit}/h"


def say(msg: str) -> None:
    """A status line (what was reused, recorded or discarded), at once."""
    print(msg, flush=True)


__all__ = ["Progress", "rate_text", "say"]
