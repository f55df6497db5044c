"""A gene x environment term: genes that change how much another modality's risk matters.

Some genes carry no risk of their own but change the effect of physiology (a modifier:
the same lactate trend is worse in carriers). A fused representation can hold such a
product only by learning two projections whose product it is, and both start at random:
measured on the strategies cohort, neither attention fusion nor explicit low-rank
cross-modal products gave the physiology x carrier interaction more than a tenth of the
weight the simulator plants (docs/benchmarks.md, "Where the default's AUROC goes").

This term states the interaction the genotype path already tests for
(``sgl_mlp.path_interaction``): the environment is the risk the other modality carries
alone, its auxiliary head's logit (trained by the auxiliary loss, detached here so the
term cannot move it), standardized; the modifier is a linear read, starting at zero, of
the standardized dosages of the genes the path kept for their interaction
(``gene_environment_input: dosages``, the default) or of the genotype embedding
(``embedding``). The risk logit gains::

    logit += (u . g + c) * (e - mean_e) / sd_e

so at initialization the model is unchanged, and since ``e`` is fixed the term is
linear in ``u`` and ``c``: the first step already moves them along the interaction, with
no random partner to align first. The term is zero for a sample without either
modality (absent, or dropped by modality dropout).

On the strategies cohort, a logistic fit of this form on the default model's held-out
parts (its logit, the vitals/labs auxiliary logit) lifted AUROC more with the
interaction gene's ten dosages than with the 64-wide embedding (0.859 -> 0.868 against
0.863): the embedding, trained for the main-effect genes, blurs the carrier.

Shapes:
    genotype input (B, D); environment logit (B,); both present (B,) bool -> (B,)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GENE_MODALITY = "genomics"
# Where ``FusionModel.encode`` puts the dosages the modifier reads, beside the tokens.
GENE_INPUT_KEY = "genomics/interaction"


class GeneEnvironment(nn.Module):
    """``m(g) * standardized(e)`` on the samples with both modalities, else 0.

    The modifier ``m(g)`` is ``u . g + c``, plus, with ``hidden > 0``, a one-layer
    ``v . tanh(W g + b)``: a carrier defined by a threshold on several markers is a step
    in a direction of ``g``, which a linear read only approximates. ``u``, ``c`` and ``v``
    start at zero (so does the term); ``W`` and ``b`` start at PyTorch's default, so the
    first steps already move ``v`` along random features of ``g`` and then ``W``.

    The environment's mean and standard deviation are those of the training batch in
    training mode (over the samples where the term applies) and a running estimate of
    them otherwise, as batch normalization keeps them.

    Args:
        gene_dim: width of the genotype input.
        hidden: width of the nonlinear read (0 = linear only).
        momentum: weight of the newest batch in the running estimate.
    """

    def __init__(self, gene_dim: int, hidden: int = 0, momentum: float = 0.05) -> None:
        super().__init__()
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        self.modifier = nn.Linear(gene_dim, 1)
        nn.init.zeros_(self.modifier.weight)
        nn.init.zeros_(self.modifier.bias)
        self.nonlinear: nn.Sequential | None = None
        if hidden > 0 and gene_dim > 0:
            out = nn.Linear(hidden, 1, bias=False)
            nn.init.zeros_(out.weight)
            self.nonlinear = nn.Sequential(nn.Linear(gene_dim, hidden), nn.Tanh(), out)
        self.momentum = momentum
        self.register_buffer("env_mean", torch.zeros(()))
        self.register_buffer("env_var", torch.ones(()))
        self.register_buffer("env_seen", torch.zeros((), dtype=torch.long))

    def standardize(self, env: Tensor, both: Tensor) -> Tensor:
        """The environment logit standardized; updates the running moments in training.

        Shapes:
            env: (B,); both: (B,) bool -> (B,)
        """
        env = env.detach()
        if self.training and int(both.sum()) > 1:
            sel = env[both]
            mean, var = sel.mean(), sel.var()
            with torch.no_grad():
                # The first batch sets the estimate; later ones move it.
                w = 1.0 if int(self.env_seen) == 0 else self.momentum
                self.env_mean.mul_(1 - w).add_(w * mean)
                self.env_var.mul_(1 - w).add_(w * var)
                self.env_seen.add_(1)
        else:
            mean, var = self.env_mean, self.env_var
        return (env - mean) / var.clamp_min(1e-6).sqrt()

    def forward(self, gene: Tensor, env: Tensor, both: Tensor) -> Tensor:
        term = self.modifier_score(gene) * self.standardize(env, both)  # (B,)
        return torch.where(both, term, torch.zeros_like(term))

    def modifier_score(self, gene: Tensor) -> Tensor:
        """How much each sample's genes scale the environment's effect (B,)."""
        score = self.modifier(gene)
        if self.nonlinear is not None:
            score = score + self.nonlinear(gene)
        return score.squeeze(-1)
