"""Why a sample has no risk: its own input, or something else (then the chunk is not done).

Two classes of failure, told apart where the exception is raised:

* **Input rows.** The files can be read and what they hold for this subject cannot be
  used: a value that does not cast (``"n/a"`` as a heart rate), a dosage outside
  0/1/2, two genotype rows. Scoring again gives the same answer, so the sample gets
  an *error row* (risk null, ``error`` naming subject, file and reason) and its chunk
  is done. These are ``InputError``s (``clinfuse.errors``) other than the one below.
* **Everything else.** A cohort table that cannot be opened or decoded at all
  (``CohortUnreadable``: missing, permission denied, an I/O error, a truncated or
  corrupt Parquet file, a node that does not mount the cohort), or an exception
  clinfuse does not know as bad input (a bug, out of memory). The sample still gets
  an error row, so the output keeps one row per sample, but the rows are *failed*:
  the manifest records the chunk as failed, ``--resume`` scores it again, and
  ``score`` ends with a non-zero exit naming the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from clinfuse.errors import InputError


class CohortUnreadable(InputError):
    """A cohort file that cannot be opened or decoded as a whole, here and now.

    Not a fault of any one subject; scoring again (once the file or mount is fixed)
    can succeed, so rows failing with it are never a finished chunk.
    """


def is_file_level(err: BaseException) -> bool:
    """Whether a read failure concerns the file as a whole (open, read, decode).

    Polars raises ``OSError``s (a missing file) or a ``ComputeError`` (not Parquet,
    truncated, an empty glob) when a file cannot be read; a value or column that does
    not fit the schema raises ``InvalidOperationError``, ``ColumnNotFoundError`` or
    ``SchemaError``, which are the input's content.
    """
    return isinstance(err, (OSError, pl.exceptions.ComputeError))


def is_input_fault(err: BaseException) -> bool:
    """Whether ``err`` is the sample's own input (an error row that stays) or not."""
    return isinstance(err, InputError) and not isinstance(err, CohortUnreadable)


@dataclass(frozen=True)
class ScoredChunk:
    """A chunk's output rows and how many of them failed for a reason other than input.

    Attributes:
        rows: one output row per sample (``scoring.plan.OUTPUT_SCHEMA``).
        failed: rows whose error is not their input's fault (see the module docstring).
        failure: the first such error, as written in its row.
    """

    rows: pl.DataFrame
    failed: int = 0
    failure: str | None = None

    @property
    def errors(self) -> int:
        """Rows without a risk, for any reason."""
        return int(self.rows["error"].is_not_null().sum())

    @staticmethod
    def concat(parts: list[ScoredChunk]) -> ScoredChunk:
        failures = [p.failure for p in parts if p.failure is not None]
        return ScoredChunk(
            pl.concat([p.rows for p in parts]),
            sum(p.failed for p in parts),
            failures[0] if failures else None,
        )
