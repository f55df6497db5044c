"""Gradient reversal, the DANN schedule and the confound adversary's losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clinfuse.fusion.adversary import (
    AdversaryConfig,
    ConfoundAdversary,
    build_adversary,
    dann_lambda,
    grad_reverse,
    ramp_progress,
    squared_correlation,
)


@pytest.mark.parametrize("lambd", [0.0, 0.37, 1.0, 2.5])
def test_gradient_reversal_is_identity_forward_and_scales_backward(lambd: float) -> None:
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    y = grad_reverse(x, lambd)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    # d/dx sum(w * x) = w; reversed: -lambda * w (one float multiply, so exact)
    assert torch.equal(x.grad, -lambd * w)


def test_dann_schedule_endpoints_and_monotone() -> None:
    assert dann_lambda(0.0, lambda_max=2.0) == 0.0
    # at p = 1: lambda_max * tanh(gamma / 2); tanh(5) = 1 - 9.1e-5
    assert dann_lambda(1.0, lambda_max=2.0, gamma=10.0) == pytest.approx(
        2.0 * math.tanh(5.0), rel=1e-12
    )
    assert abs(dann_lambda(1.0, lambda_max=2.0) - 2.0) < 2.0 * 1e-4
    values = [dann_lambda(p / 10) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert dann_lambda(-0.5) == 0.0 and dann_lambda(3.0) == dann_lambda(1.0)  # clipped


def test_ignore_index_rows_do_not_touch_the_loss() -> None:
    torch.manual_seed(0)
    adv = ConfoundAdversary(in_dim=4, n_classes={"site": 3}, hidden=0)
    fused = torch.randn(6, 4)
    site = torch.tensor([0, -1, 2, 1, -1, 0])
    preds = adv(fused)
    loss, parts = adv.loss(preds, {"site": site})
    known = site >= 0
    logp = torch.log_softmax(preds["site"][known], dim=-1)
    expected = -logp[torch.arange(int(known.sum())), site[known]].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # changing the representation of the unknown rows leaves the loss unchanged
    fused2 = fused.clone()
    fused2[~known] = 100.0
    loss2, _ = adv.loss(adv(fused2), {"site": site})
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_all_unknown_labels_give_zero_loss_and_finite_gradient() -> None:
    adv = ConfoundAdversary(in_dim=4, n_classes={"site": 3}, continuous={"pcs": 2})
    fused = torch.randn(3, 4, requires_grad=True)
    confounds = {"site": torch.full((3,), -1), "pcs": torch.full((3, 2), float("nan"))}
    loss, _ = adv.loss(adv(fused), confounds)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(fused.grad).all()


def test_continuous_confound_uses_mse_over_known_rows() -> None:
    adv = ConfoundAdversary(in_dim=4, n_classes={}, continuous={"pcs": 2}, hidden=0)
    fused = torch.randn(4, 4)
    pcs = torch.tensor([[0.1, 0.2], [float("nan"), 0.0], [1.0, -1.0], [0.5, 0.5]])
    preds = adv(fused)
    loss, _ = adv.loss(preds, {"pcs": pcs})
    keep = torch.tensor([True, False, True, True])
    assert loss.item() == pytest.approx(F.mse_loss(preds["pcs"][keep], pcs[keep]).item(), rel=1e-6)


def test_heads_learn_while_the_representation_gets_reversed_gradient() -> None:
    torch.manual_seed(0)
    adv = ConfoundAdversary(in_dim=4, n_classes={"site": 3}, hidden=8)
    adv.lambd = 0.5
    site = torch.tensor([0, 1, 2, 1])
    fused = torch.randn(4, 4, requires_grad=True)
    adv.loss(adv(fused), {"site": site})[0].backward()
    reversed_grad = fused.grad.clone()
    head_grads = [p.grad.clone() for p in adv.parameters()]
    adv.zero_grad()
    fused.grad = None
    F.cross_entropy(adv.heads["site"](fused), site).backward()  # the same head, no reversal
    assert torch.allclose(reversed_grad, -0.5 * fused.grad, atol=1e-7)
    for before, p in zip(head_grads, adv.parameters(), strict=True):
        assert torch.allclose(before, p.grad, atol=1e-7)


def test_per_modality_heads_skip_absent_samples() -> None:
    adv = ConfoundAdversary(in_dim=4, n_classes={"site": 2}, modality_dims={"image": 3}, hidden=0)
    fused, emb = torch.randn(4, 4), torch.randn(4, 3)
    present = torch.tensor([True, False, True, True])
    preds = adv(fused, {"image": (emb, present)})
    assert set(preds) == {"site", "image/site"}
    site = torch.tensor([0, 1, 1, 0])
    _, parts = adv.loss(preds, {"site": site}, present={"image": present})
    expected = F.cross_entropy(preds["image/site"][present], site[present])
    assert parts["image/site"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_squared_correlation_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    y[:, 0] += 2 * x[:, 0]
    expected = [np.corrcoef(x[:, k], y[:, k])[0, 1] ** 2 for k in range(3)]
    got = squared_correlation(torch.tensor(x), torch.tensor(y)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    constant = torch.ones(50, 1, dtype=torch.float64)
    assert squared_correlation(torch.tensor(x[:, :1]), constant).item() == 0.0


def _linear_r2(z: torch.Tensor, c: torch.Tensor) -> float:
    """R^2 of the best linear fit of c from z (least squares with intercept)."""
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1).double()
    coef = torch.linalg.lstsq(design, c.double().unsqueeze(1)).solution
    resid = c.double() - (design @ coef).squeeze(1)
    return 1.0 - float(resid.var() / c.double().var())


@pytest.mark.parametrize("mode", ["adversarial", "correlation"])
def test_training_against_the_adversary_removes_linear_confound_information(mode: str) -> None:
    # x = [site + 0.5 noise, 3 noise dims]; the encoder maps 4 -> 2 dims and starts out
    # reading the site column. Linear R^2 of site from x is var(site) / var(x_0) =
    # 0.25 / 0.5 = 0.5. Trained only against the adversary, the encoder must pick a
    # subspace without the site column: a fresh probe's R^2 drops to the chance level
    # k / N = 2 / 256 ~ 0.008 (we allow 0.05; DANN oscillates on the way).
    g = torch.Generator().manual_seed(0)
    n = 256
    site = torch.randint(0, 2, (n,), generator=g)
    noise = torch.randn(n, 4, generator=g)
    x = torch.cat([(site.float() + 0.5 * noise[:, 0]).unsqueeze(1), noise[:, 1:]], dim=1)
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 2)
    with torch.no_grad():
        encoder.weight[:, 0] = 1.0
    adv = ConfoundAdversary(in_dim=2, n_classes={"site": 2}, hidden=0, mode=mode)
    adv.lambd = 1.0
    r2_before = _linear_r2(encoder(x).detach(), site.float())
    opt = torch.optim.Adam([*encoder.parameters(), *adv.parameters()], lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        adv.loss(adv(encoder(x)), {"site": site})[0].backward()
        opt.step()
    r2_after = _linear_r2(encoder(x).detach(), site.float())
    assert r2_before > 0.3
    assert r2_after < 0.05


def test_build_adversary_from_config() -> None:
    assert build_adversary(AdversaryConfig(enabled=False), 8, {"site": 3}, {}) is None
    # a confound with a single class carries nothing to hide
    assert build_adversary(AdversaryConfig(enabled=True), 8, {"site": 1, "ancestry": 0}, {}) is None
    adv = build_adversary(
        AdversaryConfig(enabled=True, on_modalities=True),
        8,
        {"site": 3, "ancestry": 2},
        {"image": 5},
    )
    assert set(adv.heads) == {"site", "ancestry", "image/site", "image/ancestry"}
    with pytest.raises(ValueError, match="mode"):
        ConfoundAdversary(4, {"site": 2}, mode="bogus")


def test_confusion_mode_head_learns_the_site_encoder_learns_to_confuse() -> None:
    # The head's parameters get gradient only from predicting the site (from a detached
    # representation); the representation gets gradient only from the uniform target.
    torch.manual_seed(0)
    z = torch.randn(8, 4, requires_grad=True)
    site = torch.tensor([0, 1, 2, 0, 1, 2, 0, -1])
    adv = ConfoundAdversary(in_dim=4, n_classes={"site": 3}, hidden=0, mode="confusion")
    adv.lambd = 0.5
    preds = adv(z)
    assert set(preds) == {"site", "site|confusion"}
    total, parts = adv.loss(preds, {"site": site})
    head = adv.heads["site"]
    # Head gradient equals that of plain cross-entropy on the known rows.
    total.backward()
    expected_head = torch.autograd.grad(
        torch.nn.functional.cross_entropy(head(z.detach())[:7], site[:7]), head.weight
    )[0]
    torch.testing.assert_close(head.weight.grad, expected_head)
    # Representation gradient equals lambda * d/dz CE(uniform, softmax(W z + b)).
    z2 = z.detach().clone().requires_grad_(True)
    confusion = -torch.log_softmax(head(z2), dim=-1).mean()
    (0.5 * confusion).backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_confusion_term_is_minimal_at_uniform_posteriors() -> None:
    from clinfuse.fusion.adversary import _uniform_cross_entropy

    uniform = torch.zeros(5, 3)  # equal logits -> uniform posterior
    peaked = torch.tensor([[4.0, 0.0, 0.0]]).repeat(5, 1)
    assert _uniform_cross_entropy(uniform).item() == pytest.approx(np.log(3))
    assert _uniform_cross_entropy(peaked).item() > np.log(3) + 0.5


@pytest.mark.parametrize("max_epochs", [4, 15, 40, None])
def test_ramp_in_epochs_reaches_full_strength_after_ramp_epochs_whatever_the_run_length(
    max_epochs: int | None,
) -> None:
    steps_per_epoch = 37
    # None: a run bounded by neither max_epochs nor max_steps (total steps unknown).
    total = math.inf if max_epochs is None else steps_per_epoch * max_epochs
    steps = range(steps_per_epoch * (max_epochs or 6) + 1)
    lambd = [
        dann_lambda(ramp_progress(step, total, steps_per_epoch, ramp_epochs=2), lambda_max=1.5)
        for step in steps
    ]
    assert lambd[0] == 0.0  # no reversal at the first step, whatever bounds the run
    # After two epochs p = 1: lambda_max * tanh(gamma / 2) (tanh(5) = 1 - 9.1e-5), then flat.
    assert lambd[2 * steps_per_epoch] == pytest.approx(1.5 * math.tanh(5.0), rel=1e-12)
    assert lambd[-1] == lambd[2 * steps_per_epoch]
    # After one epoch p = 1/2: lambda_max * tanh(2.5), the same for every run length.
    assert lambd[steps_per_epoch] == pytest.approx(1.5 * math.tanh(2.5), rel=1e-12)
    assert all(b >= a for a, b in zip(lambd, lambd[1:], strict=False))


def test_ramp_over_the_whole_run_without_ramp_epochs() -> None:
    # The original schedule: p = step / total, so after 1 epoch of 15, lambda = tanh(1/3).
    p = ramp_progress(100, 1500, 100)
    assert p == pytest.approx(1 / 15)
    assert dann_lambda(p) == pytest.approx(math.tanh(5.0 / 15), rel=1e-12)
    assert ramp_progress(3000, 1500, 100) == 1.0


def test_ramp_progress_edge_cases() -> None:
    assert ramp_progress(5, 100, float("inf"), ramp_epochs=2) == 1.0  # unknown epoch length
    assert ramp_progress(5, float("inf"), 10) == 1.0  # unknown run length, no ramp_epochs
    assert ramp_progress(5, 0, 10) == 1.0
    with pytest.raises(ValueError, match="ramp_epochs"):
        ramp_progress(5, 100, 10, ramp_epochs=0)


def _low_variance_site(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Site carried by one feature with std 1e-3 beside 7 unit-variance noise features."""
    g = torch.Generator().manual_seed(0)
    site = torch.randint(0, 2, (n,), generator=g)
    z = torch.randn(n, 8, generator=g)
    z[:, 0] = 1e-3 * (site.float() * 2 - 1 + 0.3 * torch.randn(n, generator=g))
    return z, site


@pytest.mark.parametrize("standardize", [True, False])
def test_standardized_head_reads_a_confound_in_a_low_variance_direction(standardize: bool) -> None:
    torch.manual_seed(0)
    z, site = _low_variance_site()
    adv = ConfoundAdversary(8, {"site": 2}, hidden=0, mode="confusion", standardize=standardize)
    opt = torch.optim.Adam(adv.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(adv.heads["site"](z), site).backward()
        opt.step()
    adv.eval()  # running statistics: the same data standardized the same way
    accuracy = (adv.heads["site"](z).argmax(-1) == site).float().mean().item()
    # The site feature separates the classes at 1 / 0.3 = 3.3 noise s.d.: ~0.9995 for
    # the best linear rule. Unstandardized, its weight would have to grow to ~1e3 at
    # Adam's ~lr per step (>> 100 steps), so the head stays near chance (0.5 +- 0.1).
    if standardize:
        assert accuracy > 0.97
    else:
        assert accuracy < 0.7


def test_standardize_uses_running_statistics_in_eval_and_for_a_single_row() -> None:
    from clinfuse.fusion.adversary import Standardize

    norm = Standardize(3, momentum=1.0)
    x = torch.tensor([[1.0, 10.0, -2.0], [3.0, 30.0, 2.0]])
    y = norm(x)  # batch statistics: mean (2, 20, 0), var (1, 100, 4)
    torch.testing.assert_close(
        y, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]), atol=1e-4, rtol=0
    )
    single = norm(x[:1])  # one row: running statistics (momentum 1 = the last batch's)
    torch.testing.assert_close(single, y[:1], atol=1e-4, rtol=0)
    norm.eval()
    torch.testing.assert_close(norm(x), y, atol=1e-4, rtol=0)
