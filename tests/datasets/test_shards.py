"""Each data-parallel worker's share of subjects: disjoint, balanced, padded, and for
training a new share every epoch, so every subject passes through every worker."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clinfuse.datasets.datamodule import CohortDataModule, DataConfig
from clinfuse.datasets.shards import (
    ShardedDataModule,
    block_assignment,
    epoch_length,
    per_worker_config,
    sample_blocks,
    shard_bounds,
)
from clinfuse.errors import InputError
from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.module import _gather_unique


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    return simulate_cohort(out, SimConfig(n_subjects=90, image_size=32, seed=5, progress=False))


def test_shards_are_contiguous_disjoint_and_balanced_by_samples() -> None:
    # Subject 3 has 5 samples, the others 1: a cut by subject count would be lopsided.
    ids = pl.Series("subject_id", [1, 2, 3, 3, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10])
    bounds = shard_bounds(ids, 3)
    assert bounds[0][0] == 1 and bounds[-1][1] == 10
    pairs = zip(bounds, bounds[1:], strict=False)
    assert all(hi + 1 == lo for (_, hi), (lo, _) in pairs)  # no gap, no overlap
    counts = [ids.is_between(lo, hi).sum() for lo, hi in bounds]
    assert sum(counts) == len(ids) and max(counts) - min(counts) <= 5  # one subject's samples
    assert shard_bounds(ids, 10)[-1] == (10, 10)  # one subject each at most
    with pytest.raises(ValueError, match="10 subject.*11 workers"):
        shard_bounds(ids, 11)


def _epoch(dm: ShardedDataModule, epoch: int) -> list[dict]:
    """The training batches of ``epoch``, as Lightning draws them (no Trainer here)."""
    dm.load_epoch(epoch)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_each_epoch_the_workers_split_the_train_split_and_take_the_same_steps(cohort) -> None:
    # Long sequences: the blocks' tensors come padded to different T, and batches mix blocks.
    cfg = per_worker_config(DataConfig(batch_size=8, image_size=32, max_steps=256), 2)
    full = CohortDataModule(cohort, DataConfig(batch_size=8, image_size=32, max_steps=256))
    full.setup("fit")
    local = next(iter(full.dataloader("train")))  # a batch of the first 8 samples, in order
    shards = [ShardedDataModule(cohort, cfg, full.spec, rank, 2) for rank in (0, 1)]
    for dm in shards:
        dm.setup("fit")
    train = set(full.split_samples("train")["subject_id"])
    for epoch in range(3):
        batches = [_epoch(dm, epoch) for dm in shards]
        mine = [set(dm.split_samples("train")["subject_id"]) for dm in shards]
        # Disjoint but for at most one subject cut by a block edge; together the split.
        assert len(mine[0] & mine[1]) <= 1 and mine[0] | mine[1] == train
        assert len(batches[0]) == len(batches[1])  # padded: the same number of steps
        seen = set().union(*(b["subject_id"].tolist() for t in batches for b in t))
        assert seen == train  # every sample trained on in every epoch
    # The same tensors as a local run's, whichever block a sample came from.
    rows = {}
    for batch in (b for t in batches for b in t):
        for i, subject in enumerate(batch["subject_id"].tolist()):
            n = int(batch["ts_length"][i])
            rows[subject] = (batch["ts_values"][i, :n], batch["ts_delta"][i, :n])
            assert not batch["ts_mask"][i, n:].any()
    for i, subject in enumerate(local["subject_id"].tolist()):
        n = int(local["ts_length"][i])
        torch.testing.assert_close(rows[subject][0], local["ts_values"][i, :n])
        torch.testing.assert_close(rows[subject][1], local["ts_delta"][i, :n])
    # The tuning split: a fixed contiguous range per worker, together the whole split.
    tuning = [set(dm.split_samples("tuning")["subject_id"]) for dm in shards]
    assert not tuning[0] & tuning[1] and max(tuning[0]) < min(tuning[1])
    assert tuning[0] | tuning[1] == set(full.split_samples("tuning")["subject_id"])
    assert len(list(shards[0].val_dataloader())) == len(list(shards[1].val_dataloader()))


def test_every_train_subject_passes_through_every_worker_and_pairings_change(cohort) -> None:
    # A fixed subject range per worker would keep each sample on one worker, among the
    # same part of the split, for the whole run.
    cfg = per_worker_config(DataConfig(batch_size=8, image_size=32, max_steps=8), 2)
    full = CohortDataModule(cohort, DataConfig(batch_size=8, image_size=32, max_steps=8))
    full.setup("fit")
    train = frozenset(full.split_samples("train")["subject_id"])
    dm = ShardedDataModule(cohort, cfg, full.spec, 0, 2)
    dm.setup("fit")
    shares = []
    for epoch in range(4):
        dm.load_epoch(epoch)
        shares.append(frozenset(dm.split_samples("train")["subject_id"]))
    for a, b in ((0, 1), (2, 3)):  # each cycle of two epochs covers the split on worker 0
        assert shares[a] | shares[b] == train
    assert len({shares[0], shares[2], train - shares[0], train - shares[2]}) == 4  # regrouped


def test_block_assignment_rotates_every_block_through_every_worker() -> None:
    for world in (1, 2, 3, 4):
        n_blocks = 8 * world
        for cycle in range(3):
            epochs = range(cycle * world, (cycle + 1) * world)
            held = [block_assignment(n_blocks, world, seed=0, epoch=e) for e in epochs]
            for shares in held:  # each epoch: a partition into equal shares
                assert sorted(b for share in shares for b in share) == list(range(n_blocks))
                assert {len(share) for share in shares} == {8}
            for rank in range(world):  # each cycle: every block once on every worker
                assert sorted(b for shares in held for b in shares[rank]) == list(range(n_blocks))


def test_blocks_pad_to_one_length_that_fits_every_share() -> None:
    for n, world in ((560, 2), (63, 1), (63, 2), (100, 3), (7, 2), (5, 5)):
        blocks = sample_blocks(n, world)
        assert [i for b in blocks for i in b] == list(range(n))  # contiguous, in order
        length = epoch_length(blocks, world)
        shares = [
            sum(len(blocks[b]) for b in share)
            for epoch in range(4 * world)
            for share in block_assignment(len(blocks), world, seed=1, epoch=epoch)
        ]
        assert max(shares) <= length < n / world + len(blocks) / world + 1
    assert sample_blocks(63, 1) == [range(63)]  # one worker: the split, no padding
    with pytest.raises(ValueError, match="3 sample.*4 workers"):
        sample_blocks(3, 4)


def test_one_worker_sees_the_batches_of_a_local_run(cohort) -> None:
    cfg = DataConfig(batch_size=8, image_size=32, max_steps=8)
    full = CohortDataModule(cohort, cfg)
    full.setup("fit")
    one = ShardedDataModule(cohort, cfg, full.spec, 0, 1)
    one.setup("fit")
    for a, b in zip(full.train_dataloader(), one.train_dataloader(), strict=True):
        torch.testing.assert_close(a["subject_id"], b["subject_id"])
        torch.testing.assert_close(a["ts_values"], b["ts_values"])


def test_a_global_batch_the_workers_cannot_share_is_refused() -> None:
    with pytest.raises(InputError, match="data.batch_size=30 is the global batch.*4 workers"):
        per_worker_config(DataConfig(batch_size=30), 4)


def _gather_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # Rank 1's shard is padded with a repeat of its first row (subject 20).
    keys = {0: [[10, 5], [11, 5]], 1: [[20, 5], [21, 5], [20, 5]]}[rank]
    rows = {
        "logit": torch.tensor([float(k[0]) for k in keys]),
        "label": torch.tensor([float(k[0] % 2) for k in keys]),
        "key": torch.tensor(keys),
    }
    merged = _gather_unique(rows)
    torch.save(merged, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and clinfuse: ~70 s on a loaded 2-core box
def test_validation_rows_are_gathered_from_every_worker_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        merged = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert merged["key"][:, 0].tolist() == [10, 11, 20, 21]  # every row once, by key
        torch.testing.assert_close(merged["logit"], torch.tensor([10.0, 11.0, 20.0, 21.0]))


def test_a_trainer_that_reloads_every_epoch_trains_each_epoch_on_its_blocks(
    cohort, tiny_run_config, tmp_path
) -> None:
    # What a worker's Trainer does (training.distributed): the train loader is rebuilt
    # every epoch and reads the blocks of trainer.current_epoch. Rank 0 of 2, alone.
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from clinfuse.training.module import RiskModule
    from clinfuse.training.run import fit_image_harmonization

    cfg = tiny_run_config(cohort, "optim.max_epochs=3")
    full = CohortDataModule(cohort, cfg.data)
    full.setup("fit")
    dm = ShardedDataModule(cohort, per_worker_config(cfg.data, 2), full.spec, 0, 2)
    seen: list[tuple[int, list[int], list[int]]] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                subjects = set(dm.split_samples("train")["subject_id"])
                assert set(batch["subject_id"].tolist()) <= subjects
                seen.append((trainer.current_epoch, dm.held_blocks, sorted(subjects)))

    trainer = L.Trainer(
        max_epochs=3, reload_dataloaders_every_n_epochs=1, callbacks=[Record()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    module = RiskModule.create(cfg.model, full.spec, cfg.optim, cfg.seed)
    fit_image_harmonization(module, full)  # the driver's ComBat fit, which workers load
    trainer.fit(module, datamodule=dm)
    n_blocks = len(dm._blocks)
    assert [epoch for epoch, _, _ in seen] == [0, 1, 2]
    for epoch, blocks, _ in seen:
        assert blocks == block_assignment(n_blocks, 2, cfg.data.split_seed, epoch)[0]
    assert seen[0][2] != seen[1][2]  # another share of subjects in the next epoch
