"""Each data-parallel worker reads its own share of subjects, straight from the cohort.

Training split: the samples, in subject order, are cut into ``blocks_per_worker *
world_size`` contiguous blocks of equal size (±1 sample). Every epoch each worker
takes ``blocks_per_worker`` of them and reads only those (``block_assignment``): a
fresh seeded grouping of the blocks every ``world_size`` epochs, rotated across the
workers epoch by epoch, so within ``world_size`` epochs every block, and every
subject, passes through every worker, and the samples that share a worker (and a
global batch) change from epoch to epoch, as with ``DistributedSampler.set_epoch``.
A fixed subject range per worker, shuffled only locally, would draw every global
batch of the run half from each range, and each worker's batches from its own range
only (batches of one site, where subject ids follow the site).
Contiguous blocks keep the reads cheap: the subject-range readers
(``samples.in_subject_range``) skip every other block's Parquet row groups.

Tuning split: a fixed contiguous range of subjects per worker, cut so the ranges
hold about the same number of samples; validation predictions are gathered across
workers and de-duplicated on (subject_id, prediction_time), so the tuning AUROC is
the one of the whole tuning split (see ``training.module.RiskModule``).

Every worker computes the same cuts from the samples index (labels, subjects and
splits: a few columns per label row), so no data travels between processes. DDP
needs every worker to take the same number of steps: each worker's loader pads its
share to a length every worker knows in advance by repeating its own samples (as
``DistributedSampler`` pads); the training length is the same in every epoch, so
an epoch has the steps of a local run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

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

BLOCKS_PER_WORKER = 8  # training blocks each worker reads per epoch


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


def sample_blocks(n: int, world_size: int, per_worker: int = BLOCKS_PER_WORKER) -> list[range]:
    """Row ranges of ``n`` samples cut into ``world_size * k`` contiguous blocks (±1 sample).

    ``k`` is ``per_worker``, lowered when the split is too small for that many
    non-empty blocks; one worker reads the split as one block (its share never changes).

    Raises:
        ValueError: fewer samples than workers.
    """
    if n < world_size:
        raise ValueError(f"{n} sample(s) cannot be shared by {world_size} workers")
    k = max(1, min(per_worker, n // world_size)) if world_size > 1 else 1
    edges = np.linspace(0, n, world_size * k + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def block_assignment(n_blocks: int, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The blocks each worker reads in ``epoch``: ``out[rank]``, in block order.

    Epochs go in cycles of ``world_size``: each cycle draws a seeded grouping of the
    blocks into ``world_size`` equal groups, and epoch ``e`` gives group ``g`` to
    worker ``(g + e) % world_size``. Within a cycle every block visits every worker
    once; the grouping, hence which samples train side by side on one worker, is
    drawn afresh every cycle. A function of (seed, epoch) only: every worker, and a
    worker group restarted from a checkpoint, computes the same assignment.
    """
    cycle = epoch // world_size
    generator = torch.Generator().manual_seed(seed * 100_003 + cycle + 7_919)
    order = torch.randperm(n_blocks, generator=generator).tolist()
    out: list[list[int]] = [[] for _ in range(world_size)]
    for position, block in enumerate(order):
        out[(position + epoch) % world_size].append(block)
    return [sorted(blocks) for blocks in out]


def epoch_length(blocks: list[range], world_size: int) -> int:
    """Samples per worker and epoch, its share padded: the same for every worker and epoch.

    Blocks hold ``q`` or ``q + 1`` samples (``r`` of them the larger); a worker's
    ``k`` blocks then hold at most ``k * q + min(r, k)`` samples, which is the split
    itself for one worker.
    """
    sizes = [len(b) for b in blocks]
    k, q = len(blocks) // world_size, min(sizes)
    r = sum(size > q for size in sizes)
    return k * q + min(r, k)


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

    The training share changes every epoch (``block_assignment``): ``train_dataloader``
    reads the blocks of ``trainer.current_epoch`` (keeping those it already holds), so
    the Trainer must reload the train loader every epoch
    (``reload_dataloaders_every_n_epochs=1``; with one worker the share never changes).

    Args:
        cohort_dir: the cohort, on storage every worker sees.
        cfg: the data config; ``batch_size`` is per worker here.
        spec: the run's DataSpec (fitted once, ``fit_run_spec``).
        rank, world_size: this worker and the number of workers.
        run_dir: the run directory (the image cache defaults to ``run_dir/image_cache``).
        blocks_per_worker: training blocks each worker reads per epoch (``sample_blocks``).
    """

    def __init__(
        self,
        cohort_dir: str | Path,
        cfg: DataConfig,
        spec: DataSpec,
        rank: int,
        world_size: int,
        run_dir: str | Path | None = None,
        blocks_per_worker: int = BLOCKS_PER_WORKER,
    ) -> None:
        super().__init__(cohort_dir, cfg, run_dir=run_dir, spec=spec)
        self.rank, self.world_size = rank, world_size
        self.blocks_per_worker = blocks_per_worker
        self.lengths: dict[str, int] = {}
        self.epoch: int | None = None  # the epoch whose training share is loaded
        self._train_rows: pl.DataFrame | None = None
        self._blocks: list[range] = []
        self._held: dict[int, Any] = {}  # block -> its CohortDataset
        self._loader: ImageLoader | None = None
        self._tuning_rows: pl.DataFrame | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train_rows is not None:
            return
        index = run_samples(self.cohort_dir, self.cfg)
        self._loader = ImageLoader(self.spec.image_size, self._cache_dir())
        self._train_rows = index.filter(pl.col("split") == "train")
        self._blocks = train_blocks(
            self.cohort_dir, self._train_rows, self.world_size, self.blocks_per_worker
        )
        self.lengths["train"] = epoch_length(self._blocks, self.world_size)
        rows = index.filter(pl.col("split") == "tuning")
        sizes = [
            s["samples"] for s in split_shards(self.cohort_dir, rows, "tuning", self.world_size)
        ]
        own = shard_of(rows, self.rank, self.world_size)
        self.datasets["tuning"] = make_dataset(self.cohort_dir, own, self.spec, self._loader)
        self.lengths["tuning"] = max(sizes)
        self._tuning_rows = own
        self.load_epoch(0)

    def load_epoch(self, epoch: int) -> None:
        """Holds this worker's training blocks of ``epoch`` (reads only blocks it lacks)."""
        if epoch == self.epoch:
            return
        assert self._train_rows is not None and self._loader is not None
        mine = block_assignment(len(self._blocks), self.world_size, self.cfg.split_seed, epoch)
        mine = mine[self.rank]
        self._held = {b: d for b, d in self._held.items() if b in mine}  # free the others
        for b in mine:
            if b not in self._held:
                rows = self._train_rows[self._blocks[b].start : self._blocks[b].stop]
                self._held[b] = make_dataset(self.cohort_dir, rows, self.spec, self._loader)
        self.datasets["train"] = ConcatDataset([self._held[b] for b in mine])
        share = [self._train_rows[self._blocks[b].start : self._blocks[b].stop] for b in mine]
        self.samples = pl.concat([*share, self._tuning_rows])
        self.epoch = epoch

    @property
    def held_blocks(self) -> list[int]:
        """The training blocks of the loaded epoch (indices into ``sample_blocks``)."""
        return sorted(self._held)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:  # without one, the epoch loaded last (``load_epoch``)
            self.load_epoch(self.trainer.current_epoch)
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


def describe_shards(
    cohort_dir: str | Path, cfg: DataConfig, world_size: int,
    blocks_per_worker: int = BLOCKS_PER_WORKER,
) -> dict[str, Any]:  # fmt: skip
    """The run record's view of the shares: the training blocks (subject range, samples),
    how many each worker reads per epoch and its padded length, and the tuning range
    and sample count of every worker.

    Raises:
        InputError: naming the split, when it cannot give every worker a share.
    """
    index = run_samples(cohort_dir, cfg)
    train = index.filter(pl.col("split") == "train")
    blocks = train_blocks(cohort_dir, train, world_size, blocks_per_worker)
    ids = train["subject_id"]
    return {
        "train": {
            "blocks": [
                {"subjects": [int(ids[b.start]), int(ids[b.stop - 1])], "samples": len(b)}
                for b in blocks
            ],
            "blocks_per_worker": len(blocks) // world_size,
            "samples_per_worker_per_epoch": epoch_length(blocks, world_size),
            "assignment": "block_assignment(seed=data.split_seed, epoch)",
        },
        "tuning": split_shards(
            cohort_dir, index.filter(pl.col("split") == "tuning"), "tuning", world_size
        ),
    }


def train_blocks(
    cohort_dir: str | Path, rows: pl.DataFrame, world_size: int, per_worker: int
) -> list[range]:
    """``sample_blocks`` of the train split's ``rows``.

    Raises:
        InputError: naming the split, when it has fewer samples than workers.
    """
    try:
        return sample_blocks(rows.height, world_size, per_worker)
    except ValueError as err:
        raise InputError(f"the train split: {err}", cohort_dir, "use fewer workers") from err


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
