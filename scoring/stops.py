"""How a scoring run stops early: SIGINT (Ctrl-C) or SIGTERM is a pause.

While ``score_cohort`` or ``score_with_ray`` runs, both signals raise
``KeyboardInterrupt`` in the driver (Ray's driver handler would otherwise exit on
SIGTERM without a word), except while a part is being committed: there the signal
waits until the manifest and the part agree (``PauseSignals.held``). The run then
raises ``ScoringPaused``, which carries the signal for the exit status (128 + its
number, as a shell reports a process killed by it) and how many chunks are done.
Every committed part stays valid, so ``--resume`` continues where it stopped.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ScoringPaused(KeyboardInterrupt):
    """A scoring run stopped by SIGINT or SIGTERM after committing what was finished.

    A ``KeyboardInterrupt``, so a notebook's Ctrl-C still stops the cell.

    Attributes:
        signum: the signal (``exit_code`` is 128 + it).
        done, total: chunks finished before and during this run, and in the plan.
        manifest: whether the run's manifest was written (else there is nothing to resume).
    """

    def __init__(self, signum: int, done: int, total: int, manifest: bool) -> None:
        super().__init__(f"paused by {signal.Signals(signum).name}")
        self.signum, self.done, self.total, self.manifest = signum, done, total, manifest

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PauseSignals:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` now, or at the end of a ``held`` block.

    Only the main thread can set signal handlers; elsewhere this does nothing and a
    signal does what it did before. A signal that is ignored when the run starts stays
    ignored.

    Attributes:
        signum: the first signal received, or None.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._held = 0
        self._pending = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> PauseSignals:
        if threading.current_thread() is threading.main_thread():
            # A signal the parent ignores (``nohup``, ``cmd &`` in a script) stays ignored.
            mine = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
            self._saved = {s: signal.signal(s, self._on_signal) for s in mine}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved = {}

    @contextmanager
    def held(self) -> Iterator[None]:
        """A block a signal does not cut short; a signal received inside is raised after it."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if self._pending and not self._held:
            self._pending = False
            raise KeyboardInterrupt

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if self._held:
            self._pending = True
            return
        raise KeyboardInterrupt
