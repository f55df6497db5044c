"""Cohort directory -> DataSpec -> batches: Dataset, collate and LightningDataModule.

``setup`` reads the samples and their splits, fits the DataSpec on the training
split only (channel statistics, marker means, vocabularies, pos_weight), then
builds every tabular tensor of a split at once with the vectorized builders in
``events`` and ``samples``. Images are decoded lazily, once, through the
on-disk cache of ``images``. ``build_batch_tensors`` gives the same tensors for
any subset of samples under an existing spec (scoring streams chunks through it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from clinfuse.config import save_yaml
from clinfuse.datasets.batch import IMAGE_KEYS
from clinfuse.datasets.events import events_to_tensors
from clinfuse.datasets.images import ImageLoader
from clinfuse.datasets.meds.options import MedsOptions
from clinfuse.datasets.samples import (
    genotype_tensors,
    latest_images,
    load_samples,
    sample_tensors,
    scan_events,
    window_events,
)
from clinfuse.datasets.schema import GENOTYPES, MARKERS, SPLITS, as_cohort, has_table, scan
from clinfuse.datasets.spec import DataSpec
from clinfuse.datasets.splits import DEFAULT_FRACTIONS, subsample_train

SPEC_FILE = "data_spec.yaml"
UNGROUPED = "ungrouped"  # group of markers that markers.parquet does not list
_TS_SEQ = ("ts_values", "ts_mask", "ts_delta", "ts_time")  # keys with a T axis


@dataclass
class DataConfig:
    """How a cohort becomes batches.

    Attributes:
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        max_steps: time steps kept per sample (the latest ones).
        window_hours: events older than this before prediction_time are dropped.
        image_size: side of the square image tensor.
        split_seed: seed of the drawn split (when the cohort has no subject_splits).
        split_fractions: train, tuning, held_out shares of subjects.
        label_fraction: share of training subjects kept (learning curves).
        image_policy: which image per sample; "latest" at or before prediction_time.
        genotype_pcs: principal axes of the training dosages to store in the DataSpec
            (0 = none), for ancestry adjustment in the genotype encoder.
        cache_dir: decoded-image cache; None -> ``run_dir/image_cache`` or memory.
        meds: for a MEDS root, which codes become channels and subject metadata.
    """

    batch_size: int = 32
    num_workers: int = 0
    max_steps: int = 256
    window_hours: float = 72.0
    image_size: int = 128
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    label_fraction: float = 1.0
    image_policy: str = "latest"
    cache_dir: str | None = None
    genotype_pcs: int = 0
    meds: MedsOptions = field(default_factory=MedsOptions)

    def __post_init__(self) -> None:
        if self.image_policy != "latest":
            raise ValueError(f"image_policy {self.image_policy!r} unknown; supported: 'latest'")
        if self.max_steps < 1 or self.window_hours <= 0 or self.image_size < 1:
            raise ValueError(
                "max_steps, window_hours and image_size must be positive, got "
                f"{self.max_steps}, {self.window_hours}, {self.image_size}"
            )


# ----------------------------------------------------------------------------- spec


def fit_spec(cohort_dir: str | Path, train_samples: pl.DataFrame, cfg: DataConfig) -> DataSpec:
    """Fits sizes, vocabularies and statistics on the training samples only."""
    spec = DataSpec(
        image_size=cfg.image_size, max_steps=cfg.max_steps, window_hours=float(cfg.window_hours)
    )
    _fit_channels(spec, cohort_dir, train_samples)
    _fit_markers(spec, cohort_dir, train_samples, cfg.genotype_pcs)
    spec.sites = _vocabulary(train_samples["site"])
    spec.ancestries = _vocabulary(train_samples["ancestry"])
    positives = float(train_samples["label"].sum())
    negatives = train_samples.height - positives
    spec.pos_weight = negatives / positives if positives > 0 else 1.0
    return spec


def _fit_channels(spec: DataSpec, cohort_dir: str | Path, train: pl.DataFrame) -> None:
    """Channels: codes with numeric values in train windows; population mean and std."""
    events = scan_events(cohort_dir, train["subject_id"])
    stats = (
        window_events(events, train, spec.window_hours)
        .filter(pl.col("numeric_value").is_finite())  # null, NaN and inf never enter the statistics
        .group_by("code")
        .agg(
            pl.col("numeric_value").cast(pl.Float64).mean().alias("mean"),
            pl.col("numeric_value").cast(pl.Float64).std(ddof=0).alias("std"),
        )
        .sort("code")
        .collect()
    )
    std = stats["std"].fill_null(0.0).to_numpy()
    spec.channels = stats["code"].to_list()
    spec.channel_mean = [float(x) for x in stats["mean"].to_numpy()]
    spec.channel_std = [float(s) if s > 1e-8 else 1.0 for s in std]  # constant -> unscaled


def _fit_markers(
    spec: DataSpec, cohort_dir: str | Path, train: pl.DataFrame, n_pcs: int = 0
) -> None:
    """Markers in genotypes column order, their groups, train-split mean dosage and, when
    ``n_pcs`` > 0, the top principal axes of the standardized train dosages."""
    if not has_table(cohort_dir, GENOTYPES):
        return
    genotypes = scan(cohort_dir, GENOTYPES)
    spec.markers = [c for c in genotypes.collect_schema().names() if c != "subject_id"]
    group_of = _marker_groups(cohort_dir)
    names = [group_of.get(m, UNGROUPED) for m in spec.markers]
    spec.groups = sorted(set(names))
    spec.marker_groups = [spec.groups.index(g) for g in names]
    calls = genotype_tensors(genotypes, train.unique("subject_id"), spec.markers)
    called = calls["genotype_mask"].sum(0)
    mean = calls["genotype"].sum(0) / called.clamp(min=1)
    spec.marker_mean = [float(x) for x in mean]
    if n_pcs > 0:
        spec.marker_pcs = genotype_principal_axes(calls, mean, n_pcs)


def genotype_principal_axes(calls: dict, mean: torch.Tensor, k: int) -> list[list[float]]:
    """Top-``k`` right singular vectors of the standardized dosages of genotyped subjects.

    Dosages are centred by the train mean and scaled by the binomial s.d. (missing calls
    at 0), the input of Price et al. 2006 (EIGENSTRAT). Each axis's sign is fixed so its
    largest loading is positive (the same cohort always gives the same axes).

    Shapes:
        calls["genotype"], calls["genotype_mask"]: (N, M) -> k lists of M floats
    """
    from clinfuse.encoders.genomics import binomial_scale, standardize_genotype

    rows = calls["genotype_present"].bool()
    z = standardize_genotype(
        calls["genotype"][rows], calls["genotype_mask"][rows], mean, binomial_scale(mean)
    ).double()  # (N', M)
    k = min(k, *z.shape)
    if k <= 0:
        return []
    _, _, vt = torch.linalg.svd(z - z.mean(0), full_matrices=False)  # (min, M)
    axes = vt[:k]
    flip = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # (k, 1)
    return (axes * flip).tolist()


def _marker_groups(cohort_dir: str | Path) -> dict[str, str]:
    if not has_table(cohort_dir, MARKERS):
        return {}
    table = scan(cohort_dir, MARKERS).select("marker", "group").collect()
    return dict(zip(table["marker"].to_list(), table["group"].to_list(), strict=True))


def _vocabulary(values: pl.Series) -> list[str]:
    return sorted(values.drop_nulls().cast(pl.String).unique().to_list())


def save_spec(spec: DataSpec, path: str | Path) -> None:
    save_yaml(spec, path)


def load_spec(path: str | Path) -> DataSpec:
    from clinfuse.config import from_dict, load_yaml

    return from_dict(DataSpec, load_yaml(path))


# ---------------------------------------------------------------------------- tensors


def build_batch_tensors(
    cohort_dir: str | Path, samples: pl.DataFrame, spec: DataSpec, cfg: DataConfig
) -> dict[str, Any]:
    """The full batch dict (see ``batch``) for any ``samples`` under an existing spec.

    Images are decoded here (through ``cfg.cache_dir`` when set).

    Shapes:
        image (B, 1, S, S); ts_* (B, T, C) / (B, T) / (B,); genotype (B, M); label (B,).
    """
    batch = _tabular_tensors(cohort_dir, samples, spec)
    images = latest_images(cohort_dir, samples)
    loader = ImageLoader(spec.image_size, cfg.cache_dir)
    batch["image"], batch["image_present"] = loader.load_many(images["path"].to_list())
    batch["image_age"] = _image_age(images, batch["image_present"])
    return batch


def _tabular_tensors(cohort_dir: str | Path, samples: pl.DataFrame, spec: DataSpec) -> dict:
    """Everything but the image pixels, for every row of ``samples``."""
    events = scan_events(cohort_dir, samples["subject_id"])
    genotypes = scan(cohort_dir, GENOTYPES) if has_table(cohort_dir, GENOTYPES) else None
    batch = events_to_tensors(events, samples, spec)
    batch.update(genotype_tensors(genotypes, samples, spec.markers))
    batch.update(sample_tensors(samples, spec.sites, spec.ancestries))
    return batch


def _image_age(images: pl.DataFrame, present: Tensor) -> Tensor:
    age = torch.from_numpy(images["image_age"].fill_null(0.0).to_numpy().astype(np.float32))
    return torch.where(present, age, torch.zeros_like(age))


# ---------------------------------------------------------------------------- dataset


class CohortDataset(Dataset):
    """Samples of one split: precomputed tabular tensors, images loaded through the cache.

    Args:
        tensors: a batch dict without ``image``/``image_present`` (see ``batch``).
        image_paths: per sample, the DICOM path or None.
        loader: decodes and caches images.

    Attributes:
        images: False leaves the image keys out of every item, for a model without an
            image encoder (each item would otherwise read a film nothing looks at).
    """

    def __init__(
        self, tensors: dict[str, Any], image_paths: Sequence[str | None], loader: ImageLoader
    ) -> None:
        self.tensors = tensors
        self.image_paths = list(image_paths)
        self.loader = loader
        self.images = True

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {k: v[index] for k, v in self.tensors.items() if k != "confounds"}
        item["confounds"] = {k: v[index] for k, v in self.tensors["confounds"].items()}
        if not self.images:
            return {k: v for k, v in item.items() if k not in IMAGE_KEYS}
        image = self.loader.load(self.image_paths[index])
        size = self.loader.image_size
        item["image"] = image if image is not None else torch.zeros(1, size, size)
        item["image_present"] = torch.tensor(image is not None)
        item["image_age"] = item["image_age"] * item["image_present"]
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks samples into a batch, the T axis cut or zero-padded to the longest sequence (>= 1).

    Samples of different datasets (a data-parallel worker's blocks, ``datasets.shards``)
    may come padded to different T; steps past a sample's ``ts_length`` are zeros in
    every dataset, so the batch is the one a single dataset would give.
    """
    steps = max(1, *(int(it["ts_length"]) for it in items)) if "ts_length" in items[0] else None
    batch = {}
    for key in items[0]:
        if key == "confounds":
            continue
        parts = [it[key] for it in items]
        if steps is not None and key in _TS_SEQ:
            parts = [_to_steps(x, steps) for x in parts]
        batch[key] = torch.stack(parts)
    batch["confounds"] = {
        k: torch.stack([it["confounds"][k] for it in items]) for k in items[0]["confounds"]
    }
    return batch


def _to_steps(x: Tensor, steps: int) -> Tensor:
    """``x`` (T, ...) cut or zero-padded to (steps, ...)."""
    if x.shape[0] >= steps:
        return x[:steps]
    return torch.cat([x, x.new_zeros((steps - x.shape[0], *x.shape[1:]))])


def make_loader(
    cohort_dir: str | Path,
    samples: pl.DataFrame,
    spec: DataSpec,
    cfg: DataConfig,
    cache_dir: str | Path | None = None,
    images: bool = True,
) -> DataLoader:
    """An in-order DataLoader over ``samples`` under an existing spec (evaluation, scoring).

    ``images=False`` (a model without an image encoder) leaves the image keys out of
    every batch, so no film is read.
    """
    loader = ImageLoader(spec.image_size, cache_dir if cache_dir is not None else cfg.cache_dir)
    dataset = make_dataset(cohort_dir, samples, spec, loader)
    dataset.images = images
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=cfg.num_workers,
    )


def make_dataset(
    cohort_dir: str | Path, samples: pl.DataFrame, spec: DataSpec, loader: ImageLoader
) -> CohortDataset:
    """A CohortDataset for ``samples`` under ``spec``."""
    tensors = _tabular_tensors(cohort_dir, samples, spec)
    images = latest_images(cohort_dir, samples)
    tensors["image_age"] = torch.from_numpy(
        images["image_age"].fill_null(0.0).to_numpy().astype(np.float32)
    )
    return CohortDataset(tensors, images["path"].to_list(), loader)


# ------------------------------------------------------------------------- datamodule


class CohortDataModule(L.LightningDataModule):
    """Train / tuning / held_out loaders for a cohort directory.

    Args:
        cohort_dir: the cohort (see ``schema``).
        cfg: the data config.
        run_dir: where ``data_spec.yaml`` (and by default the image cache) goes.
        spec: an existing spec (fine-tuning, evaluation); None fits one on train.
    """

    def __init__(
        self,
        cohort_dir: str | Path,
        cfg: DataConfig | None = None,
        run_dir: str | Path | None = None,
        spec: DataSpec | None = None,
    ) -> None:
        super().__init__()
        self.cohort_dir = as_cohort(cohort_dir)
        self.cfg = cfg or DataConfig()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.spec = spec
        self.samples: pl.DataFrame | None = None
        self.datasets: dict[str, CohortDataset] = {}

    def prepare_data(self) -> None:
        """Nothing to convert: the cohort is read in place, images decode on first use."""

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        cfg = self.cfg
        samples = load_samples(self.cohort_dir, cfg.split_fractions, cfg.split_seed)
        self.samples = subsample_train(samples, cfg.label_fraction, cfg.split_seed)
        if self.spec is None:
            self.spec = fit_spec(self.cohort_dir, self._split("train"), cfg)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_spec(self.spec, self.run_dir / SPEC_FILE)
        loader = ImageLoader(self.spec.image_size, self._cache_dir())
        for split in SPLITS:
            self.datasets[split] = make_dataset(
                self.cohort_dir, self._split(split), self.spec, loader
            )

    def use_images(self, images: bool) -> None:
        """Whether batches carry the image keys; False for a model without an image
        encoder, which then never reads a film. Call after ``setup``."""
        for dataset in self.datasets.values():
            dataset.images = images

    def split_samples(self, split: str) -> pl.DataFrame:
        """The samples of ``split``, in dataset order."""
        return self._split(split)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["tuning"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["held_out"], shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Every sample, split by split in SPLITS order (see ``split_samples``)."""
        return self._loader(ConcatDataset([self.datasets[s] for s in SPLITS]), shuffle=False)

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        """The loader of any split, in dataset order unless ``shuffle``."""
        return self._loader(self.datasets[split], shuffle=shuffle)

    def _split(self, split: str) -> pl.DataFrame:
        if self.samples is None:
            raise RuntimeError("call setup() before reading splits")
        return self.samples.filter(pl.col("split") == split)

    def _cache_dir(self) -> Path | None:
        if self.cfg.cache_dir is not None:
            return Path(self.cfg.cache_dir)
        return self.run_dir / "image_cache" if self.run_dir is not None else None

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        sampler = EpochShuffleSampler(len(dataset), self.cfg.split_seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=collate,
            persistent_workers=self.cfg.num_workers > 0,
        )


class EpochShuffleSampler(Sampler[int]):
    """A shuffle whose order is a function of (seed, epoch) only.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a
    checkpoint sees exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def config_from_dict(data: dict[str, Any]) -> DataConfig:
    """A DataConfig from a plain mapping (YAML), with lists turned into tuples."""
    from clinfuse.config import from_dict

    cfg = from_dict(DataConfig, data)
    return dataclasses.replace(cfg, split_fractions=tuple(cfg.split_fractions))
