"""A study folder is used by one run at a time, workers included, and workers die with the run (a `kill -9` of
`crate study` left its two workers training into the folder, and a rerun trained the same runs beside them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crate.errors import PipelineError
from crate.eval.workflows.lock import folder_lock

# a "study" process: takes the folder's lock, starts one worker as crate study does (spawned, with its initializer),
# prints the worker's pid and sleeps; the worker sleeps too
STUDY = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from crate.eval.workflows.lock import folder_lock
from crate.eval.workflows.study import _worker_init

def work():
    time.sleep(120)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    with folder_lock(out, "crate study"):
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                   initargs=(os.getpid(), str(out)))
        pool.submit(work)
        while not (out / "worker").exists():
            pids = [p.pid for p in pool._processes.values()]
            if pids and (out / ".lock-workers").read_text().split():  # the worker has joined the lock
                (out / "worker").write_text(str(pids[0]))
            time.sleep(0.1)
        time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path):
    with folder_lock(tmp_path, "crate study"):
        with pytest.raises(PipelineError, match=rf"{tmp_path} is in use by another `crate study` .*process ids that "
                                                rf"held it: {os.getpid()}\)"):
            with folder_lock(tmp_path, "crate study"):
                pass
    with folder_lock(tmp_path, "crate study"):  # released: the next run goes ahead
        pass


def test_workers_die_with_the_study_and_hold_the_folder_until_then(tmp_path):
    script = tmp_path / "study.py"
    script.write_text(STUDY)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    study = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "worker").exists():
            assert time.monotonic() < deadline and study.poll() is None, "the worker did not start"
            time.sleep(0.2)
        worker = int((out / "worker").read_text())
        assert alive(worker)
        os.kill(study.pid, signal.SIGKILL)
        study.wait()
        # the study is gone; its worker notices within a second or two and exits, freeing the folder
        deadline = time.monotonic() + 30
        while alive(worker):
            assert time.monotonic() < deadline, "the worker outlived its study"
            time.sleep(0.2)
        with folder_lock(out, "crate study"):
            pass
    finally:
        study.kill()
        study.wait()


def test_a_worker_left_running_keeps_the_folder_locked(tmp_path):
    """Without the parent watch (a worker that does not notice), the rerun is still refused: the worker holds the
    folder's lock."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom crate.eval.workflows.lock import join_lock\n"
            "f = join_lock(Path(sys.argv[1])); print('joined', flush=True); time.sleep(120)\n")
    with folder_lock(tmp_path, "crate study"):
        worker = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == "joined"
    try:  # the run has ended (its lock released), the worker has not
        with pytest.raises(PipelineError, match=rf"process ids that held it: .*{worker.pid}"):
            with folder_lock(tmp_path, "crate study"):
                pass
    finally:
        worker.kill()
        worker.wait()
    with folder_lock(tmp_path, "crate study"):
        pass
