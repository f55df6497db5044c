"""Binary risk metrics with bootstrap confidence intervals and calibration.

All functions take numpy arrays: ``y`` (N,) in {0, 1} and ``p`` (N,) predicted
probabilities. Threshold-based metrics use a decision threshold chosen on the
tuning split (``choose_threshold``), never on the data being scored.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y = np.asarray(y)
    if y.min(initial=1) == y.max(initial=0):
        return float("nan")
    return float(roc_auc_score(y, p))


def stratified_auroc(y: np.ndarray, p: np.ndarray, strata: np.ndarray) -> float:
    """AUROC over the (positive, negative) pairs that share a stratum; NaN without any.

    The probability that a positive scores above a negative of the same stratum (ties
    count half): each stratum's AUROC weighted by its number of such pairs. A score that
    differs between strata by a constant (a site's or an ancestry's own outcome rate)
    neither helps nor hurts it, where the plain AUROC rewards it.

    Shapes:
        y, p, strata: (N,)
    """
    y, p, strata = np.asarray(y), np.asarray(p, float), np.asarray(strata)
    total, pairs = 0.0, 0.0
    for stratum in np.unique(strata):
        rows = strata == stratum
        n_pos = float(y[rows].sum())
        n_pairs = n_pos * (rows.sum() - n_pos)
        if n_pairs == 0:
            continue
        total += n_pairs * roc_auc_score(y[rows], p[rows])
        pairs += n_pairs
    return total / pairs if pairs else float("nan")


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve)."""
    y = np.asarray(y)
    if y.sum() == 0:
        return float("nan")
    return float(average_precision_score(y, p))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width reliability bins: mean predicted, observed rate and count per bin."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    idx = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {
        "mean_predicted": np.bincount(idx, weights=p, minlength=n_bins) / safe,
        "observed_rate": np.bincount(idx, weights=y, minlength=n_bins) / safe,
        "count": count,
    }


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: count-weighted |observed - predicted| over bins."""
    bins = calibration_bins(y, p, n_bins)
    weights = bins["count"] / max(len(np.asarray(y)), 1)
    return float(np.sum(weights * np.abs(bins["observed_rate"] - bins["mean_predicted"])))


def confusion_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, specificity, F1 and G-mean at ``threshold``."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    tp, tn = float(np.sum(pred & y)), float(np.sum(~pred & ~y))
    fp, fn = float(np.sum(pred & ~y)), float(np.sum(~pred & y))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, len(y)),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "g_mean": math.sqrt(recall * specificity),
    }


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold that maximizes the G-mean (sqrt(recall * specificity)) on (y, p)."""
    candidates = np.unique(np.asarray(p))
    if len(candidates) > 512:
        candidates = np.quantile(p, np.linspace(0, 1, 513))
    scores = [confusion_metrics(y, p, t)["g_mean"] for t in candidates]
    return float(candidates[int(np.argmax(scores))]) if len(candidates) else 0.5


def bootstrap_ci(
    fn: Any, y: np.ndarray, p: np.ndarray, n: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``fn(y, p)`` resampling subjects with replacement."""
    rng = np.random.default_rng(seed)
    y, p = np.asarray(y), np.asarray(p)

    def resample() -> float:
        idx = rng.integers(0, len(y), len(y))
        return fn(y[idx], p[idx])

    return _percentile_ci(resample, n, alpha)


def _percentile_ci(resample: Any, n: int, alpha: float) -> tuple[float, float]:
    """The ``alpha`` percentile interval of ``n`` calls of ``resample()`` (each one
    statistic of one bootstrap draw), draws whose statistic is NaN left out."""
    stats = [value for value in (resample() for _ in range(n)) if not math.isnan(value)]
    if not stats:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def paired_auroc_delta(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same subjects, with a paired percentile bootstrap CI.

    Each resample draws subjects with replacement and scores both models on the
    same draw, so the interval reflects the difference, not two independent spreads.

    Returns:
        ``{"delta": float, "ci": [low, high]}`` (``ci`` NaN without resamples).
    """
    both = np.column_stack([p_a, p_b])  # (N, 2): one resample draws both models' rows
    delta = _auroc_difference(np.asarray(y), both)
    ci = bootstrap_ci(_auroc_difference, y, both, n, alpha, seed)
    return {"delta": delta, "ci": list(ci)}


def auroc_drop(
    y_a: np.ndarray,
    p_a: np.ndarray,
    y_b: np.ndarray,
    p_b: np.ndarray,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC on cohort a minus AUROC on cohort b (other subjects), with a bootstrap CI.

    Each resample draws subjects with replacement within each cohort independently.

    Returns:
        ``{"drop": float, "ci": [low, high]}`` (``ci`` NaN without resamples).
    """
    rng = np.random.default_rng(seed)
    y_a, p_a, y_b, p_b = (np.asarray(v) for v in (y_a, p_a, y_b, p_b))
    drop = auroc(y_a, p_a) - auroc(y_b, p_b)

    def resample() -> float:
        ia = rng.integers(0, len(y_a), len(y_a))
        ib = rng.integers(0, len(y_b), len(y_b))
        return auroc(y_a[ia], p_a[ia]) - auroc(y_b[ib], p_b[ib])

    return {"drop": drop, "ci": list(_percentile_ci(resample, n, alpha))}


def _auroc_difference(y: np.ndarray, both: np.ndarray) -> float:
    return auroc(y, both[:, 0]) - auroc(y, both[:, 1])


def binary_report(
    y: np.ndarray, p: np.ndarray, threshold: float, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Every metric of the evaluation report for one set of predictions."""
    out: dict[str, Any] = {
        "n": int(len(y)),
        "prevalence": float(np.mean(y)) if len(y) else float("nan"),
        "auroc": auroc(y, p),
        "auprc": auprc(y, p),
        "brier": brier(y, p),
        "ece": ece(y, p),
        "threshold": float(threshold),
    }
    out.update(confusion_metrics(y, p, threshold))
    if n_bootstrap:
        out["auroc_ci"] = list(bootstrap_ci(auroc, y, p, n_bootstrap, seed=seed))
        out["auprc_ci"] = list(bootstrap_ci(auprc, y, p, n_bootstrap, seed=seed))
    return out


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0
