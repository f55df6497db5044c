"""``clinfuse weights verify``: which weights are these, and do they still see ImageNet?"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from clinfuse.cli_options import add_command, option


def register(subparsers: argparse._SubParsersAction) -> None:
    weights = add_command(
        subparsers, "weights", None, doc="inspect pretrained image-backbone weights"
    )
    actions = weights.add_subparsers(dest="weights_command", metavar="ACTION")
    add_command(actions, "verify", _run_verify, [
        option("--model", default="efficientnet_lite0", help="timm model name"),
        option("--weights", default="package",
               help="package | hub | none | PATH (default: package)"),
        option("--image", default=None, help="PNG/JPEG/DICOM file (default: chelsea)"),
        option("--top", type=int, default=5, help="how many classes to print"),
    ])  # fmt: skip


def top_classes(
    model_name: str, weights: str, image: np.ndarray, k: int = 5
) -> tuple[Any, list[tuple[int, str, float]]]:
    """The weights info and the top-``k`` (index, name, probability) for ``image``.

    Args:
        image: (H, W) gray or (H, W, 3) RGB, uint8 or float in [0, 1].
    """
    import torch
    from timm.data import ImageNetInfo

    from clinfuse.encoders.weights import create_backbone

    model, info = create_backbone(model_name, weights, num_classes=1000)
    model.eval()
    with torch.no_grad():
        probs = model(_imagenet_input(model, image)).softmax(dim=-1)[0]  # (1000,)
    top = probs.topk(k)
    names = ImageNetInfo()
    rows = [
        (int(i), names.index_to_description(int(i)), float(p))
        for p, i in zip(top.values, top.indices, strict=True)
    ]
    return info, rows


def read_image(path: str | None) -> np.ndarray:
    """An image as an array; DICOM goes through ``clinfuse.datasets.dicom.DicomReader``."""
    if path is None:
        from skimage import data

        return data.chelsea()
    if Path(path).suffix.lower() in (".dcm", ".dicom", ""):
        return _read_dicom(path)
    from skimage import io

    return io.imread(path)


def _run_verify(args: argparse.Namespace) -> int:
    """print the checkpoint sha256 and the top-5 ImageNet classes for an image

    Load a timm backbone with its ImageNet head, print the checkpoint's sha256 and the
    five most likely ImageNet classes for an image (default: scikit-image's chelsea, a
    cat). A healthy load names cat classes.
    """
    from clinfuse.errors import NotFoundError

    if args.image is not None and not Path(args.image).is_file():
        raise NotFoundError("no such image file", args.image, "pass an existing --image")
    image = read_image(args.image)
    try:
        info, rows = top_classes(args.model, args.weights, image, args.top)
    except FileNotFoundError as err:  # --weights names no source and no existing file
        raise NotFoundError(
            str(err), args.weights, "pass package, hub, none or an existing checkpoint file"
        ) from err
    print(f"model    {args.model}")
    print(f"weights  {info.source} {info.path}".rstrip())
    print(f"sha256   {info.sha256}")
    print(f"image    {args.image or 'skimage.data.chelsea()'}")
    for rank, (index, name, prob) in enumerate(rows, start=1):
        print(f"{rank}. {index:4d} {prob:6.3f}  {name}")
    return 0


def _imagenet_input(model: Any, image: np.ndarray) -> Any:
    import torch
    import torch.nn.functional as F

    cfg = model.pretrained_cfg
    x = torch.as_tensor(_to_float_rgb(image)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    size = cfg.get("input_size", (3, 224, 224))[-2:]
    x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
    return (x - mean) / std


def _to_float_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {img.shape}")
    return np.ascontiguousarray(img[:, :, :3])


def _read_dicom(path: str) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the header's window (or percentiles), bright = dense."""
    from clinfuse.datasets.dicom import DicomReader

    return DicomReader(window="auto").read(path).to_unit()
