"""SIGTERM / SIGINT (and JAX's preemption notice on pods) as "stop after the current step": the loop's
PreemptionHook asks `PreemptionGuard.requested(step)` and the checkpoint hook then saves that step."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import jax


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into "stop after the current step" (`requested(step)`); a second signal of the
    same kind acts as it did before (e.g. Ctrl-C twice aborts). With several processes, JAX's preemption
    service decides (SIGTERM on any process; all stop at the same step) and no Python handler is installed,
    so that JAX's own SIGTERM notifier stays in place."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoints=None, log: Callable[[str], None] = print):
        self.checkpoints, self.log = checkpoints, log
        self.signal_name = ""
        self._previous: dict = {}

    def install(self) -> PreemptionGuard:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
        self.log(f"received {self.signal_name}: finishing the current step, then saving a checkpoint and "
                 f"exiting (send {self.signal_name} again to abort without saving)")

    def requested(self, step: int) -> bool:
        if self.signal_name:
            return True
        if self.checkpoints is not None and self.checkpoints.reached_preemption(step):
            self.signal_name = "preemption notice"
            return True
        return False
