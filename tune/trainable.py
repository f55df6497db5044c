"""The Ray Tune trainable: one ``train_fn(config, ...)`` that builds everything from the config.

Each trial writes its sampled ``{dotted.path: value}`` config onto the sweep's
base config, trains with the run's Lightning Trainer (``training.run.build_trainer``)
and reports every validation epoch to Tune with a Lightning checkpoint through
Ray's ``TuneReportCheckpointCallback`` (each report also names the node, so
results.parquet can say where a trial ran). A trial that is restarted (a retried
failure, a resumed sweep) continues from its last reported checkpoint.

The driver fits the DataSpec once; each trial gets only the cohort path, the data
config and that spec (``SweepData``, through ``tune.with_parameters``) and reads
the train and tuning splits itself, lazily, on whatever node it lands, as a
data-parallel worker does (``datasets.shards.ShardedDataModule`` with one worker):
the cohort never goes through the object store. Trials also read the images: a trial configured with an image encoder first reads the films the driver
sampled and read (``preflight.sample_images``) and fails, naming the node, when
any is unreadable here, instead of training on masked images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import ray
import torch
from lightning.pytorch.callbacks import Callback
from ray import tune
from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback
from torch import nn

from clinfuse.config import from_dict
from clinfuse.datasets.datamodule import CohortDataModule, DataConfig
from clinfuse.datasets.shards import ShardedDataModule
from clinfuse.datasets.spec import DataSpec
from clinfuse.training.config import RunConfig
from clinfuse.training.module import RiskModule
from clinfuse.training.run import build_trainer, fit_image_harmonization
from clinfuse.tune.space import apply_sampled

CHECKPOINT_FILE = "lightning.ckpt"
METRIC = "val_auroc"
BACKBONE_METRIC = "image_backbone_images"
NODE_KEY = "node_id"
# DataConfig fields a trial may change on the shared, already prepared data.
_LOADER_FIELDS = ("batch_size", "num_workers")


@dataclasses.dataclass(frozen=True)
class SweepData:
    """What a trial needs to read the cohort itself: its path, data config and DataSpec."""

    cohort_dir: Path
    cfg: DataConfig
    spec: DataSpec

    @classmethod
    def of(cls, dm: CohortDataModule) -> SweepData:
        return cls(dm.cohort_dir, dm.cfg, dm.spec)


def trial_config(base_cfg: dict[str, Any], sampled: dict[str, Any]) -> RunConfig:
    """The resolved RunConfig of a trial: ``sampled`` dotted paths over ``base_cfg``."""
    return from_dict(RunConfig, apply_sampled(base_cfg, sampled))


def train_fn(
    config: dict[str, Any],
    base_cfg: dict[str, Any],
    data: SweepData,
    image_probe: Sequence[str] = (),
) -> None:
    """Trains one trial and reports ``val_auroc`` (plus every logged metric) each epoch.

    Args:
        config: the sampled ``{dotted.path: value}`` overrides of this trial.
        base_cfg: the sweep's resolved RunConfig as a plain dict.
        data: the cohort, data config and DataSpec of the sweep (``tune.with_parameters``).
        image_probe: image files the driver read; a trial with an image encoder
            checks them on its node first.

    Raises:
        RuntimeError: naming the node and a file, when this node cannot read an
            image of ``image_probe`` (a trial without its images is not a result).
    """
    cfg = trial_config(base_cfg, config)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = datamodule_for(data, cfg.data)
    module = RiskModule.create(cfg.model, dm.spec, cfg.optim)
    if _has_image(module):
        require_images(image_probe, dm.spec.image_size)
    fit_image_harmonization(module, dm)  # ComBat on the training features, when asked for
    callbacks = [
        BackboneCounter(),
        EpochMetricsCarry(),  # before the Tune callback: its state rides in the checkpoint
        ReportWithNode(filename=CHECKPOINT_FILE),
    ]
    trainer, _ = build_trainer(cfg, _trial_dir(), callbacks)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        trainer.fit(module, datamodule=dm)
        return
    with checkpoint.as_directory() as folder:
        trainer.fit(module, datamodule=dm, ckpt_path=str(Path(folder) / CHECKPOINT_FILE))


def require_images(paths: Sequence[str], image_size: int) -> None:
    """Raises, naming this node, when any of ``paths`` cannot be read here.

    The image loader masks an unreadable film and trains on: right for one broken
    file, silent loss when a node cannot see the cohort at all.
    """
    from clinfuse.tune.preflight import image_problems, node_label

    problems = image_problems(paths, image_size)
    if problems:
        path, reason = next(iter(problems.items()))
        raise RuntimeError(
            f"{node_label()}: {len(problems)} of {len(paths)} sampled images that the driver "
            f"read are unreadable here, e.g. {path} ({reason}); the trial stops instead of "
            "training without its image modality"
        )


class ReportWithNode(TuneReportCheckpointCallback):
    """Ray's Lightning report-and-checkpoint callback, adding this node's id to each report.

    Tune records ``node_ip`` with every result, which two nodes of one machine (or
    behind one NAT) share; the node id tells them apart.
    """

    def _get_report_dict(self, trainer: L.Trainer, pl_module: L.LightningModule):
        report = super()._get_report_dict(trainer, pl_module)
        if report:
            report[NODE_KEY] = ray.get_runtime_context().get_node_id()
        return report


def datamodule_for(shared: SweepData | CohortDataModule, cfg: DataConfig) -> ShardedDataModule:
    """A DataModule of the sweep's data with this trial's loader settings (batch size,
    workers); it reads the train and tuning splits when Lightning sets it up.

    Raises:
        ValueError: when the trial changes a field the DataSpec and caches depend on
            (image size, window, splits, ...): those cannot vary inside one sweep.
    """
    ours, theirs = _tensor_fields(cfg), _tensor_fields(shared.cfg)
    changed = [name for name in ours if ours[name] != theirs[name]]
    if changed:
        raise ValueError(
            f"a trial changed data.{', data.'.join(changed)}; the sweep prepares the data once, "
            f"so only data.{' and data.'.join(_LOADER_FIELDS)} may be tuned"
        )
    ours = dataclasses.replace(shared.cfg, **{name: getattr(cfg, name) for name in _LOADER_FIELDS})
    return ShardedDataModule(shared.cohort_dir, ours, shared.spec, rank=0, world_size=1)


def _tensor_fields(cfg: DataConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(cfg)
    fields["split_fractions"] = tuple(fields["split_fractions"])  # YAML gives a list
    return {k: v for k, v in fields.items() if k not in _LOADER_FIELDS}


class BackboneCounter(Callback):
    """Counts images that really pass through the image CNN and logs the running total.

    A forward hook on the backbone's first convolution sees every CNN pass and
    nothing else, so cache hits of a frozen backbone leave the count at zero.
    Logged as ``image_backbone_images`` at each validation epoch end.
    """

    def __init__(self) -> None:
        self.images = 0
        self._handle: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        conv = first_conv(pl_module.model.encoders["image"]) if _has_image(pl_module) else None
        if conv is not None and self._handle is None:
            self._handle = conv.register_forward_hook(self._count)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log(BACKBONE_METRIC, float(self.images))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _count(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.images += int(inputs[0].shape[0])


class EpochMetricsCarry(Callback):
    """Stores the last validation metrics in the checkpoint and restores them on resume.

    Tune checkpoints at ``on_validation_end``, before the epoch's
    ``on_train_epoch_end``; a trial resumed from such a checkpoint starts by
    finishing that epoch, where EarlyStopping reads ``val_auroc`` from metrics
    Lightning does not save. Putting them back lets the epoch end as it would have.
    """

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in self.metrics.items():
            trainer.callback_metrics.setdefault(name, torch.tensor(value))

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics = dict(state_dict.get("metrics", {}))


def first_conv(encoder: nn.Module) -> nn.Conv2d | None:
    """The first convolution of an image encoder's ``backbone`` (None without a backbone)."""
    backbone = getattr(encoder, "backbone", None)
    if backbone is None:
        return None
    return next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)


def _has_image(pl_module: L.LightningModule) -> bool:
    return "image" in pl_module.model.encoders


def _trial_dir() -> Path:
    """Where the trial's Lightning logs go (Tune's per-trial directory)."""
    return Path(tune.get_context().get_trial_dir())
