"""The cohort contract: a directory of Parquet files with MEDS column names.

MEDS v0.4 words where MEDS has them (``subject_id`` int64, ``time``
timestamp[us], ``code`` string, ``numeric_value`` float32; labels with
``prediction_time`` and ``boolean_value``; ``subject_splits`` with
train/tuning/held_out). Everything that reads a cohort takes its file names and
dtypes from here.

Rule of time: only events and images with ``time <= prediction_time`` may reach
the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from clinfuse.errors import NotFoundError

TIME = pl.Datetime("us")
SPLITS = ("train", "tuning", "held_out")


@dataclass(frozen=True)
class TableSpec:
    """One file of the cohort.

    Attributes:
        name: the file stem (``events`` -> ``events.parquet`` or ``events/*.parquet``).
        required: column -> dtype every cohort must have.
        optional: column -> dtype used when present.
        mandatory: whether the cohort is invalid without this file.
        wide: extra columns beyond ``required`` are allowed (genotypes: one per marker).
    """

    name: str
    required: dict[str, pl.DataType]
    optional: dict[str, pl.DataType] = field(default_factory=dict)
    mandatory: bool = True
    wide: bool = False


EVENTS = TableSpec(
    "events",
    {"subject_id": pl.Int64, "time": TIME, "code": pl.String, "numeric_value": pl.Float32},
    {"unit": pl.String},
)
LABELS = TableSpec(
    "labels",
    {"subject_id": pl.Int64, "prediction_time": TIME, "boolean_value": pl.Boolean},
)
SUBJECTS = TableSpec(
    "subjects",
    {"subject_id": pl.Int64, "site": pl.String},
    {"ancestry": pl.String, "sex": pl.String, "age": pl.Float32, "scanner": pl.String},
)
IMAGES = TableSpec(
    "images",
    {"subject_id": pl.Int64, "time": TIME, "path": pl.String, "modality": pl.String},
    {"manufacturer": pl.String, "model": pl.String, "site": pl.String, "view": pl.String},
    mandatory=False,
)
GENOTYPES = TableSpec(
    "genotypes", {"subject_id": pl.Int64}, mandatory=False, wide=True
)  # one Float32/Int8 column per marker: dosage 0/1/2, null = missing call
MARKERS = TableSpec(
    "markers",
    {"marker": pl.String, "group": pl.String},
    {"chrom": pl.String, "pos": pl.Int64},
    mandatory=False,
)
SUBJECT_SPLITS = TableSpec(
    "subject_splits", {"subject_id": pl.Int64, "split": pl.String}, mandatory=False
)

TABLES: tuple[TableSpec, ...] = (
    EVENTS,
    LABELS,
    SUBJECTS,
    IMAGES,
    GENOTYPES,
    MARKERS,
    SUBJECT_SPLITS,
)
ORACLE_FILE = "oracle.parquet"  # simulator ground truth; never read by training


def as_cohort(cohort_dir: str | Path | Any) -> Path | Any:
    """A cohort directory as a Path; a MEDS root (``data/`` + ``metadata/``) as a
    ``datasets.meds.MedsSource``; a MedsSource as itself. Every reader below takes either."""
    if hasattr(cohort_dir, "scan_table"):
        return cohort_dir
    path = Path(cohort_dir)
    from clinfuse.datasets.meds.source import MedsSource, is_meds_root

    return MedsSource(path) if is_meds_root(path) else path


def sidecar_root(cohort_dir: str | Path | Any) -> Path:
    """The folder of our own tables beside the events: the cohort directory, or a MEDS
    root's sidecar folder. DICOM paths in ``images`` are relative to it; the simulator's
    oracle lives in it."""
    source = as_cohort(cohort_dir)
    return source if isinstance(source, Path) else source.sidecar_dir


def table_location(cohort_dir: str | Path | Any, spec: TableSpec) -> str:
    """The file to name in a message about one table."""
    source = as_cohort(cohort_dir)
    if isinstance(source, Path):
        return str(source / f"{spec.name}.parquet")
    return source.where(spec)


def table_paths(cohort_dir: str | Path | Any, spec: TableSpec) -> list[Path]:
    """The Parquet file(s) holding ``spec`` in a cohort: ``name.parquet`` or ``name/*.parquet``."""
    source = as_cohort(cohort_dir)
    if not isinstance(source, Path):
        return source.table_paths(spec)
    return dir_table_paths(source, spec)


def dir_table_paths(root: Path, spec: TableSpec) -> list[Path]:
    """``table_paths`` in a cohort directory (never a MEDS root)."""
    single = root / f"{spec.name}.parquet"
    if single.is_file():
        return [single]
    folder = root / spec.name
    if folder.is_dir():
        return sorted(folder.glob("*.parquet"))
    return []


def scan(cohort_dir: str | Path | Any, spec: TableSpec) -> pl.LazyFrame:
    """A lazy scan of one table. Raises NotFoundError (a FileNotFoundError) naming the file
    when absent."""
    source = as_cohort(cohort_dir)
    if not isinstance(source, Path):
        return source.scan_table(spec)
    paths = dir_table_paths(source, spec)
    if not paths:
        raise NotFoundError(
            f"{source / (spec.name + '.parquet')}: no such file "
            f"(nor a folder {spec.name}/ of Parquet files)",
            fix="check the cohort directory (docs/cohort-format.md)",
        )
    return pl.scan_parquet([str(p) for p in paths])


def has_table(cohort_dir: str | Path | Any, spec: TableSpec) -> bool:
    return bool(table_paths(cohort_dir, spec))
