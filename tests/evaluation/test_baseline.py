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
    BaselineConfig,
    ConfoundTreatment,
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


def _sites(cohort: Path, site: list[str], ancestry: list[str]) -> None:
    ids = pl.Series("subject_id", range(len(site)), dtype=pl.Int64)
    pl.DataFrame({"subject_id": ids, "site": site, "ancestry": ancestry}).write_parquet(
        cohort / "subjects.parquet"
    )


@pytest.mark.parametrize("confounds", ["matched", "offsets"])
def test_the_matched_baseline_reads_the_site_in_training_and_never_in_a_score(
    tmp_path, confounds
) -> None:
    rng = np.random.default_rng(1)
    n = 400
    site = rng.choice(["a", "b"], n)
    label = (rng.random(n) < np.where(site == "b", 0.7, 0.3)).astype(int)  # the site's own share
    hr = 70.0 + 15.0 * label + rng.normal(0.0, 5.0, n)
    split = ["train"] * 260 + ["tuning"] * 70 + ["held_out"] * 70
    cohort = _write_cohort(tmp_path / "c", hr, label, split)
    _sites(cohort, list(site), list(rng.choice(["x", "y"], n)))
    spec = DataSpec(
        channels=["LAB//LACTATE", "VITAL//HR"], markers=["m0", "m1"], window_hours=72.0,
        sites=["a", "b"], ancestries=["x", "y"],
    )  # fmt: skip
    samples = load_samples(cohort)
    fitted = fit_baseline(
        cohort, samples, spec, ("timeseries",), cfg=BaselineConfig(confounds=confounds)
    )
    assert fitted.n_features == 2 * len(TS_STATS) + 2  # the site and ancestry columns
    held = samples.filter(pl.col("split") == "held_out")
    logit = fitted.logit(cohort, held)
    assert auroc(held["label"].to_numpy(), logit) > 0.85  # the HR signal is read
    # The same patients told another site, or an unknown one, and another ancestry:
    # the same scores.
    for column, value in (("site", "a"), ("site", "b"), ("site", "elsewhere"), ("ancestry", "y")):
        moved = fitted.logit(cohort, held.with_columns(pl.lit(value).alias(column)))
        np.testing.assert_allclose(moved, logit, rtol=1e-9, atol=1e-9, err_msg=f"{column}={value}")
    with pytest.raises(ValueError, match="confounds must be one of"):
        fit_baseline(cohort, samples, spec, ("timeseries",), cfg=BaselineConfig(confounds="erase"))


def test_the_matched_baseline_harmonizes_film_features_across_sites() -> None:
    rng = np.random.default_rng(2)
    n = 600
    site = rng.integers(0, 3, n)
    y = rng.integers(0, 2, n)
    film = rng.normal(0.0, 1.0, (n, 4)) * (1.0 + site[:, None]) + 3.0 * site[:, None]  # scanner
    film[:, 0] += 1.5 * y  # the disease's own signal, which ComBat keeps
    other = rng.normal(0.0, 1.0, (n, 1))
    x = np.column_stack([other, film])
    names = ["VITAL//HR:last", *(f"image:{i}" for i in range(4))]
    samples = pl.DataFrame({"site": [f"s{k}" for k in site], "ancestry": ["x"] * n})
    spec = DataSpec(sites=["s0", "s1", "s2"], ancestries=["x"])
    treatment = ConfoundTreatment.fit(x, names, samples, spec, np.ones(n, dtype=bool), y)
    out = treatment.harmonized(x, samples)
    np.testing.assert_array_equal(out[:, 0], x[:, 0])  # not a film feature: untouched
    for k in range(3):  # per site, the same mean and spread of each film feature after
        rows = (site == k) & (y == 0)
        np.testing.assert_allclose(out[rows, 2:].mean(0), out[(y == 0), 2:].mean(0), atol=0.35)
        np.testing.assert_allclose(out[rows, 2:].std(0), out[(y == 0), 2:].std(0), rtol=0.25)
    gap = out[y == 1, 1].mean() - out[y == 0, 1].mean()
    assert gap > 1.0  # the outcome's difference survives harmonization
    assert np.isnan(treatment.harmonized(np.full((1, 5), np.nan), samples[:1])).all()
    # "offsets": the columns and the average without ComBat; the features stay as read.
    plain = ConfoundTreatment.fit(x, names, samples, spec, np.ones(n, dtype=bool), y, False)
    np.testing.assert_array_equal(plain.harmonized(x, samples), x)
