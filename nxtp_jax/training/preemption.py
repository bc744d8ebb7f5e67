"""Preemption (SIGTERM): every process learns at the same step that it should save and stop.

One process: a SIGTERM handler sets a flag. Several processes under `jax.distributed`:
JAX's preemption service catches the signal on any host and agrees a common step with
the others (`multihost_utils.reached_preemption_sync_point`), so the collective save
never deadlocks on hosts that disagree.
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
        self._previous = None
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
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
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
