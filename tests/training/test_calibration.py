from __future__ import annotations

import numpy as np
import pytest

from clinfuse.training.calibration import apply_temperature, fit_temperature, prior_shift_logit


def test_temperature_recovers_known_overconfidence():
    # Labels drawn from sigmoid(z); the model reports 3 * z: the best temperature is 3.
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 50_000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z))).astype(float)
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.05)
    np.testing.assert_allclose(apply_temperature(3.0 * z, t), 1 / (1 + np.exp(-3 * z / t)))


def test_temperature_single_class_is_identity():
    assert fit_temperature(np.array([1.0, 2.0]), np.array([1.0, 1.0])) == 1.0


def test_prior_shift_moves_mean_risk_to_target_prevalence():
    # Class-conditional scores unchanged, base rate 10% -> 30%: Bayes' rule on logits.
    train_prev, target_prev = 0.1, 0.3
    logit = np.log(0.1 / 0.9)  # a subject at the training base rate
    shifted = prior_shift_logit(np.array([logit]), train_prev, target_prev)
    assert 1 / (1 + np.exp(-shifted[0])) == pytest.approx(target_prev)
    with pytest.raises(ValueError, match="prevalence"):
        prior_shift_logit(np.array([0.0]), 0.0, 0.5)


def test_class_weight_offset_undoes_weighted_bce():
    # Minimising BCE with positives weighted by w on a constant predictor gives
    # logit = logit(prevalence) + log(w); the offset must bring it back.
    import torch

    from clinfuse.datasets.spec import DataSpec
    from clinfuse.training.config import OptimConfig
    from clinfuse.training.run import class_weight_offset

    y = torch.tensor([1.0] * 20 + [0.0] * 80)
    w = 80 / 20
    z = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            z.expand(100), y, pos_weight=torch.tensor(w)
        )
        loss.backward()
        return loss

    opt.step(closure)
    offset = class_weight_offset(OptimConfig(), DataSpec(pos_weight=w))
    assert float(z.detach()) + offset == pytest.approx(np.log(0.2 / 0.8), abs=1e-4)
    assert class_weight_offset(OptimConfig(class_weight=False), DataSpec(pos_weight=w)) == 0.0
    assert class_weight_offset(OptimConfig(loss="focal"), DataSpec(pos_weight=w)) == 0.0
