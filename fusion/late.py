"""Late fusion: one risk head per modality, logits combined over the present ones.

Late fusion is its own risk head, so it sets ``produces_logit = True`` and
returns the combined logit as ``(B, 1)``; the model takes ``fused[:, 0]`` as the
risk logit (see ``fusion/base.py``). The per-modality logits of the last forward
are kept in ``last_modality_logits`` for inspection and attribution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clinfuse.fusion.base import FusionModule, register_fusion
from clinfuse.fusion.gated import masked_softmax


class LateFusion(FusionModule):
    """Decision-level fusion.

    ``s_m = head_m(e_m)``; ``logit = sum_m w_m s_m`` over present modalities, with
    ``w_m = p_m / sum_k p_k`` ("mean") or ``w = softmax(a)`` renormalized over the
    present modalities ("learned", ``a`` a learned vector). A sample with no
    modality gets a learned prior logit (FusionModel starts it at the training log-odds).

    Args:
        in_dims: modality -> embedding width D_m.
        hidden: width of each head's hidden layer (0 = a linear head).
        weighting: "mean" or "learned".
        dropout: dropout before each head's output layer.

    Attributes:
        last_modality_logits: modality -> (B,) logits of the last forward (detached).

    Shapes:
        embeddings[m]: (B, D_m) and present (B,) bool
        output: (B, 1), the risk logit
    """

    produces_logit = True

    def __init__(
        self,
        in_dims: dict[str, int],
        hidden: int = 64,
        weighting: str = "mean",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if weighting not in ("mean", "learned"):
            raise ValueError(
                f"late fusion: weighting must be 'mean' or 'learned', got {weighting!r}"
            )
        if not in_dims:
            raise ValueError("late fusion needs at least one modality in in_dims")
        self.modalities = sorted(in_dims)
        self.weighting = weighting
        self.out_dim = 1
        self.heads = nn.ModuleDict({m: _head(in_dims[m], hidden, dropout) for m in self.modalities})
        self.weight_logits = nn.Parameter(torch.zeros(len(self.modalities)))
        self.weight_logits.requires_grad_(weighting == "learned")
        self.prior = nn.Parameter(torch.zeros(()))
        self.last_modality_logits: dict[str, Tensor] = {}

    def forward(
        self,
        embeddings: dict[str, tuple[Tensor, Tensor]],
        tokens: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> Tensor:
        present = torch.stack([embeddings[m][1] for m in self.modalities], dim=1)  # (B, M)
        logits = torch.stack(
            [self._modality_logit(m, *embeddings[m]) for m in self.modalities], dim=1
        )  # (B, M)
        self.last_modality_logits = {
            m: logits[:, i].detach() for i, m in enumerate(self.modalities)
        }
        weights = self.modality_weights(present)  # (B, M), rows sum to 1 or 0
        none = (~present.any(dim=1)).to(logits.dtype)  # (B,)
        return ((weights * logits).sum(dim=1) + none * self.prior).unsqueeze(-1)  # (B, 1)

    def modality_weights(self, present: Tensor) -> Tensor:
        """Combination weights over present modalities.

        Shapes:
            present: (B, M) bool; output: (B, M)
        """
        scores = self.weight_logits.expand(present.shape[0], -1)
        return masked_softmax(scores, present)

    def _modality_logit(self, modality: str, emb: Tensor, present: Tensor) -> Tensor:
        emb = torch.where(present.unsqueeze(-1), emb, torch.zeros_like(emb))
        return self.heads[modality](emb).squeeze(-1)  # (B,)


def _head(in_dim: int, hidden: int, dropout: float) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_dim, 1)
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
    )


@register_fusion("late")
def late(in_dims: dict[str, int], token_dims: dict[str, int] | None = None, **cfg) -> LateFusion:
    """Builds ``LateFusion``; it reads pooled embeddings only, so ``token_dims`` is ignored."""
    return LateFusion(in_dims, **cfg)
