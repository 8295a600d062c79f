"""SIGTERM/SIGINT during a run: a flag the loop reads at step boundaries (save, then exit 0).

Before the trainer installs its `StopFlag`, `alignx train`'s start-up handler (`cli._exit_on_sigterm`)
either exits 0 at once (one process: nothing to save) or, in a multi-process job, only records the
signal (`distributed.record_signal`): a process that left alone would leave the others blocked in a
collective. `StopFlag.install` takes a recorded signal over, and the trainer's first agreed check (an
all-gather at a start-up boundary) stops every process together.
"""

from __future__ import annotations

import signal
from typing import Any

from alignx_jax import distributed


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker): no handler
                pass
        early = distributed.take_recorded_signal()  # a start-up signal recorded before this flag existed
        if early is not None and self.signum is None:
            self.signum = early

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
