"""How a sweep ends when not every trial finished: paused by a signal, or with errors.

SIGINT (Ctrl-C) and SIGTERM pause a sweep. Inside ``Tuner.fit`` Tune's own SIGINT
handler ends the run loop after saving the experiment; ``StopSignals`` hands
SIGTERM to that handler too and remembers the signal for the exit status
(128 + signal number, as a shell reports a process killed by it). The sweep then
writes results.parquet and raises ``SweepInterrupted`` naming the ``--resume``
command. Every trial finished but some ended in error: ``SweepFailed`` with a
summary of the errors.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from typing import Any

import polars as pl

from clinfuse.tune.results import RESULTS_FILE, describe


class SweepError(RuntimeError):
    """A sweep that did not finish cleanly; ``table`` is what results.parquet holds."""

    exit_code = 1

    def __init__(self, message: str, table: pl.DataFrame | None = None) -> None:
        super().__init__(message)
        self.table = table


class SweepInterrupted(SweepError):
    """SIGINT or SIGTERM paused the sweep; the message names the ``--resume`` command."""

    def __init__(self, message: str, table: pl.DataFrame | None, signum: int) -> None:
        super().__init__(message, table)
        self.exit_code = 128 + signum


class SweepFailed(SweepError):
    """Every trial finished, and at least one ended in error."""


def resume_command(out: Path) -> str:
    """The command that continues the sweep in ``out`` (its options are in sweep.json)."""
    return f"clinfuse tune --out {shlex.quote(str(out))} --resume"


def failure_summary(table: pl.DataFrame, counts: dict, finished: int, out: Path) -> str:
    """What ended in error (up to three trials with their last error), what was exported."""
    errors = table.filter(pl.col("status") == "error")
    lines = [
        f"trial {r['trial_id']} ({r['failures']} failures{_last_report(r)}): "
        f"{r['error'] or 'no error text saved'}"
        for r in errors.head(3).iter_rows(named=True)
    ]
    more = [f"... and {errors.height - 3} more"] if errors.height > 3 else []
    exported = (
        f"the best of the {finished} finished trials is in {out / 'best' / 'model'}"
        if finished
        else "no trial finished, so no model was exported"
    )
    return (
        f"{counts['error']} of {table.height} trials ended in error ({describe(counts)}); "
        f"{exported}; every trial is in {out / RESULTS_FILE}:\n  " + "\n  ".join(lines + more)
    )


def _last_report(row: dict[str, Any]) -> str:
    if row["node_id"] is None:
        return ""
    return f", last report from node {row['node_ip']} ({row['node_id'][:12]})"


def stopped_before_fit(out: Path, resume: bool) -> str:
    if resume:
        return f"interrupted before the sweep resumed. Continue with: {resume_command(out)}"
    return (
        "interrupted before the first trial started; nothing to resume: run the same command again"
    )


class StopSignals:
    """SIGTERM stops the sweep the way Ctrl-C does; the signal is kept for the exit code.

    Inside ``Tuner.fit`` Tune's own SIGINT handler pauses the sweep (it saves the
    experiment and returns), and SIGTERM is handed to that handler. Outside it both
    raise KeyboardInterrupt (Ray's driver handler would exit on SIGTERM without a
    word). A second signal during Tune's final save stops at once, as Tune says.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: Any = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._saved = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is not None:
            signal.signal(signal.SIGTERM, self._saved)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.signum = signum
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)  # Tune's: ends the run loop after a last save
        else:
            raise KeyboardInterrupt
