"""The run config: every default of a training run in one place.

``RunConfig`` nests the data, model and optimisation configs. ``configs/*.yaml``
presets fill it; ``clinfuse train --config X.yaml key=value`` overrides fields;
the resolved config is saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from clinfuse.config import apply_overrides, from_dict, load_yaml
from clinfuse.datasets.datamodule import DataConfig
from clinfuse.errors import NotFoundError, config_errors
from clinfuse.fusion.model import ModelConfig


@dataclass
class OptimConfig:
    """Loss, optimiser and Trainer settings.

    Attributes:
        loss: "bce" (class-weighted by the train split's negatives/positives when
            ``class_weight``) or "focal" (Lin et al. 2017, ``focal_gamma``).
        lr: base learning rate; encoders scale it per layer group.
        monitor: metric for early stopping and the best checkpoint: ``val_auroc``, or
            with ``model.confound_offsets`` ``val_auroc_stratified``, the tuning AUROC
            over pairs of patients in the same cell of those confounds' classes (what
            the model reads beyond their outcome rates; ``evaluation.metrics``).
        select_from_epoch: the first epoch (0-based) that can become the best
            checkpoint or count towards early stopping; earlier epochs still train
            and write ``last.ckpt``. A confound adversary with
            ``model.adversary.ramp_epochs`` raises it to the first epoch trained
            entirely at full strength (``training.run.selection_start``).
        ema_decay: when > 0, validation, checkpoints and the exported model use an
            exponential moving average of the parameters over optimizer steps,
            ``avg = decay * avg + (1 - decay) * current`` (``training.run.ParameterEMA``);
            0 turns it off. The average is less noisy than any one step's weights, so
            the checkpoint chosen on a small tuning split depends less on chance.
        unimodal_epochs: two-stage training in one run. The first ``unimodal_epochs``
            epochs train each encoder through its own auxiliary risk head only (the
            fused logit, the fusion, the gene x environment term and the adversary get
            no loss), as if each modality were trained alone; from then on the full
            loss trains everything. Needs ``model.aux_weight > 0``. Model selection
            starts at the first full-loss epoch (``training.run.selection_start``).
        encoder_lr_after_unimodal: factor on the encoders' learning rates from the first
            full-loss epoch on (1 = unchanged), so the fusion learns on encoders that
            move slowly; only with ``unimodal_epochs > 0``.
        precision: Lightning precision flag ("32-true"; "16-mixed"/"bf16-mixed" on GPUs).
        accelerator: "auto", "cpu" or "gpu".
    """

    loss: str = "bce"
    class_weight: bool = True
    focal_gamma: float = 2.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 20
    patience: int = 5
    monitor: str = "val_auroc"
    select_from_epoch: int = 0
    ema_decay: float = 0.0
    unimodal_epochs: int = 0
    encoder_lr_after_unimodal: float = 1.0
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    log_every_n_steps: int = 1
    progress_bar: bool = True


@dataclass
class RunConfig:
    """A whole training run."""

    cohort: str = ""
    labels: str = ""  # a MEDS root's label directory (``cohort`` a MEDS root)
    sidecars: str = ""  # a MEDS root's images/genotypes/markers folder (default: the root)
    seed: int = 0
    validate: bool = True  # check the cohort against the contract before training
    deterministic: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.optim.ema_decay}")
        if self.optim.unimodal_epochs < 0:
            raise ValueError(
                f"optim.unimodal_epochs must be >= 0, got {self.optim.unimodal_epochs}"
            )
        if self.optim.unimodal_epochs > 0 and self.model.aux_weight <= 0:
            raise ValueError(
                f"optim.unimodal_epochs={self.optim.unimodal_epochs} trains the encoders "
                "through their auxiliary heads; set model.aux_weight > 0"
            )
        if self.optim.encoder_lr_after_unimodal <= 0:
            raise ValueError(
                "optim.encoder_lr_after_unimodal must be > 0, got "
                f"{self.optim.encoder_lr_after_unimodal}"
            )
        if self.optim.monitor == STRATIFIED_MONITOR and not self.model.confound_offsets:
            raise ValueError(
                f"optim.monitor={STRATIFIED_MONITOR} needs model.confound_offsets: it is the "
                "AUROC within the cells of those confounds' classes"
            )


# The tuning AUROC within site x ancestry cells, logged when confound offsets are on.
STRATIFIED_MONITOR = "val_auroc_stratified"
MONITOR_LABELS = {
    "val_auroc": "validation AUROC",
    STRATIFIED_MONITOR: "validation AUROC within site x ancestry cells",
}


def best_score_text(summary: dict[str, Any]) -> str:
    """A run summary's ``best_val_auroc`` as printed, named by the metric it is the best
    of: ``validation AUROC 0.845`` (``none`` when no validation epoch ran)."""
    monitor = summary.get("monitor", "val_auroc")
    best = summary["best_val_auroc"]
    return f"{MONITOR_LABELS.get(monitor, monitor)} {'none' if best is None else f'{best:.3f}'}"


def run_cohort(cfg: RunConfig) -> Any:
    """The run's cohort: a directory (Path) or a MEDS root with its labels and sidecars."""
    from clinfuse.datasets.meds import open_cohort

    return open_cohort(cfg.cohort, cfg.labels or None, cfg.sidecars or None, cfg.data.meds)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Builds a RunConfig from a YAML file or preset (optional) and ``key=value`` overrides.

    Args:
        path: a YAML file, or the name of a preset shipped in the package (``"demo"``,
            see ``preset_names``); None for the defaults alone.
        overrides: ``dotted.key=value`` items applied in order.
    """
    data = load_config_file(path) if path else {}
    data = apply_overrides(data, overrides or [])
    # Dataclass __post_init__ checks (e.g. DataConfig) raise ValueError on bad values.
    with config_errors(path, "fix the preset or the key=value override"):
        return from_dict(RunConfig, data)


def preset_names() -> list[str]:
    """The presets shipped in the package (``configs/*.yaml``), by name."""
    folder = files("clinfuse") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config_file(config: str | Path) -> dict[str, Any]:
    """The mapping of a YAML file, or of the packaged preset named ``config``.

    A bare name (no folder, no ``.yaml``) that is not a file in the working directory
    is a preset; presets are package data, read through ``importlib.resources`` so an
    installed wheel has them too.

    Raises:
        NotFoundError: neither a file nor a preset, naming the presets.
    """
    text = str(config)
    if Path(text).is_file() or "/" in text or os.sep in text or text.endswith((".yaml", ".yml")):
        return load_yaml(config)
    resource = files("clinfuse") / "configs" / f"{text}.yaml"
    if not resource.is_file():
        raise NotFoundError(
            f"no config file or preset named {text!r}",
            None,
            f"pass a YAML path or one of the presets {preset_names()}",
        )
    with as_file(resource) as path:
        return load_yaml(path)
