"""The gradient-boosting baseline: its fixed features on a hand-made cohort, and its fit."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinfuse.datasets.samples import load_samples
from clinfuse.datasets.spec import DataSpec
from clinfuse.evaluation.baseline import (
    TS_STATS,
    fit_baseline,
    genotype_features,
    timeseries_features,
)
from clinfuse.evaluation.metrics import auroc

T0 = dt.datetime(2024, 3, 1)
PT = 48.0  # prediction time, hours after T0


def _at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


def _write_cohort(root: Path, hr: np.ndarray, label: np.ndarray, split: list[str]) -> Path:
    """Per subject: HR at 10 h and 20 h, HR 1000 after prediction time, lactate at 20 h
    for every subject but subject 1; two markers, subject 1 not called on m1."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(hr)
    rows = []
    for s in range(n):
        rows += [(s, 10.0, "VITAL//HR", hr[s] - 10.0), (s, 20.0, "VITAL//HR", hr[s])]
        rows += [(s, 50.0, "VITAL//HR", 1000.0)]  # after prediction time: never a feature
        if s != 1:
            rows.append((s, 20.0, "LAB//LACTATE", 1.0 + 0.1 * s))
    sid, hours, code, value = zip(*rows, strict=True)
    pl.DataFrame(
        {"subject_id": sid, "time": [_at(h) for h in hours], "code": code, "numeric_value": value},
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                "numeric_value": pl.Float32},
    ).write_parquet(root / "events.parquet")  # fmt: skip
    ids = pl.Series("subject_id", range(n), dtype=pl.Int64)
    pl.DataFrame(
        {"subject_id": ids, "prediction_time": [_at(PT)] * n, "boolean_value": label.astype(bool)},
        schema_overrides={"prediction_time": pl.Datetime("us")},
    ).write_parquet(root / "labels.parquet")
    pl.DataFrame({"subject_id": ids, "site": ["a"] * n, "ancestry": ["x"] * n}).write_parquet(
        root / "subjects.parquet"
    )
    pl.DataFrame({"subject_id": ids, "split": split}).write_parquet(root / "subject_splits.parquet")
    m1 = [None if s == 1 else float(s % 3) for s in range(n)]
    pl.DataFrame(
        {"subject_id": ids, "m0": [float(s % 2) for s in range(n)], "m1": m1}
    ).write_parquet(root / "genotypes.parquet")
    return root


def _spec() -> DataSpec:
    return DataSpec(channels=["LAB//LACTATE", "VITAL//HR"], markers=["m0", "m1"], window_hours=72.0)


def test_timeseries_features_follow_the_rule_of_time(tmp_path) -> None:
    hr = np.array([80.0, 81.0, 82.0])
    cohort = _write_cohort(tmp_path / "c", hr, np.array([0, 1, 0]), ["train"] * 3)
    samples = load_samples(cohort)
    x, names = timeseries_features(cohort, samples, _spec().channels, 72.0)
    assert x.shape == (3, 2 * len(TS_STATS)) and len(names) == x.shape[1]
    col = {n: i for i, n in enumerate(names)}
    for s in range(3):
        # HR at 10 h (hr - 10) and 20 h (hr); the 1000 at 50 h is after prediction time
        assert x[s, col["VITAL//HR:last"]] == pytest.approx(hr[s])
        assert x[s, col["VITAL//HR:mean"]] == pytest.approx(hr[s] - 5.0)
        assert x[s, col["VITAL//HR:min"]] == pytest.approx(hr[s] - 10.0)
        assert x[s, col["VITAL//HR:max"]] == pytest.approx(hr[s])
        assert x[s, col["VITAL//HR:count"]] == 2.0
        assert x[s, col["VITAL//HR:hours_since_last"]] == pytest.approx(PT - 20.0)
    # subject 1 has no lactate: count 0, every other statistic missing
    assert x[1, col["LAB//LACTATE:count"]] == 0.0
    assert np.isnan(x[1, col["LAB//LACTATE:last"]]) and np.isnan(x[1, col["LAB//LACTATE:max"]])
    assert x[2, col["LAB//LACTATE:last"]] == pytest.approx(1.2)


def test_a_shorter_window_drops_older_events(tmp_path) -> None:
    cohort = _write_cohort(tmp_path / "c", np.array([80.0, 81.0]), np.array([0, 1]), ["train"] * 2)
    x, names = timeseries_features(cohort, load_samples(cohort), ["VITAL//HR"], 30.0)
    col = {n: i for i, n in enumerate(names)}
    # window (18 h, 48 h]: only the 20 h value remains
    np.testing.assert_allclose(x[:, col["VITAL//HR:count"]], [1.0, 1.0])
    np.testing.assert_allclose(x[:, col["VITAL//HR:min"]], [80.0, 81.0])


def test_genotype_features_are_raw_dosages_with_nan_for_missing_calls(tmp_path) -> None:
    cohort = _write_cohort(tmp_path / "c", np.full(4, 80.0), np.array([0, 1, 0, 1]), ["train"] * 4)
    x, names = genotype_features(cohort, load_samples(cohort), ["m0", "m1"])
    assert names == ["m0", "m1"]
    np.testing.assert_array_equal(x[:, 0], [0.0, 1.0, 0.0, 1.0])
    assert np.isnan(x[1, 1]) and x[2, 1] == 2.0


def test_fit_baseline_finds_a_planted_signal_and_stops_on_tuning(tmp_path) -> None:
    rng = np.random.default_rng(0)
    n = 300
    label = rng.integers(0, 2, n)
    hr = 70.0 + 20.0 * label + rng.normal(0.0, 5.0, n)  # the last HR carries the outcome
    split = ["train"] * 200 + ["tuning"] * 50 + ["held_out"] * 50
    cohort = _write_cohort(tmp_path / "c", hr, label, split)
    samples = load_samples(cohort)
    fitted = fit_baseline(cohort, samples, _spec(), ("timeseries", "genomics"))
    assert fitted.n_features == 2 * len(TS_STATS) + 2
    assert 1 <= fitted.n_iter < 1000  # early stopping on the tuning split ended it
    held = samples.filter(pl.col("split") == "held_out")
    # 4 standard deviations between the classes: the baseline must rank almost perfectly
    assert auroc(held["label"].to_numpy(), fitted.logit(cohort, held)) > 0.95


def test_fit_baseline_names_a_split_with_one_outcome(tmp_path) -> None:
    label = np.array([0, 1] * 5 + [0] * 5)
    split = ["train"] * 10 + ["tuning"] * 5
    cohort = _write_cohort(tmp_path / "c", np.full(15, 80.0), label, split)
    with pytest.raises(ValueError, match="tuning split needs both outcomes"):
        fit_baseline(cohort, load_samples(cohort), _spec(), ("timeseries",))
