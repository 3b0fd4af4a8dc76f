"""One workflow run per output folder, workers included.

A run holds `<out>/.lock` exclusively for its whole life, and every worker process it starts holds a shared lock on
`<out>/.lock-workers`; a new run needs both, so it refuses to start while the run, or any worker the run left behind,
still writes there (two files: converting one lock from exclusive to shared is not atomic). Workers also watch their
parent and exit when it is gone (a `kill -9` of the run), so none trains on unattended."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from crate.errors import PipelineError

LOCK, WORKERS = ".lock", ".lock-workers"


@contextmanager
def folder_lock(out: Path, command: str) -> Iterator[None]:
    """Hold `out`'s lock for the run; refuse at once if a run or a worker of one holds it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as run:
        _take(run, out, command)
        with open(out / WORKERS, "a+") as workers:
            _take(workers, out, command)  # no worker of an earlier run is alive ...
            workers.truncate(0)  # ... so the file's process ids start afresh
            fcntl.flock(workers, fcntl.LOCK_UN)  # and this run's workers may join
        run.seek(0)
        run.truncate()
        run.write(f"{os.getpid()}\n")
        run.flush()
        yield


def join_lock(out: Path) -> IO[str]:
    """A worker's share of the run's lock (kept until the worker exits); it records its process id in the file."""
    f = open(out / WORKERS, "a+")
    fcntl.flock(f, fcntl.LOCK_SH)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def watch_parent(parent: int, interval: float = 1.0) -> threading.Thread:
    """Exit this process as soon as `parent` is no longer its parent (it died and the process was re-parented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread


def _take(f: IO[str], out: Path, command: str) -> None:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pids = [p for p in f.read().split() if p.isdigit() and Path(f"/proc/{p}").exists()]
        raise PipelineError(
            f"{out} is in use by another `{command}` or by worker processes it left running (process ids that "
            f"held it: {', '.join(pids) or 'unknown'}): wait for it to finish, or stop those processes, then run "
            f"this again") from None
