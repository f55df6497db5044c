"""Each data-parallel worker reads its own share of subjects, straight from the cohort.

A shard is a contiguous range of subject ids within one split, cut so the shards
of a split hold about the same number of samples. Contiguous ranges let the
subject-range readers (``samples.in_subject_range``) skip every other worker's
Parquet row groups, so a worker reads its share of events and genotypes, never the
cohort. Every worker computes the same cut from the samples index (labels,
subjects and splits: a few columns per label row), so no data travels between
processes.

DDP needs every worker to take the same number of steps: each worker's loader
pads its shard to the largest shard of the split by repeating its own samples
(as ``DistributedSampler`` pads). Validation predictions are gathered across
workers and de-duplicated on (subject_id, prediction_time), so the tuning AUROC is
the one of the whole tuning split (see ``training.module.RiskModule``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Sampler

from clinfuse.datasets.datamodule import (
    SPEC_FILE,
    CohortDataModule,
    DataConfig,
    collate,
    fit_spec,
    make_dataset,
    save_spec,
)
from clinfuse.datasets.images import ImageLoader
from clinfuse.datasets.samples import load_samples
from clinfuse.datasets.spec import DataSpec
from clinfuse.datasets.splits import subsample_train
from clinfuse.errors import InputError

FIT_SPLITS = ("train", "tuning")  # what a data-parallel fit reads


def run_samples(cohort_dir: str | Path, cfg: DataConfig) -> pl.DataFrame:
    """The samples index of a run (splits read or drawn, train subsampled as configured)."""
    samples = load_samples(cohort_dir, cfg.split_fractions, cfg.split_seed)
    return subsample_train(samples, cfg.label_fraction, cfg.split_seed)


def fit_run_spec(cohort_dir: str | Path, cfg: DataConfig, run_dir: str | Path) -> DataSpec:
    """Fits the DataSpec on the train split once and writes ``run_dir/data_spec.yaml``.

    The statistics are lazy aggregates over the train split; the workers read the
    file instead of fitting again.
    """
    samples = run_samples(cohort_dir, cfg)
    spec = fit_spec(cohort_dir, samples.filter(pl.col("split") == "train"), cfg)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_spec(spec, Path(run_dir) / SPEC_FILE)
    return spec


def shard_bounds(subject_ids: pl.Series, world_size: int) -> list[tuple[int, int]]:
    """Inclusive subject-id ranges ``(lo, hi)``, one per worker, of about equal sample counts.

    Args:
        subject_ids: the subject of every sample of one split (repeats allowed).
        world_size: the number of workers.

    Raises:
        ValueError: the split has fewer subjects than workers (a worker would have none).
    """
    counts = subject_ids.value_counts(name="n").sort(subject_ids.name)
    if counts.height < world_size:
        raise ValueError(f"{counts.height} subject(s) cannot be shared by {world_size} workers")
    ids = counts[subject_ids.name].to_numpy()
    ends = np.cumsum(counts["n"].to_numpy())  # samples up to and including each subject
    targets = ends[-1] * np.arange(1, world_size) / world_size
    cuts = list(np.searchsorted(ends, targets, side="left") + 1)  # first subject of the next
    for k in range(world_size - 1):  # at least one subject per shard
        low = cuts[k - 1] + 1 if k else 1
        cuts[k] = int(min(max(cuts[k], low), counts.height - (world_size - 1 - k)))
    starts, stops = [0, *cuts], [*cuts, counts.height]
    return [(int(ids[a]), int(ids[b - 1])) for a, b in zip(starts, stops, strict=True)]


def shard_of(samples: pl.DataFrame, rank: int, world_size: int) -> pl.DataFrame:
    """The samples of worker ``rank``: its contiguous range of subjects (``shard_bounds``)."""
    lo, hi = shard_bounds(samples["subject_id"], world_size)[rank]
    return samples.filter(pl.col("subject_id").is_between(lo, hi))


class PaddedShuffleSampler(Sampler[int]):
    """A shuffle of ``n`` local samples padded to ``length`` by repeating its start.

    The order is a function of (seed, epoch, rank) only, so a worker group
    restarted from a checkpoint sees the batches the uninterrupted one would have;
    rank 0 of one worker draws the order of ``datamodule.EpochShuffleSampler``.
    """

    def __init__(self, n: int, length: int, seed: int, rank: int) -> None:
        self.n, self.length, self.seed, self.rank, self.epoch = n, length, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        seed = self.seed * 100_003 + self.epoch + self.rank * 1_000_000_007
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        return iter(_padded(order, self.length).tolist())

    def __len__(self) -> int:
        return self.length


class PaddedSequentialSampler(Sampler[int]):
    """``0 .. n-1`` in order, then from 0 again until ``length`` indices."""

    def __init__(self, n: int, length: int) -> None:
        self.n, self.length = n, length

    def __iter__(self):
        return iter(_padded(torch.arange(self.n), self.length).tolist())

    def __len__(self) -> int:
        return self.length


def _padded(order: torch.Tensor, length: int) -> torch.Tensor:
    reps = -(-length // max(len(order), 1))
    return order.repeat(reps)[:length]


class ShardedDataModule(CohortDataModule):
    """Train and tuning loaders over one worker's share of subjects.

    Args:
        cohort_dir: the cohort, on storage every worker sees.
        cfg: the data config; ``batch_size`` is per worker here.
        spec: the run's DataSpec (fitted once, ``fit_run_spec``).
        rank, world_size: this worker and the number of workers.
        run_dir: the run directory (the image cache defaults to ``run_dir/image_cache``).
    """

    def __init__(
        self,
        cohort_dir: str | Path,
        cfg: DataConfig,
        spec: DataSpec,
        rank: int,
        world_size: int,
        run_dir: str | Path | None = None,
    ) -> None:
        super().__init__(cohort_dir, cfg, run_dir=run_dir, spec=spec)
        self.rank, self.world_size = rank, world_size
        self.lengths: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        index = run_samples(self.cohort_dir, self.cfg)
        loader = ImageLoader(self.spec.image_size, self._cache_dir())
        mine = []
        for split in FIT_SPLITS:
            rows = index.filter(pl.col("split") == split)
            sizes = [
                s["samples"] for s in split_shards(self.cohort_dir, rows, split, self.world_size)
            ]
            own = shard_of(rows, self.rank, self.world_size)
            self.datasets[split] = make_dataset(self.cohort_dir, own, self.spec, loader)
            self.lengths[split] = max(sizes)
            mine.append(own)
        self.samples = pl.concat(mine)

    def train_dataloader(self) -> DataLoader:
        n = len(self.datasets["train"])
        sampler = PaddedShuffleSampler(n, self.lengths["train"], self.cfg.split_seed, self.rank)
        return self._sharded_loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        n = len(self.datasets["tuning"])
        return self._sharded_loader("tuning", PaddedSequentialSampler(n, self.lengths["tuning"]))

    def _sharded_loader(self, split: str, sampler: Sampler[int]) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=collate,
            persistent_workers=self.cfg.num_workers > 0,
        )


def per_worker_config(cfg: DataConfig, world_size: int) -> DataConfig:
    """``cfg`` with ``batch_size`` split over the workers (the global batch stays the same).

    Raises:
        InputError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if cfg.batch_size % world_size:
        raise InputError(
            f"data.batch_size={cfg.batch_size} is the global batch and must be a multiple "
            f"of the {world_size} workers",
            fix=f"set data.batch_size to a multiple of {world_size}",
        )
    return dataclasses.replace(cfg, batch_size=cfg.batch_size // world_size)


def describe_shards(cohort_dir: str | Path, cfg: DataConfig, world_size: int) -> dict[str, Any]:
    """Subject ranges and sample counts of every worker, per fit split (for the run record)."""
    index = run_samples(cohort_dir, cfg)
    return {
        split: split_shards(cohort_dir, index.filter(pl.col("split") == split), split, world_size)
        for split in FIT_SPLITS
    }


def split_shards(
    cohort_dir: str | Path, rows: pl.DataFrame, split: str, world_size: int
) -> list[dict[str, Any]]:
    """``[{"subjects": [lo, hi], "samples": n}, ...]`` per worker for the samples of one split.

    Raises:
        InputError: naming the split, when it has fewer subjects than workers.
    """
    try:
        bounds = shard_bounds(rows["subject_id"], world_size)
    except ValueError as err:
        raise InputError(f"the {split} split: {err}", cohort_dir, "use fewer workers") from err
    sizes = [rows.filter(pl.col("subject_id").is_between(lo, hi)).height for lo, hi in bounds]
    return [{"subjects": [lo, hi], "samples": n} for (lo, hi), n in zip(bounds, sizes, strict=True)]
