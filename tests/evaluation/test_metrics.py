from __future__ import annotations

import math

import numpy as np
import pytest

from clinfuse.evaluation import metrics


def test_confusion_metrics_hand_counted():
    # threshold 0.5: predictions 1,1,0,0,1 vs labels 1,0,0,1,1 -> tp=2 fp=1 tn=1 fn=1
    y = np.array([1, 0, 0, 1, 1])
    p = np.array([0.9, 0.6, 0.2, 0.4, 0.7])
    m = metrics.confusion_metrics(y, p, 0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["g_mean"] == pytest.approx(math.sqrt(2 / 3 * 1 / 2))


def test_auroc_perfect_random_and_single_class():
    y = np.array([0, 0, 1, 1])
    assert metrics.auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert math.isnan(metrics.auroc(np.ones(4), np.random.rand(4)))


def test_ece_zero_when_calibrated_and_brier_matches_definition():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    # A calibrated predictor: ECE shrinks like 1/sqrt(n per bin) ~ 0.007 here.
    assert metrics.ece(y, p) < 0.01
    # A predictor that says 0.9 where the truth is 0.5 is off by 0.4.
    assert metrics.ece(y, np.clip(p + 0.4, 0, 1)) > 0.25
    assert metrics.brier(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.25)


def test_bootstrap_ci_brackets_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(y * 0.3 + rng.uniform(size=400) * 0.7, 0, 1)
    lo, hi = metrics.bootstrap_ci(metrics.auroc, y, p, n=200)
    est = metrics.auroc(y, p)
    assert lo < est < hi
    assert hi - lo < 0.15


def test_choose_threshold_separates_perfectly_separable_scores():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.9])
    t = metrics.choose_threshold(y, p)
    assert metrics.confusion_metrics(y, p, t)["g_mean"] == 1.0


def test_stratified_auroc_counts_only_pairs_within_a_stratum():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    p = rng.normal(size=120) + y
    strata = rng.integers(0, 4, 120)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    wins = [
        1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0
        for i in pos
        for j in neg
        if strata[i] == strata[j]
    ]
    assert metrics.stratified_auroc(y, p, strata) == pytest.approx(np.mean(wins))
    # One stratum: the plain AUROC.
    assert metrics.stratified_auroc(y, p, np.zeros(120)) == pytest.approx(metrics.auroc(y, p))


def test_stratified_auroc_ignores_what_a_stratum_adds_to_every_score():
    rng = np.random.default_rng(4)
    strata = rng.integers(0, 3, 300)
    y = (rng.random(300) < np.array([0.1, 0.3, 0.6])[strata]).astype(int)  # rates differ
    p = rng.normal(size=300) + 0.8 * y
    shortcut = p + 2.0 * strata  # reads the stratum's own outcome rate
    assert metrics.auroc(y, shortcut) > metrics.auroc(y, p) + 0.05
    assert metrics.stratified_auroc(y, shortcut, strata) == pytest.approx(
        metrics.stratified_auroc(y, p, strata)
    )
    # Strata with one class hold no pair; none at all gives NaN.
    assert math.isnan(metrics.stratified_auroc(np.array([0, 1]), np.array([0.1, 0.2]), [0, 1]))
