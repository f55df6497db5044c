"""Events -> padded GRU-D tensors: the rule of time, delta, cropping, normalization."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
import torch

from clinfuse.datasets.events import events_to_tensors
from clinfuse.datasets.spec import DataSpec

T0 = dt.datetime(2024, 1, 1)


def _at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


def _events(rows: list[tuple[int, float, str, float | None]]) -> pl.DataFrame:
    sid, hours, code, value = zip(*rows, strict=True) if rows else ([], [], [], [])
    return pl.DataFrame(
        {"subject_id": sid, "time": [_at(h) for h in hours], "code": code, "numeric_value": value},
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
        },
    )


def _samples(subjects: list[int], pt_hours: list[float]) -> pl.DataFrame:
    return pl.DataFrame(
        {"subject_id": subjects, "prediction_time": [_at(h) for h in pt_hours]},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )


def _spec(channels=("A", "B"), mean=None, std=None, **kw) -> DataSpec:
    n = len(channels)
    return DataSpec(
        channels=list(channels),
        channel_mean=list(mean or [0.0] * n),
        channel_std=list(std or [1.0] * n),
        **kw,
    )


def test_gru_d_delta_matches_hand_computed_example():
    # Prediction at 10 h, window 72 h -> window start at -62 h (relative hours).
    # Steps at 0 h (A), 1 h (A, B), 3 h (B): s = -10, -9, -7.
    events = _events([(1, 0, "A", 1.0), (1, 1, "A", 2.0), (1, 1, "B", 3.0), (1, 3, "B", 4.0)])
    out = events_to_tensors(events, _samples([1], [10]), _spec(window_hours=72.0))
    # A: step0 first obs -> s0 - start = 62; step1: s1-s0 = 1 (A seen at 0);
    #    step2: s2-s1 = 2 (A seen at 1).
    # B: step0 62; step1: unobserved at 0 -> (s1-s0)+62 = 63; step2: seen at 1 -> 2.
    expected = torch.tensor([[[62.0, 62.0], [1.0, 63.0], [2.0, 2.0]]])
    torch.testing.assert_close(out["ts_delta"], expected)
    torch.testing.assert_close(out["ts_time"], torch.tensor([[10.0, 9.0, 7.0]]))
    torch.testing.assert_close(out["ts_mask"], torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]]))
    assert out["ts_length"].tolist() == [3]


def test_only_events_at_or_before_prediction_time_within_window():
    events = _events(
        [
            (1, 0.0, "A", 1.0),  # exactly at the window start: excluded (window is open there)
            (1, 30.0, "A", 2.0),
            (1, 72.0, "A", 3.0),  # exactly at prediction time: kept
            (1, 72.5, "A", 999.0),  # after prediction time: must never appear
        ]
    )
    out = events_to_tensors(events, _samples([1], [72.0]), _spec(window_hours=72.0))
    observed = out["ts_values"][out["ts_mask"] > 0]
    assert sorted(observed.tolist()) == [2.0, 3.0]
    assert (out["ts_time"][0, : out["ts_length"][0]] >= 0).all()


def test_values_are_normalized_with_spec_statistics_and_duplicates_averaged():
    events = _events([(1, 1, "A", 10.0), (1, 1, "A", 14.0), (1, 2, "B", 7.0)])
    spec = _spec(mean=[8.0, 1.0], std=[2.0, 3.0])
    out = events_to_tensors(events, _samples([1], [5]), spec)
    # Duplicate A at 1 h -> mean 12 -> (12 - 8) / 2 = 2; B: (7 - 1) / 3 = 2.
    assert out["ts_values"][0, 0, 0].item() == pytest.approx(2.0)
    assert out["ts_values"][0, 1, 1].item() == pytest.approx(2.0)
    assert out["ts_mask"].sum().item() == 2


def test_unknown_codes_and_null_values_are_ignored():
    events = _events([(1, 1, "ICU_ADMISSION", None), (1, 2, "OTHER", 5.0), (1, 3, "A", 1.0)])
    out = events_to_tensors(events, _samples([1], [5]), _spec())
    assert out["ts_length"].tolist() == [1]
    assert out["ts_time"][0, 0].item() == pytest.approx(2.0)


def test_subject_without_events_has_zero_length():
    events = _events([(1, 1, "A", 1.0)])
    out = events_to_tensors(events, _samples([1, 2], [5, 5]), _spec())
    assert out["ts_length"].tolist() == [1, 0]
    assert out["ts_present"].tolist() == [True, False]
    assert out["ts_mask"][1].sum().item() == 0
    assert out["ts_delta"][1].abs().sum().item() == 0


def test_max_steps_keeps_the_latest_steps_and_counts_dropped_observations():
    events = _events([(1, h, "A" if h == 0 else "B", float(h)) for h in range(5)])
    out = events_to_tensors(events, _samples([1], [10]), _spec(max_steps=2, window_hours=72.0))
    assert out["ts_length"].tolist() == [2]
    torch.testing.assert_close(out["ts_time"], torch.tensor([[7.0, 6.0]]))
    # A last seen at 0 h (a dropped step): at step 3 h, delta = 3; at 4 h, delta = 4.
    torch.testing.assert_close(out["ts_delta"][0, :, 0], torch.tensor([3.0, 4.0]))
    # B seen at 2 h (dropped) then 3 h: deltas 1 and 1.
    torch.testing.assert_close(out["ts_delta"][0, :, 1], torch.tensor([1.0, 1.0]))


def test_two_prediction_times_of_one_subject_see_different_histories():
    events = _events([(1, 1, "A", 1.0), (1, 5, "A", 2.0)])
    out = events_to_tensors(events, _samples([1, 1], [3, 6]), _spec())
    assert out["ts_length"].tolist() == [1, 2]
    assert out["ts_values"][0, :, 0].tolist()[:1] == [1.0]


def _reference(events: pl.DataFrame, samples: pl.DataFrame, spec: DataSpec) -> dict:
    """Per-sample loop straight from the definitions (GRU-D recursion), for comparison."""
    n_ch = spec.n_channels
    rows = []
    for sid, pt in samples.iter_rows():
        ev = events.filter(
            (pl.col("subject_id") == sid)
            & (pl.col("time") <= pt)
            & (pl.col("time") > pt - dt.timedelta(hours=spec.window_hours))
            & pl.col("code").is_in(spec.channels)
        )
        times = sorted(set(ev["time"].to_list()))
        s = [(t - pt).total_seconds() / 3600 for t in times]
        val = np.zeros((len(times), n_ch))
        cnt = np.zeros((len(times), n_ch))
        for t, code, v in ev.select("time", "code", "numeric_value").iter_rows():
            i, c = times.index(t), spec.channels.index(code)
            val[i, c] += (v - spec.channel_mean[c]) / spec.channel_std[c]
            cnt[i, c] += 1
        mask = (cnt > 0).astype(float)
        val = np.divide(val, np.maximum(cnt, 1))
        delta = np.zeros_like(val)
        for i in range(len(times)):
            if i == 0:
                delta[i] = s[0] + spec.window_hours
            else:
                gap = s[i] - s[i - 1]
                delta[i] = np.where(mask[i - 1] > 0, gap, gap + delta[i - 1])
        k = spec.max_steps
        rows.append((val[-k:], mask[-k:], delta[-k:], -np.asarray(s[-k:])))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_sample_reference_on_random_cohort(seed):
    rng = np.random.default_rng(seed)
    n_events, n_subjects = 400, 12
    hours = rng.integers(0, 120, n_events).astype(float)  # integer hours -> repeated stamps
    rows = [
        (int(rng.integers(n_subjects)), h, str(rng.choice(["A", "B", "C", "X"])), float(v))
        for h, v in zip(hours, rng.normal(5, 2, n_events), strict=True)
    ]
    events = _events(rows)
    samples = _samples(list(range(n_subjects)) + [0, 3], list(rng.uniform(20, 110, 14)))
    spec = _spec(("A", "B", "C"), [5.0, 4.0, 6.0], [2.0, 1.5, 3.0], max_steps=6, window_hours=48)
    out = events_to_tensors(events, samples, spec)
    for b, (val, mask, delta, before) in enumerate(_reference(events, samples, spec)):
        n = len(before)
        assert out["ts_length"][b].item() == n
        np.testing.assert_allclose(out["ts_values"][b, :n].numpy(), val, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out["ts_mask"][b, :n].numpy(), mask)
        np.testing.assert_allclose(out["ts_delta"][b, :n].numpy(), delta, atol=1e-4)
        np.testing.assert_allclose(out["ts_time"][b, :n].numpy(), before, atol=1e-4)
