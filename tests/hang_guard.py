"""A guard that turns a hang into a test failure instead of a stuck suite (SIGALRM, main thread)."""

import contextlib
import signal


@contextlib.contextmanager
def hang_guard(seconds: float = 60):
    """Raises TimeoutError in the block if it is still running after `seconds`: it loops."""

    def on_alarm(*_):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
