"""Data-parallel training on a Ray cluster: Ray Train's ``TorchTrainer`` around Lightning DDP.

The driver (``train_on_ray``) does what a local run does before and after the fit:
checks, ``config.yaml``, ``provenance.json``, the DataSpec fitted once on the train
split (``data_spec.yaml``), and at the end the best checkpoint, confound erasure,
calibration and the exported artifact (``training.run.finish_run``). The run
directory is a local run's, plus ``distributed.json`` (workers, shards, where
each worker group ran).

In between, ``TorchTrainer`` starts ``num_workers`` workers. Each builds the same
``RiskModule`` and the run's Lightning Trainer (``training.run.build_trainer``) with
Ray's ``RayDDPStrategy``, ``RayLightningEnvironment`` and ``RayTrainReportCallback``
and ``prepare_trainer``: gloo on CPU, NCCL on GPU. Each worker reads its own share
of train and tuning subjects from the cohort (``datasets.shards``); the driver
never ships data. The training share is a set of contiguous blocks that changes
every epoch, so every subject passes through every worker and global batches mix
the whole split. ``data.batch_size`` is the global batch: each worker takes
``batch_size / num_workers``, so an epoch has the steps of a local run.

A frozen image backbone's features go to the run's embedding cache
(``run_dir/embedding_cache``, or ``model.encoders.timm_image.cache_dir``), each
worker computing those of its own films during the first epoch: every film passes
through the CNN once for the whole cluster, in parallel, and the export pass and
later epochs read them.

Faults: every epoch ends with a checkpoint reported to Ray Train (stored under
``storage_path``); a worker or node that dies makes Ray Train restart the worker
group (``FailureConfig(max_failures)``) on the nodes left, from that checkpoint.
``resume=True`` after a driver stop reattaches to the same Ray Train run
(``distributed.json`` keeps its name), which continues from its latest checkpoint,
or from ``checkpoints/last.ckpt`` when Ray's storage has none.

What every node must see: the cohort, the run directory and ``storage_path`` at the
same paths (shared storage), and the same clinfuse installation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from clinfuse.config import from_dict, save_yaml, to_dict
from clinfuse.datasets.datamodule import SPEC_FILE, CohortDataModule, load_spec
from clinfuse.datasets.shards import (
    ShardedDataModule,
    describe_shards,
    fit_run_spec,
    per_worker_config,
)
from clinfuse.errors import InputError, config_errors
from clinfuse.integrity.checksums import cache_failures
from clinfuse.integrity.locks import output_lock
from clinfuse.training.config import RunConfig
from clinfuse.training.genotype_selection import choose_genotype_groups, wants_genotype_path
from clinfuse.training.module import RiskModule
from clinfuse.training.run import (
    build_trainer,
    finish_run,
    fit_image_harmonization,
    harmonizing_encoder,
    keep_earlier_metrics,
    prepare_run,
    write_json,
)

RECORD_FILE = "distributed.json"
STARTS_FILE = "logs/worker_group_starts.jsonl"  # one line per worker-group start (rank 0)
THROUGHPUT_FILE = "logs/worker_throughput.jsonl"  # one line per epoch (rank 0)
FIT_FILE = "logs/worker_fit.json"  # rank 0's best checkpoint and epochs
# ComBat maps of the image features, fitted on the driver over the whole train split.
HARMONIZATION_FILE = "harmonization.safetensors"
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayTrainOptions:
    """Where and how wide a data-parallel run goes.

    Attributes:
        address: the Ray cluster: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``.
        num_workers: DDP workers (processes), each with ``cpus_per_worker`` CPUs
            and ``gpus_per_worker`` GPUs.
        gpus_per_worker: 0 trains on CPU with gloo; > 0 on GPU with NCCL.
        storage_path: where Ray Train keeps checkpoints and run state (a shared
            directory or an object-store URI); None = ``RUN_DIR/ray``.
        max_failures: worker-group restarts after a failure (-1 = no limit).
        placement_strategy: Ray placement of the workers: PACK (fewest nodes) or
            SPREAD (one per node where possible), STRICT_PACK, STRICT_SPREAD.
    """

    address: str
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage_path: str | None = None
    max_failures: int = 3
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise InputError(f"--num-workers must be at least 1, got {self.num_workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise InputError(
                f"--gpus-per-worker ({self.gpus_per_worker}) must be >= 0 and CPUs per worker "
                f"({self.cpus_per_worker}) > 0"
            )
        if self.placement_strategy not in PLACEMENTS:
            raise InputError(
                f"placement strategy {self.placement_strategy!r} unknown; one of {PLACEMENTS}"
            )


def train_on_ray(
    cfg: RunConfig, run_dir: str | Path, opts: RayTrainOptions, resume: bool = False
) -> dict[str, Any]:
    """Trains on a Ray cluster with ``opts.num_workers`` DDP workers; returns the run summary.

    Raises:
        InputError: a bad config or cohort, a global batch the workers cannot share,
            a split with fewer subjects than workers; nothing was trained.
        PreflightError: the cluster does not answer, or a node cannot read the
            cohort or write the run directory or storage path; nothing was written.
        RuntimeError: the workers failed more than ``opts.max_failures`` times.
        LockHeldError: another process is writing ``run_dir``.
    """
    with output_lock(run_dir):
        return _train_on_ray(cfg, Path(run_dir).resolve(), opts, resume)


def _train_on_ray(cfg: RunConfig, run: Path, opts: RayTrainOptions, resume: bool) -> dict[str, Any]:
    failed_before = cache_failures()
    record = _read_record(run) if resume else {}
    per_worker_config(cfg.data, opts.num_workers)  # the global batch must split evenly
    storage = opts.storage_path or str(run / "ray")
    preflight_cluster(cfg, run, opts, storage)  # before anything is written
    prepare_run(cfg, run)
    shards = describe_shards(cfg.cohort, cfg.data, opts.num_workers)
    spec = fit_run_spec(cfg.cohort, cfg.data, run)

    @functools.cache
    def whole_cohort() -> CohortDataModule:
        """The cohort on the driver, built once for what must see every training subject
        (the genotype path, ComBat); released before the workers start."""
        dm = CohortDataModule(cfg.cohort, cfg.data, run_dir=run, spec=spec)
        dm.setup("fit")
        return dm

    with config_errors(run / "config.yaml", "fix the model.* and optim.* settings"):
        genotype_path = _choose_genotype_groups(cfg, run, whole_cohort)  # before workers build
        # A bad model config fails here, not on a worker; ComBat is fitted into this one.
        module = RiskModule.create(cfg.model, spec, cfg.optim, cfg.seed)
    harmonization = _fit_harmonization_on_driver(run, module, whole_cohort, resume)
    whole_cohort.cache_clear()
    name = record.get("ray_run_name") or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    record = {
        "ray_run_name": name,
        "storage_path": storage,
        "options": dataclasses.asdict(opts),
        "shards": shards,
    }
    write_json(run / RECORD_FILE, record)
    _fit_on_workers(cfg, run, opts, name, storage, resume)

    fit = {**json.loads((run / FIT_FILE).read_text()), **harmonization}
    dm = CohortDataModule(cfg.cohort, cfg.data, run_dir=run, spec=spec)
    dm.setup("fit")
    module = RiskModule.create(cfg.model, spec, cfg.optim, cfg.seed)
    summary = finish_run(
        cfg, run, module, dm, fit, failed_before, _weights_saver(module, fit), genotype_path
    )
    record["worker_group_starts"] = worker_group_starts(run)
    write_json(run / RECORD_FILE, record)
    return summary


def _fit_harmonization_on_driver(
    run: Path, module: RiskModule, whole_cohort: Callable[[], CohortDataModule], resume: bool
) -> dict[str, Any]:
    """ComBat on the whole training split's frozen image features, on the driver, when
    the image encoder asks for it (``timm_image.harmonize: combat``).

    The workers each read a share of the subjects, so none of them could fit it; the
    driver fits it once (``training.run.fit_image_harmonization``, as a local run does)
    and writes the maps to ``harmonization.safetensors``, which every worker loads
    before its first epoch. A resumed run keeps the file it has.

    Returns:
        ``{"harmonization": summary}`` for summary.json, or ``{}`` when not asked for.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    encoder = harmonizing_encoder(module)
    if encoder is None:
        return {}
    path = run / HARMONIZATION_FILE
    if resume and path.is_file():
        with safe_open(str(path), "pt") as f:
            kept = (f.metadata() or {}).get("harmonization")
        if kept is not None:
            return {"harmonization": json.loads(kept)}
    info = fit_image_harmonization(module, whole_cohort())
    tmp = path.with_suffix(".tmp")
    metadata = {"harmonization": json.dumps(info["harmonization"])}
    save_file(encoder.harmonization_maps(), str(tmp), metadata=metadata)
    tmp.replace(path)
    return info


def load_harmonization(module: RiskModule, run: Path) -> None:
    """Sets the image encoder's ComBat maps from the driver's ``harmonization.safetensors``
    (a worker, before its first epoch); a no-op when the encoder does not harmonize.

    Raises:
        InputError: the file is missing, unreadable, or does not fit the encoder (its
            shapes or non-finite values), named with its path.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    encoder = harmonizing_encoder(module)
    if encoder is None:
        return
    path = run / HARMONIZATION_FILE
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise InputError(f"{path}: the driver's ComBat maps cannot be read ({err})") from err
    for key, target in encoder.harmonization_maps().items():
        value = tensors.get(key)
        if value is None or value.shape != target.shape or not bool(value.isfinite().all()):
            raise InputError(
                f"{path}: {key} must be finite with shape {tuple(target.shape)} (got "
                f"{None if value is None else tuple(value.shape)}); delete the file and "
                f"train again"
            )
    encoder.set_harmonization(tensors)


def _choose_genotype_groups(
    cfg: RunConfig, run: Path, whole_cohort: Callable[[], CohortDataModule]
) -> dict[str, Any] | None:
    """The genotype path on the driver (``training.genotype_selection``), when the config
    asks for it; the workers then build the encoder from the chosen ``keep_groups``."""
    if not wants_genotype_path(cfg.model.encoders):
        return None
    path = choose_genotype_groups(cfg.model.encoders, whole_cohort(), run)
    save_yaml(cfg, run / "config.yaml")  # now with the chosen keep_groups
    return path


def preflight_cluster(cfg: RunConfig, run: Path, opts: RayTrainOptions, storage: str) -> None:
    """Joins the cluster and checks, on every node a worker may land on, what the workers
    will need (``tune.preflight``, as sweeps and scoring do): the cohort's Parquet
    files and a sample of its images read, and the run directory and a local
    ``storage`` seen and written as the driver sees them.

    Raises:
        PreflightError: the cluster does not answer at ``opts.address``, no node can
            hold a worker, or a node lacks a path; one line each, naming node and path.
    """
    from clinfuse.tune.preflight import TRAINING, connect, preflight

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    connect(opts.address)
    if not cfg.cohort:  # prepare_run says what is missing
        return
    shared = [str(run)] + ([] if "://" in storage else [storage])
    preflight(
        cfg.cohort, shared, cfg.data.image_size, opts.cpus_per_worker, opts.gpus_per_worker,
        cluster=True, needs_images="timm_image" in cfg.model.encoders, work=TRAINING,
    )  # fmt: skip


def _fit_on_workers(
    cfg: RunConfig, run: Path, opts: RayTrainOptions, name: str, storage: str, resume: bool
) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = opts.gpus_per_worker > 0
    resources = {"CPU": opts.cpus_per_worker, **({"GPU": opts.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "run_dir": str(run),
            "resume": resume,
            "use_gpu": use_gpu,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=opts.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=opts.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(
            f"{run}: data-parallel training failed after {opts.max_failures} restart(s): "
            f"{str(err).strip().splitlines()[-1]}; continue with --resume"
        ) from err


def _worker_loop(config: dict[str, Any]) -> None:
    """One DDP worker: its shard of subjects, the run's Trainer under Ray's strategy, fit."""
    import ray.train
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    cfg, run = from_dict(RunConfig, config["cfg"]), Path(config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    spec = load_spec(run / SPEC_FILE)
    data = per_worker_config(cfg.data, world)
    dm = ShardedDataModule(cfg.cohort, data, spec, rank, world, run_dir=run)
    module = RiskModule.create(cfg.model, spec, cfg.optim, cfg.seed)
    load_harmonization(module, run)
    reported = ray.train.get_checkpoint()
    last = run / "checkpoints" / "last.ckpt"
    source = "ray" if reported else "last.ckpt" if config["resume"] and last.is_file() else None
    trainer, checkpoint = build_trainer(
        cfg,
        run,
        [
            WorkerGroupRecord(run / STARTS_FILE, source),
            ThroughputRecord(run / THROUGHPUT_FILE),
            RayTrainReportCallback(),
        ],
        strategy=RayDDPStrategy(find_unused_parameters=True),
        plugins=[RayLightningEnvironment()],
        accelerator="gpu" if config["use_gpu"] else "cpu",
        devices="auto",
        use_distributed_sampler=False,  # each worker already holds its own shard
        reload_dataloaders_every_n_epochs=1,  # a new training share every epoch
    )
    trainer = prepare_trainer(trainer)
    if reported is not None:
        with reported.as_directory() as folder:
            ckpt = Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME
            _fit(trainer, module, dm, ckpt, rank, run)
    else:
        _fit(trainer, module, dm, last if source else None, rank, run)
    if rank == 0:
        fit = {
            "best_checkpoint": checkpoint.best_model_path or str(last),
            "best_val_auroc": _score(checkpoint),
            "monitor": cfg.optim.monitor,  # what best_val_auroc is the best of
            "epochs": trainer.current_epoch,
        }
        write_json(run / FIT_FILE, fit)


def _fit(
    trainer: L.Trainer, module: RiskModule, dm: ShardedDataModule, ckpt: Path | None, rank: int,
    run: Path,
) -> None:  # fmt: skip
    if ckpt is not None and rank == 0:
        keep_earlier_metrics(run)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt is not None else None)


class WorkerGroupRecord(Callback):
    """Rank 0 appends one JSON line per worker-group start: the checkpoint it starts
    from (``ray``: the Ray Train run's latest, ``last.ckpt``, or None), the epoch and
    optimiser step restored from it, the world size and the node of every rank. A
    restart after a failure shows as a further line."""

    def __init__(self, path: Path, source: str | None) -> None:
        self.path, self.source = path, source

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import ray
        import torch.distributed as dist

        node = ray.get_runtime_context().get_node_id()
        nodes: list[Any] = [None] * trainer.world_size
        if dist.is_available() and dist.is_initialized():
            dist.all_gather_object(nodes, node)
        else:
            nodes = [node]
        if trainer.is_global_zero:
            line = {
                "time": time.time(),
                "from": self.source,
                "start_epoch": trainer.current_epoch,
                "start_step": trainer.global_step,
                "world_size": trainer.world_size,
                "nodes": nodes,
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")


class ThroughputRecord(Callback):
    """Per epoch and worker: training samples, seconds from the first batch's start to
    the last batch's end (validation excluded) and the process's peak resident memory.

    Rank 0 appends ``{"epoch", "world_size", "workers": [{samples, seconds,
    peak_rss_mb, blocks}, ...]}`` per epoch (``benchmarks/bench_distributed.py`` reads
    it); ``blocks`` are the training blocks the worker read (``datasets.shards``).
    Samples include the padding that evens out the shares.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._first: float | None = None
        self._last, self._samples = 0.0, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first, self._last, self._samples = None, 0.0, 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._first is None:
            self._first = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._samples += int(batch["label"].shape[0])
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import resource

        import torch.distributed as dist

        mine = {
            "samples": self._samples,
            "seconds": self._last - self._first if self._first is not None else 0.0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "blocks": getattr(trainer.datamodule, "held_blocks", None),
        }
        workers: list[Any] = [mine]
        if dist.is_available() and dist.is_initialized():
            workers = [None] * trainer.world_size
            dist.all_gather_object(workers, mine)
        if trainer.is_global_zero:
            line = {"epoch": trainer.current_epoch, "world_size": trainer.world_size,
                    "workers": workers}  # fmt: skip
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")


def worker_group_starts(run: str | Path) -> list[dict[str, Any]]:
    """The worker-group starts of a run (``WorkerGroupRecord``), oldest first."""
    return _jsonl(Path(run) / STARTS_FILE)


def worker_throughput(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch training throughput of a run's workers (``ThroughputRecord``)."""
    return _jsonl(Path(run) / THROUGHPUT_FILE)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights_saver(module: RiskModule, fit: dict[str, Any]) -> Any:
    """Writes ``module``'s weights into a copy of the best checkpoint (``erased.ckpt``).

    The driver has no Trainer attached; the file has the keys a Lightning
    ``save_checkpoint(weights_only=True)`` writes.
    """

    def save(path: Path, weights_only: bool = True) -> None:
        ckpt = torch.load(fit["best_checkpoint"], map_location="cpu", weights_only=True)
        keep = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters")
        out = {k: ckpt[k] for k in keep if k in ckpt}
        out["state_dict"] = module.state_dict()
        torch.save(out, path)

    return save


def _read_record(run: Path) -> dict[str, Any]:
    path = run / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _score(checkpoint: Any) -> float | None:
    score = checkpoint.best_model_score
    return None if score is None else float(score)
