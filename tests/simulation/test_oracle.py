"""Latent-factor ceilings fitted on one split and scored on another."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from clinfuse.simulation.oracle import (
    FEATURE_SETS,
    observed_ceiling_scores,
    split_ceiling_scores,
)

N_PER_SPLIT = 200


def _oracle(seed: int = 0, reverse_held_out: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A hand-made oracle whose outcome is ``lung_disease > 0`` (reversed on held_out)."""
    rng = np.random.default_rng(seed)
    n = 2 * N_PER_SPLIT
    split = np.repeat(["train", "held_out"], N_PER_SPLIT)
    lung = rng.normal(size=n)
    outcome = lung > 0
    if reverse_held_out:
        outcome = np.where(split == "held_out", ~outcome, outcome)
    oracle = pl.DataFrame(
        {
            "subject_id": np.arange(n, dtype=np.int64),
            "site": rng.choice(["A", "B", "C"], n),
            "ancestry": rng.choice(["POP1", "POP2"], n),
            "lung_disease": lung,
            "physio_severity": rng.normal(size=n),
            "genetic_score": rng.normal(size=n),
            "modifier_carrier": rng.random(n) < 0.3,
            "true_risk": 1 / (1 + np.exp(-4 * lung)),
            "outcome": outcome,
        }
    )
    splits = pl.DataFrame({"subject_id": np.arange(n, dtype=np.int64), "split": split})
    return oracle, splits


def _auroc(frame: pl.DataFrame, column: str) -> float:
    return float(roc_auc_score(frame["outcome"].to_numpy(), frame[column].to_numpy()))


def test_scores_only_the_score_split_with_one_column_per_feature_set():
    oracle, splits = _oracle()
    scores = split_ceiling_scores(oracle, splits)
    held = splits.filter(pl.col("split") == "held_out")["subject_id"]
    assert scores["subject_id"].to_list() == held.to_list()
    assert set(FEATURE_SETS) <= set(scores.columns)


def test_a_feature_set_holding_the_cause_separates_and_noise_does_not():
    oracle, splits = _oracle()
    scores = split_ceiling_scores(oracle, splits, ("image", "timeseries"))
    assert _auroc(scores, "image") == 1.0  # outcome is a threshold of lung_disease
    # Pure noise: AUROC of independent scores has SE ~ sqrt((n+ + n- + 1) / (12 n+ n-)).
    se = np.sqrt((N_PER_SPLIT + 1) / (12 * (N_PER_SPLIT / 2) ** 2))
    assert abs(_auroc(scores, "timeseries") - 0.5) < 4 * se


def test_the_regression_is_fit_on_the_fit_split_only():
    # Reversed link on held_out: a model fit on train ranks held_out exactly backwards.
    oracle, splits = _oracle(reverse_held_out=True)
    scores = split_ceiling_scores(oracle, splits, ("image",))
    assert _auroc(scores, "image") == 0.0


def test_a_subject_without_a_split_is_named():
    oracle, splits = _oracle()
    with pytest.raises(ValueError, match="subject_id 0"):
        split_ceiling_scores(oracle, splits.filter(pl.col("subject_id") != 0))


def test_an_empty_split_is_refused():
    oracle, splits = _oracle()
    with pytest.raises(ValueError, match="'tuning'"):
        split_ceiling_scores(oracle, splits, ("image",), score_split="tuning")


def test_the_observed_ceiling_with_every_film_present_separates_like_the_full_one():
    oracle, splits = _oracle()
    everyone = np.ones(oracle.height, dtype=bool)
    scores = observed_ceiling_scores(oracle, splits, {"image": everyone})
    held = splits.filter(pl.col("split") == "held_out")["subject_id"]
    assert scores["subject_id"].to_list() == held.to_list()
    assert (
        _auroc(scores, "observed_interaction") > 0.98
    )  # the cause is observed (noise factors cost a little)


def test_a_missing_film_hides_the_cause_from_the_observed_ceiling():
    # Films of a random half are missing: the half without one is ranked by noise only,
    # so the ceiling sits near (1 + 0.5) / 2 AUROC-wise, well below the full 1.0, and
    # with no film at all it is at chance.
    oracle, splits = _oracle()
    rng = np.random.default_rng(1)
    half = rng.random(oracle.height) < 0.5
    partial = _auroc(
        observed_ceiling_scores(oracle, splits, {"image": half}), "observed_interaction"
    )
    nobody = np.zeros(oracle.height, dtype=bool)
    none = _auroc(
        observed_ceiling_scores(oracle, splits, {"image": nobody}), "observed_interaction"
    )
    se = np.sqrt((N_PER_SPLIT + 1) / (12 * (N_PER_SPLIT / 2) ** 2))
    assert 0.6 < partial < 0.95
    assert abs(none - 0.5) < 4 * se


def test_the_observed_ceiling_refuses_flags_of_the_wrong_length_or_modality():
    oracle, splits = _oracle()
    with pytest.raises(ValueError, match="expected \\(400,\\)"):
        observed_ceiling_scores(oracle, splits, {"image": np.ones(3, dtype=bool)})
    with pytest.raises(ValueError, match="unknown modality"):
        observed_ceiling_scores(oracle, splits, {"vitals": np.ones(oracle.height, dtype=bool)})


def test_the_observed_ceiling_may_read_a_confound_that_carries_the_outcome():
    # The outcome is the site here (and no factor): only a ceiling told the site reads it.
    oracle, splits = _oracle()
    oracle = oracle.with_columns(outcome=pl.col("site") == "A")
    everyone = {"image": np.ones(oracle.height, dtype=bool)}
    blind = _auroc(observed_ceiling_scores(oracle, splits, everyone), "observed_interaction")
    told = observed_ceiling_scores(oracle, splits, everyone, confounds=("site",))
    se = np.sqrt((N_PER_SPLIT + 1) / (12 * (N_PER_SPLIT / 3) * (2 * N_PER_SPLIT / 3)))
    assert abs(blind - 0.5) < 4 * se
    assert _auroc(told, "observed_interaction") > 0.99
    with pytest.raises(ValueError, match="unknown \\['scanner'\\]"):
        observed_ceiling_scores(oracle, splits, everyone, confounds=("scanner",))
