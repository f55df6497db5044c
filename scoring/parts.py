"""A scoring run's part files on disk: written, committed, checked, read back.

Each chunk's rows are written to a temporary file in OUT_DIR with Parquet page
checksums (``integrity.checksums.write_parquet``) and hashed; the process holding
the output lock (the driver) then *commits* the part: it records the part's sha256
and row count under ``parts`` in ``_manifest.json`` first, and only then moves the
file into place with ``os.replace``. So a ``part-*.parquet`` that is visible always
has its digest recorded, whatever moment a ``kill -9`` lands at, and ``--resume``
can hold every finished part to its digest: a part whose bytes changed since (or
that was never recorded, e.g. written by a version without digests) is scored again.
Workers and Ray actors only stage parts; they never write the manifest.

A part whose rows failed for a reason other than their input (``scoring.failures``)
is committed too, so the output keeps one row per sample, but its record carries
``failed`` (the count) and ``failure`` (the first reason): ``--resume`` scores such a
chunk again and ``read_scores`` warns about it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from clinfuse.errors import IntegrityError
from clinfuse.hashing import file_sha256
from clinfuse.integrity.checksums import (
    read_parquet_verified,
    temp_file_beside,
    write_parquet,
    write_text_atomic,
)

MANIFEST = "_manifest.json"
PART = "part-{:05d}.parquet"
RESCORE = "run clinfuse score again with --resume to re-score it"


@dataclass(frozen=True)
class StagedPart:
    """A chunk's rows written to a temporary file in OUT_DIR, not yet committed.

    ``failed`` rows (and the first ``failure``) are not their input's fault: the chunk
    is committed but not done (``scoring.failures``).
    """

    index: int
    tmp: str
    sha256: str
    rows: int
    failed: int = 0
    failure: str | None = None

    @property
    def name(self) -> str:
        return PART.format(self.index)


def stage_part(
    out_dir: str | Path, index: int, frame: pl.DataFrame, failed: int = 0,
    failure: str | None = None,
) -> StagedPart:  # fmt: skip
    """Writes one chunk's rows to a temporary file beside its final name and hashes it."""
    fd, tmp = temp_file_beside(out_dir, prefix=f".part-{index:05d}.")
    os.close(fd)
    try:
        write_parquet(frame, tmp)
        return StagedPart(index, tmp, file_sha256(tmp), frame.height, failed, failure)
    except BaseException:
        os.unlink(tmp)
        raise


def write_part(out_dir: str | Path, index: int, frame: pl.DataFrame) -> Path:
    """Writes one chunk's rows atomically, without recording them in the manifest.

    For callers that keep no manifest (benchmarks); a scoring run commits its parts
    through ``PartLedger`` so that ``--resume`` can check them.
    """
    staged = stage_part(out_dir, index, frame)
    os.replace(staged.tmp, Path(out_dir) / staged.name)
    return Path(out_dir) / staged.name


class PartLedger:
    """The manifest's record of committed parts; only the lock holder uses one.

    Args:
        out_dir: the run's output directory, whose manifest already exists.
        guard: a context each commit runs in (``scoring.stops.PauseSignals.held``: a
            Ctrl-C waits until the manifest and the part agree).

    Attributes:
        committed: parts committed by this ledger, finished or failed.
    """

    def __init__(
        self, out_dir: str | Path,
        guard: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:  # fmt: skip
        self.out = Path(out_dir)
        self.manifest = json.loads((self.out / MANIFEST).read_text())
        self.manifest.setdefault("parts", {})
        self.guard = guard
        self.committed = 0

    def commit(self, staged: StagedPart) -> Path:
        """Records the part's digest in the manifest, then moves the part into place."""
        record: dict[str, Any] = {"sha256": staged.sha256, "rows": staged.rows}
        if staged.failed:
            record |= {"failed": staged.failed, "failure": staged.failure}
        with self.guard():
            self.manifest["parts"][staged.name] = record
            self.manifest["parts"] = dict(sorted(self.manifest["parts"].items()))  # stable
            write_text_atomic(self.out / MANIFEST, json.dumps(self.manifest, indent=2))
            os.replace(staged.tmp, self.out / staged.name)
            self.committed += 1
        return self.out / staged.name


def recorded_parts(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``part name -> {"sha256", "rows"}`` from a manifest (empty for older runs)."""
    parts = manifest.get("parts")
    return parts if isinstance(parts, dict) else {}


def failed_rows(record: dict[str, Any] | None) -> int:
    """Rows of a committed part that failed for a reason other than their input."""
    return int((record or {}).get("failed") or 0)


def part_problem(path: Path, record: dict[str, Any] | None) -> str | None:
    """Why a finished part cannot be trusted, or None when it matches its record."""
    if record is None:
        return "no recorded sha256 (written before parts were recorded)"
    try:
        found = file_sha256(path)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if found != record.get("sha256"):
        return f"sha256 differs (expected {record.get('sha256')}, found {found})"
    return None


def remove_temporaries(out: Path) -> None:
    """Deletes staged parts a killed run left behind (never committed, never visible)."""
    for tmp in out.glob(".part-*.tmp"):
        tmp.unlink(missing_ok=True)


def read_scores(out_dir: str | Path, schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    """Every part file of a scoring run, in chunk order, verified before it is returned.

    Each part is held to its sha256 in the manifest (when recorded) and its Parquet
    page checksums (when written with them), so a damaged part raises instead of
    returning wrong risks.

    Raises:
        IntegrityError: naming the first part that fails.
    """
    out = Path(out_dir)
    parts = sorted(out.glob("part-*.parquet"))
    if not parts:
        return pl.DataFrame(schema=schema)
    records = _manifest_parts(out)
    for path in parts:
        if path.name in records and (problem := part_problem(path, records[path.name])):
            raise IntegrityError(problem, path, RESCORE)
    _warn_failed(out, {p.name: records.get(p.name) for p in parts})
    return read_parquet_verified(parts, RESCORE)


def _warn_failed(out: Path, records: dict[str, dict[str, Any] | None]) -> None:
    failed = {name: r for name, r in records.items() if failed_rows(r)}
    if failed:
        first, record = next(iter(failed.items()))
        warnings.warn(
            f"{out}: {sum(map(failed_rows, failed.values()))} row(s) in {len(failed)} part(s) "
            f"were not scored for a reason other than their input (first: {first}: "
            f"{record.get('failure')}); {RESCORE.replace('re-score it', 're-score them')}",
            stacklevel=3,
        )


def _manifest_parts(out: Path) -> dict[str, dict[str, Any]]:
    try:
        return recorded_parts(json.loads((out / MANIFEST).read_text()))
    except (OSError, ValueError):
        return {}
