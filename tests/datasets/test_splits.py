"""Subject-level splits: disjoint, stratified, seeded, read from the cohort when present."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clinfuse.datasets.splits import assign_splits, check_splits, subsample_train


def _samples(n_subjects: int = 600, seed: int = 0) -> pl.DataFrame:
    """Two sites with different label rates; every subject has 1-3 samples."""
    rng = np.random.default_rng(seed)
    site = np.where(np.arange(n_subjects) % 3 == 0, "B", "A")
    rate = np.where(site == "A", 0.15, 0.45)
    label = (rng.random(n_subjects) < rate).astype(float)
    reps = rng.integers(1, 4, n_subjects)
    return pl.DataFrame(
        {
            "subject_id": np.repeat(np.arange(n_subjects), reps),
            "label": np.repeat(label, reps),
            "site": np.repeat(site, reps),
        }
    )


def test_no_subject_in_two_splits_and_every_subject_assigned():
    samples = _samples()
    splits = assign_splits(samples, (0.7, 0.15, 0.15), seed=3)
    assert splits["subject_id"].is_unique().all()
    assert set(splits["subject_id"]) == set(samples["subject_id"])
    assert set(splits["split"]) == {"train", "tuning", "held_out"}


def test_stratification_keeps_label_rate_and_site_mix_close():
    samples = _samples()
    subjects = samples.unique("subject_id").join(assign_splits(samples, seed=1), on="subject_id")
    overall = subjects["label"].mean()
    n_strata = 4  # (label 0/1) x (site A/B)
    for split in ("train", "tuning", "held_out"):
        part = subjects.filter(pl.col("split") == split)
        # Each stratum's count is within 1 of its exact share, so the rate is off by
        # at most n_strata / split size.
        assert abs(part["label"].mean() - overall) <= n_strata / part.height
        site_b = (part["site"] == "B").mean()
        assert abs(site_b - (subjects["site"] == "B").mean()) <= n_strata / part.height


def test_fractions_set_the_split_sizes():
    samples = _samples()
    splits = assign_splits(samples, (0.6, 0.2, 0.2), seed=0)
    counts = dict(splits.group_by("split").len().iter_rows())
    n = splits.height
    for name, share in (("train", 0.6), ("tuning", 0.2), ("held_out", 0.2)):
        assert abs(counts[name] - share * n) <= 4  # one per stratum at most


def test_same_seed_same_split_other_seed_differs():
    samples = _samples()
    a = assign_splits(samples, seed=7)
    b = assign_splits(samples.sample(fraction=1.0, shuffle=True, seed=1), seed=7)
    c = assign_splits(samples, seed=8)
    assert a.sort("subject_id").equals(b.sort("subject_id"))  # row order does not matter
    assert not a.sort("subject_id").equals(c.sort("subject_id"))


def test_bad_fractions_raise():
    with pytest.raises(ValueError, match="split_fractions"):
        assign_splits(_samples(30), (0.5, 0.5))


def test_check_splits_names_the_bad_row_and_duplicate_subject():
    bad = pl.DataFrame({"subject_id": [1, 2], "split": ["train", "test"]})
    with pytest.raises(ValueError, match=r"row 1 \(subject_id 2\) has split 'test'"):
        check_splits(bad)
    dup = pl.DataFrame({"subject_id": [1, 1], "split": ["train", "held_out"]})
    with pytest.raises(ValueError, match="subject_id 1 appears in more than one row"):
        check_splits(dup)


def test_subsample_train_keeps_a_fraction_of_train_subjects_only():
    samples = _samples().join(assign_splits(_samples(), seed=0), on="subject_id")
    kept = subsample_train(samples, 0.25, seed=0)
    n_train = samples.filter(pl.col("split") == "train")["subject_id"].n_unique()
    n_kept = kept.filter(pl.col("split") == "train")["subject_id"].n_unique()
    assert abs(n_kept - 0.25 * n_train) <= 4
    for split in ("tuning", "held_out"):
        assert kept.filter(pl.col("split") == split).equals(
            samples.filter(pl.col("split") == split)
        )
