"""benchmarks/logit_decomposition.py: the least-squares read of a logit in the true factors."""

from __future__ import annotations

import numpy as np
import polars as pl

from clinfuse.benchmarks.logit_decomposition import FACTORS, decompose, table


def _frame(seed: int = 0, n: int = 400) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({f: rng.standard_normal(n) for f in FACTORS})


def test_decompose_recovers_the_weights_of_a_linear_logit() -> None:
    frame = _frame()
    weights = np.array([1.5, 1.1, 1.2, 1.65, 1.0])
    logit = sum(w * frame[f].to_numpy() for w, f in zip(weights, FACTORS, strict=True)) - 2.0
    coef, r2 = decompose(frame.with_columns(pl.Series("logit", logit)), "logit")
    np.testing.assert_allclose(coef, weights, atol=1e-8)
    assert abs(r2 - 1.0) < 1e-10


def test_a_factor_the_logit_ignores_gets_no_weight_and_noise_lowers_r2() -> None:
    frame = _frame(seed=1, n=4000)
    rng = np.random.default_rng(2)
    logit = frame["physio_severity"].to_numpy() + rng.standard_normal(frame.height)
    coef, r2 = decompose(frame.with_columns(pl.Series("logit", logit)), "logit")
    assert abs(coef[FACTORS.index("physio_x_carrier")]) < 0.1
    assert abs(coef[FACTORS.index("physio_severity")] - 1.0) < 0.1
    assert 0.4 < r2 < 0.6  # half the variance is noise


def test_table_shows_each_weight_relative_to_physiology() -> None:
    coef = np.array([1.5, 1.0, 0.5, 0.0, 2.0])
    text = table([{"run": "r", "n": 10, "auroc": 0.8, "coef": coef, "r2": 0.9}])
    assert "+1.50 (1.50)" in text and "+0.50 (0.50)" in text and "| 0.800 |" in text
