"""SIGTERM/SIGINT during a run: a flag the loop reads at step boundaries (save, then exit 0)."""

from __future__ import annotations

import signal
from typing import Any


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

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
