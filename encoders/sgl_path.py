"""The data-chosen strength of the genotype penalty: a warm-started path and the 1-SE rule.

A linear logistic sparse group lasso (Simon et al. 2013) is fitted on the train split
along a decreasing grid of strengths, from ``lambda_max`` (the smallest strength at
which every group is zero) down to ``min_ratio * lambda_max``, each fit warm-started
from the one before (the pathwise strategy of glmnet, Friedman et al. 2010), by
accelerated proximal gradient with adaptive restart (FISTA, Beck & Teboulle 2009;
O'Donoghue & Candes 2015). Every strength is scored on the tuning split, and the
largest one whose tuning loss is within one standard error of the best is kept (the
one-standard-error rule, Hastie et al., The Elements of Statistical Learning, 7.10).
The problem is convex, so the path and the chosen groups are a function of the data,
not of a training seed.

Ancestry is adjusted for the genetics way (Price et al. 2006): the top principal axes
of the training dosages are projected out of the standardized dosages, and the
subjects' scores on those axes enter the model as unpenalized covariates. A marker
that differs in frequency between populations but carries no risk then has nothing
left to explain, while the part of a causal marker's dosage that is not ancestry
keeps its effect.

Genes that change the effect of another modality (gene x environment) are found the
same way when an environment score is given: every group gets a twin, its markers'
adjusted dosages times the score (standardized on the train split), penalized as a
group of its own; the score and the ancestry scores times the score are unpenalized
covariates (so an interaction of ancestry with the score is not read off the genes
that differ by ancestry). A gene is kept when its main group, its interaction group or
both are. A gene that acts only by modifying the effect of physiology has no main
effect for a marginal screen to find (measured on the simulator's modifier gene, on
the 5,000-subject strategies cohort: kept on 0.04 of the half-samples without the
twins, its twin on all of them). Twin groups rather than one group
of both column sets: one group of twice the columns carries a penalty sqrt(2) times
larger, which on 2,000-subject cohorts cost main-effect genes their stability.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders.genomics import (
    _group_norms,
    ancestry_axes,
    binomial_scale,
    check_genotype_spec,
    sparse_group_prox,
    standardize_genotype,
)
from clinfuse.encoders.sgl_stability import stability_selection

RULES = ("min", "1se", "stability")
# Name of a group's interaction twin: "GENE02 x environment".
INTERACTION_SUFFIX = " x environment"
# Ridge (on the mean loss) of the all-groups fit whose group norms weight the
# adaptive penalty.
_ADAPTIVE_RIDGE = 1e-2
_EDGE_MARGIN = 1e-4  # the path's first strength, relative to lambda_max
# Columns whose standard deviation on the train split falls below this after the
# ancestry projection carry no information left; they are kept at scale 1.
_MIN_STD = 1e-6


@dataclass
class PathResult:
    """One regularization path and the strength chosen on it.

    Attributes:
        lambdas: strengths, largest first (the order they were fitted in).
        n_selected: groups with a non-zero coefficient, per strength.
        selected: those groups' names, per strength (an interaction twin as
            ``GENE x environment``).
        train_loss: mean training BCE (penalty excluded), per strength.
        tuning_loss: mean tuning BCE of the strength's relaxed fit (its groups refitted
            without the penalty), per strength.
        tuning_se: standard error of that mean, per strength.
        chosen: index of the chosen strength.
        rule: ``min``, ``1se`` (see ``choose``) or ``stability`` (the groups selected
            on most half-samples of the train split, ``sgl_stability``).
        alpha: L1 share of the penalty.
        ancestry_pcs: principal axes adjusted for.
        adaptive: whether group penalties were weighted by a ridge fit.
        n_train, n_tuning: genotyped subjects used.
        group_norms: norm of each group's coefficients, per strength (G per row; 2 G
            with interaction twins, the twins after the genes).
        stability: the ``stability`` rule's frequencies (``StabilityResult.to_dict``).
        interaction: whether each group had its dosage x environment twin.
    """

    lambdas: list[float]
    n_selected: list[int]
    selected: list[list[str]]
    train_loss: list[float]
    tuning_loss: list[float]
    tuning_se: list[float]
    chosen: int
    rule: str
    alpha: float
    ancestry_pcs: int
    adaptive: bool
    n_train: int
    n_tuning: int
    group_norms: list[list[float]] = field(default_factory=list)
    stability: dict[str, Any] | None = None
    interaction: bool = False

    @property
    def lambda_(self) -> float:
        return self.lambdas[self.chosen]

    @property
    def _chosen_names(self) -> list[str]:
        return (
            self.stability["groups"] if self.stability is not None else self.selected[self.chosen]
        )

    @property
    def groups(self) -> list[str]:
        """The chosen genes: the stable groups (``stability`` rule), else the chosen
        strength's; a gene kept by its interaction twin (``GENE x environment``) counts."""
        return list(dict.fromkeys(g.removesuffix(INTERACTION_SUFFIX) for g in self._chosen_names))

    @property
    def interaction_groups(self) -> list[str]:
        """The chosen genes whose interaction twin was chosen."""
        return [g.removesuffix(INTERACTION_SUFFIX) for g in self._chosen_names
                if g.endswith(INTERACTION_SUFFIX)]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "lambda_": self.lambda_,
            "groups": self.groups,
            "interaction_groups": self.interaction_groups,
        }


@dataclass
class GenotypeDesign:
    """Standardized, ancestry-adjusted dosages: the path's inputs, fitted on train.

    ``x = (z - s A) / sd`` with ``z`` the binomially standardized dosages (missing
    calls at 0), ``A`` (k, M) the principal axes, ``s = z A^T`` (N, k) the scores, and
    ``sd`` the per-marker standard deviation of ``z - s A`` on the train split.
    """

    mean: Tensor  # (M,)
    scale: Tensor  # (M,)
    axes: Tensor  # (k, M)
    sd: Tensor  # (M,)

    @classmethod
    def fit(cls, spec: DataSpec, genotype: Tensor, mask: Tensor, n_pcs: int) -> GenotypeDesign:
        mean = torch.tensor(spec.marker_mean, dtype=torch.float64)
        axes = ancestry_axes(spec, n_pcs).double()
        design = cls(mean, binomial_scale(mean), axes, torch.ones_like(mean))
        x, _ = design.transform(genotype, mask)
        sd = x.std(0)
        design.sd = torch.where(sd > _MIN_STD, sd, torch.ones_like(sd))
        return design

    def transform(self, genotype: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Penalized inputs (N, M) and covariates (N, 1 + k): an intercept and the scores."""
        z = standardize_genotype(genotype.double(), mask.double(), self.mean, self.scale)
        scores = z @ self.axes.T  # (N, k)
        x = (z - scores @ self.axes) / self.sd  # (N, M)
        ones = torch.ones(z.shape[0], 1, dtype=z.dtype)
        return x, torch.cat([ones, scores], dim=1)


def lambda_max(
    grad: Tensor, column_group: Tensor, group_size: Tensor, alpha: float, iters: int = 60
) -> float:
    """The smallest strength at which every group's coefficients are zero.

    Group g stays at zero iff ``||S(grad_g, alpha lam)||_2 <= (1 - alpha) sqrt(p_g) lam``
    (S the soft threshold, ``grad`` the loss gradient at the all-zero fit), a condition
    monotone in ``lam``: solved per group by bisection.

    Shapes:
        grad: (P,); column_group: (P,) long; group_size: (G,)
    """
    hi = torch.full_like(group_size, float(grad.abs().max()) / max(alpha, 1e-12))
    if alpha < 1:
        norms = _group_norms(grad[None], column_group, group_size.numel())
        hi = torch.minimum(hi, norms / ((1 - alpha) * group_size.sqrt()).clamp_min(1e-12))
    lo = torch.zeros_like(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        shrunk = (grad.abs() - alpha * mid[column_group]).clamp_min(0.0)
        norms = _group_norms(shrunk[None], column_group, group_size.numel())
        zero = norms <= (1 - alpha) * group_size.sqrt() * mid
        hi, lo = torch.where(zero, mid, hi), torch.where(zero, lo, mid)
    return float(hi.max())


def fit_sgl(
    x: Tensor,
    cov: Tensor,
    y: Tensor,
    column_group: Tensor,
    group_size: Tensor,
    lam: float,
    alpha: float,
    beta: Tensor,
    gamma: Tensor,
    max_iter: int = 3000,
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Logistic sparse group lasso by FISTA with adaptive restart; returns (beta, gamma).

    Minimizes ``mean BCE(y, x beta + cov gamma) + lam ((1 - alpha) sum_g sqrt(p_g)
    ||beta_g|| + alpha ||beta||_1)``; ``gamma`` (intercept, ancestry scores) is not
    penalized. Starts from ``beta``, ``gamma`` (warm start).

    Shapes:
        x: (N, P); cov: (N, C); y: (N,); beta: (P,); gamma: (C,)
    """
    n = x.shape[0]
    lipschitz = torch.linalg.matrix_norm(torch.cat([x, cov], 1), ord=2) ** 2 / (4 * n)
    step = 1.0 / float(lipschitz)
    b, g = beta.clone(), gamma.clone()
    yb, yg, t = b, g, 1.0
    for _ in range(max_iter):
        r = (torch.sigmoid(x @ yb + cov @ yg) - y) / n  # (N,)
        b_new = sparse_group_prox(
            (yb - step * (x.T @ r))[None],
            column_group,
            group_size,
            step * lam * alpha,
            step * lam * (1 - alpha),
        )[0]
        g_new = yg - step * (cov.T @ r)
        change = max(float((b_new - b).abs().max()), float((g_new - g).abs().max()))
        restart = float((yb - b_new) @ (b_new - b) + (yg - g_new) @ (g_new - g)) > 0
        t_new = 1.0 if restart else (1 + math.sqrt(1 + 4 * t * t)) / 2
        momentum = 0.0 if restart else (t - 1) / t_new
        yb, yg = b_new + momentum * (b_new - b), g_new + momentum * (g_new - g)
        b, g, t = b_new, g_new, t_new
        if change < tol:
            break
    return b, g


def refit_logistic(
    x: Tensor, y: Tensor, ridge: float = 1e-3, max_iter: int = 50, tol: float = 1e-8
) -> Tensor:
    """Unpenalized (up to a small ridge) logistic regression by Newton's method.

    The relaxed fit of a selected set (Meinshausen 2007): the lasso's shrinkage of
    the kept coefficients is undone, so a strength is judged by the groups it keeps,
    not by how much it shrinks them. ``ridge`` (on the mean loss) keeps the Hessian
    invertible when a set separates the classes.

    Shapes:
        x: (N, P) with an intercept column; y: (N,) -> coefficients (P,)
    """
    n, p = x.shape
    w = torch.zeros(p, dtype=x.dtype)
    eye = torch.eye(p, dtype=x.dtype)
    for _ in range(max_iter):
        prob = torch.sigmoid(x @ w)
        grad = x.T @ (prob - y) / n + ridge * w
        hess = (x.T * (prob * (1 - prob))) @ x / n + ridge * eye
        delta = torch.linalg.solve(hess, grad)
        w = w - delta
        if float(delta.abs().max()) < tol:
            break
    return w


def _oof_loss(x, y, folds):
    out = torch.empty_like(y)
    for k in range(int(folds.max()) + 1):
        te = folds == k
        w = refit_logistic(x[~te], y[~te])
        out[te] = _bce(x[te] @ w, y[te])
    return out


def _bce(logit: Tensor, y: Tensor) -> Tensor:
    """Per-sample binary cross-entropy. Shapes: (N,), (N,) -> (N,)"""
    return torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")


def choose(tuning_loss: Tensor, rule: str) -> int:
    """Index of the chosen strength (strengths ordered largest first).

    Args:
        tuning_loss: per-subject tuning losses (L, N) of L strengths.
        rule: ``min``: the lowest mean loss; ``1se``: the largest strength whose mean
            loss exceeds the lowest by at most one standard error of the per-subject
            difference. Every strength is scored on the same subjects, so the
            difference's error is the one that matters; the error of the mean loss
            itself (0.018 on 750 subjects) is mostly spread between subjects that
            every strength shares, and would wave through models missing a gene.
    """
    if rule not in ("min", "1se"):
        raise ValueError(f"rule={rule!r}: choose 'min' or '1se'")
    mean = tuning_loss.mean(1)  # (L,)
    best = int(mean.argmin())
    if rule == "min":
        return best
    diff = tuning_loss - tuning_loss[best]  # (L, N)
    se = diff.std(1) / math.sqrt(tuning_loss.shape[1])  # (L,)
    return int((diff.mean(1) <= se).nonzero()[0])


def regularization_path(
    spec: DataSpec,
    train: dict[str, Tensor],
    tuning: dict[str, Tensor],
    alpha: float = 0.5,
    ancestry_pcs: int = 0,
    n_lambdas: int = 20,
    min_ratio: float = 0.02,
    rule: str = "1se",
    adaptive: bool = True,
    max_iter: int = 3000,
    tol: float = 1e-6,
    stability: dict[str, Any] | None = None,
    environment: tuple[Tensor, Tensor] | None = None,
) -> PathResult:
    """Fits the path on ``train``, scores it on ``tuning``, chooses a strength.

    Each strength's groups are refitted without the penalty (``refit_logistic``) and
    that relaxed fit is scored on the tuning split: otherwise a weaker penalty wins
    on tuning loss by shrinking the true groups less, and lets noise groups in with
    them (measured: 9-18 of 20 groups kept where 4 are causal).

    Args:
        spec: markers, groups, train means and (for ``ancestry_pcs``) principal axes.
        train, tuning: ``genotype``, ``genotype_mask``, ``genotype_present`` and
            ``label`` tensors (a batch dict); subjects without genotypes are left out.
        alpha: L1 share of the penalty (the encoder's ``alpha``).
        ancestry_pcs: principal axes to adjust for (``DataSpec.marker_pcs``).
        n_lambdas, min_ratio: the grid, ``lambda_max`` down to ``min_ratio * lambda_max``
            in equal log steps.
        rule: ``min`` or ``1se``: how the strength is chosen (``choose``);
            ``stability``: the groups are the stable ones over complementary halves of
            the train split (``sgl_stability.stability_selection`` on the same
            adjusted, weighted inputs and the same grid), and the chosen strength
            marks the lower end of the strengths they were counted over.
        stability: keyword arguments of ``stability_selection`` (``threshold``,
            ``max_false``, ``pairs``, ``seed``) for the ``stability`` rule.
        adaptive: weight each group's penalty by the inverse norm of its coefficients
            in a ridge fit of every group (the adaptive group lasso, Wang & Leng 2008),
            so groups with no signal are penalized harder than groups with some.
        max_iter, tol: per-strength solver limits (largest coefficient change).
        environment: a score per subject of ``train`` and of ``tuning`` (every row of
            the batch, genotyped or not) whose effect a gene may change; each group
            then has a twin group, its markers' products with the score (standardized
            on the genotyped train subjects), and the score and the ancestry scores
            times the score are unpenalized covariates.

    Raises:
        ValueError: when either split has no genotyped subject of each outcome, or an
            environment score is not finite or does not match its batch.
    """
    check_genotype_spec(spec)
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: choose one of {RULES}")
    y, yt = _labels(train, "train"), _labels(tuning, "tuning")
    design = GenotypeDesign.fit(spec, *_called(train), ancestry_pcs)
    x, cov = design.transform(*_called(train))
    xt, covt = design.transform(*_called(tuning))
    groups = torch.tensor(spec.marker_groups, dtype=torch.long)
    names = path_group_names(spec.groups, environment is not None)
    if environment is not None:
        (x, cov), (xt, covt) = _with_interaction(x, cov, xt, covt, train, tuning, environment)
        groups = torch.cat([groups, groups + spec.n_groups])
    n_groups = len(names)
    sizes = torch.bincount(groups, minlength=n_groups).double()
    if adaptive:
        # Penalizing beta_g / w_g is fitting columns scaled by w_g: both terms of the
        # penalty get the group's weight, and zero groups stay zero groups.
        init = refit_logistic(torch.cat([x, cov], 1), y, ridge=_ADAPTIVE_RIDGE)[: x.shape[1]]
        weight = _group_norms(init[None], groups, n_groups)[groups]  # (M,)
        x, xt = x * weight, xt * weight
    beta = torch.zeros(x.shape[1], dtype=x.dtype)
    gamma = torch.zeros(cov.shape[1], dtype=x.dtype)
    _, gamma = fit_sgl(x, cov, y, groups, sizes, math.inf, alpha, beta, gamma, max_iter, tol)
    r = (torch.sigmoid(cov @ gamma) - y) / x.shape[0]
    # A hair above the edge: at lambda_max itself the all-zero solution sits on its
    # optimality boundary, and rounding (which differs with the thread count) let a
    # group in at 1e-17 there on some machines and not on others.
    top = lambda_max(x.T @ r, groups, sizes, alpha) * (1 + _EDGE_MARGIN)
    lambdas = [top * min_ratio ** (i / max(n_lambdas - 1, 1)) for i in range(n_lambdas)]
    rows: dict[str, list] = {k: [] for k in ("sel", "train", "tune", "norms")}
    for lam in lambdas:
        beta, gamma = fit_sgl(x, cov, y, groups, sizes, lam, alpha, beta, gamma, max_iter, tol)
        norms = _group_norms(beta[None], groups, n_groups)
        keep = norms[groups] > 0  # (M,)
        w = refit_logistic(torch.cat([x[:, keep], cov], 1), y)
        rows["sel"].append([names[i] for i in (norms > 0).nonzero().flatten().tolist()])
        rows["train"].append(float(_bce(x @ beta + cov @ gamma, y).mean()))
        rows["tune"].append(_bce(torch.cat([xt[:, keep], covt], 1) @ w, yt))
        rows["norms"].append([float(v) for v in norms])
    losses = torch.stack(rows["tune"])  # (L, N_tuning)
    stable = None
    if rule == "stability":
        stable = stability_selection(x, cov, y, groups, names, lambdas, alpha, **(stability or {}))
    return PathResult(
        lambdas=lambdas,
        n_selected=[len(s) for s in rows["sel"]],
        selected=rows["sel"],
        train_loss=rows["train"],
        tuning_loss=[float(v) for v in losses.mean(1)],
        tuning_se=[float(v) for v in losses.std(1) / math.sqrt(losses.shape[1])],
        chosen=stable.n_strengths - 1 if stable else choose(losses, rule),
        rule=rule,
        alpha=alpha,
        ancestry_pcs=ancestry_pcs,
        adaptive=adaptive,
        n_train=x.shape[0],
        n_tuning=xt.shape[0],
        group_norms=rows["norms"],
        stability=stable.to_dict() if stable else None,
        interaction=environment is not None,
    )


def path_group_names(genes: list[str], interaction: bool) -> list[str]:
    """The path's groups in order: the genes, then (with interaction) their twins."""
    return list(genes) + ([g + INTERACTION_SUFFIX for g in genes] if interaction else [])


def _with_interaction(x, cov, xt, covt, train, tuning, environment):
    """Both splits' inputs with each marker's x environment column, and the covariates
    with the score and the ancestry scores x the score (``cov[:, 0]`` is the intercept).

    Shapes:
        x: (N, M); cov: (N, C) -> (N, 2 M), (N, 2 C); the same for the tuning split
    """
    scores = []
    for name, batch, e in (("train", train, environment[0]), ("tuning", tuning, environment[1])):
        e = torch.as_tensor(e, dtype=torch.float64).flatten()
        if e.numel() != batch["genotype_present"].shape[0] or not bool(e.isfinite().all()):
            raise ValueError(
                f"genotype lambda path: the {name} environment score needs one finite value "
                f"per subject ({batch['genotype_present'].shape[0]}), got {e.numel()} values"
            )
        scores.append(e[batch["genotype_present"].bool()])
    mean, sd = scores[0].mean(), scores[0].std().clamp_min(_MIN_STD)
    out = []
    for (a, c), e in zip(((x, cov), (xt, covt)), scores, strict=True):
        z = ((e - mean) / sd)[:, None]  # (N, 1)
        out.append((torch.cat([a, a * z], 1), torch.cat([c, z, c[:, 1:] * z], 1)))
    return out


def _called(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Dosages and call masks of the genotyped subjects. Shapes: (N', M), (N', M)"""
    rows = batch["genotype_present"].bool()
    return batch["genotype"][rows], batch["genotype_mask"][rows]


def _labels(batch: dict[str, Tensor], split: str) -> Tensor:
    """Outcomes of the genotyped subjects (N',), float64; both classes must be there."""
    y = batch["label"][batch["genotype_present"].bool()].double()
    for value in (0, 1):
        if not bool((y == value).any()):
            raise ValueError(
                f"genotype lambda path: the {split} split has no genotyped subject with "
                f"outcome {value}, so the penalty strength cannot be chosen"
            )
    return y
