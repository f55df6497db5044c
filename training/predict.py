"""Run a trained model over a DataLoader and gather everything evaluation needs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def collect_predictions(
    model: nn.Module, batches: Iterable[dict[str, Any]]
) -> dict[str, np.ndarray]:
    """Logits, labels, embeddings, presence flags and confounds for every sample.

    Returns:
        ``logit (N,)``, ``label (N,)``, ``fused (N, D)``, ``subject_id (N,)``,
        ``prediction_time (N,)``, ``site (N,)``, ``ancestry (N,)``, and for each
        modality the model encodes ``present_<modality> (N,)`` and
        ``embedding_<modality> (N, D_m)`` (the encoder's output, zero where absent).
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        out = model(batch)
        _append(parts, "logit", out["logit"])
        _append(parts, "fused", out["fused"])
        for name, (embedding, present) in out["embeddings"].items():
            _append(parts, f"present_{name}", present)
            _append(parts, f"embedding_{name}", embedding)
        for key in ("label", "subject_id", "prediction_time"):
            _append(parts, key, batch[key])
        for key, codes in batch["confounds"].items():
            _append(parts, key, codes)
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _append(parts: dict[str, list[np.ndarray]], key: str, value: torch.Tensor) -> None:
    parts.setdefault(key, []).append(
        value.detach().float().cpu().numpy()
        if value.is_floating_point()
        else value.detach().cpu().numpy()
    )
