"""One training run: a run directory with everything needed to trace and reuse it.

``run_dir/``
    config.yaml          the fully resolved RunConfig
    provenance.json      code version, package versions, sha256 of every cohort file
    data_spec.yaml       the DataSpec fitted on the train split
    checkpoints/         best.ckpt and last.ckpt (Lightning; load with weights_only=True);
                         erased.ckpt when confounds are erased (best + eraser + refitted head);
                         each with a NAME.sha256 beside it, checked before the file is read
                         (``training.checkpoints``)
    logs/                metrics.csv and TensorBoard events
    model/               the exported artifact (model.safetensors, artifact.json, artifact.sha256)
    .clinfuse.lock       while a process writes the run: its pid and host (integrity.locks)
    summary.json         best validation AUROC, epochs, temperature, threshold
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.optim.swa_utils import get_ema_multi_avg_fn

from clinfuse.config import save_yaml, to_dict
from clinfuse.datasets.datamodule import CohortDataModule
from clinfuse.datasets.spec import DataSpec
from clinfuse.errors import InputError, config_errors
from clinfuse.evaluation.metrics import auroc, choose_threshold
from clinfuse.fusion.erasure import one_hot_concept
from clinfuse.fusion.model import confound_classes
from clinfuse.integrity.checksums import cache_failures
from clinfuse.integrity.locks import output_lock
from clinfuse.progress import format_seconds, interactive
from clinfuse.scoring.ood import MahalanobisOOD
from clinfuse.training.artifact import save_artifact
from clinfuse.training.calibration import apply_temperature, fit_temperature
from clinfuse.training.checkpoints import (
    VerifiedCheckpointIO,
    load_checkpoint,
    verify_checkpoint,
)
from clinfuse.training.config import OptimConfig, RunConfig, run_cohort
from clinfuse.training.genotype_selection import choose_genotype_groups
from clinfuse.training.module import RiskModule
from clinfuse.training.predict import collect_predictions
from clinfuse.training.provenance import code_version, cohort_hashes, package_versions

# A frozen image backbone is kept in eval mode on purpose (its BatchNorm statistics
# must not move); Lightning warns about every such module at the start of fit.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


class EpochLines(Callback):
    """One plain line per epoch, for logs where Lightning's redrawn bar would be frames
    joined by carriage returns (``clinfuse.progress.interactive``): the epoch's
    metrics, seconds per epoch and the time left if every epoch up to ``max_epochs``
    runs (early stopping may end sooner)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self._start, self._first = time.monotonic(), 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._first = time.monotonic(), trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(self.line(trainer), file=self.stream or sys.stdout, flush=True)

    def line(self, trainer: L.Trainer) -> str:
        epoch, last = trainer.current_epoch + 1, trainer.max_epochs
        per_epoch = (time.monotonic() - self._start) / max(epoch - self._first, 1)
        shown = ("train_loss", "val_loss", "val_auroc")
        metrics = trainer.callback_metrics
        parts = [f"{k} {float(metrics[k]):.4f}" for k in shown if k in metrics]
        text = f"epoch {epoch}/{last}: {', '.join(parts)}" if parts else f"epoch {epoch}/{last}"
        text += f", {format_seconds(per_epoch)}/epoch"
        if last is not None and last > epoch:
            text += f", ETA {format_seconds(per_epoch * (last - epoch))}"
        return text


class ParameterEMA(WeightAveraging):
    """An exponential moving average of the parameters, updated after every optimizer step.

    Lightning's ``WeightAveraging``: validation runs on the average, checkpoints hold it
    in ``state_dict`` (the current weights in ``current_model_state``, so a resumed run
    continues both), and the model left after training is the average. Buffers are not
    averaged: the average keeps the current ones (confound offsets, ComBat maps, masks),
    copied after each update.
    """

    def __init__(self, decay: float) -> None:
        super().__init__(use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
        if self._average_model is not None:
            with torch.no_grad():
                for kept, current in zip(
                    self._average_model.module.buffers(), pl_module.buffers(), strict=True
                ):
                    kept.copy_(current)


class GradualUnfreezing(Callback):
    """Tells the encoders each epoch so they can unfreeze stages on their schedule."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.model.on_epoch_start(trainer.current_epoch)


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Trains, calibrates and exports a model. Returns the run summary.

    Args:
        cfg: the resolved run config (``cfg.cohort`` is the cohort directory).
        run_dir: where everything is written.
        resume: continue from ``checkpoints/last.ckpt`` when it exists.

    Raises:
        LockHeldError: another process is writing ``run_dir``.
        IntegrityError: on resume, ``last.ckpt`` differs from the sha256 recorded when it
            was written (``training.checkpoints``); nothing in ``run_dir`` is changed.
    """
    with output_lock(run_dir):  # one writer per run directory
        return _train(cfg, Path(run_dir), resume)


def _train(cfg: RunConfig, run: Path, resume: bool) -> dict[str, Any]:
    failed_before = cache_failures()  # damaged cache entries, recomputed, in this process
    last = run / "checkpoints" / "last.ckpt"
    resuming = resume and last.is_file()
    if resuming:
        verify_checkpoint(last)  # before anything in the run directory changes
    cohort = prepare_run(cfg, run)
    dm = CohortDataModule(cohort, cfg.data, run_dir=run)
    dm.setup("fit")
    with config_errors(run / "config.yaml", "fix the model.* and optim.* settings"):
        genotype_path = choose_genotype_groups(cfg.model.encoders, dm, run)
        if genotype_path is not None:
            save_yaml(cfg, run / "config.yaml")  # now with the chosen keep_groups
        module = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    dm.use_images("image" in module.model.encoders)
    harmonization = fit_image_harmonization(module, dm)
    trainer, checkpoint = build_trainer(cfg, run)
    if resuming:
        keep_earlier_metrics(run)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resuming else None)

    fit = {
        "best_checkpoint": checkpoint.best_model_path or str(last),
        "best_val_auroc": _score(checkpoint),
        "monitor": cfg.optim.monitor,  # what best_val_auroc is the best of
        "epochs": trainer.current_epoch,
        # Wall seconds of the epochs this invocation ran (training and validation),
        # without the data preparation, calibration and export around them.
        "fit_seconds": round(time.perf_counter() - start, 3),
    }
    return finish_run(
        cfg, run, module, dm, {**fit, **harmonization}, failed_before,
        trainer.save_checkpoint, genotype_path,
    )  # fmt: skip


def harmonizing_encoder(module: RiskModule) -> torch.nn.Module | None:
    """The image encoder when it harmonizes its features across sites
    (``timm_image.harmonize`` other than ``none``), else None."""
    encoder = dict(module.model.encoders).get("image")
    if encoder is None or getattr(encoder.config, "harmonize", "none") == "none":
        return None
    return encoder


def fit_image_harmonization(module: RiskModule, dm: CohortDataModule) -> dict[str, Any]:
    """ComBat on the training split's frozen image features, when the image encoder asks
    for it (``timm_image.harmonize: combat``, ``encoders.harmonize``).

    Runs before the first epoch, so every epoch trains on harmonized features; the
    features go through the encoder's embedding cache, which the first epoch then reads.

    Returns:
        ``{"harmonization": summary}`` for summary.json, or ``{}`` when not asked for.
    """
    encoder = harmonizing_encoder(module)
    if encoder is None:
        return {}
    was_training = encoder.training
    encoder.eval()  # no augmentation, frozen statistics
    feats, sites, labels = [], [], []
    with torch.no_grad():
        for batch in dm.dataloader("train"):
            present, pooled, _ = encoder._batch_features(batch, want_tokens=False)
            feats.append(pooled[present].numpy())
            sites.append(batch["confounds"]["site"][present].numpy())
            labels.append(batch["label"][present].numpy())
    encoder.train(was_training)
    if not feats or sum(len(f) for f in feats) == 0:
        raise InputError("timm_image: harmonize='combat' found no training films to fit on")
    try:
        info = encoder.fit_harmonization(
            np.concatenate(feats), np.concatenate(sites), np.concatenate(labels)
        )
    except ValueError as err:
        raise InputError(f"timm_image harmonize: {err}") from err
    if info["unharmonized_sites"]:
        names = dm.spec.sites
        info["unharmonized_site_names"] = [names[c] for c in info["unharmonized_sites"]]
        warnings.warn(
            f"timm_image harmonize: {info['note']} (sites {info['unharmonized_site_names']})",
            stacklevel=2,
        )
    return {"harmonization": info}


def prepare_run(cfg: RunConfig, run: Path) -> Any:
    """Checks the config and cohort, writes config.yaml and provenance.json, seeds.

    Also points a frozen image backbone at the run's embedding cache (see
    ``_default_embedding_cache``), so call it before building data or model.

    Returns:
        the cohort to read (``training.config.run_cohort``: a directory, or a MEDS root
        with its labels and sidecars).
    """
    if not cfg.cohort:
        raise InputError("cohort is not set", None, "pass --cohort DIR or cohort=DIR")
    _check_selection_window(cfg)
    cohort = run_cohort(cfg)
    if cfg.validate:
        _check_cohort(cohort)
    run.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, run / "config.yaml")
    write_json(run / "provenance.json", _provenance(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    _default_embedding_cache(cfg, run)
    return cohort


def finish_run(
    cfg: RunConfig,
    run: Path,
    module: RiskModule,
    dm: CohortDataModule,
    fit: dict[str, Any],
    failed_before: int,
    save_weights: Any,
    genotype_path: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Loads the best checkpoint, erases confounds, exports the artifact, writes summary.json.

    Args:
        fit: ``best_checkpoint`` (path), ``best_val_auroc`` and ``epochs`` of the fit.
        failed_before: ``cache_failures()`` when the run started.
        save_weights: ``save_weights(path, weights_only=True)`` writes the module's
            checkpoint (``erased.ckpt``).
        genotype_path: the genotype groups' path when training chose them
            (``training.genotype_selection``); goes into the artifact and the summary.
    """
    best = fit["best_checkpoint"]
    state = load_checkpoint(best)["state_dict"]
    module.load_state_dict(state)
    erasure = erase_confounds(module, dm)
    if erasure:
        save_weights(run / "checkpoints" / "erased.ckpt", weights_only=True)
    summary = export_artifact(module, dm, cfg, run, genotype_path=genotype_path)
    summary.update(erasure)
    summary.update(fit)
    if genotype_path is not None:
        summary["genotype_groups"] = genotype_path["groups"]
        summary["genotype_lambda"] = genotype_path["lambda_"]
    summary["cache_entries_recomputed"] = cache_failures() - failed_before
    summary["warnings"] = unused_modality_warnings(module.model)
    for message in summary["warnings"]:
        warnings.warn(message, stacklevel=3)
    write_json(run / "summary.json", summary)
    return summary


def unused_modality_warnings(model: torch.nn.Module) -> list[str]:
    """Messages for encoders whose sparsity penalty zeroed every input group, and for a
    configured gene x environment term left out or reading no gene.

    A sparse-group-lasso encoder with every group at zero outputs a constant: the
    model then ignores that modality, which no loss curve shows.
    """
    out = []
    for modality, encoder in model.encoders.items():
        if not hasattr(encoder, "selected_groups") or encoder.selected_groups():
            continue
        if getattr(encoder.cfg, "select", "fixed") == "path":
            rule = getattr(encoder.cfg, "path_rule", "1se")
            why = (
                "no group was selected on enough half-samples of the train split"
                if rule == "stability"
                else "none lowered the tuning loss"
            )
            out.append(
                f"{modality}: the genotype lambda path kept no marker group ({why}; see "
                f"genotype_path.json in the run directory), so the model ignores {modality}; "
                f"on a small cohort, model.encoders.sgl_mlp.select=fixed reads every group"
            )
        else:
            out.append(
                f"{modality}: the sparse-group-lasso penalty zeroed every group, so the model "
                f"ignores {modality}; lower the encoder's lambda_ (model.encoders.sgl_mlp.lambda_)"
            )
    if getattr(model, "gxe_note", None):
        out.append(model.gxe_note)
    return out


def erase_confounds(module: RiskModule, dm: CohortDataModule) -> dict[str, Any]:
    """Fits the LEACE eraser on the train split, then refits the risk head on its output.

    Runs after the Lightning fit and before temperature scaling, so calibration,
    the OOD statistics and everything downstream see the erased representation.
    A no-op (empty summary) when ``model.adversary.erase`` is empty.

    Returns:
        ``{"erasure": {...}}``: erased confounds, rank of the erased subspace, rows
        used, and the tuning AUROC before and after (erasure plus head refit).
    """
    model = module.model
    if model.eraser is None:
        return {}
    cfg = model.adversary_cfg
    model.eraser.reset()
    before = collect_predictions(model, dm.val_dataloader())
    train_pred = collect_predictions(model, dm.dataloader("train"))
    codes = {c: train_pred[c] for c in cfg.erase}
    concept, known = one_hot_concept(codes, confound_classes(dm.spec))
    model.eraser.fit(train_pred["fused"][known], concept[known], cfg.erase_ridge)
    erased = model.eraser(torch.as_tensor(train_pred["fused"]))  # (N, D)
    val = (model.eraser(torch.as_tensor(before["fused"])), before["label"])
    refit_head(module, erased, train_pred["label"], val, cfg.erase_refit_steps)
    with torch.no_grad():  # the tuning split's erased representation is already at hand
        after = model.head(val[0]).squeeze(-1).numpy()  # (M,)
    info = {
        "confounds": list(cfg.erase),
        "rank": model.eraser.rank,
        "n_fit": int(known.sum()),
        "tuning_auroc_before": auroc(before["label"], before["logit"]),
        "tuning_auroc_after": auroc(before["label"], after),
    }
    return {"erasure": info}


def refit_head(
    module: RiskModule,
    z: torch.Tensor,
    y: np.ndarray,
    val: tuple[torch.Tensor, np.ndarray],
    steps: int,
    lr: float = 1e-2,
) -> float:
    """Head-only full-batch training on fixed representations; keeps the best on ``val``.

    The loss is the module's risk loss (class weights or focal as configured), so the
    calibration offset of ``class_weight_offset`` still applies. Returns the best
    tuning loss.

    Shapes:
        z: (N, D); y: (N,); val: ((M, D), (M,))
    """
    head = module.model.head
    y_t, z_val, y_val = torch.as_tensor(y).float(), val[0], torch.as_tensor(val[1]).float()
    best = (_head_loss(module, z_val, y_val), copy.deepcopy(head.state_dict()))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for step in range(steps):
        head.train()
        optimizer.zero_grad()
        module._risk_loss(head(z).squeeze(-1), y_t).backward()
        optimizer.step()
        if (step + 1) % 10 == 0 and (loss := _head_loss(module, z_val, y_val)) < best[0]:
            best = (loss, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[1])
    head.eval()
    return best[0]


@torch.no_grad()
def _head_loss(module: RiskModule, z: torch.Tensor, y: torch.Tensor) -> float:
    module.model.head.eval()
    return float(module._risk_loss(module.model.head(z).squeeze(-1), y))


def _check_cohort(cohort: str | Path) -> None:
    """Refuses a cohort that breaks the contract, naming every file, column and row.

    Headers only for DICOM (``pixels=False``): a film whose pixels turn out to be
    unreadable is masked as a missing image during training, with a warning.
    """
    from clinfuse.datasets.validate import validate_cohort

    report = validate_cohort(cohort, pixels=False)
    if not report.ok:
        # One line: the first problem names the file, column and row; validate lists all.
        n = len(report.errors)
        raise InputError(
            f"the cohort breaks the contract ({n} error{'s' if n > 1 else ''}; first: "
            f"{report.errors[0]})",
            cohort,
            f"run `clinfuse validate {cohort}` for every problem, or set validate=false",
        )


def keep_earlier_metrics(run: Path) -> None:
    """Lightning's CSV logger rewrites metrics.csv on resume; keep the interrupted part."""
    csv = run / "logs" / "metrics.csv"
    if csv.is_file():
        k = len(list(csv.parent.glob("metrics-before-resume-*.csv"))) + 1
        csv.rename(csv.with_name(f"metrics-before-resume-{k}.csv"))


def _default_embedding_cache(cfg: RunConfig, run: Path) -> None:
    """A frozen image backbone gets an embedding cache in the run dir by default.

    The CNN then runs once per image instead of once per epoch. Augmentation would
    change the CNN input every epoch, so the cache is only switched on when the user
    did not ask for augmentation or a cache of their own in the config.
    """
    image = cfg.model.encoders.get("timm_image")
    if image is None or image.get("transfer", "frozen") != "frozen":
        return
    if "cache_dir" in image or image.get("augment") is True:
        return
    image["cache_dir"] = str(run / "embedding_cache")
    image["augment"] = False


def build_trainer(
    cfg: RunConfig, run: Path, extra_callbacks: list[Callback] | None = None, **overrides: Any
) -> tuple[L.Trainer, ModelCheckpoint]:
    """The Lightning Trainer of a run: checkpoints, early stopping, CSV + TensorBoard logs.

    Epochs before ``selection_start(cfg)`` neither become the best checkpoint nor
    count towards early stopping. ``extra_callbacks`` (e.g. Ray Tune's reporting
    callback) are appended; ``overrides`` replace Trainer arguments.
    """
    o = cfg.optim
    checkpoint, stopping = _selection_callbacks(o, selection_start(cfg), run / "checkpoints")
    last = last_checkpoint(run / "checkpoints")
    callbacks = [checkpoint, last, stopping, GradualUnfreezing(), *(extra_callbacks or [])]
    if o.ema_decay > 0:
        callbacks.append(ParameterEMA(o.ema_decay))
    # A bar where it redraws in place; in a log file, one line per epoch instead.
    bars = o.progress_bar and interactive(sys.stdout)  # Lightning's bar writes to stdout
    if o.progress_bar and not bars:
        callbacks.append(EpochLines())
    loggers = [
        CSVLogger(run, name="logs", version=""),
        TensorBoardLogger(run, name="logs", version="tensorboard"),
    ]
    kwargs = dict(
        max_epochs=o.max_epochs,
        accelerator=o.accelerator,
        devices=o.devices,
        precision=o.precision,
        accumulate_grad_batches=o.accumulate_grad_batches,
        gradient_clip_val=o.gradient_clip_val or None,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
        logger=loggers,
        log_every_n_steps=o.log_every_n_steps,
        enable_progress_bar=bars,
        enable_model_summary=False,
        default_root_dir=run,
        plugins=[VerifiedCheckpointIO()],  # sha256 beside each checkpoint, checked on load
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs), checkpoint


def selection_start(cfg: RunConfig) -> int:
    """The first epoch that model selection (best checkpoint, early stopping) considers.

    ``optim.select_from_epoch``, raised, when an enabled adversary ramps over
    ``model.adversary.ramp_epochs`` epochs, to ``ceil(ramp_epochs)``: the first epoch
    trained entirely at full gradient-reversal (or confusion) strength. Otherwise
    validation AUROC, which the adversary lowers while it ramps up, picks weights
    from before the adversary acted. With ``optim.unimodal_epochs``, at least the first
    full-loss epoch: before it the fused logit is not trained.
    """
    adversary = cfg.model.adversary
    ramp = adversary.ramp_epochs if adversary.enabled else None
    return max(first_selected_epoch(cfg.optim.select_from_epoch, ramp), cfg.optim.unimodal_epochs)


def _check_selection_window(cfg: RunConfig) -> None:
    """Refuses a run whose epochs all end before model selection starts.

    Otherwise no epoch could become ``best.ckpt`` and the exported model would be
    the last epoch's, chosen by nobody.
    """
    start = selection_start(cfg)
    if 0 < cfg.optim.max_epochs <= start:
        raise InputError(
            f"optim.max_epochs={cfg.optim.max_epochs} ends before model selection starts "
            f"at epoch {start} (optim.select_from_epoch={cfg.optim.select_from_epoch}, "
            f"model.adversary.ramp_epochs={cfg.model.adversary.ramp_epochs}, "
            f"optim.unimodal_epochs={cfg.optim.unimodal_epochs}): no epoch "
            f"could become the best checkpoint; set optim.max_epochs above {start}"
        )


def first_selected_epoch(select_from_epoch: int, ramp_epochs: float | None) -> int:
    """``select_from_epoch``, raised to ``ceil(ramp_epochs)`` when a ramp is given."""
    start = max(int(select_from_epoch), 0)
    if ramp_epochs is not None:
        start = max(start, math.ceil(ramp_epochs))
    return start


class LateCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose best model is chosen among epochs ``>= start`` only.

    Earlier epochs still write ``last.ckpt`` (``last_checkpoint``), so a run killed
    during them resumes.
    """

    def __init__(self, *args: Any, start: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = start

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if trainer.current_epoch >= self.start:
            super()._save_topk_checkpoint(trainer, monitor_candidates)


def last_checkpoint(dirpath: Path) -> ModelCheckpoint:
    """Writes ``last.ckpt`` after every validation, whatever the monitored metric did.

    Not ``save_last`` of the best-model callback: since Lightning 2.6 that writes
    ``last.ckpt`` only in a step that also saved a top-k checkpoint, so with
    ``save_top_k=1`` it is a copy of ``best.ckpt`` and ``--resume`` would go back to
    the best epoch. Lightning runs checkpoint callbacks after the others, in list
    order: put this one after the best-model callback, so ``last.ckpt`` holds the
    early-stopping and best-model state of the same epoch.
    """
    return ModelCheckpoint(
        dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
        enable_version_counter=False,
    )  # fmt: skip


class LateEarlyStopping(EarlyStopping):
    """``EarlyStopping`` that starts counting at epoch ``start``."""

    def __init__(self, *args: Any, start: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = start

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        if trainer.current_epoch >= self.start:
            super()._run_early_stopping_check(trainer)


def _selection_callbacks(
    o: OptimConfig, start: int, dirpath: Path
) -> tuple[ModelCheckpoint, EarlyStopping]:
    """Best-checkpoint and early-stopping callbacks; the stock ones when ``start`` is 0."""
    ckpt_kwargs: dict[str, Any] = dict(
        dirpath=dirpath, filename="best", monitor=o.monitor, mode="max", save_top_k=1,
    )  # fmt: skip
    if start <= 0:
        stopping = EarlyStopping(o.monitor, mode="max", patience=o.patience)
        return ModelCheckpoint(**ckpt_kwargs), stopping
    return (
        LateCheckpoint(**ckpt_kwargs, start=start),
        LateEarlyStopping(o.monitor, mode="max", patience=o.patience, start=start),
    )


def export_artifact(
    module: RiskModule,
    dm: CohortDataModule,
    cfg: RunConfig,
    run: Path,
    genotype_path: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fits temperature and threshold on the tuning split, OOD stats on train; saves the artifact.

    Writes ``run/model`` (see ``training.artifact``) and returns its summary. The
    genotype groups' regularization path, when training chose them, goes into the
    artifact's metadata so ``evaluate`` can report it.
    """
    model = module.model
    tuning = collect_predictions(model, dm.val_dataloader())
    offset = class_weight_offset(cfg.optim, dm.spec)
    temperature = fit_temperature(tuning["logit"] + offset, tuning["label"])
    threshold = choose_threshold(
        tuning["label"], apply_temperature(tuning["logit"] + offset, temperature)
    )
    train_pred = collect_predictions(model, dm.dataloader("train"))
    ood = MahalanobisOOD.fit(train_pred["fused"], train_pred["label"])
    prevalence = float(np.mean(train_pred["label"]))
    model_id = save_artifact(
        run / "model",
        model,
        dm.spec,
        model_config=to_dict(cfg.model),
        data_config=to_dict(cfg.data),
        temperature=temperature,
        logit_offset=offset,
        threshold=threshold,
        train_prevalence=prevalence,
        ood=to_dict(ood),
        provenance=_read_or_make_provenance(cfg, run),
        **({"genotype_path": genotype_path} if genotype_path is not None else {}),
    )
    return {
        "model_id": model_id,
        "temperature": temperature,
        "threshold": threshold,
        "train_prevalence": prevalence,
    }


def class_weight_offset(optim: OptimConfig, spec: DataSpec) -> float:
    """The logit shift that undoes class-weighted BCE.

    Weighting positives by w moves the loss minimiser from logit(p) to logit(p) + log w,
    a bias that temperature scaling (a pure rescaling) cannot remove; subtracting log w
    first restores the unweighted log-odds. Focal loss has no such closed form: 0.
    """
    if optim.loss == "bce" and optim.class_weight and spec.pos_weight > 0:
        return -math.log(spec.pos_weight)
    return 0.0


def _read_or_make_provenance(cfg: RunConfig, run: Path) -> dict[str, Any]:
    path = run / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else _provenance(cfg)


def _provenance(cfg: RunConfig) -> dict[str, Any]:
    return {
        "code": code_version(),
        "packages": package_versions(),
        "cohort": str(run_cohort(cfg)),
        "cohort_files_sha256": cohort_hashes(run_cohort(cfg)),
    }


def _score(checkpoint: ModelCheckpoint) -> float | None:
    score = checkpoint.best_model_score
    return None if score is None else float(score)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON (paths and dates as strings)."""
    path.write_text(json.dumps(payload, indent=2, default=str))
