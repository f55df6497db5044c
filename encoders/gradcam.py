"""Grad-CAM heat maps for timm CNNs and the clinfuse image encoder.

Grad-CAM (Selvaraju et al., ICCV 2017): for feature maps ``A_k`` of a conv layer
and a class score ``y``, ``alpha_k = mean_ij dy/dA_k[i, j]`` and
``L = ReLU(sum_k alpha_k A_k)``, upsampled to the image and scaled to [0, 1].
The layer defaults to the model's last feature stage (timm ``feature_info``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ScoreFn = Callable[[Tensor], Tensor]


class GradCAM:
    """Heat maps from forward/backward hooks on one layer of ``model``.

    Args:
        model: maps images to scores, (B, K) logits or (B,) scores.
        layer: the module (or its dotted name in ``model``) whose output is used;
            default: the last stage in ``model.feature_info``.

    Shapes:
        images: (B, C, H, W) -> heat maps (B, H, W) in [0, 1]
    """

    def __init__(self, model: nn.Module, layer: nn.Module | str | None = None) -> None:
        self.model = model
        self.layer = _resolve_layer(model, layer)

    def __call__(self, images: Tensor, target: int | Tensor | None = None) -> Tensor:
        """Heat maps for class ``target`` (an int, a (B,) tensor, or None = top class)."""
        store: dict[str, Tensor] = {}
        handle = self.layer.register_forward_hook(_keep_output(store))
        try:
            with torch.enable_grad():
                x = images.detach().clone().requires_grad_(True)
                score = _select(self.model(x), target)  # (B,)
                (grads,) = torch.autograd.grad(score.sum(), store["act"])
        finally:
            handle.remove()
        return _cam(store["act"].detach(), grads, images.shape[-2:])


def encoder_grad_cam(encoder: nn.Module, images: Tensor, score_fn: ScoreFn) -> Tensor:
    """Grad-CAM for a ``TimmImageEncoder`` and a score over its embeddings.

    The feature cache is bypassed (a heat map needs the activations).

    Args:
        encoder: a ``TimmImageEncoder``.
        images: gray films in [0, 1].
        score_fn: embeddings (B, D) -> scores (B,), e.g. a risk head.

    Shapes:
        images: (B, 1, H, W) -> (B, H, W)
    """

    class _Scored(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x: Tensor) -> Tensor:
            return score_fn(self.encoder.embed_images(x, use_cache=False))

    return GradCAM(_Scored(), layer=_default_layer(encoder.backbone))(images)


def _resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, str):
        return model.get_submodule(layer)
    return _default_layer(model)


def _default_layer(model: nn.Module) -> nn.Module:
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(
            f"{type(model).__name__} has no feature_info; pass layer= (a module or its name)"
        )
    last = info[-1]
    name = last["module"] if isinstance(last, dict) else info.module_name()[-1]
    return model.get_submodule(name)


def _keep_output(store: dict[str, Tensor]) -> Callable[..., Any]:
    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        store["act"] = output

    return hook


def _select(scores: Tensor, target: int | Tensor | None) -> Tensor:
    if scores.dim() == 1:
        return scores
    if target is None:
        target = scores.argmax(dim=1)
    if isinstance(target, int):
        return scores[:, target]
    return scores.gather(1, target.view(-1, 1).to(scores.device)).squeeze(1)


def _cam(acts: Tensor, grads: Tensor, size: torch.Size) -> Tensor:
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    peak = cam.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
    return (cam / peak).squeeze(1)  # (B, H, W)
