from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders import create_encoder
from clinfuse.encoders.genomics import (
    SGLMLPEncoder,
    binomial_scale,
    fit_logistic,
    group_selection_metrics,
    regularization_path,
    sparse_group_penalty,
    sparse_group_prox,
)


def _spec(n_groups: int = 3, per_group: int = 2) -> DataSpec:
    m = n_groups * per_group
    return DataSpec(
        markers=[f"rs{i}" for i in range(m)],
        marker_groups=[i // per_group for i in range(m)],
        groups=[f"G{g}" for g in range(n_groups)],
        marker_mean=[0.5 + 0.1 * i for i in range(m)],
    )


def _batch(spec: DataSpec, b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (b, spec.n_markers), generator=gen).float()
    mask = (torch.rand(b, spec.n_markers, generator=gen) > 0.2).float()
    return {
        "genotype": x * mask,
        "genotype_mask": mask,
        "genotype_present": torch.ones(b, dtype=torch.bool),
    }


# --- proximal operator against its closed form ----------------------------------


def test_prox_zeroes_small_group_and_shrinks_large_group_by_exact_factor() -> None:
    # group 0: columns 0,1 with norm 0.05; group 1: columns 2,3 with norm 5 (3-4-0-0 triangle)
    w = torch.tensor([[0.03, 0.0, 3.0, 0.0], [0.0, 0.04, 0.0, 4.0]])
    col = torch.tensor([0, 0, 1, 1])
    size = torch.tensor([2.0, 2.0])
    t = 0.1  # group threshold; t * sqrt(2) = 0.1414 > 0.05, < 5
    out = sparse_group_prox(w, col, size, l1=0.0, group=t)
    assert torch.equal(out[:, :2], torch.zeros(2, 2))  # exactly zero, not small
    factor = 1 - t * math.sqrt(2) / 5.0
    torch.testing.assert_close(out[:, 2:], w[:, 2:] * factor, rtol=0, atol=1e-7)


def test_prox_l1_part_soft_thresholds_entries() -> None:
    w = torch.tensor([[0.05, -0.05, 1.0, -2.0]])
    col = torch.tensor([0, 0, 1, 1])
    out = sparse_group_prox(w, col, torch.tensor([2.0, 2.0]), l1=0.1, group=0.0)
    expected = torch.tensor([[0.0, 0.0, 0.9, -1.9]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_prox_l1_then_group_composition() -> None:
    # one group of 2 columns: soft-threshold by 0.5 -> (2.5, 0), norm 2.5,
    # group shrink 1 - 0.5 * sqrt(2) / 2.5
    w = torch.tensor([[3.0, 0.4]])
    out = sparse_group_prox(w, torch.tensor([0, 0]), torch.tensor([2.0]), l1=0.5, group=0.5)
    expected = torch.tensor([[2.5 * (1 - 0.5 * math.sqrt(2) / 2.5), 0.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_prox_with_zero_thresholds_is_identity() -> None:
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    col = torch.tensor([0, 0, 1, 1, 2, 2])
    out = sparse_group_prox(w, col, torch.tensor([2.0, 2.0, 2.0]), l1=0.0, group=0.0)
    assert torch.equal(out, w)


def test_after_optimizer_step_with_lambda_zero_leaves_weights() -> None:
    enc = create_encoder("sgl_mlp", spec=_spec(), lambda_=0.0)
    before = enc.first.weight.detach().clone()
    enc.after_optimizer_step(lr=1.0)
    assert torch.equal(enc.first.weight, before)


def test_penalty_matches_hand_computation() -> None:
    w = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, -1.0]])
    col = torch.tensor([0, 0, 1])
    size = torch.tensor([2.0, 1.0])
    # group norms 5 and sqrt(2); L1 = 9
    expected = 0.1 * (0.25 * (math.sqrt(2) * 5 + 1 * math.sqrt(2)) + 0.75 * 9)
    got = sparse_group_penalty(w, col, size, lambda_=0.1, alpha=0.75)
    assert float(got) == pytest.approx(expected, rel=1e-6)


# --- encoder contract -------------------------------------------------------------


@pytest.mark.parametrize("missing", ["impute", "mask"])
def test_forward_shape_and_registry(missing: str) -> None:
    spec = _spec()
    enc = create_encoder("sgl_mlp", spec=spec, hidden=(8,), embed_dim=5, missing=missing)
    emb, present = enc(_batch(spec))
    assert emb.shape == (4, 5) and present.dtype == torch.bool
    # impute adds one indicator column per marker, in the marker's group
    assert enc.first.in_features == spec.n_markers * (2 if missing == "impute" else 1)


def test_missing_call_is_imputed_with_train_mean() -> None:
    spec = _spec()
    enc = create_encoder("sgl_mlp", spec=spec, missing="mask", dropout=0.0)
    called = _batch(spec, b=1)
    called["genotype"][0, 0] = spec.marker_mean[0]  # a call equal to the train mean
    called["genotype_mask"][0, 0] = 1.0
    missing = {k: v.clone() for k, v in called.items()}
    missing["genotype"][0, 0] = 0.0
    missing["genotype_mask"][0, 0] = 0.0
    torch.testing.assert_close(enc(called)[0], enc(missing)[0])


def test_binomial_scale_is_hardy_weinberg_sd() -> None:
    # p = 0.25: var of Binomial(2, p) = 2 p (1 - p) = 0.375
    got = binomial_scale(torch.tensor([0.5, 0.0]))
    assert float(got[0]) == pytest.approx(math.sqrt(0.375), rel=1e-6)
    assert float(got[1]) > 0  # a monomorphic marker does not divide by zero


def test_fully_missing_and_absent_subjects_are_finite() -> None:
    spec = _spec()
    enc = create_encoder("sgl_mlp", spec=spec)
    batch = _batch(spec)
    batch["genotype"][1:] = 0.0
    batch["genotype_mask"][1:] = 0.0
    batch["genotype_present"][2:] = False
    emb, present = enc(batch)
    assert torch.isfinite(emb).all()
    assert present.tolist() == [True, True, False, False]


def test_regularization_loss_is_zero_and_penalty_is_logged_value() -> None:
    enc = create_encoder("sgl_mlp", spec=_spec(), lambda_=0.5)
    assert float(enc.regularization_loss()) == 0.0
    expected = sparse_group_penalty(
        enc.first.weight.detach(), enc.column_group, enc.group_size, 0.5, enc.cfg.alpha
    )
    assert float(enc.penalty()) == pytest.approx(float(expected))


def test_bad_inputs_name_the_problem() -> None:
    spec = _spec()
    with pytest.raises(ValueError, match="marker_groups"):
        SGLMLPEncoder(DataSpec(markers=["a"], marker_groups=[], groups=["G"], marker_mean=[1.0]))
    with pytest.raises(ValueError, match="'a'"):
        SGLMLPEncoder(DataSpec(markers=["a"], marker_groups=[0], groups=["G"], marker_mean=[3.0]))
    with pytest.raises(ValueError, match="missing"):
        create_encoder("sgl_mlp", spec=spec, missing="drop")
    enc = create_encoder("sgl_mlp", spec=spec)
    batch = _batch(spec)
    batch["genotype"] = batch["genotype"][:, :3]
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        enc(batch)


def test_group_selection_metrics() -> None:
    m = group_selection_metrics(["a", "b", "x"], ["a", "b", "c"])
    assert m == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3)}
    assert group_selection_metrics([], ["a"]) == {"precision": 1.0, "recall": 0.0}


# --- selection on simulated genotypes -----------------------------------------------

N_GROUPS, PER_GROUP, CAUSAL = 20, 5, (2, 9, 15)


def _simulate(n: int, seed: int) -> tuple[DataSpec, dict[str, torch.Tensor], torch.Tensor]:
    """20 groups of 5 markers; 3 causal groups; logistic outcome; 5% missing calls."""
    rng = np.random.default_rng(seed)
    m = N_GROUPS * PER_GROUP
    freq = rng.uniform(0.1, 0.5, m)
    x = rng.binomial(2, freq, size=(n, m)).astype(np.float32)
    z = (x - 2 * freq) / np.sqrt(2 * freq * (1 - freq))
    cols = [g * PER_GROUP + j for g in CAUSAL for j in range(PER_GROUP)]
    beta = rng.choice([-1.0, 1.0], size=len(cols)) / math.sqrt(PER_GROUP)
    y = rng.random(n) < 1 / (1 + np.exp(-(z[:, cols] @ beta)))  # logit variance 3
    called = (rng.random(x.shape) > 0.05).astype(np.float32)
    spec = DataSpec(
        markers=[f"rs{i}" for i in range(m)],
        marker_groups=[i // PER_GROUP for i in range(m)],
        groups=[f"G{g}" for g in range(N_GROUPS)],
        marker_mean=x.mean(0).astype(float).tolist(),
    )
    batch = {
        "genotype": torch.from_numpy(x * called),
        "genotype_mask": torch.from_numpy(called),
        "genotype_present": torch.ones(n, dtype=torch.bool),
    }
    return spec, batch, torch.from_numpy(y.astype(np.float32))


@pytest.mark.slow
def test_proximal_training_recovers_causal_groups() -> None:
    # Why the thresholds hold: at a fixed point of the proximal step a group sits
    # at zero iff ||grad W_g|| <= lambda (1 - alpha) sqrt(p_g) (KKT). For a null
    # group of standardized markers the gradient is an average of N independent
    # zero-mean terms, so its norm is ~ sqrt(p_g E||delta||^2 / N): with N = 3000
    # it is ~30x smaller than a causal group's (effect 1/sqrt(5) per marker), and
    # lambda = 0.03 sits between the two. Recall must be 1; a null group can only
    # survive if training has not yet converged, so allow 3 of 17 (precision >= 0.5).
    spec, batch, y = _simulate(n=3000, seed=2)
    torch.manual_seed(0)
    enc = create_encoder("sgl_mlp", spec=spec, hidden=(8,), embed_dim=4, dropout=0.0)
    enc.lambda_ = 0.0  # warm-up: the all-zero first layer is a saddle
    head = fit_logistic(enc, batch, y, steps=300, lr=1.0)
    enc.lambda_ = 0.03
    fit_logistic(enc, batch, y, head=head, steps=1500, lr=1.0)
    causal = [f"G{g}" for g in CAUSAL]
    metrics = group_selection_metrics(enc.selected_groups(), causal)
    assert metrics["recall"] == 1.0
    norms = enc.group_norms()
    null_zero = sum(float(norms[g]) == 0.0 for g in range(N_GROUPS) if g not in CAUSAL)
    assert null_zero >= 14, (null_zero, enc.selected_groups())
    assert metrics["precision"] >= 0.5


@pytest.mark.slow
def test_regularization_path_is_monotone_in_selection() -> None:
    spec, batch, y = _simulate(n=1000, seed=3)
    path = regularization_path(
        spec, batch["genotype"], y, [0.0, 0.3], mask=batch["genotype_mask"], steps=300, lr=1.0
    )
    assert path["lambda"].to_list() == [0.0, 0.3]
    # lambda = 0 never zeroes a group; a huge lambda zeroes all of them
    assert path["n_selected"].to_list() == [N_GROUPS, 0]
    assert path["selected"][1].to_list() == []


def test_prox_lr_makes_the_step_exact_proximal_gradient_descent():
    # With prox_lr the optimizer leaves the penalized layer alone (lr 0) and
    # after_optimizer_step applies W <- prox(W - eta * grad) with threshold eta * lambda.
    from clinfuse.datasets.spec import DataSpec
    from clinfuse.encoders import create_encoder
    from clinfuse.encoders.genomics import sparse_group_prox

    spec = DataSpec(markers=[f"m{i}" for i in range(6)], marker_groups=[0, 0, 0, 1, 1, 1],
                    groups=["g0", "g1"], marker_mean=[1.0] * 6)  # fmt: skip
    enc = create_encoder("sgl_mlp", spec=spec, hidden=(4,), embed_dim=4, lambda_=0.2, prox_lr=0.5)
    groups = enc.param_groups(lr=1e-3, weight_decay=0.0)
    first = next(g for g in groups if g["params"][0] is enc.first.weight)
    assert first["lr"] == 0.0
    torch.manual_seed(0)
    enc.first.weight.grad = torch.randn_like(enc.first.weight)
    before = enc.first.weight.detach().clone()
    expected = sparse_group_prox(
        before - 0.5 * enc.first.weight.grad, enc.column_group, enc.group_size,
        0.5 * 0.2 * enc.cfg.alpha, 0.5 * 0.2 * (1 - enc.cfg.alpha),
    )  # fmt: skip
    enc.after_optimizer_step(lr=1e-3)  # the optimizer's lr is ignored for this layer
    torch.testing.assert_close(enc.first.weight.detach(), expected)


# --- ancestry adjustment: principal axes of the training dosages projected out


def _two_populations(n: int = 1200, m: int = 60, seed: int = 0):
    """Two ancestry groups with diverged allele frequencies at every marker but the last,
    a causal marker of the same frequency in both groups. Returns calls, ancestry, carrier."""
    rng = np.random.default_rng(seed)
    ancestry = rng.integers(0, 2, n)
    base = rng.uniform(0.1, 0.5, m)
    shift = rng.choice([-1.0, 1.0], m) * 0.15
    shift[-1] = 0.0  # the causal marker does not differ between the groups
    freq = np.clip(base + np.where(ancestry[:, None] == 1, shift, -shift), 0.02, 0.98)
    dosage = rng.binomial(2, freq).astype(np.float32)  # (N, M)
    calls = {
        "genotype": torch.from_numpy(dosage),
        "genotype_mask": torch.ones(n, m),
        "genotype_present": torch.ones(n, dtype=torch.bool),
    }
    return calls, ancestry, dosage[:, -1] > 0


def _probe_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=5).mean())


def test_principal_axes_find_ancestry_and_their_projection_removes_it() -> None:
    from clinfuse.datasets.datamodule import genotype_principal_axes

    calls, ancestry, carrier = _two_populations()
    m = calls["genotype"].shape[1]
    mean = calls["genotype"].mean(0)
    axes = torch.tensor(genotype_principal_axes(calls, mean, 3))  # (3, M)
    torch.testing.assert_close(axes @ axes.T, torch.eye(3, dtype=axes.dtype), atol=1e-6, rtol=0)
    spec = DataSpec(
        markers=[f"rs{i}" for i in range(m)], marker_groups=[0] * m, groups=["G0"],
        marker_mean=mean.tolist(), marker_pcs=axes.tolist(),
    )  # fmt: skip
    plain = create_encoder("sgl_mlp", spec=spec, missing="mask")
    adjusted = create_encoder("sgl_mlp", spec=spec, missing="mask", ancestry_pcs=1)
    z_plain, z_adj = plain.inputs(calls).numpy(), adjusted.inputs(calls).numpy()
    # population structure: 60 diverged markers give the ancestry away; along PC1 it goes
    assert _probe_accuracy(z_plain, ancestry) > 0.95
    assert _probe_accuracy(z_adj, ancestry) < 0.65
    torch.testing.assert_close(
        torch.from_numpy(z_adj).double() @ axes[:1].T.double(),
        torch.zeros(len(ancestry), 1, dtype=torch.float64),
        atol=1e-4, rtol=0,
    )  # fmt: skip
    # the causal marker, not diverged, keeps its carrier signal
    assert _probe_accuracy(z_adj[:, -1:], carrier) > 0.95


def test_ancestry_pcs_without_fitted_axes_is_refused_by_name() -> None:
    spec = _spec()
    with pytest.raises(ValueError, match="data.genotype_pcs"):
        create_encoder("sgl_mlp", spec=spec, ancestry_pcs=2)
