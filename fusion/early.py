"""Early fusion: concatenate every modality's embedding and presence flag, then an MLP.

A missing modality contributes zeros plus a 0 flag, so the MLP can learn a
different use of the remaining inputs when one is absent (the "missing
indicator" approach common in clinical multimodal models).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clinfuse.fusion.base import FusionModule, register_fusion


class EarlyFusion(FusionModule):
    """Concatenation fusion.

    ``z = MLP([e_1 * p_1, p_1, ..., e_M * p_M, p_M])`` with ``p_m`` the 0/1
    presence flag of modality m.

    Args:
        in_dims: modality -> embedding width D_m.
        hidden: width of the hidden layer.
        out_dim: width of the fused representation.
        dropout: dropout after the hidden layer.

    Shapes:
        embeddings[m]: (B, D_m) and present (B,) bool
        output: (B, out_dim)
    """

    def __init__(
        self, in_dims: dict[str, int], hidden: int = 128, out_dim: int = 128, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if not in_dims:
            raise ValueError("early fusion needs at least one modality in in_dims")
        self.modalities = sorted(in_dims)
        self.out_dim = out_dim
        width = sum(in_dims[m] + 1 for m in self.modalities)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(
        self,
        embeddings: dict[str, tuple[Tensor, Tensor]],
        tokens: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> Tensor:
        parts = []
        for m in self.modalities:
            emb, present = embeddings[m]
            keep = present.unsqueeze(-1)  # (B, 1)
            # where(), not emb * flag: a non-finite embedding of an absent modality stays out
            parts += [torch.where(keep, emb, torch.zeros_like(emb)), keep.to(emb.dtype)]
        return self.mlp(torch.cat(parts, dim=-1))  # (B, out_dim)


@register_fusion("early")
def early(in_dims: dict[str, int], token_dims: dict[str, int] | None = None, **cfg) -> EarlyFusion:
    """Builds ``EarlyFusion``; it reads pooled embeddings only, so ``token_dims`` is ignored."""
    return EarlyFusion(in_dims, **cfg)
