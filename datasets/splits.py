"""Subject-level splits: read from the cohort or drawn with a seed.

A subject is in exactly one split, whatever the number of its prediction times.
When the cohort has no ``subject_splits.parquet``, subjects are shuffled within
strata of (any positive label, site) and cut by the requested fractions, so each
split keeps close to the cohort's label rate and site mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from clinfuse.datasets.schema import SPLITS, SUBJECT_SPLITS, has_table, scan
from clinfuse.errors import InputError

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def read_splits(cohort_dir: str | Path) -> pl.LazyFrame | None:
    """The cohort's own ``subject_splits`` table, lazily, or None when it has none."""
    if not has_table(cohort_dir, SUBJECT_SPLITS):
        return None
    return scan(cohort_dir, SUBJECT_SPLITS).select(
        pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String)
    )


def check_splits(splits: pl.DataFrame, where: str = "subject_splits") -> None:
    """Raises InputError (a ValueError) naming the row when a split name is unknown or a subject repeats."""
    bad = splits.with_row_index("row").filter(~pl.col("split").is_in(SPLITS))
    if bad.height:
        row = bad.row(0, named=True)
        raise InputError(
            f"{where}: row {row['row']} (subject_id {row['subject_id']}) has split "
            f"{row['split']!r}; expected one of {list(SPLITS)}",
            fix="run `clinfuse validate COHORT` and fix the file",
        )
    dup = splits.filter(pl.col("subject_id").is_duplicated())
    if dup.height:
        raise InputError(
            f"{where}: subject_id {dup['subject_id'][0]} appears in more than one row; "
            "a subject must be in exactly one split",
            fix="run `clinfuse validate COHORT` and fix the file",
        )


def assign_splits(
    samples: pl.DataFrame,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> pl.DataFrame:
    """Draws a seeded split per subject, stratified by label and site.

    Args:
        samples: one row per sample with ``subject_id``, ``label`` and ``site``.
        fractions: train, tuning, held_out shares (normalized to sum to 1).
        seed: random seed; the same seed and samples give the same splits.

    Returns:
        One row per subject: ``subject_id``, ``split``.
    """
    shares = _normalized(fractions)
    subjects = _subject_strata(samples)
    rng = np.random.default_rng(seed)
    members = subjects.group_by("stratum", maintain_order=True).agg("row")["row"].to_list()
    sizes = _allocate(np.array([len(m) for m in members]), shares, rng)  # (S, 3)
    split_idx = np.empty(subjects.height, dtype=np.int64)
    for rows, counts in zip(members, sizes, strict=True):
        split_idx[rng.permutation(np.asarray(rows, dtype=np.int64))] = np.repeat(
            np.arange(len(shares)), counts
        )
    names = np.asarray(SPLITS)[split_idx]
    return subjects.select("subject_id").with_columns(split=pl.Series(names, dtype=pl.String))


def subsample_train(samples: pl.DataFrame, fraction: float, seed: int = 0) -> pl.DataFrame:
    """Keeps a seeded ``fraction`` of training subjects (stratified), other splits untouched.

    Used for learning curves: fewer labelled training subjects, same evaluation sets.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return samples
    train = samples.filter(pl.col("split") == "train")
    keep = assign_splits(train, (fraction, 1.0 - fraction, 0.0), seed)
    kept = keep.filter(pl.col("split") == "train")["subject_id"]
    return samples.filter((pl.col("split") != "train") | pl.col("subject_id").is_in(kept.implode()))


def _subject_strata(samples: pl.DataFrame) -> pl.DataFrame:
    site = pl.col("site").fill_null("") if "site" in samples.columns else pl.lit("")
    return (
        samples.group_by("subject_id")
        .agg(pl.col("label").max().fill_null(0.0), site.first())
        .sort("subject_id")  # a seed must not depend on the hash-group order
        .with_columns(stratum=pl.format("{}|{}", "label", "site"))
        .with_row_index("row")
    )


def _allocate(n: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Subjects per (stratum, split): each within 1 of its exact share, totals as close as can be.

    Every stratum gets the floor of its exact counts; its few left-over subjects go to
    distinct splits, those furthest below their overall target first, so small
    strata do not all round towards the same split.
    """
    exact = n[:, None] * shares[None, :]  # (S, K)
    sizes = np.floor(exact).astype(np.int64)
    deficit = _largest_remainder(n.sum() * shares) - sizes.sum(axis=0)  # (K,)
    for s in rng.permutation(len(n)):
        left = n[s] - sizes[s].sum()
        pick = np.lexsort((-(exact[s] - sizes[s]), -deficit))[:left]
        sizes[s, pick] += 1
        deficit[pick] -= 1
    return sizes


def _largest_remainder(exact: np.ndarray) -> np.ndarray:
    sizes = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: int(round(exact.sum())) - sizes.sum()]] += 1
    return sizes


def _normalized(fractions: Sequence[float]) -> np.ndarray:
    shares = np.asarray(list(fractions), dtype=np.float64)
    if shares.shape != (len(SPLITS),) or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(
            f"split_fractions must be {len(SPLITS)} non-negative numbers for "
            f"{list(SPLITS)}, got {list(fractions)}"
        )
    return shares / shares.sum()
