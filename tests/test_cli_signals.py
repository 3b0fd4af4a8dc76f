"""SIGTERM in the commands' processes: the command unwinds (see test_autointerp_interpret), and a child forked under
the command still dies of it, even one stuck in C code where a Python handler never runs."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import sys

import pytest

from crate.cli import _stop_on_sigterm


def _deadlock_in_c() -> None:
    """Relock a default pthread mutex held by this thread: blocks in C for ever, as a child does that was forked
    while another thread held a lock (lm-eval's bootstrap pool forked beside tqdm's monitor thread did this on CI)."""
    libc = ctypes.CDLL(None, use_errno=True)
    mutex = ctypes.create_string_buffer(64)  # zeroed = PTHREAD_MUTEX_INITIALIZER (40 bytes on x86-64 glibc)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)


@pytest.mark.skipif(sys.platform != "linux", reason="a glibc pthread mutex and the fork start method")
def test_a_forked_child_stuck_in_c_dies_of_sigterm():
    previous = _stop_on_sigterm([])
    try:
        child = mp.get_context("fork").Process(target=_deadlock_in_c)
        child.start()
        child.join(0.5)  # let it reach the deadlock
        child.terminate()  # SIGTERM, as multiprocessing.Pool.terminate() sends it
        child.join(10)
        if child.exitcode is None:  # it ignored SIGTERM: the parent would have hung in join() for ever
            child.kill()
            child.join()
            pytest.fail("a forked child stuck in C ignored SIGTERM: it inherited the command's Python handler")
        assert child.exitcode == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_command_keeps_its_handler_after_forking():
    """Only the child gets the default back: the command itself still unwinds on SIGTERM."""
    terminated: list[int] = []
    previous = _stop_on_sigterm(terminated)
    try:
        handler = signal.getsignal(signal.SIGTERM)
        child = mp.get_context("fork").Process(target=int)
        child.start()
        child.join(10)
        assert child.exitcode == 0 and signal.getsignal(signal.SIGTERM) is handler
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)
        assert terminated == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
