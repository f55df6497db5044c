"""Progress output that reads well on a terminal and in a log file.

On a terminal (or in a Jupyter notebook) a progress bar redraws itself in place. Where
the stream is a file or a pipe (CI, ``nohup``, a Ray worker's log) those redraws
arrive as carriage-return-joined frames on one line; there, long work prints one
plain line per step instead, with its rate and the time left:

    scoring: 3/12 chunks, 0.84 chunks/s, ETA 11s

``interactive`` is the one place that decides; ``progress`` (chunks, films, files)
and ``training.run.EpochLines`` (Lightning epochs) follow it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) shows a redrawn progress bar as a bar.

    A terminal does; so does a Jupyter kernel's output stream (tqdm draws a widget
    there), although it is not a TTY.
    """
    stream = sys.stderr if stream is None else stream
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h07m``."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """A progress report of plain lines, with the part of tqdm's interface we use.

    Args:
        iterable: items to pass through (optional; else call ``update``).
        total: the number of steps expected.
        desc: what is progressing, e.g. ``"scoring"``.
        unit: one step, e.g. ``"chunk"``.
        stream: where lines go (default stderr).
        min_interval: seconds between two lines; the last step always prints.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int,
        desc: str,
        unit: str,
        stream: TextIO | None = None,
        min_interval: float = 0.0,
    ) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream = stream
        self.min_interval = min_interval
        self.n = 0
        self._start = self._last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n >= self.total or now - self._last >= self.min_interval:
            self._last = now
            print(self.line(now - self._start), file=self.stream or sys.stderr, flush=True)

    def line(self, elapsed: float) -> str:
        """``desc: n/total units, rate units/s, ETA t`` after ``elapsed`` seconds."""
        rate = self.n / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s, {rate:.3g} {self.unit}s/s"
        if rate > 0 and self.n < self.total:
            text += f", ETA {format_seconds((self.total - self.n) / rate)}"
        return text + (f", done in {format_seconds(elapsed)}" if self.n >= self.total else "")

    def close(self) -> None:
        pass

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int,
    desc: str,
    unit: str,
    enabled: bool = True,
    stream: TextIO | None = None,
    min_interval: float = 0.0,
    **tqdm_options: Any,
) -> Any:
    """A tqdm bar on a terminal, a ``LineProgress`` elsewhere, silent when not ``enabled``.

    Both wrap ``iterable`` and offer ``update``, ``close`` and ``with``.
    ``min_interval`` throttles the plain lines (tqdm throttles its own redraws).
    """
    if interactive(stream) or not enabled:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled,
                    file=stream, **tqdm_options)  # fmt: skip
    return LineProgress(
        iterable, total=total, desc=desc, unit=unit, stream=stream, min_interval=min_interval
    )
