"""Linear concept erasure of confounds from the fused representation (LEACE).

LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form")
is the least-squares edit of a representation ``z`` after which no linear
classifier predicts a concept ``c`` better than a constant: the cross-covariance
of the edited ``z`` with ``c`` is exactly zero. In closed form

    r(z) = z - W^+ P W (z - mu),    W = Sigma_zz^{-1/2},  P = proj onto colspace(W Sigma_zc)

where ``mu`` is the mean of ``z``, ``Sigma_zz`` its covariance and ``Sigma_zc`` the
cross-covariance with the one-hot concept. The whitening ``W`` makes the
projection the smallest change in the Mahalanobis sense; a ridge on ``Sigma_zz``
keeps ``W`` finite when the representation has dead dimensions (the erasure of the
covariance stays exact: ``W^+ W = I`` for any ridge > 0).

The eraser is computed by ``concept-erasure`` (``LeaceFitter``), the authors'
package; this module keeps the fitted edit as model buffers and adds the ridge.

Several confounds (site and ancestry) are erased jointly by stacking their
one-hot columns into one concept. The edit is linear: a non-linear probe may still
read what is left (class-conditional variances, interactions), which is why the
audit also runs an MLP probe.

Shapes:
    z: (..., D); concept one-hot: (N, K); mean: (D,); projection: (D, D)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class ConceptEraser(nn.Module):
    """Applies a fitted LEACE edit ``z - (z - mean) @ projection.T``; the identity until fitted.

    The mean and the oblique projection ``W^+ P W`` are buffers, so they are saved
    with the model's state (Lightning checkpoints, the safetensors artifact).

    Args:
        dim: width D of the representation.
        confounds: names of the erased confounds (recorded for the reader).

    Shapes:
        forward: z (..., D) -> (..., D)
    """

    def __init__(self, dim: int, confounds: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__()
        self.confounds = list(confounds)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("projection", torch.zeros(dim, dim))  # zero = identity edit
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, z: Tensor) -> Tensor:
        centred = z - self.mean.to(z.dtype)  # (..., D)
        return z - centred @ self.projection.to(z.dtype).T  # (..., D)

    @torch.no_grad()
    def fit(
        self, z: np.ndarray | Tensor, concept: np.ndarray | Tensor, ridge: float = 1e-3
    ) -> None:
        """Fits the edit on representations ``z (N, D)`` and the one-hot ``concept (N, K)``."""
        mean, projection = leace_fit(_as_numpy(z), _as_numpy(concept), ridge)
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.projection.copy_(torch.as_tensor(projection, dtype=self.projection.dtype))
        self.fitted.fill_(True)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity edit."""
        self.mean.zero_()
        self.projection.zero_()
        self.fitted.fill_(False)

    @property
    def rank(self) -> int:
        """Dimension of the erased subspace."""
        # float32 buffers: singular values below 1e-5 of the largest are rounding.
        return int(torch.linalg.matrix_rank(self.projection.double(), rtol=1e-5).item())

    def extra_repr(self) -> str:
        return f"dim={self.mean.shape[0]}, confounds={self.confounds}"


def leace_fit(
    z: np.ndarray, concept: np.ndarray, ridge: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """The LEACE mean and oblique projection ``W^+ P W`` (float64), by ``concept-erasure``.

    The authors' ``LeaceFitter`` computes the eraser, configured as the closed form
    above: no covariance shrinkage, no cap on the erased covariance's trace, and
    singular values of ``W Sigma_zc`` dropped only at rounding level. The ridge is
    added to its covariance statistics.

    Args:
        z: representations (N, D).
        concept: the concept per row (N, K), e.g. stacked one-hot confounds.
        ridge: added to ``Sigma_zz`` as ``ridge * trace / D`` before the inverse root;
            0 leaves the package's pseudo-inverse (exact LEACE, smallest edit).

    Returns:
        ``mean (D,)`` and ``projection (D, D)``; ``r(z) = z - (z - mean) @ projection.T``.
    """
    from concept_erasure import LeaceFitter

    z, concept = _check_fit_inputs(z, concept)
    if ridge < 0:
        raise ValueError(f"erasure fit: ridge must be >= 0, got {ridge}")
    d, k = z.shape[1], concept.shape[1]
    fitter = LeaceFitter(
        d, k, dtype=torch.float64, shrinkage=False, constrain_cov_trace=False, svd_tol=_SVD_TOL
    )
    fitter.update(torch.from_numpy(z), torch.from_numpy(concept))
    if ridge > 0:  # sigma_xx_ is the unnormalized X^T X: the ridge enters scaled by n - 1
        cov = fitter.sigma_xx
        eps = max(ridge * float(torch.trace(cov)) / d, 1e-12)
        fitter.sigma_xx_ += eps * (len(z) - 1) * torch.eye(d, dtype=torch.float64)
    eraser = fitter.eraser
    return eraser.bias.numpy().copy(), (eraser.proj_left @ eraser.proj_right).numpy()


# Singular values of the whitened cross-covariance below this are rounding (the
# one-hot columns of a confound sum to one, so one direction is always ~1e-16).
_SVD_TOL = 1e-8


def one_hot_concept(
    codes: dict[str, np.ndarray], n_classes: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Stacked one-hot columns of several categorical confounds, and the rows where all are known.

    Args:
        codes: confound -> class code per row (N,), -1 = unknown.
        n_classes: confound -> number of classes.

    Returns:
        ``concept (N, sum K)`` float64 and ``known (N,)`` bool.
    """
    names = list(codes)
    n = len(codes[names[0]]) if names else 0
    known = np.ones(n, dtype=bool)
    blocks = []
    for name in names:
        c = np.asarray(codes[name]).astype(np.int64)
        k = int(n_classes[name])
        if c.size and c.max(initial=-1) >= k:
            raise ValueError(f"confound {name!r}: code {int(c.max())} but only {k} classes")
        known &= c >= 0
        blocks.append(np.eye(k)[np.clip(c, 0, None)])  # (N, K) rows of unknowns dropped below
    concept = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0))
    return concept, known


def _check_fit_inputs(z: np.ndarray, concept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z, concept = np.asarray(z, dtype=np.float64), np.asarray(concept, dtype=np.float64)
    if z.ndim != 2 or concept.ndim != 2 or len(z) != len(concept):
        raise ValueError(
            f"erasure fit needs z (N, D) and concept (N, K); got {z.shape}, {concept.shape}"
        )
    if len(z) < 2:
        raise ValueError(f"erasure fit needs at least 2 rows with known confounds, got {len(z)}")
    if not np.isfinite(z).all():
        raise ValueError("erasure fit: the representation has NaN or inf values")
    return z, concept


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
