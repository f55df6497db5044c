"""Stability selection of genotype groups: planted groups, determinism, frequencies."""

from __future__ import annotations

import pytest
import torch

from clinfuse.encoders import create_encoder
from clinfuse.encoders.sgl_path import regularization_path
from clinfuse.encoders.sgl_stability import complementary_halves, max_selected


def _stability_path(spec, data, **stability):
    return regularization_path(
        spec, data["train"], data["tuning"], ancestry_pcs=2, rule="stability",
        stability=stability,
    )  # fmt: skip


@pytest.fixture(scope="module")
def planted(two_populations):
    spec, data, truth = two_populations(n=3000, seed=0)
    return spec, data, truth, _stability_path(spec, data, pairs=10, seed=0)


def test_stability_keeps_the_planted_causal_groups_and_not_the_ancestry_only_one(planted):
    spec, data, truth, path = planted
    assert path.groups == truth["causal"]
    freq = dict(zip(spec.groups, path.stability["frequency"], strict=True))
    assert freq[truth["ancestral"]] < path.stability["threshold"]
    # The expected-false-selection bound the strengths were counted over holds.
    assert path.stability["false_bound"] <= path.stability["max_false"]
    assert path.lambda_ == path.lambdas[path.stability["n_strengths"] - 1]


def test_frequencies_are_shares_of_the_halves(planted):
    _, _, _, path = planted
    halves = 2 * path.stability["pairs"]
    freq = torch.tensor(path.stability["frequency_path"], dtype=torch.float64)  # (L', G)
    assert bool(((freq >= 0) & (freq <= 1)).all())
    torch.testing.assert_close(freq * halves, (freq * halves).round(), rtol=0, atol=1e-9)
    torch.testing.assert_close(
        torch.tensor(path.stability["frequency"], dtype=torch.float64), freq.max(0).values
    )


def test_the_rule_is_deterministic_for_a_seed(planted):
    spec, data, _, path = planted
    again = _stability_path(spec, data, pairs=10, seed=0)
    assert again.stability == path.stability
    other = complementary_halves(2100, 10, seed=1)
    assert not torch.equal(other, complementary_halves(2100, 10, seed=0))


def test_halves_come_in_disjoint_pairs():
    rows = complementary_halves(11, 3, seed=0)
    assert rows.shape == (6, 5)
    for k in range(3):
        assert not set(rows[2 * k].tolist()) & set(rows[2 * k + 1].tolist())


def test_the_false_selection_bound_sets_the_strengths_counted():
    # q^2 / ((2 pi - 1) G) = max_false at q = max_selected(...)
    q = max_selected(0.75, 1.0, 20)
    assert q**2 / ((2 * 0.75 - 1) * 20) == pytest.approx(1.0)


def test_bad_settings_are_named(two_populations):
    spec, _, _ = two_populations(n=200, seed=1)
    with pytest.raises(ValueError, match="path_threshold=0.4"):
        create_encoder("sgl_mlp", spec=spec, path_rule="stability", path_threshold=0.4)
    with pytest.raises(ValueError, match="path_rule='vote'"):
        create_encoder("sgl_mlp", spec=spec, path_rule="vote")


def test_the_rule_does_not_depend_on_the_thread_count(planted):
    spec, data, _, path = planted
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        other = _stability_path(spec, data, pairs=10, seed=0)
    finally:
        torch.set_num_threads(before)
    assert other.stability["groups"] == path.stability["groups"]
    assert other.stability["frequency_path"] == path.stability["frequency_path"]
