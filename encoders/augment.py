"""Batched, tensor-only augmentation for grayscale films, active in training mode only.

One affine warp per image combines a random resized crop (area fraction in
``crop_scale``, square aspect) and a small rotation (``+-max_rotation`` degrees);
then gamma (``x ** g``, ``log g ~ U(-gamma, gamma)``), contrast around the image
mean (``c ~ U(1-contrast, 1+contrast)``) and Gaussian noise (``noise_std``).
Horizontal flips are off by default: chest films have a laterality (the heart is
on the patient's left), and a flipped film is not a plausible patient.

The input is never modified in place; in eval mode it is returned as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AugmentConfig:
    """Augmentation strengths (0 turns a step off)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    max_rotation: float = 7.0
    gamma: float = 0.15
    contrast: float = 0.15
    noise_std: float = 0.02
    hflip: bool = False


class ImageAugment(nn.Module):
    """Random crop/rotation/gamma/contrast/noise on a batch of images in [0, 1].

    Args:
        config: strengths; see ``AugmentConfig``.

    Shapes:
        x: (B, C, H, W) in [0, 1] -> (B, C, H, W) in [0, 1]
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        super().__init__()
        self.config = config or AugmentConfig()
        lo, hi = self.config.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.training:
            return x
        out = self._warp(x, generator)
        out = self._intensity(out, generator)
        return out.clamp(0.0, 1.0)

    def _warp(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        theta = self._affine(x.shape[0], x.device, gen)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _affine(self, b: int, device: torch.device, gen: torch.Generator | None) -> Tensor:
        cfg = self.config
        lo, hi = cfg.crop_scale
        side = _uniform(b, lo, hi, gen).sqrt()  # crop side as a fraction of the image side
        angle = _uniform(b, -cfg.max_rotation, cfg.max_rotation, gen) * math.pi / 180
        # The crop centre may move as far as keeps the (unrotated) crop inside the image.
        shift = (1 - side).unsqueeze(1) * _uniform(2 * b, -1, 1, gen).view(b, 2)  # (B, 2)
        cos, sin = angle.cos() * side, angle.sin() * side
        flip = self._flip_signs(b, gen)
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
                torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
            ],
            dim=1,
        )
        return theta.to(device)

    def _flip_signs(self, b: int, gen: torch.Generator | None) -> Tensor:
        if not self.config.hflip:
            return torch.ones(b)
        return torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)

    def _intensity(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        cfg = self.config
        b = x.shape[0]
        shape = (b,) + (1,) * (x.dim() - 1)
        gamma = _uniform(b, -cfg.gamma, cfg.gamma, gen).exp().view(shape).to(x)
        out = x.clamp(min=0.0) ** gamma
        contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen).view(shape).to(x)
        mean = out.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        out = (out - mean) * contrast + mean
        if cfg.noise_std > 0:
            noise = torch.randn(x.shape, generator=gen) * cfg.noise_std
            out = out + noise.to(x)
        return out


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)
