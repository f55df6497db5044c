"""The image encoder: any timm CNN, pretrained offline, with transfer learning done right.

Grayscale films meet RGB-pretrained backbones in one of two ways:

* ``replicate``: the gray channel is copied to R, G and B (Gu & Lee 2024 found
  replication a strong default for medical transfer learning);
* ``fold``: the first convolution's RGB kernels are summed into one channel,
  ``w' = w_R + w_G + w_B``. With one mean/std for all channels this equals
  replication exactly; with ImageNet's per-channel statistics we normalize the
  gray input by the luminance-equivalent mean and std (Rec. 601 weights).

Transfer modes: ``frozen`` (backbone fixed and kept in eval mode, so BatchNorm
statistics never move; features can be cached on disk), ``bn`` (only BatchNorm
affine parameters train), ``partial`` (the last ``trainable_stages`` depth groups
train; optionally one more every ``unfreeze_every`` epochs, ULMFiT-style gradual
unfreezing) and ``full``.

``bn_stats`` says what the BatchNorm layers of a training backbone normalize with:
``frozen`` keeps them in eval mode, so they use the pretrained running statistics
while their affine parameters still train (FrozenBatchNorm, as detection and
segmentation fine-tuning do); ``update`` normalizes with batch statistics in
training and re-estimates the running ones; ``auto`` (the default) is ``frozen``
for pretrained weights and ``update`` for a backbone trained from scratch
(``weights: none``), whose running statistics are only their initial values.
Measured on 64 px simulated films (``benchmarks/bench_fusion.py --experiment
transfer``, 3,000 subjects): with ``update`` full fine-tuning fell below the frozen
backbone's linear probe (held-out AUROC 0.638 vs 0.706 at 25% of the labels), with
``frozen`` it rose above it (0.722). Normalizing with a batch's statistics moves
every layer's input away from what the pretrained weights expect from the first step.
``param_groups`` gives layer-wise learning-rate decay: the depth group ``i`` of
``n`` (stem first, projection head last) gets ``lr * layer_decay ** (n - 1 - i)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from clinfuse.config import from_dict
from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders.augment import AugmentConfig, ImageAugment
from clinfuse.encoders.base import ModalityEncoder, register_encoder
from clinfuse.encoders.embedding_cache import EmbeddingCache, settings_fingerprint
from clinfuse.encoders.harmonize import combat_affine
from clinfuse.encoders.weights import KeyRemap, create_backbone

TRANSFER_MODES = ("frozen", "bn", "partial", "full")
BN_STATS = ("auto", "frozen", "update")
GRAYSCALE_MODES = ("replicate", "fold")
FEATURE_SETS = ("head", "levels", "levels_head")
NORMALIZATIONS = ("imagenet", "dataset")
_LUMA = (0.299, 0.587, 0.114)  # Rec. 601 luminance weights of R, G, B


@dataclass
class ImageEncoderConfig:
    """Every option of the ``timm_image`` encoder, with its default.

    Attributes:
        model_name: any timm architecture name.
        weights: "package" (offline EfficientNet-Lite0), "hub" (timm download),
            "none", or a ``.pth``/``.safetensors`` path.
        weights_remap: ordered ``{regex: replacement}`` renaming checkpoint keys.
        transfer: "frozen", "bn", "partial" or "full".
        trainable_stages: depth groups (from the top) that train under "partial".
        unfreeze_every: under "partial", unfreeze one more group every k epochs (0 = never).
        bn_stats: "frozen" (BatchNorm uses the pretrained running statistics while
            training), "update" (batch statistics in training, running ones
            re-estimated) or "auto" ("update" when ``weights`` is "none", else
            "frozen"); only matters when part of the backbone trains.
        layer_decay: learning-rate factor per depth group (1 = same lr everywhere).
        grayscale: "replicate" or "fold".
        normalization: "imagenet" (the weights' statistics) or "dataset"
            (``fit_normalization`` on training images).
        features: what the pooled feature vector is: "head" (the backbone's own pooled
            output, ``forward_head(pre_logits=True)``), "levels" (the global average of
            the feature map at every level of timm's ``feature_info``, concatenated:
            fine and coarse scales, Head2Toe-style) or "levels_head" (both). Frozen
            ImageNet features of a small grayscale film carry more of it in the early
            levels than in the head (docs/benchmarks.md). Token fusion reads the final
            feature map's cells, so it needs "head".
        embed_dim: width of the linear projection after pooling (0 = none).
        drop_rate: dropout on the pooled features before the projection.
        drop_path_rate: stochastic depth inside the backbone (timm).
        augment: augment images in training mode.
        augment_config: augmentation strengths.
        cache_dir: directory for cached features of a frozen backbone ("" = off).
        cache_tokens: also cache spatial tokens (for attention fusion); only with
            ``features: head``, the one feature set that has them.
        harmonize: "none" or "combat": ComBat harmonization of the frozen backbone's
            features across sites (``encoders.harmonize``), fitted on the training
            split before training (``fit_harmonization``) and kept in the model; needs
            ``transfer: frozen``.
        standardize: with ``harmonize: combat``, also centre the harmonized features
            and scale them to unit variance with the training films' statistics
            (folded into the same per-site maps), so the projection starts from
            comparable inputs whatever each feature's raw range.
        clip: with ``standardize``, clamp every standardized feature to ``[-clip, clip]``
            (0 = no clamp): a unit nearly silent in training (a tiny training standard
            deviation) can otherwise put a held-out film thousands of deviations out.
        principal_axes: with ``harmonize: combat``, project the harmonized features onto
            the top ``k`` principal axes of the training films (centred on their mean)
            before dropout and the projection (0 = keep every feature). The projection
            then fits ``k x embed_dim`` weights instead of ``F x embed_dim`` from a few
            thousand labelled films; a feature that never varies in training gets no
            weight on any axis, so a value it takes only at test cannot move the
            embedding.
    """

    model_name: str = "efficientnet_lite0"
    weights: str = "package"
    weights_remap: dict[str, str] | None = None
    transfer: str = "frozen"
    trainable_stages: int = 1
    unfreeze_every: int = 0
    bn_stats: str = "auto"
    layer_decay: float = 0.7
    grayscale: str = "replicate"
    normalization: str = "imagenet"
    features: str = "head"
    embed_dim: int = 128
    drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    augment: bool = True
    augment_config: AugmentConfig = field(default_factory=AugmentConfig)
    cache_dir: str = ""
    cache_tokens: bool = False
    harmonize: str = "none"
    standardize: bool = False
    clip: float = 0.0
    principal_axes: int = 0


HARMONIZE_MODES = ("none", "combat")
# The buffers of the fitted ComBat maps, one row per site and one for an unknown site.
HARMONIZATION_MAPS = ("harm_scale", "harm_shift")


@register_encoder("timm_image")
def timm_image(
    spec: DataSpec | None = None, remap: KeyRemap | None = None, **cfg: Any
) -> TimmImageEncoder:
    """Builds a ``TimmImageEncoder`` from ``ImageEncoderConfig`` fields.

    Args:
        spec: the data spec (the image encoder needs nothing from it today).
        remap: a key-remapping callable for checkpoint files (overrides
            ``weights_remap``).
        **cfg: ``ImageEncoderConfig`` fields; unknown names raise ValueError.
    """
    config = from_dict(ImageEncoderConfig, cfg, path="timm_image")
    return TimmImageEncoder(config, spec=spec, remap=remap)


class TimmImageEncoder(ModalityEncoder):
    """A timm CNN over (B, 1, H, W) films -> pooled, projected embeddings.

    ``emb = W · pool(f(norm(aug(x)))) + b``; rows without an image get a zero
    embedding and ``present=False``, and the backbone runs only on present rows
    (absent zero images would otherwise skew BatchNorm batch statistics).

    Args:
        config: encoder options.
        spec: the data spec (unused; accepted for the registry contract).
        remap: key-remapping callable for checkpoint files.

    Shapes:
        batch["image"]: (B, 1, H, W) in [0, 1]; batch["image_present"]: (B,)
        forward -> emb (B, D), present (B,)
        forward_tokens -> tokens (B, h*w, D), mask (B, h*w), age (B, h*w)
    """

    modality = "image"

    def __init__(
        self,
        config: ImageEncoderConfig | None = None,
        spec: DataSpec | None = None,
        remap: KeyRemap | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = config or ImageEncoderConfig()
        _validate(cfg)
        self.backbone, self.weights_info = create_backbone(
            cfg.model_name,
            cfg.weights,
            remap=remap or cfg.weights_remap,
            drop_path_rate=cfg.drop_path_rate,
        )
        if cfg.grayscale == "fold":
            fold_first_conv(self.backbone)
        self._register_norm_buffers()
        self.num_features = _pooled_width(self.backbone, cfg.features)
        self._register_harmonization_buffers(spec)
        # What the projection reads: the pooled features, or their principal axes.
        self.input_width = cfg.principal_axes or self.num_features
        self.embed_dim = cfg.embed_dim or self.input_width
        self.dropout = nn.Dropout(cfg.drop_rate)
        self.proj = nn.Linear(self.input_width, cfg.embed_dim) if cfg.embed_dim else nn.Identity()
        self.augment = ImageAugment(cfg.augment_config) if cfg.augment else None
        self.depth_groups = _depth_groups(self.backbone)
        self.trainable_stages = cfg.trainable_stages
        self._cache: EmbeddingCache | None = None
        self._warn_augment_with_cache()
        self._apply_transfer()

    # ----------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        present, pooled, _ = self._batch_features(batch, want_tokens=False)  # (B,), (B, F)
        pooled, _ = self._harmonized(batch, pooled, None)
        emb = self.proj(self.dropout(pooled))  # (B, D)
        return emb * present.unsqueeze(1).to(emb.dtype), present

    def forward_tokens(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Spatial feature-map cells as tokens; every token's age is the image's age.

        Shapes:
            -> tokens (B, h*w, D), mask (B, h*w) bool, age (B, h*w)
        """
        return self.forward_with_tokens(batch)[2]

    def forward_with_tokens(
        self, batch: dict[str, Any]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The pooled embedding and the patch tokens from ONE backbone pass.

        Shapes:
            -> emb (B, D), present (B,), (tokens (B, h*w, D), mask (B, h*w), age (B, h*w))
        """
        present, pooled, tokens = self._batch_features(batch, want_tokens=True)  # (B, N, F)
        pooled, tokens = self._harmonized(batch, pooled, tokens)
        emb = self.proj(self.dropout(pooled)) * present.unsqueeze(1).to(pooled.dtype)  # (B, D)
        tokens = self.proj(self.dropout(tokens))  # (B, N, D)
        mask = present.unsqueeze(1).expand(-1, tokens.shape[1])  # (B, N)
        tokens = tokens * mask.unsqueeze(2).to(tokens.dtype)
        age = batch.get("image_age")
        age = torch.zeros_like(present, dtype=tokens.dtype) if age is None else age.to(tokens)
        return emb, present, (tokens, mask, age.unsqueeze(1).expand_as(mask))

    def embed_images(self, images: Tensor, use_cache: bool = True) -> Tensor:
        """Embeddings of images that are all present (no masking, no cache if asked).

        Shapes:
            images: (B, 1, H, W) -> (B, D)
        """
        pooled, _ = self._backbone_features(images, want_tokens=False, use_cache=use_cache)
        if self.config.harmonize != "none":  # no site given: the unknown-site map
            site = torch.full((images.shape[0],), -1, dtype=torch.long)
            pooled, _ = self._harmonized({"confounds": {"site": site}}, pooled, None)
        return self.proj(self.dropout(pooled))

    def preprocess(self, images: Tensor) -> Tensor:
        """Grayscale handling and normalization (no augmentation).

        Shapes:
            images: (B, 1, H, W) in [0, 1] -> (B, 3 or 1, H, W) normalized
        """
        if not bool(self.norm_fitted):
            raise RuntimeError(
                "normalization='dataset' needs fit_normalization(training images) "
                "before the first forward pass"
            )
        if self.config.grayscale == "replicate":
            images = images.expand(-1, 3, -1, -1)
        return (images - self.norm_mean.view(1, -1, 1, 1)) / self.norm_std.view(1, -1, 1, 1)

    # ---------------------------------------------------------- normalization
    @torch.no_grad()
    def fit_normalization(
        self, images: Tensor | Iterable[Tensor], present: Tensor | None = None
    ) -> tuple[float, float]:
        """Re-estimates the gray mean/std on training images (normalization="dataset").

        Args:
            images: a (N, 1, H, W) tensor or an iterable of such batches, in [0, 1].
            present: optional (N,) mask of real images (only with a tensor).

        Returns:
            The pixel mean and standard deviation now used by ``preprocess``.
        """
        if self.config.normalization != "dataset":
            raise ValueError("fit_normalization needs normalization='dataset'")
        if isinstance(images, Tensor):
            images = [images if present is None else images[present.bool()]]
        mean, std = _pixel_stats(images)
        self.norm_mean.fill_(mean)
        self.norm_std.fill_(std)
        self.norm_fitted.fill_(True)
        return mean, std

    def _register_norm_buffers(self) -> None:
        cfg = self.config
        in_ch = 1 if cfg.grayscale == "fold" else 3
        pcfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean = list(pcfg.get("mean", (0.485, 0.456, 0.406)))
        std = list(pcfg.get("std", (0.229, 0.224, 0.225)))
        if in_ch == 1:
            mean, std = [_luma(mean)], [_luma(std)]
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("norm_std", torch.tensor(std, dtype=torch.float32))
        fitted = torch.tensor(cfg.normalization == "imagenet")
        self.register_buffer("norm_fitted", fitted)

    # ---------------------------------------------------------- harmonization
    def _register_harmonization_buffers(self, spec: DataSpec | None) -> None:
        if self.config.harmonize == "none":
            return
        if spec is None:
            raise ValueError("timm_image: harmonize needs the DataSpec (its sites)")
        rows = len(spec.sites) + 1  # the last row: unknown or unseen site (identity)
        self.register_buffer("harm_scale", torch.ones(rows, self.num_features))
        self.register_buffer("harm_shift", torch.zeros(rows, self.num_features))
        self.register_buffer("harm_fitted", torch.tensor(False))
        if self.config.principal_axes:
            self.register_buffer(
                "harm_axes", torch.zeros(self.config.principal_axes, self.num_features)
            )

    @torch.no_grad()
    def fit_harmonization(
        self, features: np.ndarray, sites: np.ndarray, labels: np.ndarray
    ) -> dict[str, Any]:
        """Fits ComBat on training features (``encoders.harmonize.combat_affine``).

        Args:
            features: (N, F) frozen backbone features (``frozen_features``) of training
                samples with a film; sites: (N,) codes, -1 = unknown (left out);
                labels: (N,) outcome.

        Returns:
            The fit's summary (sites, samples, features left unchanged; with
            ``principal_axes``, the share of the harmonized training variance the axes keep).

        Raises:
            ValueError: fewer training films (or features) than ``principal_axes``.
        """
        if self.config.harmonize != "combat":
            raise ValueError("fit_harmonization needs harmonize='combat'")
        sites = np.asarray(sites)
        known = sites >= 0
        n_sites = self.harm_scale.shape[0] - 1
        x = np.asarray(features)[known]
        scale, shift, info = combat_affine(x, sites[known], np.asarray(labels)[known], n_sites)
        if self.config.standardize:
            scale, shift = _standardized_maps(x, sites[known], scale, shift)
            info = {**info, "standardized": True}
        maps = {"harm_scale": torch.as_tensor(scale), "harm_shift": torch.as_tensor(shift)}
        if self.config.principal_axes:
            axes, shift, kept = _principal_axes(
                x, sites[known], scale, shift, self.config.principal_axes
            )
            maps.update(harm_shift=torch.as_tensor(shift), harm_axes=torch.as_tensor(axes))
            info = {**info, "principal_axes": self.config.principal_axes, "variance_kept": kept}
        self.set_harmonization(maps)
        return info

    def _map_names(self) -> tuple[str, ...]:
        return HARMONIZATION_MAPS + (("harm_axes",) if self.config.principal_axes else ())

    def harmonization_maps(self) -> dict[str, Tensor]:
        """The per-site ComBat maps (copies): ``harm_scale`` and ``harm_shift``, (S + 1, F),
        and with ``principal_axes`` the axes ``harm_axes``, (k, F)."""
        return {k: getattr(self, k).detach().clone() for k in self._map_names()}

    @torch.no_grad()
    def set_harmonization(self, maps: dict[str, Tensor]) -> None:
        """Takes fitted ComBat maps (``harmonization_maps`` of a fitted encoder, or
        ``fit_harmonization``'s); the caller checks them against this encoder's shapes."""
        for key in self._map_names():
            target = getattr(self, key)
            target.copy_(torch.as_tensor(maps[key], dtype=target.dtype))
        self.harm_fitted.fill_(True)

    def _harmonized(
        self, batch: dict[str, Any], pooled: Tensor, tokens: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Pooled features (B, F) and tokens (B, N, F) with the site's ComBat map applied,
        then projected onto the principal axes when asked: (B, k) and (B, N, k).

        Rows without a film are masked after (their values here are the map's shift).
        """
        if self.config.harmonize == "none":
            return pooled, tokens
        if not bool(self.harm_fitted):
            raise RuntimeError(
                "timm_image: harmonize='combat' needs fit_harmonization(training features) "
                "before the first forward pass"
            )
        confounds = batch.get("confounds") or {}
        site = confounds.get("site")
        if site is None:
            raise ValueError("timm_image: harmonize needs batch['confounds']['site']")
        unknown = self.harm_scale.shape[0] - 1
        row = torch.where((site < 0) | (site >= unknown), unknown, site).long()  # (B,)
        scale, shift = self.harm_scale[row].to(pooled), self.harm_shift[row].to(pooled)
        pooled = pooled * scale + shift  # (B, F)
        if tokens is not None:
            tokens = tokens * scale.unsqueeze(1) + shift.unsqueeze(1)  # (B, N, F)
        if self.config.clip:
            pooled = pooled.clamp(-self.config.clip, self.config.clip)
            tokens = None if tokens is None else tokens.clamp(-self.config.clip, self.config.clip)
        if self.config.principal_axes:
            axes = self.harm_axes.to(pooled)  # (k, F)
            pooled = pooled @ axes.T  # (B, k)
            tokens = None if tokens is None else tokens @ axes.T  # (B, N, k)
        return pooled, tokens

    @torch.no_grad()
    def frozen_features(self, images: Tensor, want_tokens: bool) -> tuple[Tensor, Tensor | None]:
        """Backbone features of present images, through the embedding cache when active.

        What ``batch["image_pooled"]`` and ``batch["image_tokens"]`` carry.

        Shapes:
            images: (B, 1, H, W) -> pooled (B, F), tokens (B, N, F) or None
        """
        return self._backbone_features(images, want_tokens)

    # --------------------------------------------------------------- features
    def _batch_features(
        self, batch: dict[str, Any], want_tokens: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """present (B,), pooled (B, F), tokens (B, N, F): from the backbone, or given.

        A batch may carry the frozen backbone's output computed ahead (zeros where
        absent): ``image_pooled`` (B, F) and optionally ``image_tokens`` (B, N, F);
        then no ``image`` is needed.
        """
        if "image_pooled" not in batch:
            images, present = self._inputs(batch)
            return present, *self._present_features(images, present, want_tokens)
        tokens = batch.get("image_tokens")
        if want_tokens and tokens is None:
            raise ValueError("batch has image_pooled but no image_tokens; this fusion reads them")
        return batch["image_present"].bool(), batch["image_pooled"], tokens

    def _inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        images = batch["image"]
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(
                f"batch['image'] must be (B, 1, H, W) grayscale, got {tuple(images.shape)}"
            )
        present = batch.get("image_present")
        if present is None:
            present = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        if present.shape != images.shape[:1]:
            raise ValueError(
                f"batch['image_present'] has shape {tuple(present.shape)}; "
                f"expected ({images.shape[0]},) to match batch['image']"
            )
        return images, present.bool()

    def _present_features(
        self, images: Tensor, present: Tensor, want_tokens: bool
    ) -> tuple[Tensor, Tensor | None]:
        b = images.shape[0]
        idx = present.nonzero().squeeze(1)  # (P,)
        pooled = images.new_zeros(b, self.num_features)  # (B, F)
        if idx.numel() == 0:
            tokens = images.new_zeros(b, 1, self.num_features) if want_tokens else None
            return pooled, tokens
        sub_pooled, sub_tokens = self._backbone_features(images[idx], want_tokens)
        pooled = pooled.index_copy(0, idx, sub_pooled)
        if not want_tokens:
            return pooled, None
        tokens = images.new_zeros(b, *sub_tokens.shape[1:])  # (B, N, F)
        return pooled, tokens.index_copy(0, idx, sub_tokens)

    def _backbone_features(
        self, images: Tensor, want_tokens: bool, use_cache: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        if use_cache and self._cache_active():
            return self._cached_features(images, want_tokens)
        if self.augment is not None and not self._cache_active():
            images = self.augment(images)
        return self._run_backbone(images, want_tokens)

    def _run_backbone(self, images: Tensor, want_tokens: bool) -> tuple[Tensor, Tensor | None]:
        features = self.config.features
        if want_tokens and features != "head":
            raise ValueError(
                f"timm_image: features={features!r} pools several feature maps into one "
                "vector; a token fusion reads the final map's cells: use features='head'"
            )
        x = self.preprocess(images)
        if features == "head":
            fmap = self.backbone.forward_features(x)  # (B, F, h, w)
            pooled = self.backbone.forward_head(fmap, pre_logits=True)  # (B, F)
            return pooled, _as_tokens(fmap) if want_tokens else None
        fmap, levels = self.backbone.forward_intermediates(x)  # (B, F, h, w), [(B, C_l, h_l, w_l)]
        parts = [level.mean(dim=(2, 3)) for level in levels]  # [(B, C_l)]
        if features == "levels_head":
            parts.append(self.backbone.forward_head(fmap, pre_logits=True))
        return torch.cat(parts, dim=1), None  # (B, sum C_l [+ F])

    # ------------------------------------------------------------------ cache
    def _cache_active(self) -> bool:
        return bool(self.config.cache_dir) and self.config.transfer == "frozen"

    def _cached_features(self, images: Tensor, want_tokens: bool) -> tuple[Tensor, Tensor | None]:
        cache = self._get_cache()
        keys = cache.keys(images)
        # cache_tokens stores tokens beside the pooled vector when the feature set has them
        # (a pooled "levels" vector has none; a fusion that reads tokens is refused below).
        need = want_tokens or (self.config.cache_tokens and self.config.features == "head")
        found = [cache.get(k) for k in keys]
        miss = [i for i, v in enumerate(found) if v is None or (need and "tokens" not in v)]
        if miss:
            with torch.no_grad():
                pooled, tokens = self._run_backbone(images[miss], need)
            for j, i in enumerate(miss):
                entry = {"pooled": pooled[j]} | ({"tokens": tokens[j]} if need else {})
                cache.put(keys[i], entry)
                found[i] = entry
        pooled = torch.stack([v["pooled"] for v in found]).to(images)
        tokens = torch.stack([v["tokens"] for v in found]).to(images) if want_tokens else None
        return pooled, tokens

    def cache_fingerprint(self) -> str:
        """``settings_fingerprint`` of everything the frozen features depend on."""
        return settings_fingerprint(self._cache_settings())

    def _get_cache(self) -> EmbeddingCache:
        fingerprint = settings_fingerprint(self._cache_settings())
        if self._cache is None or self._cache.fingerprint != fingerprint:
            self._cache = EmbeddingCache(self.config.cache_dir, fingerprint)
        return self._cache

    def _cache_settings(self) -> dict[str, Any]:
        import timm

        return {
            "model_name": self.config.model_name,
            "weights_sha256": self.weights_info.sha256,
            "grayscale": self.config.grayscale,
            **({} if self.config.features == "head" else {"features": self.config.features}),
            "mean": [round(v, 8) for v in self.norm_mean.tolist()],
            "std": [round(v, 8) for v in self.norm_std.tolist()],
            "timm": timm.__version__,
        }

    def _warn_augment_with_cache(self) -> None:
        if self.augment is not None and self._cache_active():
            warnings.warn(
                "timm_image: cache_dir with a frozen backbone caches features of the "
                "un-augmented images; augmentation is skipped",
                stacklevel=3,
            )

    # --------------------------------------------------------------- transfer
    def train(self, mode: bool = True) -> TimmImageEncoder:
        super().train(mode)
        if mode:
            self._hold_frozen_in_eval()
        return self

    def on_epoch_start(self, epoch: int) -> None:
        """Gradual unfreezing: one more depth group every ``unfreeze_every`` epochs."""
        every = self.config.unfreeze_every
        if self.config.transfer != "partial" or every <= 0:
            return
        stages = min(len(self.depth_groups), self.config.trainable_stages + epoch // every)
        if stages != self.trainable_stages:
            self.trainable_stages = stages
            self._apply_transfer()

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups with layer-wise lr decay; every parameter is included
        (frozen ones too, so gradual unfreezing needs no new optimizer). Biases and
        norm parameters get no weight decay."""
        named = dict(self.named_parameters())
        groups = [[f"backbone.{n}" for n in g] for g in self.depth_groups]
        groups.append([n for n in named if not n.startswith("backbone.")])
        out: list[dict[str, Any]] = []
        for depth, names in enumerate(groups):
            group_lr = lr * self.config.layer_decay ** (len(groups) - 1 - depth)
            out += _split_decay([named[n] for n in names], group_lr, weight_decay, depth)
        return out

    def _apply_transfer(self) -> None:
        trainable = self._trainable_names()
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(name in trainable)
        self.train(self.training)

    def _trainable_names(self) -> set[str]:
        mode = self.config.transfer
        names = [n for g in self.depth_groups for n in g]
        if mode == "full":
            return set(names)
        if mode == "bn":
            return _batchnorm_param_names(self.backbone)
        if mode == "partial" and self.trainable_stages > 0:
            return {n for g in self.depth_groups[-self.trainable_stages :] for n in g}
        return set()

    def _hold_frozen_in_eval(self) -> None:
        if self.config.transfer == "frozen":
            self.backbone.eval()
            return
        hold_all = resolved_bn_stats(self.config) == "frozen"
        for module in self.backbone.modules():
            if isinstance(module, _BatchNorm) and (hold_all or not _trains(module)):
                module.eval()


def fold_first_conv(model: nn.Module) -> nn.Conv2d:
    """Sums the first convolution's RGB kernels into one input channel, in place.

    ``conv(replicate(g)) = sum_c w_c * g = (sum_c w_c) * g``, so the folded model on a
    gray image equals the RGB model on its 3-channel replicate.
    """
    name = (getattr(model, "pretrained_cfg", {}) or {}).get("first_conv") or _first_conv_name(model)
    conv = model.get_submodule(name)
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3 or conv.groups != 1:
        raise ValueError(f"cannot fold {name!r}: expected a 3-input-channel Conv2d, got {conv}")
    conv.weight = nn.Parameter(conv.weight.detach().sum(dim=1, keepdim=True))
    conv.in_channels = 1
    return conv


def resolved_bn_stats(cfg: ImageEncoderConfig) -> str:
    """``cfg.bn_stats`` with "auto" resolved: "update" from scratch, else "frozen"."""
    if cfg.bn_stats != "auto":
        return cfg.bn_stats
    return "update" if cfg.weights == "none" else "frozen"


def _validate(cfg: ImageEncoderConfig) -> None:
    for value, allowed, name in (
        (cfg.transfer, TRANSFER_MODES, "transfer"),
        (cfg.grayscale, GRAYSCALE_MODES, "grayscale"),
        (cfg.normalization, NORMALIZATIONS, "normalization"),
        (cfg.bn_stats, BN_STATS, "bn_stats"),
        (cfg.harmonize, HARMONIZE_MODES, "harmonize"),
        (cfg.features, FEATURE_SETS, "features"),
    ):
        if value not in allowed:
            raise ValueError(f"timm_image: {name}={value!r}; choose one of {allowed}")
    if not 0 < cfg.layer_decay <= 1:
        raise ValueError(f"timm_image: layer_decay must be in (0, 1], got {cfg.layer_decay}")
    if cfg.harmonize != "none" and cfg.transfer != "frozen":
        raise ValueError(
            f"timm_image: harmonize={cfg.harmonize!r} needs transfer='frozen' (ComBat is "
            f"fitted once on fixed features), got transfer={cfg.transfer!r}"
        )
    if cfg.standardize and cfg.harmonize != "combat":
        raise ValueError(
            "timm_image: standardize folds into the ComBat maps; it needs harmonize='combat'"
        )
    if cfg.clip < 0 or (cfg.clip and not cfg.standardize):
        raise ValueError(
            f"timm_image: clip bounds standardized features; it needs standardize=true and "
            f"clip >= 0, got clip={cfg.clip}"
        )
    if cfg.clip and cfg.principal_axes:
        raise ValueError("timm_image: clip and principal_axes cannot be combined; choose one")
    if cfg.principal_axes < 0:
        raise ValueError(f"timm_image: principal_axes must be >= 0, got {cfg.principal_axes}")
    if cfg.principal_axes and cfg.harmonize != "combat":
        raise ValueError(
            "timm_image: principal_axes are fitted with the ComBat maps; it needs "
            "harmonize='combat'"
        )
    if cfg.unfreeze_every and cfg.transfer != "partial":
        raise ValueError("timm_image: unfreeze_every needs transfer='partial'")
    if isinstance(cfg.augment_config, dict):
        cfg.augment_config = from_dict(AugmentConfig, cfg.augment_config, "augment_config")


def _standardized_maps(
    features: np.ndarray, sites: np.ndarray, scale: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """ComBat maps followed by a z-score with the harmonized training features' moments.

    ``x * scale[s] + shift[s]`` becomes ``(x * scale[s] + shift[s] - mean) / sd`` for
    every row, the unknown-site row included, so every site lands on the same scale.

    Shapes:
        features: (N, F); sites: (N,) codes into the maps' rows; scale, shift: (S + 1, F)
    """
    x = np.asarray(features, dtype=np.float64)
    harmonized = x * scale[sites] + shift[sites]  # (N, F)
    mean = harmonized.mean(axis=0)
    sd = harmonized.std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)  # a constant feature stays centred, unscaled
    return scale / sd, (shift - mean) / sd


def _principal_axes(
    features: np.ndarray, sites: np.ndarray, scale: np.ndarray, shift: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """The top ``k`` principal axes of the harmonized training features.

    The training mean moves into every row of the shift, so ``(x * scale[s] + shift[s])
    @ axes.T`` are the centred features' coordinates on the axes. Each axis is signed so
    that its largest loading is positive (the same axes from the same films, whatever
    the SVD routine returns).

    Shapes:
        features: (N, F); sites: (N,) codes into the maps' rows; scale, shift: (S + 1, F)
        -> axes (k, F), shift (S + 1, F), the share of the training variance kept
    """
    x = np.asarray(features, dtype=np.float64)
    n, f = x.shape
    if k > min(n, f):
        raise ValueError(
            f"principal_axes={k} needs at least {k} training films and features; "
            f"there are {n} films with {f} features"
        )
    harmonized = x * scale[sites] + shift[sites]  # (N, F)
    mean = harmonized.mean(axis=0)
    _, s, vt = np.linalg.svd(harmonized - mean, full_matrices=False)  # vt: (min(N, F), F)
    axes = vt[:k]
    top = np.abs(axes).argmax(axis=1)
    axes = axes * np.sign(axes[np.arange(k), top])[:, None]
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum() / total) if total > 0 else 1.0
    return axes, shift - mean, kept


def _pooled_width(backbone: nn.Module, features: str) -> int:
    """Width of the pooled feature vector of ``features`` (``ImageEncoderConfig``)."""
    head = int(backbone.num_features)
    if features == "head":
        return head
    if not hasattr(backbone, "forward_intermediates"):
        raise ValueError(
            f"timm_image: features={features!r} needs a timm model with "
            f"forward_intermediates; {type(backbone).__name__} has none: use features='head'"
        )
    levels = sum(int(info["num_chs"]) for info in backbone.feature_info)
    return levels + head if features == "levels_head" else levels


def _depth_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names by depth (stem first), from timm's coarse group matcher."""
    from timm.models import group_parameters

    names = [n for n, _ in model.named_parameters()]
    if not hasattr(model, "group_matcher"):
        return [names]
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    groups = [list(grouped[k]) for k in sorted(grouped)]
    seen = {n for g in groups for n in g}
    groups[-1] += [n for n in names if n not in seen]
    return groups


def _batchnorm_param_names(model: nn.Module) -> set[str]:
    out = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            prefix = f"{mod_name}." if mod_name else ""
            out |= {prefix + n for n, _ in module.named_parameters(recurse=False)}
    return out


def _trains(module: _BatchNorm) -> bool:
    return module.weight is not None and module.weight.requires_grad


def _split_decay(
    params: list[nn.Parameter], lr: float, weight_decay: float, depth: int
) -> list[dict[str, Any]]:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [(decay, weight_decay), (no_decay, 0.0)]
    return [
        {"params": ps, "lr": lr, "weight_decay": wd, "name": f"image.depth{depth}"}
        for ps, wd in groups
        if ps
    ]


def _as_tokens(fmap: Tensor) -> Tensor:
    if fmap.dim() == 4:  # (B, F, h, w) -> (B, h*w, F)
        return fmap.flatten(2).transpose(1, 2)
    return fmap  # already (B, N, F) (transformers)


def _pixel_stats(batches: Iterable[Tensor]) -> tuple[float, float]:
    total = total_sq = count = 0.0
    for x in batches:
        x = x.detach().to(torch.float64)
        total += float(x.sum())
        total_sq += float((x * x).sum())
        count += x.numel()
    if count == 0:
        raise ValueError("fit_normalization got no pixels")
    mean = total / count
    std = max(total_sq / count - mean * mean, 0.0) ** 0.5
    if std < 1e-6:
        raise ValueError(f"fit_normalization: pixel std is {std:.2e}; images are constant")
    return mean, std


def _luma(values: list[float]) -> float:
    return float(sum(w * v for w, v in zip(_LUMA, values, strict=True)))


def _first_conv_name(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise ValueError(f"{type(model).__name__} has no Conv2d to fold")
