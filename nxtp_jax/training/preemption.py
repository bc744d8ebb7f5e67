"""Preemption (SIGTERM, or a first Ctrl-C): every process learns at the same step that it should save and stop.

One process: a SIGTERM handler sets a flag. Several processes under `jax.distributed`:
JAX's preemption service catches the signal on any host and agrees a common step with
the others (`multihost_utils.reached_preemption_sync_point`), so the collective save
never deadlocks on hosts that disagree. In one process, a first Ctrl-C (SIGINT) saves and
stops like SIGTERM, and a second one aborts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class PreemptionWatch:
    def __init__(self) -> None:
        self._multi = jax.process_count() > 1
        self._signalled = False
        self._previous = {}
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._signalled:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C: aborting without saving")
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        log.warning("%s received: saving a checkpoint after this step, then stopping", name)
        if signum == signal.SIGINT:
            print("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts)", flush=True)
        self._signalled = True

    def reached(self, step: int) -> bool:
        """True when the run should save at `step` and stop; call it at every step on every process."""
        if not self._multi:
            return self._signalled
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:
            # The preemption service is off (jax_enable_preemption_service=False): no notices.
            return False

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
