"""Out-of-distribution score: Mahalanobis distance to class-conditional Gaussians.

Lee et al. 2018 ("A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks"): fit one mean per class and a tied covariance
on the training set's fused embeddings; the OOD score of ``z`` is
``min_c (z - mu_c)^T Sigma^{-1} (z - mu_c)``. The flag threshold is a high
quantile of the training scores, so about ``1 - quantile`` of in-distribution
subjects are flagged by construction.

Shapes:
    embeddings (N, D), labels (N,) -> score (N,)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MahalanobisOOD:
    """Fitted statistics (plain lists so they serialize to JSON).

    Attributes:
        means: (K, D) per-class means.
        precision: (D, D) inverse of the tied covariance (shrunk for stability).
        threshold: training-score quantile above which a subject is flagged.
        quantile: the quantile used for ``threshold``.
    """

    means: list[list[float]]
    precision: list[list[float]]
    threshold: float
    quantile: float

    @classmethod
    def fit(
        cls,
        embeddings: np.ndarray,
        labels: np.ndarray,
        quantile: float = 0.99,
        shrinkage: float = 1e-3,
    ) -> MahalanobisOOD:
        z = np.asarray(embeddings, dtype=np.float64)
        y = np.asarray(labels).astype(int)
        classes = np.unique(y)
        means = np.stack([z[y == c].mean(axis=0) for c in classes])  # (K, D)
        centred = z - means[np.searchsorted(classes, y)]
        cov = centred.T @ centred / max(len(z) - len(classes), 1)  # (D, D)
        scale = np.trace(cov) / cov.shape[0]
        # A constant representation (e.g. a genotype-only model that kept no marker group)
        # has no spread to scale by: shrink towards the identity then, not towards zero.
        cov += shrinkage * (scale if scale > 0 else 1.0) * np.eye(cov.shape[0])
        precision = np.linalg.inv(cov)
        stats = cls(means.tolist(), precision.tolist(), 0.0, quantile)
        stats.threshold = float(np.quantile(stats.score(z), quantile))
        return stats

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        z = np.asarray(embeddings, dtype=np.float64)  # (N, D)
        means = np.asarray(self.means)  # (K, D)
        precision = np.asarray(self.precision)  # (D, D)
        diff = z[:, None, :] - means[None, :, :]  # (N, K, D)
        dist = np.einsum("nkd,de,nke->nk", diff, precision, diff)  # (N, K)
        return dist.min(axis=1)

    def flag(self, embeddings: np.ndarray) -> np.ndarray:
        return self.score(embeddings) > self.threshold
