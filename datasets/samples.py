"""The samples table and the as-of joins that respect the rule of time.

A sample is one (subject, prediction_time) row of ``labels``. Every feature that
reaches a sample comes through one of the joins here, and each keeps only rows
with ``time <= prediction_time``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from clinfuse.datasets.schema import (
    EVENTS,
    IMAGES,
    LABELS,
    SUBJECT_SPLITS,
    SUBJECTS,
    TIME,
    has_table,
    scan,
    sidecar_root,
    table_location,
)
from clinfuse.datasets.splits import (
    DEFAULT_FRACTIONS,
    assign_splits,
    check_splits,
    read_splits,
)
from clinfuse.errors import InputError

SAMPLE_COLUMNS = ("subject_id", "prediction_time", "label", "site", "ancestry", "split")
US_PER_HOUR = 3_600_000_000


def load_samples(
    cohort_dir: str | Path,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
) -> pl.DataFrame:
    """One row per label: subject_id, prediction_time, label, site, ancestry, split.

    Splits come from ``subject_splits.parquet`` when the cohort has one, otherwise
    they are drawn per subject, stratified by label and site (see ``splits``).

    Raises:
        ValueError: naming the file and row for a label whose subject has no
            ``subjects`` row, or a bad split; naming labels.parquet when it has no row.
    """
    lazy = _labels(cohort_dir).join(_subjects(cohort_dir), on="subject_id", how="left")
    lazy = lazy.sort("subject_id", "prediction_time")
    split_scan = read_splits(cohort_dir)
    if split_scan is None:
        samples = lazy.collect()
        _check_subjects(cohort_dir, samples)
        splits = assign_splits(samples, split_fractions, split_seed)
    else:
        samples, splits = pl.collect_all([lazy, split_scan])
        _check_subjects(cohort_dir, samples)
        check_splits(splits, table_location(cohort_dir, SUBJECT_SPLITS))
    samples = samples.join(splits, on="subject_id", how="left", maintain_order="left")
    _check_sample_splits(cohort_dir, samples)
    return samples.select(SAMPLE_COLUMNS)


def window_events(
    events: pl.LazyFrame | pl.DataFrame, samples: pl.DataFrame, window_hours: float
) -> pl.LazyFrame:
    """Events joined to the samples they may inform: ``pt - window < time <= pt``.

    Returns:
        A LazyFrame with ``sample`` (row index into ``samples``), ``time``,
        ``prediction_time``, ``code``, ``numeric_value``.
    """
    window_us = int(round(window_hours * US_PER_HOUR))
    keys = samples.lazy().select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("sample"), "subject_id", "prediction_time"
    )
    return (
        events.lazy()
        .select("subject_id", "time", "code", "numeric_value")
        .join(keys, on="subject_id", how="inner")
        .filter(
            (pl.col("time") <= pl.col("prediction_time"))
            & (pl.col("time") > pl.col("prediction_time") - pl.duration(microseconds=window_us))
        )
        .select("sample", "time", "prediction_time", "code", "numeric_value")
    )


def scan_events(cohort_dir: str | Path, subject_ids: pl.Series | None = None) -> pl.LazyFrame:
    """A lazy scan of the events, optionally only for ``subject_ids``, with contract dtypes."""
    lazy = scan(cohort_dir, EVENTS).select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(TIME),
        pl.col("code").cast(pl.String),
        pl.col("numeric_value").cast(pl.Float32),
    )
    if subject_ids is not None:
        lazy = in_subject_range(lazy, subject_ids)
        lazy = lazy.filter(pl.col("subject_id").is_in(subject_ids.unique().implode()))
    return lazy


def in_subject_range(lazy: pl.LazyFrame, subject_ids: pl.Series) -> pl.LazyFrame:
    """``lazy`` restricted to the subject_id range of ``subject_ids``.

    A range predicate reaches the Parquet reader, whose row-group statistics then
    skip the other subjects' rows (an ``is_in`` filter alone reads every row group:
    reading a chunk of subjects would read the whole table).
    """
    lo, hi = subject_ids.min(), subject_ids.max()
    return lazy.filter(pl.col("subject_id").cast(pl.Int64).is_between(lo, hi))


def latest_images(cohort_dir: str | Path, samples: pl.DataFrame) -> pl.DataFrame:
    """The latest image per sample with ``time <= prediction_time``, aligned to ``samples``.

    Returns:
        One row per sample, in order: ``path`` (absolute, null when none) and
        ``image_age`` (hours between the image and prediction_time, null when none).
    """
    if not has_table(cohort_dir, IMAGES):
        return pl.DataFrame(
            {"path": [None] * samples.height, "image_age": [None] * samples.height},
            schema={"path": pl.String, "image_age": pl.Float32},
        )
    root = str(sidecar_root(cohort_dir).resolve())
    images = (
        scan(cohort_dir, IMAGES)
        .select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("time").cast(TIME).alias("image_time"),
            "path",
        )
        .filter(pl.col("subject_id").is_in(samples["subject_id"].unique().implode()))
        .sort("image_time")
    )
    keys = samples.lazy().select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("sample"), "subject_id", "prediction_time"
    )
    joined = keys.sort("prediction_time").join_asof(
        images,
        left_on="prediction_time",
        right_on="image_time",
        by="subject_id",
        strategy="backward",
        check_sortedness=False,  # both sides sorted above
    )
    return (
        joined.sort("sample")
        .select(
            pl.when(pl.col("path").is_not_null())
            .then(pl.lit(root + "/") + pl.col("path"))
            .alias("path"),
            _hours(pl.col("prediction_time") - pl.col("image_time")).alias("image_age"),
        )
        .collect()
    )


def _hours(delta: pl.Expr) -> pl.Expr:
    return (delta.dt.total_microseconds() / US_PER_HOUR).cast(pl.Float32)


def _labels(cohort_dir: str | Path) -> pl.LazyFrame:
    return (
        scan(cohort_dir, LABELS)
        .select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("prediction_time").cast(TIME),
            pl.col("boolean_value").cast(pl.Float32).alias("label"),
        )
        .with_row_index("_label_row")
    )


def _subjects(cohort_dir: str | Path) -> pl.LazyFrame:
    lazy = scan(cohort_dir, SUBJECTS)
    names = lazy.collect_schema().names()
    ancestry = pl.col("ancestry") if "ancestry" in names else pl.lit(None)
    return lazy.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("site").cast(pl.String),
        ancestry.cast(pl.String).alias("ancestry"),
        pl.lit(True).alias("_has_subject"),
    )


def check_not_empty(path: str | Path, rows: pl.DataFrame, what: str = "label") -> None:
    """Raises an InputError naming ``path`` when ``rows`` is empty.

    An empty labels.parquet (or subjects.parquet for ``score --at``) leaves nothing to
    train, evaluate or score; an empty output with exit 0 would hide that.
    """
    if rows.height == 0:
        fix = "add label rows or score with --at" if what == "label" else f"add {what} rows"
        raise InputError(f"{path}: no {what} rows (empty cohort)", fix=fix)


def _check_subjects(cohort_dir: str | Path, samples: pl.DataFrame) -> None:
    labels = table_location(cohort_dir, LABELS)
    check_not_empty(labels, samples)
    missing = samples.filter(pl.col("_has_subject").is_null()).sort("_label_row")
    if missing.height:
        row = missing.row(0, named=True)
        n_subjects = missing["subject_id"].n_unique()
        raise InputError(
            f"{labels}: row {row['_label_row']} has subject_id "
            f"{row['subject_id']}, which has no row in {table_location(cohort_dir, SUBJECTS)} "
            f"({missing.height} label row(s) of {n_subjects} subject(s) affected)",
            fix="run `clinfuse validate COHORT` and fix the file",
        )
    bad = samples.filter(pl.col("label").is_null()).sort("_label_row")
    if bad.height:
        raise InputError(
            f"{labels}: column boolean_value is null at row "
            f"{bad['_label_row'][0]} (subject_id {bad['subject_id'][0]})",
            fix="run `clinfuse validate COHORT` and fix the file",
        )


def _check_sample_splits(cohort_dir: str | Path, samples: pl.DataFrame) -> None:
    missing = samples.filter(pl.col("split").is_null())
    if missing.height:
        raise InputError(
            f"{table_location(cohort_dir, SUBJECT_SPLITS)}: subject_id "
            f"{missing['subject_id'][0]} has labels but no split",
            fix="run `clinfuse validate COHORT` and fix the file",
        )


def sample_tensors(samples: pl.DataFrame, sites: list[str], ancestries: list[str]) -> dict:
    """Labels, confound codes (-1 when not in the vocabulary) and bookkeeping keys.

    Shapes:
        label (B,) float32; confounds site/ancestry (B,) int64; subject_id (B,) int64;
        prediction_time (B,) int64 microseconds since the epoch.
    """
    return {
        "label": torch.from_numpy(samples["label"].cast(pl.Float32).to_numpy().copy()),
        "confounds": {
            "site": _codes(samples["site"], sites),
            "ancestry": _codes(samples["ancestry"], ancestries),
        },
        "subject_id": torch.from_numpy(samples["subject_id"].to_numpy().astype(np.int64)),
        "prediction_time": torch.from_numpy(
            samples["prediction_time"].dt.epoch("us").to_numpy().astype(np.int64)
        ),
    }


def genotype_tensors(
    genotypes: pl.LazyFrame | None, samples: pl.DataFrame, markers: list[str]
) -> dict:
    """Dosage per marker with a called mask; missing calls, markers or subjects are 0/mask 0.

    Raises:
        ValueError: naming the subject when genotypes has two rows for it, or the
            marker and subject when a dosage is outside [0, 2].

    Shapes:
        genotype, genotype_mask: (B, M) float32; genotype_present: (B,) bool.
    """
    n, m = samples.height, len(markers)
    if genotypes is None or m == 0:
        return _no_genotypes(n, m)
    table = _genotype_table(genotypes, samples, markers)
    dosage = table.select(markers).to_numpy().astype(np.float32).reshape(n, m)
    mask = ~np.isnan(dosage)
    _check_dosage(dosage, mask, table, markers)
    present = table["_has_genotype"].fill_null(False).to_numpy() & mask.any(axis=1)
    return {
        "genotype": torch.from_numpy(np.where(mask, dosage, 0.0).astype(np.float32)),
        "genotype_mask": torch.from_numpy(mask.astype(np.float32)),
        "genotype_present": torch.from_numpy(present),
    }


def _genotype_table(genotypes: pl.LazyFrame, samples: pl.DataFrame, markers: list[str]):
    names = set(genotypes.collect_schema().names())
    columns = [
        pl.col(m).cast(pl.Float32) if m in names else pl.lit(None, pl.Float32).alias(m)
        for m in markers
    ]
    wanted = samples["subject_id"].unique().implode()
    calls = (
        in_subject_range(genotypes, samples["subject_id"])
        .filter(pl.col("subject_id").is_in(wanted))
        .select(pl.col("subject_id").cast(pl.Int64), *columns)
        .with_columns(_has_genotype=pl.lit(True))
    ).collect()
    dup = calls.filter(pl.col("subject_id").is_duplicated())
    if dup.height:
        raise InputError(
            f"genotypes.parquet: subject_id {dup['subject_id'][0]} has more than one row",
            fix="run `clinfuse validate COHORT` and fix the file",
        )
    keys = samples.select("subject_id").with_row_index("_sample")
    return keys.join(calls, on="subject_id", how="left").sort("_sample")


def _check_dosage(dosage: np.ndarray, mask: np.ndarray, table: pl.DataFrame, markers) -> None:
    bad = mask & ((dosage < 0) | (dosage > 2))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(
            f"genotypes.parquet: column {markers[col]!r} has dosage {dosage[row, col]} for "
            f"subject_id {table['subject_id'][int(row)]}; expected 0, 1 or 2 (null = missing)",
            fix="run `clinfuse validate COHORT` and fix the file",
        )


def _no_genotypes(n: int, m: int) -> dict:
    return {
        "genotype": torch.zeros(n, m),
        "genotype_mask": torch.zeros(n, m),
        "genotype_present": torch.zeros(n, dtype=torch.bool),
    }


def _codes(values: pl.Series, vocabulary: list[str]) -> torch.Tensor:
    lookup = {name: i for i, name in enumerate(vocabulary)}
    codes = values.cast(pl.String).replace_strict(lookup, default=-1, return_dtype=pl.Int64)
    return torch.from_numpy(codes.fill_null(-1).to_numpy().astype(np.int64))
