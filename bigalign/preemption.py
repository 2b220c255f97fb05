"""Stopping on request: SIGTERM (preemption, `kill`, a scheduler) or SIGINT (Ctrl-C).

The handler only records the signal; the training loop asks `requested()` after
each step (hooks.StopOnSignal), finishes that step, writes a checkpoint and exits 0,
so the next launch resumes where this one stopped. On several hosts a signal may
reach some processes first: the hook agrees on it across processes every
`stop_check_every` steps, so all stop after, and save, the same step. A second
Ctrl-C interrupts at once.
"""

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that turns SIGTERM / SIGINT into a polite stop request.

    Outside the main thread (where Python allows no handlers) it installs nothing
    and `requested()` stays false.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        if self.signal_name == "SIGINT" and number == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.signal_name = signal.Signals(number).name
        print(f"\nReceived {self.signal_name}: finishing this step, then saving a checkpoint "
              f"(Ctrl-C again to stop at once)", flush=True)

    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signal_name is not None
