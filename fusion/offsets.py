"""Confound offsets: the outcome's own dependence on site or ancestry, profiled out of training.

When the outcome rate differs by site (or ancestry) for reasons outside the patient
(referral pattern, coding practice, a population's access to care), a model that can read
the site off the films learns the site as a shortcut, and pays for it when the link
changes. Here each confound class gets a logit offset ``b`` that is added to the risk
logit in the training loss only::

    loss = BCE(f(x) + b[site] + b[ancestry], y)        prediction = f(x)

The offsets are not trained by gradient descent alongside ``f``: that would leave the
split between ``f`` and ``b`` to chance, since ``f`` can read the site too. They are
*profiled out*: before every training step, a damped Newton step moves each ``b`` toward
the minimiser of the loss given the current ``f(x)`` (Fisher scoring, per class, on the
batch; a running estimate over batches). At that minimiser the loss gradient summed over
each class is zero, so ``f`` receives no gradient along any direction that is constant
within a site (or ancestry): it learns from contrasts between patients of the same site,
the conditional likelihood of a stratified analysis (Breslow & Day 1980), and the
site's own share of the outcome stays in ``b``, which prediction leaves out.

Each auxiliary per-modality risk head gets its own offsets, profiled the same way.

Shapes:
    codes {confound: (B,) int64, -1 = unknown}; logits (B, H) for H heads.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn


class ConfoundOffsets(nn.Module):
    """Per-class logit offsets of some confounds, one set per risk head.

    Args:
        classes: confound name -> number of classes; one offset per class plus a fixed
            zero for unknown codes (-1).
        heads: number of risk heads (the fused head first, then the auxiliary heads).
        rate: damping of the Newton step in (0, 1]; the offsets are a running estimate
            over batches with this weight on the newest batch's solution.
    """

    def __init__(
        self, classes: dict[str, int], heads: int = 1, rate: float = 1.0, iterations: int = 3
    ) -> None:
        super().__init__()
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"confound offset rate must be in (0, 1], got {rate}")
        self.names = list(classes)
        self.rate = rate
        self.iterations = iterations
        for name, k in classes.items():
            self.register_buffer(f"offset_{name}", torch.zeros(heads, k + 1))

    def table(self, name: str) -> Tensor:
        """The offsets of one confound (H, K + 1); the last column (unknown) stays 0."""
        return getattr(self, f"offset_{name}")

    def forward(self, codes: dict[str, Tensor]) -> Tensor:
        """Sum of every confound's offset per sample and head.

        Shapes:
            -> (B, H)
        """
        total = None
        for name in self.names:
            table = self.table(name)  # (H, K + 1)
            code = _known(codes[name], table.shape[1] - 1)  # (B,)
            term = table[:, code].T  # (B, H)
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def update(
        self,
        logits: Tensor,
        label: Tensor,
        codes: dict[str, Tensor],
        pos_weight: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        """One damped Newton step of each confound's offsets (in turn) on this batch.

        Minimises the class-weighted binary cross-entropy of ``logits + offsets`` over
        each class's samples, with ``logits`` held fixed.

        Args:
            logits: (B, H) the heads' logits without offsets (detached).
            label: (B,) 0/1 outcome.
            codes: confound codes, as ``forward``.
            pos_weight: weight of a positive sample (None = 1).
            valid: (B, H) bool, samples each head saw (an auxiliary head only sees the
                samples with its modality); None = all.
        """
        y = label.float().unsqueeze(1)  # (B, 1)
        w = torch.ones_like(y) if pos_weight is None else 1.0 + (pos_weight - 1.0) * y
        mask = torch.ones_like(logits) if valid is None else valid.float()
        for _ in range(self.iterations):
            self._newton_step(logits, y, w, mask, codes)

    def _newton_step(
        self, logits: Tensor, y: Tensor, w: Tensor, mask: Tensor, codes: dict[str, Tensor]
    ) -> None:
        for name in self.names:
            table = self.table(name)  # (H, K + 1)
            k = table.shape[1] - 1
            code = _known(codes[name], k)  # (B,)
            z = logits + self.forward(codes)  # (B, H), with the offsets as updated so far
            p = torch.sigmoid(z)
            # d/dz of w * BCE: w * (p - y) with w = pos_weight for y = 1; d2/dz2: w p (1 - p)
            grad = mask * w * (p - y)  # (B, H)
            hess = mask * w * p * (1 - p)
            g = torch.zeros_like(table).index_add_(1, code, grad.T)  # (H, K + 1)
            h = torch.zeros_like(table).index_add_(1, code, hess.T)
            seen = h > 1e-6
            step = torch.where(seen, g / h.clamp_min(1e-6), torch.zeros_like(g))
            table -= self.rate * step.clamp(-4.0, 4.0)
            table[:, k] = 0.0


def _known(code: Tensor, unknown: int) -> Tensor:
    """Codes with -1 (unknown) mapped to the fixed-zero column."""
    return torch.where(code < 0, torch.full_like(code, unknown), code)


def build_offsets(
    names: Collection[str], classes: dict[str, int], heads: int, rate: float
) -> ConfoundOffsets | None:
    """The offsets of ``names`` (None when empty); unknown names raise ValueError."""
    if not names:
        return None
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"confound_offsets {unknown}: expected names among {sorted(classes)}")
    return ConfoundOffsets({n: classes[n] for n in names}, heads, rate)
