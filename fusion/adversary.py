"""Confound adversary: gradient reversal (DANN) or a correlation penalty (BR-Net).

Gradient reversal (Ganin et al. 2016, "Domain-Adversarial Training of Neural
Networks"): heads predict scanner site and genetic ancestry from the fused
representation; between the representation and the heads sits a layer that is
the identity forward and multiplies the gradient by ``-lambda`` backward, so one
loss trains the heads to predict the confound and the encoders to hide it.
``lambda`` ramps up over training: ``lambda(p) = lambda_max * (2 / (1 + exp(-gamma p)) - 1)``,
with ``p`` the fraction of the whole run, or of the first ``ramp_epochs`` epochs when set
(``ramp_progress``).

Correlation mode (after BR-Net, Adeli et al. 2021, "Representation learning with
statistical independence to mitigate bias"): a linear projection of the
representation is trained to maximize its squared Pearson correlation with the
confound (one-hot columns for a categorical one), and the reversed gradient
drives the encoders to make that correlation vanish.

Confusion mode (Tzeng et al. 2015, "Simultaneous Deep Transfer Across Domains and
Tasks"): for a categorical confound, maximizing the head's cross-entropy (what
gradient reversal asks of the encoders) is won by encoding the site *and* making the
head confidently wrong, which leaves the site as decodable as before or more (seen on
simulated cohorts: a fresh probe recovered site better with the reversal than
without). Here the head learns the confound from the detached representation, and
the encoders are trained, through a frozen copy of the head, to make its posterior
uniform: ``lambda * CE(uniform, softmax(head(z)))``. Continuous confounds use the
reversal in this mode.

In adversarial and correlation modes ``loss()`` returns what the heads minimize; the
gradient reversal makes the encoders maximize it. Labels of -1 (categorical) or NaN
(continuous) are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("adversarial", "confusion", "correlation")
_CONFUSION = "|confusion"  # suffix of the encoder-side predictions in confusion mode


class GradientReversal(torch.autograd.Function):
    """Identity forward; ``-lambda * grad`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lambd * grad, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Applies gradient reversal with strength ``lambd``."""
    return GradientReversal.apply(x, lambd)


def ramp_progress(
    step: int, total_steps: float, steps_per_epoch: float, ramp_epochs: float | None = None
) -> float:
    """Progress ``p`` of the DANN ramp after ``step`` optimiser steps, in [0, 1].

    Args:
        step: optimiser steps taken so far (``global_step``).
        total_steps: optimiser steps of the whole run (inf when unbounded).
        steps_per_epoch: optimiser steps of one epoch (inf or 0 when unknown).
        ramp_epochs: epochs over which ``p`` goes from 0 to 1 (None = the whole run).
            ``lambda`` then reaches ``lambda_max * tanh(gamma / 2)`` after that many
            epochs, whatever bounds the run (``max_epochs``, ``max_steps`` or neither).

    Returns:
        ``step / span`` clipped to [0, 1]; 1.0 when the span is unknown.
    """
    if ramp_epochs is not None and ramp_epochs <= 0:
        raise ValueError(f"model.adversary.ramp_epochs must be > 0, got {ramp_epochs}")
    span = float(total_steps) if ramp_epochs is None else ramp_epochs * float(steps_per_epoch)
    if not span or math.isinf(span):
        return 1.0
    return min(1.0, step / span)


def dann_lambda(progress: float, lambda_max: float = 1.0, gamma: float = 10.0) -> float:
    """The DANN ramp: 0 at progress 0, ``lambda_max * tanh(gamma / 2)`` at progress 1.

    Args:
        progress: training progress in [0, 1] (clipped).
        lambda_max: the asymptotic strength.
        gamma: steepness (Ganin et al. use 10).
    """
    p = min(max(float(progress), 0.0), 1.0)
    return lambda_max * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


@dataclass
class AdversaryConfig:
    """Confound adversary settings.

    Attributes:
        enabled: attach the adversary to the model.
        mode: "adversarial" (gradient reversal into classification heads),
            "confusion" (the encoders push the head's posterior to uniform; see the
            module docstring for why) or "correlation" (BR-Net penalty).
        confounds: categorical confounds to hide, keys of ``batch["confounds"]``;
            class counts come from the DataSpec (``sites``, ``ancestries``).
        continuous: continuous confounds (e.g. ancestry PCs) -> width K, read
            from ``batch["confounds"][name]`` as (B, K) floats, fitted with MSE.
        hidden: hidden width of the adversarial heads (0 = linear).
        standardize: each head first standardizes its input (batch statistics in
            training, running ones in evaluation), as the audit's probes do: a head
            on raw features barely sees a confound carried by low-variance
            directions, which a probe on standardized features reads.
        on_modalities: also attach heads to each modality embedding.
        lambda_max: maximal gradient-reversal strength.
        gamma: steepness of the DANN ramp.
        ramp_epochs: epochs over which lambda ramps up to ~lambda_max (None = over
            all ``optim.max_epochs``). When set, model selection (best checkpoint,
            early stopping) ignores the epochs before the ramp completes
            (``training.run.selection_start``).
        weight: weight of the adversary loss in the training loss.
        erase: categorical confounds to erase linearly from the fused representation
            after training (LEACE, ``fusion/erasure.py``), e.g. ``[site, ancestry]``;
            independent of ``enabled``. The risk head is then refitted on the erased
            representation.
        erase_ridge: ridge on the representation's covariance before whitening,
            as a fraction of its mean variance (0: none, a pseudo-inverse root).
        erase_refit_steps: full-batch steps of the head-only refit after erasure.
        head_steps: updates of the adversary heads per training step. Extra updates
            (``head_steps - 1``) train the heads alone on the detached representation
            before the joint step, so the heads the encoders play against are close
            to a best response instead of lagging behind a moving representation.
    """

    enabled: bool = False
    mode: str = "adversarial"
    confounds: list[str] = field(default_factory=lambda: ["site", "ancestry"])
    continuous: dict[str, int] = field(default_factory=dict)
    hidden: int = 64
    standardize: bool = False
    on_modalities: bool = False
    lambda_max: float = 1.0
    gamma: float = 10.0
    ramp_epochs: float | None = None
    weight: float = 1.0
    erase: list[str] = field(default_factory=list)
    erase_ridge: float = 1e-3
    erase_refit_steps: int = 300
    head_steps: int = 1


class ConfoundAdversary(nn.Module):
    """Heads predicting confounds from the fused representation (and each modality).

    Args:
        in_dim: width of the fused representation.
        n_classes: categorical confound -> number of classes.
        continuous: continuous confound -> width K.
        modality_dims: modality -> embedding width, to attach per-modality heads.
        hidden: hidden width of each head (0 = linear; correlation mode is always linear).
        mode: "adversarial", "confusion" or "correlation".
        standardize: standardize each head's input (``Standardize``).

    Attributes:
        lambd: current gradient-reversal strength (set by the model's schedule).

    Shapes:
        fused: (B, in_dim); embeddings[m]: (B, D_m), present (B,)
        output: "site", "ancestry", "image/site", ... -> (B, K) predictions
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: dict[str, int],
        continuous: dict[str, int] | None = None,
        modality_dims: dict[str, int] | None = None,
        hidden: int = 64,
        mode: str = "adversarial",
        standardize: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"adversary mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.lambd = 0.0
        self.kinds = {
            **{k: "categorical" for k in n_classes},
            **dict.fromkeys(continuous or {}, "continuous"),
        }
        widths = {**n_classes, **(continuous or {})}
        hidden = 0 if mode == "correlation" else hidden
        sources = {"": in_dim, **{f"{m}/": d for m, d in (modality_dims or {}).items()}}
        self.heads = nn.ModuleDict(
            {
                _key(prefix, name): _head(dim, hidden, k, standardize)
                for prefix, dim in sources.items()
                for name, k in widths.items()
            }
        )

    def forward(
        self, fused: Tensor, embeddings: dict[str, tuple[Tensor, Tensor]] | None = None
    ) -> dict[str, Tensor]:
        out = {}
        for key, head, z in self._heads_with_inputs(fused, embeddings):
            name = key.rsplit("/", 1)[-1]
            if self.mode == "confusion" and self.kinds[name] == "categorical":
                out[key] = head(z.detach())  # trains the head only
                frozen = {k: v.detach() for k, v in head.named_parameters()}
                out[key + _CONFUSION] = torch.func.functional_call(head, frozen, (z,))
            else:
                out[key] = head(grad_reverse(z, self.lambd))
        return out

    def head_logits(
        self, fused: Tensor, embeddings: dict[str, tuple[Tensor, Tensor]] | None = None
    ) -> dict[str, Tensor]:
        """Every head on the detached inputs: what the heads alone minimize in ``loss``.

        Used for head-only updates; no gradient reaches the representation.
        """
        heads = self._heads_with_inputs(fused, embeddings)
        return {key: head(z.detach()) for key, head, z in heads}

    def _heads_with_inputs(
        self, fused: Tensor, embeddings: dict[str, tuple[Tensor, Tensor]] | None
    ) -> Iterator[tuple[str, nn.Module, Tensor]]:
        """(key, head, its input) for every head whose input is given: the fused
        representation for "site", modality m's embedding for "m/site"."""
        inputs = {"": fused}
        for m, (emb, _) in (embeddings or {}).items():
            inputs[f"{m}/"] = emb
        for key, head in self.heads.items():
            prefix = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
            if prefix in inputs:
                yield key, head, inputs[prefix]

    def loss(
        self,
        predictions: dict[str, Tensor],
        confounds: dict[str, Tensor],
        present: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The adversary loss summed over heads, and each head's term (for logging).

        Args:
            predictions: the output of ``forward``.
            confounds: the batch's confounds; categorical (B,) int64 with -1 = unknown,
                continuous (B, K) float with NaN = unknown.
            present: modality -> (B,) bool; per-modality heads skip absent samples.
        """
        parts = {}
        for key, pred in predictions.items():
            name = key.removesuffix(_CONFUSION).rsplit("/", 1)[-1]
            if name not in confounds:
                raise KeyError(f"adversary head {key!r}: batch['confounds'] has no {name!r}")
            keep = _keep(key, pred, present)
            if key.endswith(_CONFUSION):
                parts[key] = self.lambd * _uniform_cross_entropy(pred[keep])
                continue
            parts[key] = self._term(self.kinds[name], pred[keep], confounds[name][keep])
        total = sum(parts.values(), torch.zeros((), device=_device_of(predictions)))
        return total, parts

    def _term(self, kind: str, pred: Tensor, target: Tensor) -> Tensor:
        if kind == "categorical":
            return _categorical_term(self.mode, pred, target)
        return _continuous_term(self.mode, pred, target)


def _uniform_cross_entropy(pred: Tensor) -> Tensor:
    """Cross-entropy of the head's posterior against the uniform distribution.

    Minimal (log K) exactly when every posterior is uniform: the head cannot tell.
    """
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    return -F.log_softmax(pred, dim=-1).mean()


def _categorical_term(mode: str, pred: Tensor, target: Tensor) -> Tensor:
    known = target >= 0
    if not known.any():  # cross_entropy over zero rows would be NaN
        return pred.sum() * 0.0
    if mode in ("adversarial", "confusion"):
        return F.cross_entropy(pred[known], target[known])
    onehot = F.one_hot(target[known], pred.shape[-1]).to(pred.dtype)
    return -squared_correlation(pred[known], onehot).mean()


def _continuous_term(mode: str, pred: Tensor, target: Tensor) -> Tensor:
    target = target.reshape(pred.shape).to(pred.dtype)
    known = torch.isfinite(target).all(dim=-1)
    if not known.any():
        return pred.sum() * 0.0
    if mode == "adversarial":
        return F.mse_loss(pred[known], target[known])
    return -squared_correlation(pred[known], target[known]).mean()


def squared_correlation(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Column-wise squared Pearson correlation; 0 for a column with no variance.

    Shapes:
        x, y: (N, K); output: (K,)
    """
    xc = x - x.mean(dim=0)
    yc = y - y.mean(dim=0)
    cov = (xc * yc).sum(dim=0)
    var = (xc.pow(2).sum(dim=0) * yc.pow(2).sum(dim=0)).clamp_min(eps)
    return cov.pow(2) / var


def build_adversary(
    cfg: AdversaryConfig, in_dim: int, n_classes: dict[str, int], modality_dims: dict[str, int]
) -> ConfoundAdversary | None:
    """The adversary described by ``cfg`` (None when disabled or nothing to predict)."""
    classes = {c: n_classes.get(c, 0) for c in cfg.confounds}
    classes = {c: k for c, k in classes.items() if k >= 2}  # one class: nothing to hide
    if not cfg.enabled or not (classes or cfg.continuous):
        return None
    dims = modality_dims if cfg.on_modalities else None
    return ConfoundAdversary(
        in_dim, classes, cfg.continuous, dims, cfg.hidden, cfg.mode, cfg.standardize
    )


def _keep(key: str, pred: Tensor, present: dict[str, Tensor] | None) -> Tensor:
    modality = key.split("/", 1)[0] if "/" in key else None
    if modality is None or present is None or modality not in present:
        return torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    return present[modality]


def _key(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


class Standardize(nn.Module):
    """Per-feature standardization without learned scale or shift.

    In training it uses the batch's mean and variance (gradients flow through
    them) and updates running estimates; in evaluation, or for a batch of one
    row, it uses the running estimates.

    Shapes:
        x: (B, D) -> (B, D)
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] < 2:
            return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)  # (D,)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps)


def _head(in_dim: int, hidden: int, out_dim: int, standardize: bool = False) -> nn.Module:
    layers: list[nn.Module] = [Standardize(in_dim)] if standardize else []
    if hidden <= 0:
        layers.append(nn.Linear(in_dim, out_dim))
    else:
        layers += [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def _device_of(predictions: dict[str, Tensor]) -> torch.device:
    return next(iter(predictions.values())).device if predictions else torch.device("cpu")
