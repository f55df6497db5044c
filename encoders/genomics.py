"""Genotype encoder with sparse-group-lasso selection of marker groups.

The first layer of an MLP over standardized dosages is penalized by the sparse
group lasso (Simon et al. 2013, "A sparse-group lasso"), used for input
selection in deep networks as in Scardapane et al. 2017 ("Group sparse
regularization for deep neural networks"). The penalty is applied by a proximal
step after each optimizer step, so whole marker groups (genes, pathways) become
exactly zero and ``selected_groups()`` reads the selection off the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl
import torch
from torch import Tensor, nn

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders.base import ModalityEncoder, register_encoder

MISSING_MODES = ("impute", "mask")
SELECT_MODES = ("fixed", "path")
PATH_RULES = ("min", "1se", "stability")
PATH_INTERACTIONS = ("none", "timeseries")
# Allele frequencies are clamped to [_MIN_FREQ, 1 - _MIN_FREQ] before scaling, so a
# marker monomorphic on the train split does not divide by a zero variance.
_MIN_FREQ = 0.01


@dataclass
class SGLMLPConfig:
    """Settings of ``sgl_mlp``.

    Attributes:
        hidden: widths of the hidden layers; the first one is the penalized layer.
        embed_dim: D, the width of the embedding.
        lambda_: overall penalty strength (0 turns selection off).
        alpha: L1 share of the penalty (0 = group lasso only, 1 = lasso only).
        dropout: dropout after each hidden activation.
        missing: "impute" (train-mean imputation plus a missing-call indicator per
            marker, in the marker's group) or "mask" (train-mean imputation only).
        prox_lr: when > 0, the penalized layer is updated by proximal gradient
            descent with this step size (an SGD step on its gradient, then the
            proximal operator with threshold ``prox_lr * lambda_``) instead of by the
            model's optimizer. An adaptive optimizer (Adam) rescales each weight's
            step, so ``lr * lambda_`` no longer matches the penalty it applies and
            selection becomes all-or-nothing in lambda; plain proximal gradient
            descent keeps the sparse-group-lasso optimality conditions exact.
            Without it, mind the scale: under AdamW at lr 2e-3, ``lambda_=1e-3``
            thresholds by 2e-6 per step while Adam moves every weight by ~lr, so
            the penalty is effectively off (on a 5,000-subject simulator cohort
            the genotype-only model then peaked on the tuning split after one
            epoch at AUROC 0.60; ``prox_lr=0.05, lambda_=0.01`` reached 0.645).
            The right ``lambda_`` depends on how much loss gradient reaches this
            layer: inside a fused model the same 0.01 zeroed every group (a
            saddle the layer never leaves), 0.002 kept the causal groups.
        ancestry_pcs: project the top ``k`` principal axes of the training dosages
            (``DataSpec.marker_pcs``, fitted with ``data.genotype_pcs >= k``) out of
            the standardized dosages before the first layer: the EIGENSTRAT
            adjustment for population structure (Price et al. 2006). The encoder can
            then not read ancestry along those axes, while a causal marker keeps the
            part of its dosage that is not ancestry.
        select: ``fixed`` (``lambda_`` as given) or ``path``: training first fits a
            sparse-group-lasso path on the train split and chooses its strength on
            the tuning split (``encoders.sgl_path``), then trains this encoder on the
            chosen groups alone (``keep_groups``); ``lambda_`` is the penalty of that
            second fit (0 = the relaxed fit: no further shrinkage).
        keep_groups: the only groups the first layer reads (None = all). Written by
            training when ``select`` is ``path``; the resolved config records it, so
            the artifact rebuilds the same encoder.
        path_rule: ``min`` or ``1se`` (a strength chosen on the tuning split,
            ``sgl_path.choose``), or ``stability``: the groups the path selects on at
            least ``path_threshold`` of ``2 * path_pairs`` complementary halves of the
            train split (``sgl_stability``).
        path_pcs: principal axes the path adjusts for (needs ``data.genotype_pcs``
            at least as large); independent of ``ancestry_pcs``.
        path_lambdas: strengths on the path.
        path_threshold: the ``stability`` rule's selection frequency, in (0.5, 1].
        path_max_false: the ``stability`` rule's bound on the expected number of
            groups kept that carry no signal; it sets how far down the grid
            frequencies are counted.
        path_pairs: complementary pairs of halves for the ``stability`` rule.
        path_seed: seed of the halves; fixed apart from the training seed, so the
            genes chosen are a function of the cohort alone.
        path_interaction: ``none``, or ``timeseries``: the path also tests each group
            for a change of the vitals/labs risk's effect (gene x environment). The
            environment is a gradient-boosting score of the window's vitals/labs
            features, cross-fitted on the train split
            (``training.genotype_selection.timeseries_environment``), so a gene that
            acts only through physiology (a modifier) can be kept.
        interaction_groups: the genes the path kept for their interaction with the
            environment (written by training with ``path_interaction: timeseries``, like
            ``keep_groups``); ``interaction_inputs`` reads their markers, the input of
            the model's gene x environment term (``model.gene_environment``).
    """

    hidden: tuple[int, ...] = (64,)
    embed_dim: int = 64
    lambda_: float = 1e-3
    alpha: float = 0.5
    dropout: float = 0.1
    missing: str = "impute"
    prox_lr: float = 0.0
    ancestry_pcs: int = 0
    select: str = "fixed"
    keep_groups: list[str] | None = None
    path_rule: str = "1se"
    path_pcs: int = 0
    path_lambdas: int = 20
    path_threshold: float = 0.75
    path_max_false: float = 2.0
    path_pairs: int = 25
    path_seed: int = 0
    path_interaction: str = "none"
    interaction_groups: list[str] | None = None

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.select not in SELECT_MODES:
            raise ValueError(f"sgl_mlp: select={self.select!r}; choose one of {SELECT_MODES}")
        if self.path_rule not in PATH_RULES:
            raise ValueError(f"sgl_mlp: path_rule={self.path_rule!r}; choose one of {PATH_RULES}")
        if self.path_interaction not in PATH_INTERACTIONS:
            raise ValueError(
                f"sgl_mlp: path_interaction={self.path_interaction!r}; choose one of "
                f"{PATH_INTERACTIONS}"
            )
        if not 0.5 < self.path_threshold <= 1.0:
            raise ValueError(f"sgl_mlp: path_threshold={self.path_threshold} must lie in (0.5, 1]")
        if self.path_pairs < 1 or self.path_max_false <= 0:
            raise ValueError(
                f"sgl_mlp: path_pairs={self.path_pairs} must be >= 1 and "
                f"path_max_false={self.path_max_false} > 0"
            )
        if self.path_pcs < 0 or self.path_lambdas < 2:
            raise ValueError(
                f"sgl_mlp: path_pcs={self.path_pcs} must be >= 0 and "
                f"path_lambdas={self.path_lambdas} >= 2"
            )
        if self.ancestry_pcs < 0:
            raise ValueError(f"sgl_mlp: ancestry_pcs={self.ancestry_pcs} must be >= 0")
        if self.missing not in MISSING_MODES:
            raise ValueError(f"sgl_mlp: missing={self.missing!r}; choose one of {MISSING_MODES}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"sgl_mlp: alpha={self.alpha} must lie in [0, 1]")
        if self.lambda_ < 0:
            raise ValueError(f"sgl_mlp: lambda_={self.lambda_} must be >= 0")
        if self.embed_dim < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"sgl_mlp: widths must be >= 1 (hidden={self.hidden})")


def check_genotype_spec(spec: DataSpec) -> None:
    """Raises ``ValueError`` naming the field when the spec cannot describe genotypes."""
    m = spec.n_markers
    if m == 0:
        raise ValueError("DataSpec.markers is empty: the cohort has no genotype markers")
    for name in ("marker_groups", "marker_mean"):
        if len(getattr(spec, name)) != m:
            raise ValueError(f"DataSpec.{name} has {len(getattr(spec, name))} entries, markers {m}")
    bad = [i for i, g in enumerate(spec.marker_groups) if not 0 <= g < spec.n_groups]
    if bad:
        raise ValueError(
            f"DataSpec.marker_groups[{bad[0]}]={spec.marker_groups[bad[0]]} (marker "
            f"{spec.markers[bad[0]]!r}) is not an index into {spec.n_groups} groups"
        )
    out = [i for i, v in enumerate(spec.marker_mean) if not 0.0 <= v <= 2.0]
    if out:
        raise ValueError(
            f"DataSpec.marker_mean[{out[0]}]={spec.marker_mean[out[0]]} (marker "
            f"{spec.markers[out[0]]!r}) is not a mean dosage in [0, 2]"
        )


def ancestry_axes(spec: DataSpec, k: int) -> Tensor:
    """The top ``k`` principal axes of ``spec.marker_pcs`` (k, M), orthonormalized.

    Raises:
        ValueError: when the spec holds fewer than ``k`` axes (``data.genotype_pcs``).
    """
    if k == 0:
        return torch.zeros(0, spec.n_markers)
    if len(spec.marker_pcs) < k:
        raise ValueError(
            f"sgl_mlp: ancestry_pcs={k} needs data.genotype_pcs >= {k}; the DataSpec "
            f"holds {len(spec.marker_pcs)} principal axes"
        )
    axes = torch.tensor(spec.marker_pcs[:k], dtype=torch.float64)  # (k, M)
    q, _ = torch.linalg.qr(axes.T)  # exact orthonormality after the JSON round trip
    return q.T.float()


def binomial_scale(marker_mean: Tensor) -> Tensor:
    """Per-marker standard deviation sqrt(2p(1-p)) of a Hardy-Weinberg dosage, p = mean/2.

    Shapes:
        marker_mean: (M,) -> (M,)
    """
    p = (marker_mean / 2).clamp(_MIN_FREQ, 1 - _MIN_FREQ)
    return torch.sqrt(2 * p * (1 - p))


def standardize_genotype(genotype: Tensor, mask: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """Mean-imputes missing calls with the train mean and standardizes.

    A missing call is set to the train mean, which standardizes to exactly 0.

    Shapes:
        genotype, mask: (B, M); mean, scale: (M,) -> (B, M)
    """
    return (genotype - mean) / scale * mask


def sparse_group_penalty(
    weight: Tensor, column_group: Tensor, group_size: Tensor, lambda_: float, alpha: float
) -> Tensor:
    """lambda * ((1 - alpha) * sum_g sqrt(p_g) ||W_g||_2 + alpha * ||W||_1).

    ``W_g`` holds the columns (input weights) of group g and ``p_g`` its column count.

    Shapes:
        weight: (H, P); column_group: (P,) long; group_size: (G,) -> scalar
    """
    norms = _group_norms(weight, column_group, group_size.numel())  # (G,)
    group_term = (group_size.sqrt() * norms).sum()
    return lambda_ * ((1 - alpha) * group_term + alpha * weight.abs().sum())


def sparse_group_prox(
    weight: Tensor, column_group: Tensor, group_size: Tensor, l1: float, group: float
) -> Tensor:
    """The proximal operator of ``l1 ||W||_1 + group sum_g sqrt(p_g) ||W_g||_2``.

    Soft-thresholds every entry by ``l1``, then scales each group by
    ``max(0, 1 - group sqrt(p_g) / ||W_g||)``; this composition is the exact prox
    of the sparse-group lasso (Simon et al. 2013, Sec. 3). A group whose
    thresholded norm is at most ``group sqrt(p_g)`` becomes exactly zero.

    Shapes:
        weight: (H, P); column_group: (P,) long; group_size: (G,) -> (H, P)
    """
    w = torch.sign(weight) * (weight.abs() - l1).clamp_min(0.0)  # (H, P)
    norms = _group_norms(w, column_group, group_size.numel())  # (G,)
    shrink = 1 - group * group_size.sqrt() / norms.clamp_min(torch.finfo(w.dtype).tiny)
    return w * shrink.clamp_min(0.0)[column_group]  # (H, P) * (P,)


def group_selection_metrics(selected: list[str], causal: list[str]) -> dict[str, float]:
    """Precision and recall of a selected set of groups against the causal set.

    Precision of an empty selection is 1.0 (nothing wrongly selected); recall
    against an empty causal set is 1.0.
    """
    sel, true = set(selected), set(causal)
    hits = len(sel & true)
    precision = hits / len(sel) if sel else 1.0
    recall = hits / len(true) if true else 1.0
    return {"precision": precision, "recall": recall}


def _group_norms(weight: Tensor, column_group: Tensor, n_groups: int) -> Tensor:
    """Frobenius norm of each group's columns. Shapes: (H, P) -> (G,)"""
    sq = weight.pow(2).sum(0)  # (P,)
    return (
        torch.zeros(n_groups, dtype=weight.dtype, device=weight.device)
        .index_add(0, column_group, sq)
        .sqrt()
    )


class SGLMLPEncoder(ModalityEncoder):
    """MLP over standardized dosages with a sparse-group-lasso first layer.

    Inputs are ``z = (x - 2p) / sqrt(2p(1-p))`` with missing calls at the train
    mean (z = 0), plus a missing indicator per marker when ``missing="impute"``.
    The first layer ``W (H x P)`` carries the penalty
    ``lambda ((1-alpha) sum_g sqrt(p_g) ||W_g||_2 + alpha ||W||_1)``, applied by
    ``after_optimizer_step`` as a proximal step. A marker's indicator column sits
    in the marker's group, so a zero group has no influence at all.

    Shapes:
        genotype, genotype_mask: (B, M); genotype_present: (B,)
        output: embedding (B, D), present (B,) bool
    """

    modality = "genomics"

    def __init__(self, spec: DataSpec, cfg: SGLMLPConfig | None = None) -> None:
        super().__init__()
        check_genotype_spec(spec)
        self.cfg = cfg or SGLMLPConfig()
        self.embed_dim = self.cfg.embed_dim
        self.group_names = list(spec.groups)
        self._register_marker_buffers(spec)
        widths = (*self.cfg.hidden, self.cfg.embed_dim)
        self.first = nn.Linear(self.column_group.numel(), widths[0])
        with torch.no_grad():
            self.first.weight.mul_(self.column_keep)  # groups left out start (and stay) at zero
        self.trunk = _mlp_trunk(widths, self.cfg.dropout)

    def _register_marker_buffers(self, spec: DataSpec) -> None:
        mean = torch.tensor(spec.marker_mean, dtype=torch.float32)
        groups = torch.tensor(spec.marker_groups, dtype=torch.long)
        if self.cfg.missing == "impute":
            groups = torch.cat([groups, groups])  # indicator columns follow the dosages
        sizes = torch.bincount(groups, minlength=spec.n_groups).float()
        self.register_buffer("marker_mean", mean)
        self.register_buffer("marker_scale", binomial_scale(mean))
        self.register_buffer("column_group", groups)
        self.register_buffer("group_size", sizes)
        # Rebuilt from the saved DataSpec, not saved: older artifacts load unchanged.
        axes = ancestry_axes(spec, self.cfg.ancestry_pcs)
        self.register_buffer("ancestry_axes", axes, persistent=False)
        keep = _kept_columns(spec, self.cfg.keep_groups, groups)
        self.register_buffer("column_keep", keep, persistent=False)
        chosen = _kept_columns(
            spec, self.cfg.interaction_groups or [], groups[: mean.numel()], "interaction_groups"
        )
        self.register_buffer("interaction_columns", chosen.nonzero().flatten(), persistent=False)

    @property
    def lambda_(self) -> float:
        return self.cfg.lambda_

    @lambda_.setter
    def lambda_(self, value: float) -> None:
        self.cfg.lambda_ = float(value)

    def inputs(self, batch: dict[str, Any]) -> Tensor:
        """The first layer's input: standardized dosages (and missing indicators).

        Shapes:
            output: (B, P) with P = 2M ("impute") or M ("mask")
        """
        x, mask = read_genotype(batch, self.marker_mean.numel())
        z = standardize_genotype(x, mask, self.marker_mean, self.marker_scale)  # (B, M)
        if self.ancestry_axes.numel():
            z = z - (z @ self.ancestry_axes.T) @ self.ancestry_axes  # (B, M), axes removed
        if self.cfg.missing == "impute":
            z = torch.cat([z, 1 - mask], dim=1)  # (B, 2M)
        return z

    def interaction_inputs(self, batch: dict[str, Any]) -> Tensor:
        """The standardized dosages of the ``interaction_groups`` markers.

        Shapes:
            output: (B, K), K the markers of those groups (0 when none)
        """
        return self.inputs(batch)[:, self.interaction_columns]

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        z = self.inputs(batch)  # (B, P)
        # Masking the weight (not the input) also zeroes the gradient of the columns
        # left out, so no optimizer moves them off zero.
        h = nn.functional.linear(z, self.first.weight * self.column_keep, self.first.bias)
        emb = self.trunk(h)  # (B, D)
        return emb, batch["genotype_present"].bool()

    def regularization_loss(self) -> Tensor:
        """Zero: the penalty is applied by the proximal step, not by its gradient.

        Adding the non-smooth penalty to the loss as well would apply it twice, and
        its subgradient never lands weights exactly on zero. ``penalty()`` gives
        the value for logging.
        """
        return torch.zeros((), device=self.first.weight.device)

    def penalty(self) -> Tensor:
        """The current sparse-group-lasso penalty value (detached, for logging)."""
        with torch.no_grad():
            return sparse_group_penalty(
                self.first.weight, self.column_group, self.group_size, self.lambda_, self.cfg.alpha
            )

    @torch.no_grad()
    def after_optimizer_step(self, lr: float) -> None:
        """Proximal step: W <- prox_{lr * penalty}(W).

        Exact proximal gradient for SGD; with adaptive optimizers (Adam) the step
        size differs per weight, so ``lr * lambda`` is then a heuristic threshold.
        With ``prox_lr`` set, the optimizer leaves W alone (learning rate 0) and this
        step is the whole update: W <- prox(W - prox_lr * grad W).
        """
        w = self.first.weight
        if self.cfg.prox_lr > 0:
            if w.grad is None:
                return
            w.sub_(self.cfg.prox_lr * w.grad)
            lr = self.cfg.prox_lr
        step = lr * self.lambda_
        if step <= 0:
            return
        w.copy_(
            sparse_group_prox(
                w,
                self.column_group,
                self.group_size,
                step * self.cfg.alpha,
                step * (1 - self.cfg.alpha),
            )
        )

    def group_norms(self) -> Tensor:
        """Norm of each group's first-layer weights. Shapes: (G,)"""
        with torch.no_grad():
            return _group_norms(self.first.weight, self.column_group, len(self.group_names))

    def selected_groups(self) -> list[str]:
        """Groups with any non-zero first-layer weight, in spec order."""
        norms = self.group_norms()
        return [g for g, n in zip(self.group_names, norms.tolist(), strict=True) if n > 0]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The penalized weight gets no weight decay: its penalty is the SGL alone."""
        rest = [p for n, p in self.named_parameters() if n != "first.weight" and p.requires_grad]
        # With prox_lr the penalized layer is updated by after_optimizer_step alone.
        first_lr = 0.0 if self.cfg.prox_lr > 0 else lr
        groups = [{"params": [self.first.weight], "lr": first_lr, "weight_decay": 0.0}]
        return groups + [{"params": rest, "lr": lr, "weight_decay": weight_decay}]


def _kept_columns(
    spec: DataSpec,
    keep_groups: list[str] | None,
    column_group: Tensor,
    setting: str = "keep_groups",
) -> Tensor:
    """1.0 for the columns of ``keep_groups`` (all when None), else 0.0; ``setting`` is
    the config field the groups came from, named in the error for an unknown group.

    Shapes:
        column_group: (P,) -> (P,)
    """
    if keep_groups is None:
        return torch.ones(column_group.numel())
    unknown = sorted(set(keep_groups) - set(spec.groups))
    if unknown:
        raise ValueError(
            f"sgl_mlp: {setting} names {unknown[0]!r}, not a marker group of this cohort "
            f"({len(spec.groups)} groups, e.g. {spec.groups[:3]})"
        )
    kept = torch.tensor([g in set(keep_groups) for g in spec.groups])
    return kept[column_group].float()


def _mlp_trunk(widths: tuple[int, ...], dropout: float) -> nn.Module:
    """Everything after the first layer: (act, dropout, linear) per remaining width."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.GELU(), nn.Dropout(dropout), nn.Linear(d_in, d_out)]
    return nn.Sequential(*layers)


def read_genotype(batch: dict[str, Any], n_markers: int) -> tuple[Tensor, Tensor]:
    """``genotype`` and ``genotype_mask`` as float tensors, checked against M.

    Shapes:
        output: (B, M), (B, M)
    """
    for key in ("genotype", "genotype_mask", "genotype_present"):
        if key not in batch:
            raise KeyError(f"genomics encoder: batch has no {key!r}")
    x = batch["genotype"].float()
    mask = batch["genotype_mask"].float()
    if x.ndim != 2 or x.shape[1] != n_markers or mask.shape != x.shape:
        raise ValueError(
            f"genomics encoder: genotype {tuple(x.shape)} / genotype_mask "
            f"{tuple(mask.shape)} must both be (B, {n_markers})"
        )
    return x, mask


@register_encoder("sgl_mlp")
def sgl_mlp(
    spec: DataSpec,
    hidden: tuple[int, ...] | list[int] = (64,),
    embed_dim: int = 64,
    lambda_: float = 1e-3,
    alpha: float = 0.5,
    dropout: float = 0.1,
    missing: str = "impute",
    prox_lr: float = 0.0,
    ancestry_pcs: int = 0,
    select: str = "fixed",
    keep_groups: list[str] | None = None,
    path_rule: str = "1se",
    path_pcs: int = 0,
    path_lambdas: int = 20,
    path_threshold: float = 0.75,
    path_max_false: float = 2.0,
    path_pairs: int = 25,
    path_seed: int = 0,
    path_interaction: str = "none",
    interaction_groups: list[str] | None = None,
) -> SGLMLPEncoder:
    """Builds the sparse-group-lasso MLP genotype encoder (see ``SGLMLPConfig``)."""
    cfg = SGLMLPConfig(
        tuple(hidden), embed_dim, lambda_, alpha, dropout, missing, prox_lr, ancestry_pcs,
        select, None if keep_groups is None else list(keep_groups), path_rule, path_pcs,
        path_lambdas, path_threshold, path_max_false, path_pairs, path_seed, path_interaction,
        None if interaction_groups is None else list(interaction_groups),
    )  # fmt: skip
    return SGLMLPEncoder(spec, cfg)


def fit_logistic(
    encoder: SGLMLPEncoder,
    batch: dict[str, Tensor],
    label: Tensor,
    head: nn.Linear | None = None,
    steps: int = 300,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 1e-3,
) -> nn.Linear:
    """Full-batch proximal gradient descent of a logistic head on the encoder.

    Plain SGD followed by the proximal step is proximal gradient descent on
    ``BCE + penalty`` for the first layer, so the selection is the penalty's own.
    Momentum is off by default: its buffer keeps pushing zeroed groups off zero.
    The other layers get weight decay: without it the network could shrink the
    first layer for free by growing the next one (the penalty is not scale-free).

    Returns:
        The fitted linear head (pass it back in to warm start).
    """
    head = head if head is not None else nn.Linear(encoder.embed_dim, 1)
    groups = encoder.param_groups(lr, weight_decay)
    groups.append({"params": list(head.parameters()), "lr": lr, "weight_decay": weight_decay})
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    loss_fn = nn.BCEWithLogitsLoss()
    encoder.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(head(encoder(batch)[0]).squeeze(1), label.float())
        loss.backward()
        opt.step()
        encoder.after_optimizer_step(lr)
    return head


def regularization_path(
    spec: DataSpec,
    genotype: Tensor,
    label: Tensor,
    lambdas: list[float],
    mask: Tensor | None = None,
    steps: int = 300,
    lr: float = 0.1,
    seed: int = 0,
    **encoder_kwargs: Any,
) -> pl.DataFrame:
    """Fits one small model along ``lambdas`` (smallest first, warm started).

    The path runs from dense to sparse, unlike glmnet: for a network the all-zero
    first layer is a saddle (downstream weights stop learning), so starting from
    the sparse end would keep every group at zero.

    Args:
        spec: gives markers, groups and the train means.
        genotype: dosages (B, M), 0 where missing.
        label: 0/1 outcome (B,).
        lambdas: penalty strengths; visited from the smallest to the largest,
            each fit starting from the previous one's weights.
        mask: 1 where called (B, M); default all called.
        steps, lr: full-batch SGD steps and step size per lambda (see ``fit_logistic``).
        seed: seeds the initial weights.
        **encoder_kwargs: other ``sgl_mlp`` settings (hidden, alpha, ...).

    Returns:
        One row per lambda: lambda, n_selected, selected (list of group names),
        loss (training BCE without the penalty), penalty.
    """
    torch.manual_seed(seed)
    mask = torch.ones_like(genotype) if mask is None else mask
    batch = {
        "genotype": genotype,
        "genotype_mask": mask,
        "genotype_present": torch.ones(genotype.shape[0], dtype=torch.bool),
    }
    encoder = sgl_mlp(spec, **{"dropout": 0.0, **encoder_kwargs})
    head, rows = None, []
    for lam in sorted(lambdas):
        encoder.lambda_ = lam
        head = fit_logistic(encoder, batch, label, head=head, steps=steps, lr=lr)
        rows.append(_path_row(encoder, head, batch, label))
    return pl.DataFrame(rows, schema=_PATH_SCHEMA)


_PATH_SCHEMA = {
    "lambda": pl.Float64,
    "n_selected": pl.Int64,
    "selected": pl.List(pl.String),
    "loss": pl.Float64,
    "penalty": pl.Float64,
}


@torch.no_grad()
def _path_row(
    encoder: SGLMLPEncoder, head: nn.Linear, batch: dict[str, Tensor], label: Tensor
) -> dict[str, Any]:
    encoder.eval()
    logits = head(encoder(batch)[0]).squeeze(1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, label.float())
    selected = encoder.selected_groups()
    return {
        "lambda": encoder.lambda_,
        "n_selected": len(selected),
        "selected": selected,
        "loss": float(loss),
        "penalty": float(encoder.penalty()),
    }
