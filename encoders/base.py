"""The encoder contract.

Every encoder is an ``nn.Module`` that reads the batch dict and returns
``(embedding (B, D), present (B,) bool)``. Token-level encoders also implement
``forward_tokens -> (tokens (B, T, D), token_mask (B, T) bool, token_age (B, T))``
where ``token_age`` is hours before prediction_time (fusion uses it to tell a
fresh observation from a stale one). A modality missing for a sample is
``present=False`` with a finite embedding, never an exception.

Builders are registered with ``@register_encoder(name)`` and called as
``create_encoder(name, spec=DataSpec, **cfg)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from clinfuse.registry import Registry

ENCODERS = Registry("encoder")
register_encoder = ENCODERS.register


def create_encoder(name: str, **kwargs: Any) -> ModalityEncoder:
    """Builds a registered encoder, e.g. ``create_encoder("gru_d", spec=spec, hidden=64)``."""
    return ENCODERS.create(name, **kwargs)


def list_encoders() -> list[str]:
    return ENCODERS.names()


class ModalityEncoder(nn.Module):
    """Base class. Subclasses set ``modality`` and ``embed_dim`` and implement ``forward``.

    Attributes:
        modality: "image", "timeseries" or "genomics" (the key in fusion inputs).
        embed_dim: D, the width of the embedding.
    """

    modality: str = ""
    embed_dim: int = 0

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward_tokens(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Default: the pooled embedding as one token."""
        emb, present = self(batch)
        age = torch.zeros(emb.shape[0], 1, device=emb.device)
        return emb.unsqueeze(1), present.unsqueeze(1), age

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (encoders with discriminative LRs override)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

    def regularization_loss(self) -> Tensor:
        """An extra penalty added to the training loss (default: none)."""
        return torch.zeros((), device=_device(self))

    def after_optimizer_step(self, lr: float) -> None:
        """Hook for proximal updates (e.g. sparse-group-lasso) after each optimizer step."""

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for schedules such as gradual unfreezing."""


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
