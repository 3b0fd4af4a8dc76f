"""One workflow run per output folder, workers included.

A run and every worker process it starts hold a shared lock on `<out>/.lock`; a new run first takes it exclusively,
so it refuses to start while the run, or any worker the run left behind, still writes there. Workers also watch their
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

LOCK = ".lock"


@contextmanager
def folder_lock(out: Path, command: str) -> Iterator[None]:
    """Hold `out`'s lock for the run; refuse at once if a run or a worker of one holds it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"{out} is in use by another `{command}` or by worker processes it left running (process ids that "
                f"held it: {_holders(f)}): wait for it to finish, or stop those processes, then run this again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_SH)  # shared from now on: the workers take it too
        yield


def join_lock(out: Path) -> IO[str]:
    """A worker's share of the run's lock (kept until the worker exits); it records its process id in the file."""
    f = open(out / LOCK, "a+")
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


def _holders(f: IO[str]) -> str:
    f.seek(0)
    pids = [p for p in f.read().split() if p.isdigit() and Path(f"/proc/{p}").exists()]
    return ", ".join(pids) or "unknown"
