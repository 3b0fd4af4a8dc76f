"""What a long evaluation run tells the user as it goes: a rich progress bar with a rate and an ETA, and plain
status lines. One place for both, so that every stage of a run reports the same way."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any


class Progress:
    """A rich progress bar with items/s, the elapsed time and an ETA in a terminal; where stdout is not a terminal
    (a log file, a pipe, where rich would cut the columns to the console's width) the same as a plain line when a
    task begins and ends and at most every `interval` seconds between; or nothing (`enabled` False).

    A task's clock (its rate, elapsed time and ETA) starts at `begin`, or else at its first `update`: a caller
    whose items complete in bursts (neurons whose LLM calls are batched) begins the task before its work, so that
    the first items count over the time they took."""

    def __init__(self, enabled: bool, interval: float = 10.0):
        self.bar = None
        self.plain = enabled and not sys.stdout.isatty()
        self.interval = interval
        self.printed: float | None = None  # when the last plain line was printed
        if enabled and not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[elapsed]}"),
                                    TextColumn("ETA"), TextColumn("{task.fields[eta]}"),
                                    TextColumn("{task.fields[note]}"), transient=False)
            self.bar.start()
        self.tasks: dict[str, Any] = {}
        self.start: dict[str, tuple[float, int]] = {}

    def begin(self, desc: str, done: int, total: int, unit: str, at: float | None = None) -> None:
        """Start the clock of task `desc` at `at` (a time.perf_counter() value; now when None), `done` of `total`
        being there already (reused from disk, not counted in the rate); nothing when it has started."""
        if (self.bar is None and not self.plain) or desc in self.start:
            return
        now = time.perf_counter() if at is None else at
        self.start[desc] = (now, done)
        self._show(desc, done, total, unit, "", now, force=True)

    def update(self, desc: str, done: int, total: int, unit: str, note: str = "") -> None:
        """`done` of `total`; the rate counts only what this run computed (not items reused from disk, nor those of
        the first update when the task was not begun); `note` is shown after the ETA (e.g. the LLM cache hits)."""
        if self.bar is None and not self.plain:
            return
        now = time.perf_counter()
        if desc not in self.start:
            self.start[desc] = (now, done)
        self._show(desc, done, total, unit, note, now)

    def _show(self, desc: str, done: int, total: int, unit: str, note: str, now: float, force: bool = False) -> None:
        """The bar, or a plain line when one is due: a task's start (`force`) and end, and every `interval`."""
        t0, done0 = self.start[desc]
        count, seconds = done - done0, now - t0
        rate, elapsed, eta = rate_text(count, seconds, unit), clock_text(seconds), eta_text(count, seconds, total - done)
        if self.bar is not None:
            if desc not in self.tasks:
                self.tasks[desc] = self.bar.add_task(desc, total=total, rate="", elapsed="", eta="", note="")
            self.bar.update(self.tasks[desc], completed=done, rate=rate, elapsed=elapsed, eta=eta, note=note)
        elif force or done >= total or self.printed is None or now - self.printed >= self.interval:
            self.printed = now
            parts = [f"{desc}: {done:,}/{total:,} {unit}", rate, f"elapsed {elapsed}", f"ETA {eta}", note]
            print(", ".join(p for p in parts if p), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def rate_text(count: int, seconds: float, unit: str) -> str:
    """"12.5 neurons/s", or per hour when slower than one a second ("340 neurons/h"); "" before any timing."""
    if seconds <= 0 or count <= 0:
        return ""
    rate = count / seconds
    return f"{rate:,.1f} {unit}/s" if rate >= 1 else f"{rate * 3600:,.0f} {unit}/h"


def clock_text(seconds: float) -> str:
    """"0:01:05" (h:mm:ss, whole seconds)."""
    return str(timedelta(seconds=int(max(seconds, 0))))


def eta_text(count: int, seconds: float, remaining: int) -> str:
    """The time left for `remaining` items at the rate of `count` in `seconds`; "0:00:00" when none are left,
    "-:--:--" before any timing."""
    if remaining <= 0:
        return clock_text(0)
    if seconds <= 0 or count <= 0:
        return "-:--:--"
    return clock_text(remaining * seconds / count)


def say(msg: str) -> None:
    """A status line (what was reused, recorded or discarded), at once."""
    print(msg, flush=True)


__all__ = ["Progress", "rate_text", "clock_text", "eta_text", "say"]
