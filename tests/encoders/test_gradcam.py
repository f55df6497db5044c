"""Grad-CAM: the heat map lands on the evidence a trained model uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clinfuse.encoders.gradcam import GradCAM, encoder_grad_cam
from clinfuse.encoders.image import timm_image

SIZE = 64
RADIUS = 4.0  # blob sigma in pixels
NEAR = 10.0  # pixels around the blob centre counted as "on the blob"


def _blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Noise images; class 1 carries one bright Gaussian blob at a random place."""
    label = torch.rand(n, generator=gen) < 0.5
    cy = torch.randint(12, SIZE - 12, (n,), generator=gen).float()
    cx = torch.randint(12, SIZE - 12, (n,), generator=gen).float()
    d2 = _dist2(cy, cx)
    blob = 0.6 * torch.exp(-d2 / (2 * RADIUS**2)) * label[:, None, None]
    x = 0.3 + 0.1 * torch.rand(n, SIZE, SIZE, generator=gen) + blob
    return x[:, None].expand(-1, 3, -1, -1).clone(), label.long(), cy, cx


def _dist2(cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    grid = torch.arange(SIZE).float()
    return (grid[None, :, None] - cy[:, None, None]) ** 2 + (
        grid[None, None, :] - cx[:, None, None]
    ) ** 2


@pytest.fixture(scope="module")
def blob_model() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y, _, _ = _blobs(16, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _recalibrate_batchnorm(model, gen)
    return model.eval()


def _recalibrate_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Running BN statistics as a plain average over a few batches (few steps trained)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            model(_blobs(32, gen)[0])


def test_heat_map_mass_concentrates_on_the_blob(blob_model: torch.nn.Module) -> None:
    x, y, cy, cx = _blobs(32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (blob_model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.9  # the model really uses the blob
    pos = y == 1
    cam = GradCAM(blob_model, layer="layer2")(x[pos], target=1)  # (P, H, W)
    assert cam.shape == (int(pos.sum()), SIZE, SIZE)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0 + 1e-6
    near = _dist2(cy[pos], cx[pos]) <= NEAR**2  # (P, H, W)
    area = near.float().mean().item()  # ~0.077: the mass fraction of a uniform map
    frac = (cam * near).sum((1, 2)) / cam.sum((1, 2))
    assert frac.median().item() > 4 * area
    assert frac.min().item() > 2 * area


def test_heat_map_peak_is_near_the_blob(blob_model: torch.nn.Module) -> None:
    x, y, cy, cx = _blobs(32, torch.Generator().manual_seed(2))
    pos = y == 1
    cam = GradCAM(blob_model, layer="layer2")(x[pos], target=1)
    peak = cam.flatten(1).argmax(1)
    py, px = (peak // SIZE).float(), (peak % SIZE).float()
    dist = ((py - cy[pos]) ** 2 + (px - cx[pos]) ** 2).sqrt()
    assert (dist <= NEAR).float().mean().item() >= 0.8


def test_default_layer_is_last_stage(blob_model: torch.nn.Module) -> None:
    cam = GradCAM(blob_model)
    assert cam.layer is blob_model.layer4


def test_encoder_grad_cam_bypasses_cache(tmp_path) -> None:
    enc = timm_image(model_name="test_resnet", weights="none", embed_dim=8, augment=False)
    enc.config.cache_dir = str(tmp_path)  # frozen + cache: forward would skip the CNN
    enc.eval()
    images = torch.rand(2, 1, 32, 32)
    head = torch.nn.Linear(8, 1)
    cam = encoder_grad_cam(enc, images, lambda e: head(e).squeeze(1))
    assert cam.shape == (2, 32, 32)
    assert torch.isfinite(cam).all() and float(cam.max()) <= 1.0 + 1e-6
