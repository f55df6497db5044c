"""Offline pretrained weights: strict loads, checksums, key remapping, ImageNet sanity."""

from __future__ import annotations

import hashlib

import pytest
import torch
from skimage import data

from clinfuse.cli import main as cli_main
from clinfuse.encoders.commands import top_classes
from clinfuse.encoders.weights import (
    WeightsMismatchError,
    create_backbone,
    map_by_order,
    package_checkpoint_path,
    read_checkpoint,
)

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def test_package_weights_load_strictly_in_order() -> None:
    model, info = create_backbone("efficientnet_lite0", "package", num_classes=1000)
    source = read_checkpoint(package_checkpoint_path())
    own = model.state_dict()
    assert len(source) == len(own) == 296
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), own.items(), strict=True):
        assert torch.equal(s_val, t_val), (s_key, t_key)
    assert info.source == "package"


def test_package_sha256_is_the_file_digest() -> None:
    _, info = create_backbone("efficientnet_lite0", "package")
    path = package_checkpoint_path()
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # torch-hub convention: the file name carries the digest's first 8 hex digits
    assert path.stem.endswith(info.sha256[:8])


def test_feature_extractor_drops_only_the_classifier() -> None:
    model, _ = create_backbone("efficientnet_lite0", "package", num_classes=0)
    source = read_checkpoint(package_checkpoint_path())
    assert torch.equal(model.conv_head.weight, source["_conv_head.weight"])
    assert not any(k.startswith("classifier.") for k in model.state_dict())


def test_package_weights_on_another_architecture_fail_clearly() -> None:
    with pytest.raises(WeightsMismatchError, match="cannot map by order"):
        create_backbone("resnet10t", "package")


def test_map_by_order_names_the_first_shape_mismatch() -> None:
    source = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    target = {"x": torch.zeros(3), "y": torch.zeros(4)}
    with pytest.raises(WeightsMismatchError, match=r"#1 'b'.*\(2, 2\).*'y'.*\(4,\)"):
        map_by_order(source, target)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_file_with_regex_remap(tmp_path, suffix: str) -> None:
    reference, _ = create_backbone("test_resnet", "none")
    state = {f"module.backbone.{k}": v for k, v in reference.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    _save(state, path)
    with pytest.raises(WeightsMismatchError, match="unexpected"):
        create_backbone("test_resnet", str(path))
    model, info = create_backbone("test_resnet", str(path), remap={r"^module\.backbone\.": ""})
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert info.source == "file"
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_with_callable_remap_and_wrapper(tmp_path) -> None:
    reference, _ = create_backbone("test_resnet", "none")
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"net.{k}": v for k, v in reference.state_dict().items()}}, path)
    model, _ = create_backbone("test_resnet", str(path), remap=lambda k: k.removeprefix("net."))
    assert torch.equal(model.conv1[0].weight, reference.conv1[0].weight)


def test_missing_checkpoint_path_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        create_backbone("test_resnet", "no_such.pth")


def test_chelsea_is_a_cat() -> None:
    _, rows = top_classes("efficientnet_lite0", "package", data.chelsea())
    assert rows[0][0] in CAT_CLASSES
    assert len(CAT_CLASSES & {r[0] for r in rows}) >= 3


def test_coffee_is_espresso_or_a_cup() -> None:
    _, rows = top_classes("efficientnet_lite0", "package", data.coffee())
    assert rows[0][0] in COFFEE_CLASSES
    assert {r[0] for r in rows} >= COFFEE_CLASSES


def test_weights_verify_command(capsys) -> None:
    assert cli_main(["weights", "verify"]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(package_checkpoint_path().read_bytes()).hexdigest()
    assert f"sha256   {digest}" in out
    assert "cat" in out.splitlines()[4]  # the first class line


def _save(state: dict[str, torch.Tensor], path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
