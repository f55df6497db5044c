from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_model, save_model
from sklearn.linear_model import LogisticRegression

from clinfuse.evaluation.audit import probe_confound
from clinfuse.evaluation.metrics import auroc
from clinfuse.fusion.erasure import ConceptEraser, leace_fit, one_hot_concept

# One mixing of the dimensions shared by every draw (the same "encoder").
_MIX_RNG = np.random.default_rng(99)
_MIX = np.eye(8) + 0.3 * _MIX_RNG.normal(size=(8, 8)) * (_MIX_RNG.random((8, 8)) < 0.3)


def _world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z (n, 8): dims 0-1 encode the site (3 classes, 0.5 / 0.3 / 0.2) linearly,
    dim 3 carries an outcome signal independent of the site, dims 2, 4-7 are noise;
    a fixed random mixing spreads them over all 8 dims."""
    rng = np.random.default_rng(seed)
    site = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    y = rng.integers(0, 2, n)
    z = rng.normal(size=(n, 8))
    z[:, 0] += 2.0 * (site == 1) - 1.5 * (site == 2)
    z[:, 1] += 1.5 * (site == 2)
    z[:, 3] += 1.2 * y
    return z @ _MIX.T, site, y


def _erase(z: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    return z - (z - mean) @ proj.T


def _outcome_auroc(z_fit, y_fit, z_test, y_test) -> float:
    model = LogisticRegression(max_iter=1000).fit(z_fit, y_fit)
    return auroc(y_test, model.decision_function(z_test))


def test_erased_site_is_at_the_majority_rate_and_the_outcome_survives():
    z_fit, site_fit, y_fit = _world(4000, 0)
    z_test, site_test, y_test = _world(1500, 1)
    concept, known = one_hot_concept({"site": site_fit}, {"site": 3})
    mean, proj = leace_fit(z_fit[known], concept[known])
    before = probe_confound(z_test, site_test)
    after = probe_confound(_erase(z_test, mean, proj), site_test)
    assert before["probe_accuracy"] > 0.75  # the site is plainly readable before
    # Held-out patients, fresh 5-fold probe: at the majority rate within 3 binomial SE
    # (3 * sqrt(m (1 - m) / n) = 0.039 for m = 0.5, n = 1500) and balanced accuracy at
    # chance (1/3) within the same margin.
    se3 = 3 * np.sqrt(after["majority_rate"] * (1 - after["majority_rate"]) / after["n"])
    assert after["probe_accuracy"] == pytest.approx(after["majority_rate"], abs=se3)
    assert after["probe_balanced_accuracy"] == pytest.approx(1 / 3, abs=se3)
    # The outcome lives in a direction uncorrelated with the site: the erasure leaves
    # it (AUROC s.e. at n = 1500 and AUROC 0.8 is ~0.011; the same test patients are
    # scored twice, so the paired difference is far smaller; allow 2 s.e.).
    kept = _outcome_auroc(_erase(z_fit, mean, proj), y_fit, _erase(z_test, mean, proj), y_test)
    assert kept == pytest.approx(_outcome_auroc(z_fit, y_fit, z_test, y_test), abs=0.022)
    assert kept > 0.75


def test_cross_covariance_with_the_concept_is_zero_on_the_fit_rows():
    z, site, _ = _world(800, 2)
    anc = np.random.default_rng(3).integers(0, 2, 800)
    concept, _ = one_hot_concept({"site": site, "ancestry": anc}, {"site": 3, "ancestry": 2})
    mean, proj = leace_fit(z, concept, ridge=0.1)  # exact for any ridge > 0
    erased = _erase(z, mean, proj)
    cov = (erased - erased.mean(0)).T @ (concept - concept.mean(0)) / len(z)  # (8, 5)
    assert np.abs(cov).max() < 1e-10
    # The erased subspace: (3 - 1) + (2 - 1) centred one-hot directions.
    assert np.linalg.matrix_rank(proj, tol=1e-8) == 3


def test_erasure_moves_z_only_inside_the_concept_subspace():
    # LEACE's edit is z - W^+ P W (z - mu): idempotent (erasing twice = once).
    z, site, _ = _world(600, 4)
    concept, _ = one_hot_concept({"site": site}, {"site": 3})
    mean, proj = leace_fit(z, concept)
    np.testing.assert_allclose(proj @ proj, proj, atol=1e-8)
    once = _erase(z, mean, proj)
    np.testing.assert_allclose(_erase(once, mean, proj), once, atol=1e-8)


def test_unknown_codes_are_flagged_and_bad_codes_named():
    concept, known = one_hot_concept({"site": np.array([0, -1, 2])}, {"site": 3})
    assert known.tolist() == [True, False, True]
    assert concept[0].tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="confound 'site': code 3 but only 3 classes"):
        one_hot_concept({"site": np.array([0, 3])}, {"site": 3})


def test_module_is_identity_until_fitted_and_keeps_the_fit_through_safetensors(tmp_path):
    z, site, _ = _world(500, 5)
    concept, _ = one_hot_concept({"site": site}, {"site": 3})
    eraser = ConceptEraser(8, ["site"])
    zt = torch.as_tensor(z, dtype=torch.float32)
    torch.testing.assert_close(eraser(zt), zt)
    eraser.fit(z, concept)
    assert bool(eraser.fitted) and eraser.rank == 2
    mean, proj = leace_fit(z, concept)
    np.testing.assert_allclose(eraser(zt).numpy(), _erase(z, mean, proj), atol=1e-4)
    save_model(eraser, str(tmp_path / "e.safetensors"))
    loaded = ConceptEraser(8, ["site"])
    load_model(loaded, str(tmp_path / "e.safetensors"), strict=True)
    torch.testing.assert_close(loaded(zt), eraser(zt))
    assert loaded(zt.reshape(20, 25, 8)).shape == (20, 25, 8)  # any leading dims


def _closed_form(z: np.ndarray, concept: np.ndarray, ridge: float) -> tuple[np.ndarray, ...]:
    """LEACE written out in NumPy (Belrose et al. 2023, eq. in the module docstring):
    ``W = (Sigma_zz + eps I)^{-1/2}``, ``P`` the projection onto ``colspace(W Sigma_zc)``;
    the edit ``W^+ P W`` that clinfuse computed itself before using ``concept-erasure``."""
    mean = z.mean(0)
    zc, cc = z - mean, concept - concept.mean(0)
    szz, szc = zc.T @ zc / len(z), zc.T @ cc / len(z)
    eps = ridge * np.trace(szz) / len(szz)
    evals, evecs = np.linalg.eigh(szz + eps * np.eye(len(szz)))
    whiten, unwhiten = (evecs / np.sqrt(evals)) @ evecs.T, (evecs * np.sqrt(evals)) @ evecs.T
    u, s, _ = np.linalg.svd(whiten @ szc, full_matrices=False)
    basis = u[:, s > 1e-8 * s[0]]
    return mean, unwhiten @ basis @ basis.T @ whiten


@pytest.mark.parametrize("ridge", [1e-3, 0.1])
def test_package_fit_is_the_closed_form(ridge):
    z, site, _ = _world(700, 6)
    anc = np.random.default_rng(7).integers(0, 2, 700)
    concept, _ = one_hot_concept({"site": site, "ancestry": anc}, {"site": 3, "ancestry": 2})
    mean, proj = leace_fit(z, concept, ridge=ridge)
    ref_mean, ref_proj = _closed_form(z, concept, ridge)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-12)
    np.testing.assert_allclose(proj, ref_proj, atol=1e-9)


def test_an_eraser_saved_before_the_package_loads_and_erases_the_same(tmp_path):
    # A saved model keeps the edit as the buffers mean (D,), projection (D, D) and
    # fitted (): an eraser written in that layout (the closed form, float32, as the
    # artifact stores it) loads strictly and gives the outputs it gave, and a fresh
    # fit on the same rows gives the same outputs.
    from safetensors.torch import save_file

    z, site, _ = _world(500, 8)
    concept, _ = one_hot_concept({"site": site}, {"site": 3})
    mean, proj = _closed_form(z, concept, 1e-3)
    old = {
        "mean": torch.as_tensor(mean, dtype=torch.float32),
        "projection": torch.as_tensor(proj, dtype=torch.float32),
        "fitted": torch.ones((), dtype=torch.bool),
    }
    save_file(old, str(tmp_path / "old.safetensors"))
    loaded = ConceptEraser(8, ["site"])
    load_model(loaded, str(tmp_path / "old.safetensors"), strict=True)
    zt = torch.as_tensor(z, dtype=torch.float32)
    expected = zt - (zt - old["mean"]) @ old["projection"].T
    torch.testing.assert_close(loaded(zt), expected)
    refit = ConceptEraser(8, ["site"])
    refit.fit(z, concept)
    torch.testing.assert_close(refit(zt), loaded(zt), atol=1e-5, rtol=1e-5)


def test_without_ridge_a_dead_dimension_is_erased_exactly():
    # A constant dimension makes Sigma_zz singular: the package's pseudo-inverse
    # still gives a finite edit with zero cross-covariance and leaves it constant.
    z, site, _ = _world(600, 9)
    z[:, 5] = 0.25
    concept, _ = one_hot_concept({"site": site}, {"site": 3})
    mean, proj = leace_fit(z, concept, ridge=0.0)
    erased = _erase(z, mean, proj)
    assert np.isfinite(proj).all()
    cov = (erased - erased.mean(0)).T @ (concept - concept.mean(0)) / len(z)
    assert np.abs(cov).max() < 1e-10
    np.testing.assert_allclose(erased[:, 5], 0.25, atol=1e-10)


def test_fit_rejects_nan_representations():
    z = np.zeros((4, 2))
    z[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        leace_fit(z, np.eye(2)[[0, 1, 0, 1]])


def _fusion_model(encoders, spec, fusion: str, erase: list[str]):
    from clinfuse.fusion.adversary import AdversaryConfig
    from clinfuse.fusion.base import create_fusion
    from clinfuse.fusion.model import FusionModel

    fus = create_fusion(fusion, in_dims={m: e.embed_dim for m, e in encoders.items()})
    return FusionModel(encoders, fus, spec, AdversaryConfig(erase=erase))


def test_model_refuses_erasure_it_cannot_apply(tiny_spec, toy_encoders):
    with pytest.raises(ValueError, match=r"unknown confound\(s\) \['sex'\]"):
        _fusion_model(toy_encoders, tiny_spec, "early", ["sex"])
    with pytest.raises(ValueError, match="produces the logit itself"):
        _fusion_model(toy_encoders, tiny_spec, "late", ["site"])


def test_model_fuses_through_the_fitted_eraser(tiny_spec, toy_encoders, batch_factory):
    model = _fusion_model(toy_encoders, tiny_spec, "early", ["site"]).eval()
    batch = batch_factory(tiny_spec, batch_size=12)
    with torch.no_grad():
        plain = model(batch)
        z = plain["fused"].numpy()
        concept, _ = one_hot_concept({"site": batch["confounds"]["site"].numpy()}, {"site": 3})
        model.eraser.fit(z, concept)
        erased = model(batch)
    mean, proj = leace_fit(z, concept)
    np.testing.assert_allclose(erased["fused"].numpy(), _erase(z, mean, proj), atol=1e-4)
    expected = model.head(erased["fused"]).squeeze(-1)
    torch.testing.assert_close(erased["logit"], expected)
