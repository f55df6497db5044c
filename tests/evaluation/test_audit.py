from __future__ import annotations

import numpy as np
import pytest

from clinfuse.evaluation.audit import probe_confound, run_audit


def test_probe_finds_site_encoded_in_embeddings():
    rng = np.random.default_rng(0)
    site = rng.integers(0, 3, 600)
    z = rng.normal(size=(600, 8))
    z[:, 0] += 3.0 * site  # site written plainly into one dimension
    res = probe_confound(z, site, ["A", "B", "C"])
    assert res["probe_accuracy"] > 0.9
    assert res["majority_rate"] < 0.4
    assert res["classes"] == ["A", "B", "C"]


def test_probe_at_majority_rate_when_embeddings_carry_no_site():
    rng = np.random.default_rng(1)
    site = (rng.uniform(size=900) < 0.7).astype(int)  # imbalanced: majority 0.7
    z = rng.normal(size=(900, 8))
    res = probe_confound(z, site)
    # A probe that learned nothing predicts the majority class: accuracy ~ majority
    # rate and balanced accuracy ~ chance (0.5), within CV noise (~3 SE).
    assert res["probe_accuracy"] == pytest.approx(res["majority_rate"], abs=0.05)
    assert res["probe_balanced_accuracy"] == pytest.approx(0.5, abs=0.06)


def test_unknown_codes_ignored_and_single_class_is_nan():
    z = np.zeros((10, 2))
    res = probe_confound(z, np.array([0] * 8 + [-1] * 2))
    assert res["n"] == 8 and np.isnan(res["probe_accuracy"])


def test_leave_one_site_out_transfers_shared_signal():
    rng = np.random.default_rng(2)
    site = rng.integers(0, 3, 1500)
    y = rng.integers(0, 2, 1500)
    z = rng.normal(size=(1500, 4))
    z[:, 1] += 2.0 * y  # outcome signal shared by every site
    res = run_audit(z, y, {"site": site}, {"site": ["s0", "s1", "s2"]})
    assert set(res["leave_one_site_out_auroc"]) == {"s0", "s1", "s2"}
    assert min(res["leave_one_site_out_auroc"].values()) > 0.85


def test_singleton_class_is_left_out_of_the_probe_not_the_rates():
    rng = np.random.default_rng(3)
    site = np.array([0] * 50 + [1] * 49 + [2])
    z = rng.normal(size=(100, 3))
    z[:, 0] += 4.0 * (site == 1)
    res = probe_confound(z, site)
    assert res["excluded_rare_classes"] == 1
    assert res["majority_rate"] == 0.5
    assert res["probe_accuracy"] > 0.9
