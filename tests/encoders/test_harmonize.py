"""ComBat harmonization of frozen image features across sites (encoders/harmonize.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders.harmonize import combat_affine
from clinfuse.encoders.image import ImageEncoderConfig, TimmImageEncoder


def _planted(seed: int = 0, n: int = 600, f: int = 8):
    """Features with a site shift and scale, and an outcome effect of +1 on every feature;
    the outcome is more common at site 2 (case mix differs by site)."""
    rng = np.random.default_rng(seed)
    site = rng.integers(0, 3, n)
    y = (rng.random(n) < 0.2 + 0.3 * (site == 2)).astype(int)
    x = rng.normal(size=(n, f)) + site[:, None] * np.linspace(0.5, 2.0, f) + y[:, None]
    x[:, 3] *= 1 + site  # a scale difference as well
    x[:, 5] = 2.0  # a constant feature (ReLU units that never fire)
    return x, site, y


def _site_probe(x: np.ndarray, site: np.ndarray) -> float:
    probe = LogisticRegression(max_iter=2000)
    return float(cross_val_score(probe, x, site, cv=5).mean())


def test_combat_removes_a_planted_site_shift_and_keeps_the_outcome_effect():
    x, site, y = _planted()
    scale, shift, info = combat_affine(x, site, y, n_sites=3)
    h = x * scale[site] + shift[site]
    majority = np.bincount(site).max() / len(site)
    assert _site_probe(x, site) > 0.8
    assert _site_probe(h, site) < majority + 0.05
    # The outcome effect (+1) survives inside every site, on the shift-only features.
    shifted_only = h[:, [0, 1, 2, 4]]
    for s in range(3):
        m = site == s
        effect = shifted_only[m & (y == 1)].mean(0) - shifted_only[m & (y == 0)].mean(0)
        np.testing.assert_allclose(effect, 1.0, atol=0.35)
    np.testing.assert_allclose(h[:, 5], 2.0)  # constant features pass through
    assert info["unchanged_features"] == 1 and info["sites"] == [0, 1, 2]


def test_sites_without_training_films_pass_through_unchanged():
    x, site, y = _planted()
    keep = site != 1  # site 1 never seen; row 3 is the unknown-site row
    scale, shift, info = combat_affine(x[keep], site[keep], y[keep], n_sites=3)
    for row in (1, 3):
        np.testing.assert_array_equal(scale[row], 1.0)
        np.testing.assert_array_equal(shift[row], 0.0)
    assert info["sites"] == [0, 2]


def test_a_single_site_or_a_site_with_one_film_keeps_its_features_and_is_named():
    x, site, y = _planted()
    scale, shift, info = combat_affine(x, np.zeros_like(site), y, n_sites=3)
    np.testing.assert_array_equal(scale, 1.0)  # one scanner: nothing to harmonize
    np.testing.assert_array_equal(shift, 0.0)
    assert info["sites"] == [] and info["unharmonized_sites"] == [0]
    assert "nothing to harmonize" in info["note"]

    lone = site.copy()
    lone[np.flatnonzero(site == 2)[1:]] = 0  # site 2 keeps one film
    scale, shift, info = combat_affine(x, lone, y, n_sites=3)
    np.testing.assert_array_equal(scale[2], 1.0)
    np.testing.assert_array_equal(shift[2], 0.0)
    assert info["sites"] == [0, 1] and info["unharmonized_sites"] == [2]
    assert "[2] have fewer than 2 training films" in info["note"]
    # The other two sites are fitted as if the lone film were not there.
    keep = lone != 2
    ref_scale, ref_shift, _ = combat_affine(x[keep], lone[keep], y[keep], n_sites=3)
    np.testing.assert_allclose(scale, ref_scale)
    np.testing.assert_allclose(shift, ref_shift)
    assert not np.allclose(scale[:2], 1.0)


def _spec() -> DataSpec:
    return DataSpec(image_size=32, sites=["a", "b", "c"], ancestries=["x"])


def test_encoder_refuses_harmonization_of_a_backbone_that_trains():
    with pytest.raises(ValueError, match="needs transfer='frozen'"):
        TimmImageEncoder(ImageEncoderConfig(weights="none", harmonize="combat", transfer="full"),
                         spec=_spec())  # fmt: skip


def test_encoder_applies_the_site_map_and_keeps_it_in_its_state():
    torch.manual_seed(0)
    cfg = ImageEncoderConfig(weights="none", harmonize="combat", embed_dim=8, drop_rate=0.0)
    enc = TimmImageEncoder(cfg, spec=_spec()).eval()
    f = enc.num_features
    rng = np.random.default_rng(1)
    site = np.repeat([0, 1, 2], 20)
    feats = rng.normal(size=(60, f)) + site[:, None]
    batch = {
        "image_pooled": torch.as_tensor(feats[:6], dtype=torch.float32),
        "image_present": torch.tensor([True] * 5 + [False]),
        "confounds": {"site": torch.tensor([0, 1, 2, -1, 7, 0])},
    }
    with pytest.raises(RuntimeError, match="fit_harmonization"):
        enc(batch)
    info = enc.fit_harmonization(feats, site, rng.integers(0, 2, 60))
    assert info["sites"] == [0, 1, 2]
    emb, present = enc(batch)
    rows = torch.tensor([0, 1, 2, 3, 3, 0])  # -1 and an out-of-range code: identity row
    pooled = batch["image_pooled"] * enc.harm_scale[rows] + enc.harm_shift[rows]
    expected = enc.proj(pooled) * present.unsqueeze(1)
    torch.testing.assert_close(emb, expected)
    torch.testing.assert_close(emb[3], enc.proj(batch["image_pooled"][3]))  # unknown: raw
    assert torch.all(emb[5] == 0)  # no film, no embedding
    # A saved model keeps the fitted map.
    again = TimmImageEncoder(cfg, spec=_spec()).eval()
    again.load_state_dict(enc.state_dict())
    torch.testing.assert_close(again(batch)[0], emb)


def test_standardize_centres_and_scales_the_harmonized_training_features():
    cfg = ImageEncoderConfig(weights="none", harmonize="combat", standardize=True, embed_dim=8)
    enc = TimmImageEncoder(cfg, spec=_spec()).eval()
    plain = TimmImageEncoder(ImageEncoderConfig(weights="none", harmonize="combat", embed_dim=8),
                             spec=_spec()).eval()  # fmt: skip
    rng = np.random.default_rng(3)
    site = np.repeat([0, 1, 2], 40)
    feats = rng.normal(size=(120, enc.num_features)) * 0.3 + 4.0 + site[:, None]
    feats[:, 7] = 2.0  # a constant feature stays finite
    labels = rng.integers(0, 2, 120)
    info = enc.fit_harmonization(feats, site, labels)
    plain.fit_harmonization(feats, site, labels)
    assert info["standardized"] is True
    x = torch.as_tensor(feats)
    rows = torch.as_tensor(site)
    out = (x * enc.harm_scale[rows].double() + enc.harm_shift[rows].double()).numpy()
    keep = np.arange(feats.shape[1]) != 7
    np.testing.assert_allclose(out[:, keep].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, keep].std(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(out[:, 7], 0.0, atol=1e-5)
    # The same ComBat map, then one affine step shared by every site: a feature's
    # standardized value is its harmonized value moved and rescaled.
    before = (x * plain.harm_scale[rows].double() + plain.harm_shift[rows].double()).numpy()
    slope = np.polyfit(before[:, 0], out[:, 0], 1)[0]
    np.testing.assert_allclose(out[:, 0], (before[:, 0] - before[:, 0].mean()) * slope, atol=1e-4)
    # An unknown site gets the standardization alone.
    unknown = enc.harm_scale.shape[0] - 1
    torch.testing.assert_close(
        enc.harm_scale[unknown, 0], 1.0 / torch.as_tensor(before[:, 0].std()).float()
    )


def test_standardize_needs_combat():
    with pytest.raises(ValueError, match="standardize folds into the ComBat maps"):
        TimmImageEncoder(ImageEncoderConfig(weights="none", standardize=True), spec=_spec())


def test_principal_axes_project_the_harmonized_films_onto_their_top_axes():
    torch.manual_seed(0)
    k = 3
    cfg = ImageEncoderConfig(weights="none", harmonize="combat", principal_axes=k, embed_dim=8,
                             drop_rate=0.0)  # fmt: skip
    enc = TimmImageEncoder(cfg, spec=_spec()).eval()
    plain = TimmImageEncoder(ImageEncoderConfig(weights="none", harmonize="combat", embed_dim=8),
                             spec=_spec()).eval()  # fmt: skip
    assert enc.proj.in_features == k  # the projection reads the axes, not every feature
    rng = np.random.default_rng(5)
    f = enc.num_features
    site = np.repeat([0, 1, 2], 50)
    # Two directions carry most of the variance, one a little, the rest is noise.
    basis = np.linalg.qr(rng.normal(size=(f, 3)))[0].T  # (3, F), orthonormal rows
    scores = rng.normal(size=(150, 3)) * np.array([10.0, 5.0, 2.0])
    feats = scores @ basis + 0.01 * rng.normal(size=(150, f)) + 3.0 + 0.5 * site[:, None]
    feats[:, 11] = 0.0  # a unit that never fires in training
    labels = rng.integers(0, 2, 150)
    info = enc.fit_harmonization(feats, site, labels)
    plain.fit_harmonization(feats, site, labels)
    assert info["principal_axes"] == k and info["variance_kept"] > 0.99
    # The same ComBat maps; the shift also takes the training mean out.
    torch.testing.assert_close(enc.harm_scale, plain.harm_scale)
    rows = torch.as_tensor(site)
    x = torch.as_tensor(feats, dtype=torch.float32)
    harmonized = x * plain.harm_scale[rows] + plain.harm_shift[rows]
    centred = harmonized - harmonized.mean(0)
    coords = (x * enc.harm_scale[rows] + enc.harm_shift[rows]) @ enc.harm_axes.T
    torch.testing.assert_close(coords, centred @ enc.harm_axes.T, atol=1e-3, rtol=1e-4)
    # Orthonormal axes spanning the planted directions, each signed by its largest loading.
    axes = enc.harm_axes.double().numpy()
    np.testing.assert_allclose(axes @ axes.T, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(axes @ basis.T)[1], 1.0, atol=1e-3)
    assert np.all(axes[np.arange(k), np.abs(axes).argmax(1)] > 0)
    # The never-firing unit has no weight: a value it takes only at test changes nothing.
    np.testing.assert_allclose(axes[:, 11], 0.0, atol=1e-6)
    batch = {
        "image_pooled": torch.as_tensor(feats[:4], dtype=torch.float32),
        "image_present": torch.tensor([True, True, True, False]),
        "confounds": {"site": torch.tensor([0, 1, -1, 2])},
    }
    emb, present = enc(batch)
    assert emb.shape == (4, 8) and torch.all(emb[3] == 0)
    fired = {**batch, "image_pooled": batch["image_pooled"].clone()}
    fired["image_pooled"][:, 11] = 5.0
    torch.testing.assert_close(enc(fired)[0], emb, atol=1e-4, rtol=1e-4)
    # Tokens (attention fusion's patch tokens) go through the same map and axes.
    cells = torch.as_tensor(feats[:4], dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1)
    _, _, (tokens, mask, _) = enc.forward_with_tokens({**batch, "image_tokens": cells})
    assert tokens.shape == (4, 3, 8) and not bool(mask[3].any())
    torch.testing.assert_close(tokens[:3, 1], emb[:3])
    # A saved model keeps the axes.
    again = TimmImageEncoder(cfg, spec=_spec()).eval()
    again.load_state_dict(enc.state_dict())
    torch.testing.assert_close(again(batch)[0], emb)
    assert set(enc.harmonization_maps()) == {"harm_scale", "harm_shift", "harm_axes"}


def test_principal_axes_need_combat_and_enough_films():
    with pytest.raises(ValueError, match="principal_axes .* needs harmonize='combat'"):
        TimmImageEncoder(ImageEncoderConfig(weights="none", principal_axes=4), spec=_spec())
    enc = TimmImageEncoder(
        ImageEncoderConfig(weights="none", harmonize="combat", principal_axes=40), spec=_spec()
    )
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="principal_axes=40 needs at least 40 training films"):
        enc.fit_harmonization(rng.normal(size=(30, enc.num_features)), np.repeat([0, 1, 2], 10),
                              rng.integers(0, 2, 30))  # fmt: skip


def test_clip_bounds_the_standardized_features_of_a_unit_silent_in_training():
    torch.manual_seed(0)
    cfg = ImageEncoderConfig(weights="none", harmonize="combat", standardize=True, clip=5.0,
                             embed_dim=8, drop_rate=0.0)  # fmt: skip
    enc = TimmImageEncoder(cfg, spec=_spec()).eval()
    rng = np.random.default_rng(2)
    site = np.repeat([0, 1, 2], 40)
    feats = rng.normal(size=(120, enc.num_features)) + 0.5 * site[:, None]
    feats[:, 9] = 0.0
    feats[0, 9] = 1e-3  # fires once, faintly: a training standard deviation near 1e-4
    enc.fit_harmonization(feats, site, rng.integers(0, 2, 120))
    held = feats[:2].copy()
    held[1, 9] = 0.5  # a held-out film that fires the unit: thousands of deviations out
    rows = torch.tensor([0, 0])
    x = torch.as_tensor(held, dtype=torch.float32)
    z = x * enc.harm_scale[rows] + enc.harm_shift[rows]
    assert z[1, 9] > 1000  # what the projection would read unclamped
    emb, _ = enc({"image_pooled": x, "image_present": torch.tensor([True, True]),
                  "confounds": {"site": rows}})  # fmt: skip
    torch.testing.assert_close(emb, enc.proj(z.clamp(-5.0, 5.0)))
    with pytest.raises(ValueError, match="clip bounds standardized features"):
        TimmImageEncoder(ImageEncoderConfig(weights="none", harmonize="combat", clip=5.0),
                         spec=_spec())  # fmt: skip
