"""Post-hoc calibration: temperature scaling and prior-shift recalibration."""

from __future__ import annotations

import math

import numpy as np
import torch


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """Temperature T minimizing the NLL of sigmoid(logit / T) (Guo et al. 2017).

    Optimized over log T so that T stays positive. Returns 1.0 when the labels
    hold a single class (nothing to calibrate against).
    """
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    if y.numel() == 0 or y.min() == y.max():
        return 1.0
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities sigmoid(logit / T)."""
    return _sigmoid(np.asarray(logits, float) / temperature)


def prior_shift_logit(
    logits: np.ndarray, train_prevalence: float, target_prevalence: float
) -> np.ndarray:
    """Adjusts logits for a deployment site whose base rate differs (prior shift).

    Bayes' rule with class-conditional likelihoods unchanged:
    logit' = logit + logit(pi_target) - logit(pi_train).
    """
    return np.asarray(logits, float) + _logit(target_prevalence) - _logit(train_prevalence)


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"prevalence must be strictly between 0 and 1, got {p}")
    return math.log(p / (1.0 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
