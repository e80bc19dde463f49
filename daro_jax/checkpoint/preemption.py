"""Preemption: SIGTERM sets a flag instead of ending the process, and every process
agrees to stop at the same step (`any_process_preempted`)."""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

_PREEMPTED = threading.Event()


def install_sigterm_handler():
    """On SIGTERM, set the preemption flag instead of dying.

    TPU VMs get SIGTERM before preemption; the loop polls `any_process_preempted()`, finishes
    its step, saves and exits. Must be called from the main thread. Returns the previous
    handler (for `signal.signal(signal.SIGTERM, previous)`).
    """

    def handler(signum, frame):
        _PREEMPTED.set()

    return signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def handling_sigterm():
    """Within this context SIGTERM sets the preemption flag (`install_sigterm_handler`); on
    leaving it, however it is left, the handler installed before is back."""
    previous = install_sigterm_handler()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def preemption_requested() -> bool:
    """True once this process has received SIGTERM (after `install_sigterm_handler`)."""
    return _PREEMPTED.is_set()


def clear_preemption() -> None:
    """Resets the preemption flag."""
    _PREEMPTED.clear()


def any_process_preempted() -> bool:
    """True on every process when any process has received SIGTERM.

    Collective when there are several processes (an all-gather of one flag each): call it at
    the same point of the loop everywhere, so that all processes stop at the same step.
    """
    local = preemption_requested()
    if jax.process_count() == 1:
        return local
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    return bool(np.asarray(flags).any())
