"""Stability selection of genotype groups over complementary half-samples.

Stability selection (Meinshausen & Buehlmann 2010) refits the sparse-group-lasso path
on many half-samples of the train split and keeps the groups that the penalized fits
select on a large share of them. The halves come in complementary pairs (Shah &
Samworth 2013): each pair splits the train split into two disjoint halves, which
tightens the error bound and halves the randomness of the subsampling.

The selection probability of group g over the strengths Lambda (the upper range of
the full data's grid) is ``Pi_g = max_{lam in Lambda} freq_g(lam)``. With ``q`` the
mean number of groups a half selects anywhere in Lambda and ``G`` groups, the expected
number of selected groups that carry no signal is at most ``q^2 / ((2 pi - 1) G)``
(Meinshausen & Buehlmann 2010, Theorem 1; Shah & Samworth 2013, Theorem 1 for
complementary pairs) for a threshold ``pi`` in (0.5, 1]. Lambda is therefore the
longest run of strengths from the top of the grid whose ``q`` keeps that bound at or
below ``max_false``.

All halves are fitted at once (one batched FISTA per strength, warm-started from the
strength before), so the cost is that of one path on a (2 pairs, N / 2, M) tensor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class StabilityResult:
    """Selection frequencies of every group and the stable groups.

    Attributes:
        groups: the stable groups (``frequency >= threshold``), in group order.
        frequency: per group, its largest selection frequency over Lambda.
        frequency_path: per strength fitted on the halves, each group's selection
            frequency (L' rows of G; L' <= the grid's length, the fit stops past Lambda).
        expected_selected: per strength fitted, ``q``: the mean number of groups a half
            selects at that strength or any stronger one.
        n_strengths: strengths in Lambda (the first ``n_strengths`` of the grid).
        false_bound: the bound on expected false selections at Lambda's ``q``.
        threshold, max_false, pairs, seed: the rule's settings.
    """

    groups: list[str]
    frequency: list[float]
    frequency_path: list[list[float]]
    expected_selected: list[float]
    n_strengths: int
    false_bound: float
    threshold: float
    max_false: float
    pairs: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def max_selected(threshold: float, max_false: float, n_groups: int) -> float:
    """The largest ``q`` whose error bound ``q^2 / ((2 pi - 1) G)`` is <= ``max_false``."""
    return math.sqrt(max_false * (2 * threshold - 1) * n_groups)


def complementary_halves(n: int, pairs: int, seed: int) -> Tensor:
    """Row indices of ``2 * pairs`` halves; halves 2k and 2k+1 are disjoint.

    Shapes:
        -> (2 pairs, n // 2) long
    """
    gen = torch.Generator().manual_seed(seed)
    half = n // 2
    out = []
    for _ in range(pairs):
        perm = torch.randperm(n, generator=gen)
        out += [perm[:half], perm[half : 2 * half]]
    return torch.stack(out)


def stability_selection(
    x: Tensor,
    cov: Tensor,
    y: Tensor,
    column_group: Tensor,
    group_names: list[str],
    lambdas: list[float],
    alpha: float,
    threshold: float = 0.75,
    max_false: float = 2.0,
    pairs: int = 25,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> StabilityResult:
    """Fits the path on complementary halves of (x, cov, y) and keeps the stable groups.

    Args:
        x, cov, y: the penalized inputs, the unpenalized covariates (intercept first)
            and outcomes of the train split, as the full-data path sees them.
        column_group: group of each column of ``x``.
        group_names: name of each group.
        lambdas: the full data's grid, largest first.
        alpha: L1 share of the penalty.
        threshold: ``pi``, the selection frequency a group needs, in (0.5, 1].
        max_false: the bound on expected false selections that sets Lambda's lower end.
        pairs: complementary pairs (``2 * pairs`` halves).
        seed: seed of the halves; the result is a function of the data and the seed.
        max_iter, tol: per-strength solver limits (largest coefficient change).

    Shapes:
        x: (N, M); cov: (N, C); y: (N,); column_group: (M,) long
    """
    if not 0.5 < threshold <= 1.0:
        raise ValueError(f"stability threshold={threshold} must lie in (0.5, 1]")
    if pairs < 1 or max_false <= 0:
        raise ValueError(f"stability pairs={pairs} must be >= 1 and max_false={max_false} > 0")
    n_groups = len(group_names)
    q_max = max_selected(threshold, max_false, n_groups)
    rows = complementary_halves(x.shape[0], pairs, seed)  # (H, n)
    # Every half is fitted on the full matrices with its rows weighted 1 / n and the
    # others 0: one (H, P) x (P, N) product per step instead of H narrow ones.
    member = x.new_zeros(rows.shape[0], x.shape[0]).scatter_(1, rows, 1.0 / rows.shape[1])
    full = torch.cat([x, cov], 1)  # (N, M + C)
    lipschitz = torch.stack([torch.linalg.matrix_norm(full[r], ord=2) for r in rows])
    step = 4 * rows.shape[1] / lipschitz**2  # (H,)
    sizes = torch.bincount(column_group, minlength=n_groups).to(x.dtype)
    beta = x.new_zeros(rows.shape[0], x.shape[1])
    gamma = x.new_zeros(rows.shape[0], cov.shape[1])
    ever = torch.zeros(rows.shape[0], n_groups, dtype=torch.bool)  # (H, G)
    freq_path, q_path = [], []
    for lam in lambdas:
        beta, gamma = _fista_halves(
            x, cov, y, member, column_group, sizes, lam, alpha, beta, gamma, step, max_iter, tol
        )
        chosen = _row_group_norms(beta, column_group, n_groups) > 0  # (H, G)
        ever |= chosen
        q = float(ever.sum(1).double().mean())
        if q > q_max and freq_path:
            break
        freq_path.append(chosen.double().mean(0))
        q_path.append(q)
    freq = torch.stack(freq_path).max(0).values  # (G,)
    keep = (freq >= threshold).nonzero().flatten().tolist()
    return StabilityResult(
        groups=[group_names[g] for g in keep],
        frequency=[float(v) for v in freq],
        frequency_path=[[float(v) for v in f] for f in freq_path],
        expected_selected=q_path,
        n_strengths=len(freq_path),
        false_bound=q_path[-1] ** 2 / ((2 * threshold - 1) * n_groups),
        threshold=threshold,
        max_false=max_false,
        pairs=pairs,
        seed=seed,
    )


def _row_group_norms(w: Tensor, column_group: Tensor, n_groups: int) -> Tensor:
    """Norm of each row's groups. Shapes: (H, M) -> (H, G)"""
    sq = w.new_zeros(w.shape[0], n_groups).index_add_(1, column_group, w.pow(2))
    return sq.sqrt()


def _prox_rows(w: Tensor, column_group: Tensor, sizes: Tensor, l1: Tensor, group: Tensor):
    """``sparse_group_prox`` row by row, with a threshold per row (l1, group: (H, 1))."""
    w = torch.sign(w) * (w.abs() - l1).clamp_min(0.0)  # (H, M)
    norms = _row_group_norms(w, column_group, sizes.numel())  # (H, G)
    shrink = 1 - group * sizes.sqrt() / norms.clamp_min(torch.finfo(w.dtype).tiny)
    return w * shrink.clamp_min(0.0)[:, column_group]


def _fista_halves(x, cov, y, member, column_group, sizes, lam, alpha, beta, gamma, step,
                  max_iter, tol):  # fmt: skip
    """``sgl_path.fit_sgl`` on every half at once (momentum restarted per half).

    Shapes:
        x: (N, M); cov: (N, C); y: (N,); member: (H, N), a half's rows at 1 / n and the
        others at 0; beta: (H, M); gamma: (H, C); step: (H,)
    """
    s = step[:, None]  # (H, 1)
    b, g = beta.clone(), gamma.clone()
    yb, yg = b, g
    t = torch.ones(member.shape[0], 1, dtype=x.dtype)
    for _ in range(max_iter):
        r = (torch.sigmoid(yb @ x.T + yg @ cov.T) - y) * member  # (H, N)
        b_new = _prox_rows(yb - s * (r @ x), column_group, sizes, s * lam * alpha,
                           s * lam * (1 - alpha))  # fmt: skip
        g_new = yg - s * (r @ cov)
        change = max(float((b_new - b).abs().max()), float((g_new - g).abs().max()))
        restart = (((yb - b_new) * (b_new - b)).sum(1) + ((yg - g_new) * (g_new - g)).sum(1)) > 0
        t_new = torch.where(restart[:, None], 1.0, (1 + torch.sqrt(1 + 4 * t * t)) / 2)
        momentum = torch.where(restart[:, None], 0.0, (t - 1) / t_new)
        yb, yg = b_new + momentum * (b_new - b), g_new + momentum * (g_new - g)
        b, g, t = b_new, g_new, t_new
        if change < tol:
            break
    return b, g
