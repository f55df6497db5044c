from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clinfuse.evaluation.evaluate import RISK_FACTORS, _risk_factors


def _oracle(path, **drop) -> None:
    frame = pl.DataFrame(
        {
            "subject_id": [3, 1, 2],
            "lung_disease": [0.3, 0.1, 0.2],
            "physio_severity": [3.0, 1.0, 2.0],
            "genetic_score": [-3.0, -1.0, -2.0],
            "modifier_carrier": [True, False, True],
            "true_risk": [0.5, 0.5, 0.5],
        }
    )
    frame.drop(list(drop)).write_parquet(path / "oracle.parquet")


def test_risk_factors_follow_the_samples_order_and_mark_unknown_subjects(tmp_path):
    _oracle(tmp_path)
    samples = pl.DataFrame({"subject_id": [1, 2, 2, 9, 3]})  # 2 twice, 9 not in the oracle
    x = _risk_factors(tmp_path, samples)
    assert x.shape == (5, len(RISK_FACTORS))
    np.testing.assert_allclose(x[:3], [[0.1, 1, -1, 0], [0.2, 2, -2, 1], [0.2, 2, -2, 1]])
    assert np.isnan(x[3]).all()
    np.testing.assert_allclose(x[4], [0.3, 3, -3, 1])


def test_no_oracle_no_floor_and_a_broken_oracle_is_named(tmp_path):
    assert _risk_factors(tmp_path, pl.DataFrame({"subject_id": [1]})) is None
    _oracle(tmp_path, genetic_score=None)
    with pytest.raises(
        ValueError,
        match=r"oracle.parquet: oracle has no risk-factor column\(s\) \['genetic_score'\]",
    ):
        _risk_factors(tmp_path, pl.DataFrame({"subject_id": [1]}))
