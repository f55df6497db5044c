"""The timm image encoder: transfer modes, layer decay, grayscale, cache, augmentation."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders import create_encoder
from clinfuse.encoders.augment import AugmentConfig, ImageAugment
from clinfuse.encoders.image import TimmImageEncoder, timm_image

PX = 32


def _batch(b: int = 4, present: list[bool] | None = None, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    present = present if present is not None else [True] * b
    b = len(present)
    return {
        "image": torch.rand(b, 1, PX, PX, generator=gen),
        "image_present": torch.tensor(present),
        "image_age": torch.arange(b, dtype=torch.float32) * 6.0,
    }


def _bn_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.running_mean.clone()
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    }


def _encoder(**cfg) -> TimmImageEncoder:
    cfg.setdefault("embed_dim", 8)
    cfg.setdefault("augment", False)
    return timm_image(spec=DataSpec(image_size=PX), **cfg)


# ------------------------------------------------------------------ transfer modes
def test_frozen_backbone_gets_no_grad_and_keeps_bn_stats() -> None:
    enc = _encoder(transfer="frozen")
    before = _bn_stats(enc.backbone)
    enc.train()
    emb, _ = enc(_batch())
    emb.sum().backward()
    assert not enc.backbone.training
    assert all(p.grad is None and not p.requires_grad for p in enc.backbone.parameters())
    assert enc.proj.weight.grad is not None
    after = _bn_stats(enc.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bn_mode_trains_only_batchnorm_affine_and_adapts_stats() -> None:
    enc = _encoder(transfer="bn", bn_stats="update")
    bn_params = {
        id(p)
        for m in enc.backbone.modules()
        if isinstance(m, _BatchNorm)
        for p in m.parameters(recurse=False)
    }
    trainable = {id(p) for p in enc.backbone.parameters() if p.requires_grad}
    assert trainable == bn_params and len(bn_params) > 0
    before = _bn_stats(enc.backbone)
    enc.train()(_batch())
    after = _bn_stats(enc.backbone)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_partial_trains_last_groups_and_keeps_frozen_bn_still() -> None:
    enc = _encoder(transfer="partial", trainable_stages=2, bn_stats="update")
    named = dict(enc.backbone.named_parameters())
    top = {n for g in enc.depth_groups[-2:] for n in g}
    assert {n for n, p in named.items() if p.requires_grad} == top
    assert not named["conv_stem.weight"].requires_grad
    before = _bn_stats(enc.backbone)
    enc.train()(_batch())
    after = _bn_stats(enc.backbone)
    assert torch.equal(before["bn1"], after["bn1"])  # stem BN, frozen
    assert not torch.equal(before["bn2"], after["bn2"])  # head BN, trainable


@pytest.mark.parametrize("transfer", ["full", "bn", "partial"])
def test_frozen_bn_stats_keep_running_statistics_while_affine_params_learn(transfer: str) -> None:
    enc = _encoder(transfer=transfer, trainable_stages=2, drop_rate=0.0)  # bn_stats "frozen"
    before = _bn_stats(enc.backbone)
    enc.train()
    emb, _ = enc(_batch())
    emb.sum().backward()
    after = _bn_stats(enc.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)  # pretrained statistics
    assert enc.proj.training and not any(
        m.training for m in enc.backbone.modules() if isinstance(m, _BatchNorm)
    )
    head_bn = enc.backbone.bn2  # the last BatchNorm trains in all three modes
    assert head_bn.weight.requires_grad and head_bn.weight.grad is not None
    # Without augmentation or dropout, training and eval forwards agree: no batch statistics.
    enc.augment = None
    x = _batch(seed=1)
    train_out = enc(x)[0].detach()
    torch.testing.assert_close(enc.eval()(x)[0], train_out)


def test_bn_stats_auto_freezes_pretrained_statistics_only() -> None:
    from clinfuse.encoders.image import ImageEncoderConfig, resolved_bn_stats

    assert resolved_bn_stats(ImageEncoderConfig(weights="package")) == "frozen"
    assert resolved_bn_stats(ImageEncoderConfig(weights="none")) == "update"
    assert resolved_bn_stats(ImageEncoderConfig(weights="none", bn_stats="frozen")) == "frozen"
    scratch = _encoder(transfer="full", weights="none")
    before = _bn_stats(scratch.backbone)
    scratch.train()(_batch())
    after = _bn_stats(scratch.backbone)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # learns its statistics


def test_bn_stats_option_is_checked() -> None:
    with pytest.raises(ValueError, match="bn_stats"):
        _encoder(transfer="full", bn_stats="adapt")


def test_full_trains_everything() -> None:
    enc = _encoder(transfer="full")
    assert all(p.requires_grad for p in enc.parameters())


def test_gradual_unfreezing_adds_one_group_every_k_epochs() -> None:
    enc = _encoder(transfer="partial", trainable_stages=1, unfreeze_every=2)
    n_trainable = []
    for epoch in range(6):
        enc.on_epoch_start(epoch)
        n_trainable.append(sum(1 for g in enc.depth_groups if _group_trains(enc, g)))
    assert n_trainable == [1, 1, 2, 2, 3, 3]


def test_param_groups_hold_every_parameter_even_frozen_ones() -> None:
    enc = _encoder(transfer="partial", trainable_stages=1, unfreeze_every=1)
    groups = enc.param_groups(lr=1e-3, weight_decay=0.05)
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in enc.parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups if g["params"][0].ndim <= 1)


def test_layer_decay_lrs_increase_strictly_with_depth() -> None:
    enc = _encoder(transfer="full", layer_decay=0.7)
    groups = enc.param_groups(lr=1e-3, weight_decay=0.0)
    by_depth = {}
    for g in groups:
        by_depth[int(g["name"].removeprefix("image.depth"))] = g["lr"]
    lrs = [by_depth[d] for d in sorted(by_depth)]
    n = len(enc.depth_groups) + 1  # + projection head
    assert len(lrs) == n
    assert all(a < b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] == pytest.approx(1e-3)
    assert lrs[0] == pytest.approx(1e-3 * 0.7 ** (n - 1))


def _group_trains(enc: TimmImageEncoder, names: list[str]) -> bool:
    params = dict(enc.backbone.named_parameters())
    return all(params[n].requires_grad for n in names)


# ------------------------------------------------------------------------ grayscale
def test_fold_equals_replicate_with_channel_equal_normalization() -> None:
    """sum_c w_c * (g - m) / s = (sum_c w_c) * (g - m) / s when m, s are equal per channel."""
    images = torch.rand(3, 1, PX, PX, generator=torch.Generator().manual_seed(3))
    outs = {}
    for mode in ("replicate", "fold"):
        enc = _encoder(grayscale=mode, normalization="dataset", embed_dim=0).eval()
        enc.fit_normalization(images)
        with torch.no_grad():
            outs[mode] = enc({"image": images})[0]
    scale = outs["replicate"].abs().max()
    assert torch.allclose(outs["fold"], outs["replicate"], atol=1e-4 * float(scale), rtol=1e-4)


def test_fold_sums_first_conv_kernels() -> None:
    rgb = _encoder(grayscale="replicate")
    gray = _encoder(grayscale="fold")
    w = rgb.backbone.conv_stem.weight
    assert gray.backbone.conv_stem.weight.shape == (w.shape[0], 1, *w.shape[2:])
    assert torch.allclose(gray.backbone.conv_stem.weight, w.sum(1, keepdim=True))


def test_fold_with_imagenet_uses_luminance_stats() -> None:
    enc = _encoder(grayscale="fold", normalization="imagenet")
    luma = (0.299, 0.587, 0.114)
    mean = sum(w * m for w, m in zip(luma, (0.485, 0.456, 0.406), strict=True))
    std = sum(w * s for w, s in zip(luma, (0.229, 0.224, 0.225), strict=True))
    assert enc.norm_mean.tolist() == pytest.approx([mean])
    assert enc.norm_std.tolist() == pytest.approx([std])


def test_fit_normalization_matches_pixel_moments() -> None:
    images = torch.rand(5, 1, PX, PX, generator=torch.Generator().manual_seed(4)) ** 2
    present = torch.tensor([True, True, False, True, True])
    enc = _encoder(normalization="dataset")
    mean, std = enc.fit_normalization(images, present)
    kept = images[present].double()
    assert mean == pytest.approx(float(kept.mean()), abs=1e-9)
    assert std == pytest.approx(float(kept.std(unbiased=False)), abs=1e-9)
    assert enc.norm_mean.tolist() == pytest.approx([mean] * 3)


def test_dataset_normalization_must_be_fitted() -> None:
    enc = _encoder(normalization="dataset")
    with pytest.raises(RuntimeError, match="fit_normalization"):
        enc(_batch())


# ----------------------------------------------------------------- missing / tokens
def test_missing_images_give_finite_zero_embeddings() -> None:
    batch = _batch(present=[True, False, True, False])
    batch["image"][1] = float("nan")  # whatever sits in an absent slot must not leak
    enc = _encoder().eval()
    emb, present = enc(batch)
    assert torch.isfinite(emb).all()
    assert torch.equal(present, batch["image_present"])
    assert torch.equal(emb[~present], torch.zeros_like(emb[~present]))
    alone, _ = enc({"image": batch["image"][[0, 2]]})
    assert torch.allclose(emb[present], alone, atol=1e-5)


def test_all_missing_is_finite() -> None:
    enc = _encoder().train()
    emb, _ = enc(_batch(present=[False, False]))
    tokens, mask, _ = enc.forward_tokens(_batch(present=[False, False]))
    assert torch.isfinite(emb).all() and torch.isfinite(tokens).all() and not mask.any()


def test_tokens_are_feature_map_cells_with_image_age() -> None:
    enc = _encoder().eval()
    batch = _batch(present=[True, False, True])
    tokens, mask, age = enc.forward_tokens(batch)
    cells = (PX // 32) ** 2  # efficientnet_lite0 reduces 32x
    assert tokens.shape == (3, cells, 8) and mask.shape == age.shape == (3, cells)
    assert torch.equal(mask[:, 0], batch["image_present"])
    assert torch.equal(age[:, 0], batch["image_age"])
    tokens64, _, _ = enc.forward_tokens({"image": torch.rand(2, 1, 64, 64)})
    assert tokens64.shape[1] == 4


def test_registry_builds_and_backprops() -> None:
    enc = create_encoder("timm_image", spec=DataSpec(image_size=PX), embed_dim=8, transfer="bn")
    enc.train()
    emb, _ = enc(_batch())
    emb.pow(2).sum().backward()
    trainable = [p for p in enc.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="trnasfer"):
        timm_image(trnasfer="full")
    with pytest.raises(ValueError, match="transfer='thawed'"):
        timm_image(transfer="thawed")
    enc = _encoder()
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\)"):
        enc({"image": torch.rand(2, 3, PX, PX)})


# --------------------------------------------------------------------------- cache
def test_cache_skips_the_cnn_on_the_second_pass(tmp_path) -> None:
    calls = []
    enc = _encoder(transfer="frozen", cache_dir=str(tmp_path)).eval()
    enc.backbone.conv_stem.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    batch = _batch(present=[True, True, False, True])
    first, _ = enc(batch)
    assert calls == [3]  # one CNN pass over the 3 present images
    second, _ = enc(batch)
    assert calls == [3]  # all hits
    assert torch.allclose(first, second, atol=1e-6)
    assert len(enc._get_cache()) == 3

    again = _encoder(transfer="frozen", cache_dir=str(tmp_path)).eval()  # a new trial
    again.backbone.conv_stem.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    again.proj.load_state_dict(enc.proj.state_dict())
    third, _ = again(batch)
    assert calls == [3] and torch.allclose(first, third, atol=1e-6)

    batch["image"][0] += 0.01  # one changed image -> one miss
    enc(batch)
    assert calls == [3, 1]


def test_cache_key_depends_on_preprocessing(tmp_path) -> None:
    a = _encoder(transfer="frozen", cache_dir=str(tmp_path))
    b = _encoder(transfer="frozen", cache_dir=str(tmp_path), grayscale="fold")
    image = torch.rand(1, 1, PX, PX)
    assert a._get_cache().keys(image) != b._get_cache().keys(image)


def test_cached_tokens_match_uncached(tmp_path) -> None:
    batch = _batch(present=[True, True])
    plain = _encoder(transfer="frozen").eval()
    cached = _encoder(transfer="frozen", cache_dir=str(tmp_path)).eval()
    cached.proj.load_state_dict(plain.proj.state_dict())
    want, _, _ = plain.forward_tokens(batch)
    cached.forward_tokens(batch)
    got, _, _ = cached.forward_tokens(batch)
    assert cached._get_cache().hits >= 2
    assert torch.allclose(want, got, atol=1e-5)


def test_cache_is_unused_when_backbone_trains(tmp_path) -> None:
    enc = _encoder(transfer="bn", cache_dir=str(tmp_path))
    enc.train()(_batch())
    assert not any(tmp_path.iterdir())


# -------------------------------------------------------------------- augmentation
def test_augment_does_not_mutate_and_is_train_only() -> None:
    aug = ImageAugment()
    x = torch.rand(4, 1, PX, PX)
    copy = x.clone()
    out = aug.train()(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, copy)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert aug.eval()(x) is x


def test_augment_keeps_laterality_by_default() -> None:
    x = torch.zeros(64, 1, PX, PX)
    x[..., : PX // 2] = 0.8  # bright left half
    out = ImageAugment(AugmentConfig(noise_std=0.0)).train()(x, torch.Generator().manual_seed(1))
    left, right = out[..., : PX // 2].mean((1, 2, 3)), out[..., PX // 2 :].mean((1, 2, 3))
    assert (left > right).all()
    flipped = ImageAugment(AugmentConfig(noise_std=0.0, hflip=True)).train()(
        x, torch.Generator().manual_seed(1)
    )
    fl, fr = flipped[..., : PX // 2].mean((1, 2, 3)), flipped[..., PX // 2 :].mean((1, 2, 3))
    assert (fl < fr).any()  # flips do happen when asked


def test_encoder_augments_only_in_training() -> None:
    enc = _encoder(augment=True, drop_rate=0.0).eval()
    batch = _batch()
    a, _ = enc(batch)
    b, _ = enc(batch)
    assert torch.equal(a, b)
    enc.train()  # frozen backbone stays in eval; only the input changes
    c, _ = enc(batch)
    assert not torch.allclose(a, c)


def test_cache_treats_a_torn_file_as_a_miss(tmp_path) -> None:
    from clinfuse.encoders.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path, fingerprint="f")
    key = cache.keys(torch.rand(1, 1, 4, 4))[0]
    cache.put(key, {"pooled": torch.arange(3.0)})
    assert torch.equal(cache.get(key)["pooled"], torch.arange(3.0))
    path = cache._path(key)
    path.write_bytes(path.read_bytes()[:10])  # a reader racing a non-atomic writer
    assert cache.get(key) is None
    assert not list(tmp_path.glob("*/*.tmp"))  # atomic writes leave no temporaries


# ------------------------------------------------------------------ pooled feature sets
def _level_means(enc: TimmImageEncoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Global means of the feature maps at the modules timm's feature_info names,
    caught by forward hooks on a plain forward pass (not forward_intermediates)."""
    maps: list[torch.Tensor] = []
    modules = dict(enc.backbone.named_modules())
    hooks = [
        modules[info["module"]].register_forward_hook(lambda m, a, out: maps.append(out))
        for info in enc.backbone.feature_info
    ]
    try:
        with torch.no_grad():
            enc.backbone.forward_features(enc.preprocess(images))
    finally:
        for hook in hooks:
            hook.remove()
    return [m.mean(dim=(2, 3)) for m in maps]


def test_levels_pool_every_feature_level_and_levels_head_adds_the_head() -> None:
    images = _batch(b=3)["image"]
    head = _encoder().eval()
    levels = _encoder(features="levels").eval()
    both = _encoder(features="levels_head").eval()
    channels = [int(info["num_chs"]) for info in head.backbone.feature_info]
    assert channels == [16, 24, 40, 112, 320]  # efficientnet_lite0
    assert (head.num_features, levels.num_features, both.num_features) == (1280, 512, 1792)
    want = torch.cat(_level_means(levels, images), dim=1)  # (3, 512)
    got, _ = levels.frozen_features(images, want_tokens=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    head_pooled, _ = head.frozen_features(images, want_tokens=False)
    got_both, _ = both.frozen_features(images, want_tokens=False)
    torch.testing.assert_close(
        got_both, torch.cat([want, head_pooled], dim=1), atol=1e-5, rtol=1e-4
    )
    assert levels.proj.in_features == 512 and both.proj.in_features == 1792


def test_levels_keep_absent_images_at_zero_and_train_the_projection() -> None:
    batch = _batch(present=[True, False, True])
    enc = _encoder(features="levels").train()
    emb, present = enc(batch)
    assert torch.equal(emb[1], torch.zeros_like(emb[1]))
    emb.pow(2).sum().backward()
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.backbone.parameters())  # frozen


def test_levels_have_their_own_cache_key_and_no_tokens(tmp_path) -> None:
    head = _encoder(transfer="frozen", cache_dir=str(tmp_path))
    levels = _encoder(transfer="frozen", cache_dir=str(tmp_path), features="levels")
    assert head.cache_fingerprint() != levels.cache_fingerprint()
    with pytest.raises(ValueError, match="features='head'"):
        levels.forward_tokens(_batch())
    with pytest.raises(ValueError, match="features='pyramid'"):
        _encoder(features="pyramid")


def test_levels_with_cache_tokens_cache_the_pooled_vector(tmp_path) -> None:
    # clinfuse tune sets cache_tokens on every trial; a levels encoder has no tokens to
    # cache and must still run (a pooled-only fusion never asks for them).
    batch = _batch(present=[True, True, False])
    plain = _encoder(features="levels").eval()
    cached = _encoder(features="levels", cache_dir=str(tmp_path), cache_tokens=True).eval()
    cached.proj.load_state_dict(plain.proj.state_dict())
    want, _ = plain(batch)
    first, _ = cached(batch)
    second, _ = cached(batch)
    assert cached._get_cache().hits >= 2
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, want, atol=1e-5, rtol=1e-4)


def test_combat_maps_have_the_levels_width() -> None:
    spec = DataSpec(image_size=PX, sites=("A", "B"))
    enc = timm_image(spec=spec, embed_dim=8, augment=False, features="levels", harmonize="combat")
    assert enc.harm_scale.shape == enc.harm_shift.shape == (3, 512)
