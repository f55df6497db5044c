"""Gated fusion: per-modality gates computed from the embeddings, masked for missing ones.

After the Gated Multimodal Unit (Arevalo et al. 2017, "Gated Multimodal Units for
Information Fusion"): each modality is projected to a common width,
``h_m = tanh(W_m e_m)``, and a gate network reading all (masked) embeddings
weighs them, ``z = sum_m g_m h_m``. Gates of absent modalities are exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clinfuse.fusion.base import FusionModule, register_fusion


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; an all-False row gives all zeros.

    Shapes:
        scores, mask: (..., M); output: (..., M)
    """
    # A finite floor, not -inf: an all-masked row would give 0/0 = NaN in forward and backward.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * mask.to(scores.dtype)


class GatedFusion(FusionModule):
    """Gated fusion of pooled embeddings.

    ``h_m = tanh(W_m e_m)``, ``g = gate([e_1 p_1, p_1, ...])`` with sigmoid gates
    (each in (0, 1), independent) or a softmax over present modalities;
    ``z = sum_m g_m p_m h_m + (1 - any_m p_m) * z_null``.

    Args:
        in_dims: modality -> embedding width D_m.
        dim: width of the fused representation.
        gate: "sigmoid" or "softmax".
        dropout: dropout on the projected embeddings.

    Attributes:
        last_gates: modality -> (B,) gate values of the last forward (detached).

    Shapes:
        embeddings[m]: (B, D_m) and present (B,) bool
        output: (B, dim)
    """

    def __init__(
        self, in_dims: dict[str, int], dim: int = 128, gate: str = "sigmoid", dropout: float = 0.1
    ) -> None:
        super().__init__()
        if gate not in ("sigmoid", "softmax"):
            raise ValueError(f"gated fusion: gate must be 'sigmoid' or 'softmax', got {gate!r}")
        if not in_dims:
            raise ValueError("gated fusion needs at least one modality in in_dims")
        self.modalities = sorted(in_dims)
        self.gate_kind = gate
        self.out_dim = dim
        self.proj = nn.ModuleDict({m: nn.Linear(in_dims[m], dim) for m in self.modalities})
        width = sum(in_dims[m] + 1 for m in self.modalities)
        self.gate = nn.Linear(width, len(self.modalities))
        self.null = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        self.last_gates: dict[str, Tensor] = {}

    def forward(
        self,
        embeddings: dict[str, tuple[Tensor, Tensor]],
        tokens: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> Tensor:
        embs, present = self._masked_inputs(embeddings)
        hidden = torch.stack(
            [torch.tanh(self.proj[m](e)) for m, e in zip(self.modalities, embs, strict=True)], dim=1
        )  # (B, M, dim)
        gates = self._gates(embs, present)  # (B, M)
        self.last_gates = {m: gates[:, i].detach() for i, m in enumerate(self.modalities)}
        fused = (gates.unsqueeze(-1) * self.dropout(hidden)).sum(dim=1)  # (B, dim)
        none = ~present.any(dim=1, keepdim=True)  # (B, 1)
        return fused + none.to(fused.dtype) * self.null

    def _masked_inputs(
        self, embeddings: dict[str, tuple[Tensor, Tensor]]
    ) -> tuple[list[Tensor], Tensor]:
        embs, flags = [], []
        for m in self.modalities:
            emb, present = embeddings[m]
            embs.append(torch.where(present.unsqueeze(-1), emb, torch.zeros_like(emb)))
            flags.append(present)
        return embs, torch.stack(flags, dim=1)  # list of (B, D_m), (B, M) bool

    def _gates(self, embs: list[Tensor], present: Tensor) -> Tensor:
        flags = present.to(embs[0].dtype)
        inputs = torch.cat(
            [t for e, f in zip(embs, flags.unbind(1), strict=True) for t in (e, f[:, None])], -1
        )
        scores = self.gate(inputs)  # (B, M)
        if self.gate_kind == "softmax":
            return masked_softmax(scores, present)
        return torch.sigmoid(scores) * flags


@register_fusion("gated")
def gated(in_dims: dict[str, int], token_dims: dict[str, int] | None = None, **cfg) -> GatedFusion:
    """Builds ``GatedFusion``; it reads pooled embeddings only, so ``token_dims`` is ignored."""
    return GatedFusion(in_dims, **cfg)
