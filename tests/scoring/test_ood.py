from __future__ import annotations

import numpy as np
import pytest

from clinfuse.scoring.ood import MahalanobisOOD


def _two_class_gaussians(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = rng.normal(size=(n, 4)) + np.where(y[:, None] == 1, 2.0, 0.0)
    return z, y


def test_score_equals_squared_mahalanobis_for_known_covariance():
    z, y = _two_class_gaussians(20_000)
    ood = MahalanobisOOD.fit(z, y)
    # True model: identity covariance, means 0 and 2*1. For a point at the class-0
    # mean plus (1, 0, 0, 0) the squared distance to the nearest mean is ~1.
    point = np.array([[1.0, 0.0, 0.0, 0.0]])
    assert ood.score(point)[0] == pytest.approx(1.0, abs=0.1)


def test_flag_rate_matches_quantile_in_distribution_and_catches_far_points():
    z, y = _two_class_gaussians(20_000, seed=1)
    ood = MahalanobisOOD.fit(z, y, quantile=0.95)
    z_new, _ = _two_class_gaussians(20_000, seed=2)
    assert ood.flag(z_new).mean() == pytest.approx(0.05, abs=0.01)
    far = np.full((10, 4), 12.0)
    assert ood.flag(far).all()


def test_a_constant_representation_fits_and_flags_only_what_differs():
    # A genotype-only model whose path kept no marker group embeds every subject alike.
    z = np.ones((50, 4))
    y = np.arange(50) % 2
    ood = MahalanobisOOD.fit(z, y)
    assert not ood.flag(z).any()
    assert ood.flag(z + 1.0).all()
