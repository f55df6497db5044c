"""The fusion contract.

A fusion module takes ``{modality: (embedding (B, D_m), present (B,) bool)}``
(and, for token-level strategies, ``tokens={modality: (tokens (B, T, D_m),
mask (B, T) bool, age (B, T))}``) and returns the fused representation
``(B, D_fused)`` with ``out_dim`` = D_fused. A modality missing for a sample is
a mask, never an exception; the output stays finite when every modality of a
sample is missing.

Builders are registered with ``@register_fusion(name)`` and called as
``create_fusion(name, in_dims={modality: D_m}, token_dims={modality: D'_m}, **cfg)``;
``token_dims`` lists the encoders with their own ``forward_tokens`` (strategies
that read pooled embeddings only accept and ignore it).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from clinfuse.registry import Registry

FUSIONS = Registry("fusion")
register_fusion = FUSIONS.register


def create_fusion(name: str, **kwargs: Any) -> FusionModule:
    return FUSIONS.create(name, **kwargs)


def list_fusions() -> list[str]:
    return FUSIONS.names()


class FusionModule(nn.Module):
    """Base class. ``out_dim`` is the width of the fused representation.

    ``uses_tokens``: when True the model passes ``tokens=`` from each encoder's
    ``forward_tokens``.

    ``produces_logit``: when True the strategy is its own risk head (late fusion:
    per-modality logits combined over present modalities); it returns the risk
    logit as ``(B, 1)`` with ``out_dim == 1`` and the model uses ``fused[:, 0]``
    as the logit instead of stacking a head on top.
    """

    out_dim: int = 0
    uses_tokens: bool = False
    produces_logit: bool = False

    def forward(
        self,
        embeddings: dict[str, tuple[Tensor, Tensor]],
        tokens: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError
