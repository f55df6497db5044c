"""The LightningModule: steps, losses, optimiser, schedules. The model is a plain nn.Module.

Loss per step::

    L = risk_loss(logit + o, label) + adversary_loss(site, ancestry) + model.regularization_loss()
        + aux_weight * mean_m risk_loss(aux_head_m(embedding_m) + o, label)   (when aux_weight > 0)

with ``o`` the per-site / per-ancestry logit offsets of ``model.confound_offsets``
(``fusion/offsets.py``: profiled on each batch before the step; 0 without them; in the
training loss only, never in predictions or the validation metrics).
The adversary's gradient reaches the representation through gradient
reversal scaled by the DANN schedule lambda(p), p = training progress in [0, 1]
(over the whole run, or over ``model.adversary.ramp_epochs`` epochs when set).
With ``model.adversary.head_steps > 1`` the adversary heads first take extra
head-only updates on the detached representation of the batch.
Sparse-group-lasso proximal updates run after every optimiser step.

Validation logs, besides ``val_loss`` and ``val_auroc``, how well each categorical
adversary head on the fused representation reads its confound on the tuning split
(``val_adv_site_acc``) next to the majority rate there (``val_adv_site_majority``).
The head is trained with the model, so this is a lower bound of what a fresh probe
reads (the audit is the real check), but a head well above the majority rate says
the confound is still encoded.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clinfuse.config import from_dict, to_dict
from clinfuse.datasets.spec import DataSpec
from clinfuse.evaluation.metrics import auroc, stratified_auroc
from clinfuse.fusion.adversary import ramp_progress
from clinfuse.fusion.model import ModelConfig, build_model
from clinfuse.training.config import OptimConfig

# Checkpoint entry of the adversary heads' own optimiser (``head_steps > 1``).
HEAD_OPTIMIZER_KEY = "adversary_head_optimizer"


class RiskModule(L.LightningModule):
    """Trains a ``FusionModel`` for binary risk with an optional confound adversary.

    Args:
        model_cfg: the model config as a plain dict (so checkpoints hold no pickled objects).
        spec: the DataSpec fitted on the train split, as a plain dict.
        optim_cfg: the optimisation config as a plain dict.
        seed: the run seed; each epoch reseeds the global RNG from (seed, epoch).
    """

    def __init__(self, model_cfg: dict, spec: dict, optim_cfg: dict, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.save_hyperparameters()
        self.spec = from_dict(DataSpec, spec)
        self.optim = from_dict(OptimConfig, optim_cfg)
        self.model = build_model(from_dict(ModelConfig, model_cfg), self.spec)
        self.register_buffer("pos_weight", torch.tensor(float(self.spec.pos_weight)))
        self._head_optimizer: torch.optim.Optimizer | None = None
        self._head_optimizer_state: dict[str, Any] | None = None  # from a resumed checkpoint
        self._val_logits: list[Tensor] = []
        self._val_labels: list[Tensor] = []
        self._val_keys: list[Tensor] = []  # (subject_id, prediction_time) per row
        self._val_strata: list[Tensor] = []  # the confound-offset classes' cell per row
        self._val_confounds: dict[str, list[tuple[Tensor, Tensor]]] = {}

    @classmethod
    def create(
        cls, model_cfg: ModelConfig, spec: DataSpec, optim_cfg: OptimConfig, seed: int = 0
    ) -> RiskModule:
        return cls(to_dict(model_cfg), to_dict(spec), to_dict(optim_cfg), seed)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.model(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        lambd = self.model.set_progress(self._progress())
        out = self.model(batch)
        out = self._adversary_head_steps(out, batch)
        offset = self.model.confound_offset(out, batch, self._pos_weight())  # (B, H) or None
        logit = out["logit"] if offset is None else out["logit"] + offset[:, 0]
        risk = self._risk_loss(logit, batch["label"])
        adversary, parts = self.model.adversary_loss(out, batch)
        reg = self.model.regularization_loss()
        aux = self.model.aux_loss(out, batch["label"], self._risk_loss, offset)
        # In the unimodal stage each encoder learns through its own head only.
        loss = reg + aux if self.unimodal_stage else risk + adversary + reg + aux
        logs = {
            "train_loss": loss,
            "train_risk_loss": risk,
            "train_aux_loss": aux,
            "train_adversary_loss": adversary,
            "adversary_lambda": lambd,
        }
        logs.update({f"train_adv_{k.replace('/', '_')}": v for k, v in parts.items()})
        self.log_dict(
            logs, on_step=False, on_epoch=True, batch_size=batch["label"].shape[0], sync_dist=True
        )
        return loss

    def _adversary_head_steps(self, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """``head_steps - 1`` head-only updates on the detached representation, then fresh logits.

        The heads get their own Adam, so the encoders' optimiser state is untouched;
        its state is saved in the checkpoint (``HEAD_OPTIMIZER_KEY``) and restored on
        resume, so a resumed run continues the same game.
        """
        extra = self.model.adversary_cfg.head_steps - 1
        if extra <= 0 or self.model.adversary is None:
            return out
        if self._head_optimizer is None:
            self._head_optimizer = torch.optim.Adam(
                self.model.adversary.parameters(), lr=self.optim.lr
            )
            if self._head_optimizer_state is not None:
                self._head_optimizer.load_state_dict(self._head_optimizer_state)
                self._head_optimizer_state = None
        with torch.enable_grad():
            for _ in range(extra):
                self._head_optimizer.zero_grad(set_to_none=True)
                self.model.adversary_head_loss(out, batch).backward()
                self._head_optimizer.step()
        self._head_optimizer.zero_grad(set_to_none=True)
        return self.model.refresh_adversary(out)

    @property
    def unimodal_stage(self) -> bool:
        """True in the first ``optim.unimodal_epochs`` epochs (auxiliary losses only)."""
        return self._trainer is not None and self.current_epoch < self.optim.unimodal_epochs

    def on_train_epoch_start(self) -> None:
        # The switch to the full loss lowers the encoders' rates once, at the first
        # full-loss epoch. A run resumed later restores the lowered rates with the
        # optimizer; one resumed from the last unimodal epoch's checkpoint lowers them here.
        factor = self.optim.encoder_lr_after_unimodal
        start = self.optim.unimodal_epochs
        if start > 0 and factor != 1.0 and self.current_epoch == start:
            encoder_params = {id(p) for p in self.model.encoders.parameters()}
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    if group["params"] and all(id(p) in encoder_params for p in group["params"]):
                        group["lr"] *= factor

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._head_optimizer is not None:
            checkpoint[HEAD_OPTIMIZER_KEY] = self._head_optimizer.state_dict()
        elif self._head_optimizer_state is not None:  # resumed, not stepped yet
            checkpoint[HEAD_OPTIMIZER_KEY] = self._head_optimizer_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._head_optimizer_state = checkpoint.get(HEAD_OPTIMIZER_KEY)
        self._head_optimizer = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.model(batch)
        self._val_logits.append(out["logit"].detach().float().cpu())
        self._val_labels.append(batch["label"].detach().float().cpu())
        if "subject_id" in batch and "prediction_time" in batch:
            keys = torch.stack([batch["subject_id"], batch["prediction_time"]], dim=1)  # (B, 2)
            self._val_keys.append(keys.detach().cpu())
        if self.model.confound_offsets is not None:
            self._val_strata.append(_stratum(batch, self.model.confound_offsets.names))
        self._collect_confound_predictions(out, batch)

    def on_validation_epoch_end(self) -> None:
        rows = self._validation_rows()
        if rows is None:
            return
        value = auroc(rows["label"].numpy(), rows["logit"].numpy())
        # An undefined AUROC (one class in the tuning split) must not win early stopping.
        # sync_dist: the same value on every worker (``_validation_rows``), averaged.
        self.log("val_auroc", 0.0 if np.isnan(value) else value, prog_bar=True, sync_dist=True)
        # The mean risk loss over the split's rows, each once: a mean of per-worker means
        # would count the rows that pad a worker's share twice.
        loss = self._risk_loss(rows["logit"].to(self.device), rows["label"].to(self.device))
        self.log("val_loss", loss, sync_dist=True)
        if "stratum" in rows:
            # Within site x ancestry cells only: what the model reads beyond the confounds'
            # own outcome rates, which the offsets keep out of its logit. As a monitor it
            # keeps early stopping from choosing the epoch that leans on them most.
            y, logit = rows["label"].numpy(), rows["logit"].numpy()
            within = stratified_auroc(y, logit, rows["stratum"].numpy())
            self.log("val_auroc_stratified", 0.0 if np.isnan(within) else within, sync_dist=True)
        self._log_confound_accuracy(rows)

    def _validation_rows(self) -> dict[str, Tensor] | None:
        """This epoch's validation outputs, over the whole tuning split.

        Under data-parallel training each worker validated its own share of the
        tuning subjects, padded to the largest share (``datasets.shards``): the
        rows of every worker are gathered and each (subject_id, prediction_time)
        kept once, so every worker computes the same AUROC on the whole split.
        """
        rows = _cat_rows(
            self._val_logits,
            self._val_labels,
            self._val_keys,
            self._val_confounds,
            self._val_strata,
        )
        self._val_logits.clear()
        self._val_labels.clear()
        self._val_keys.clear()
        self._val_strata.clear()
        self._val_confounds.clear()
        if self.trainer is not None and self.trainer.world_size > 1:
            rows = _gather_unique(rows)
        return rows if rows and len(rows["logit"]) else None

    def _collect_confound_predictions(self, out: dict[str, Any], batch: dict[str, Any]) -> None:
        """Keeps each categorical fused-representation head's class guesses and labels."""
        adversary = self.model.adversary
        if adversary is None or adversary.mode == "correlation":
            return
        for name, kind in adversary.kinds.items():
            logits = out["adversary_logits"].get(name)  # (B, K)
            if kind != "categorical" or logits is None or name not in batch["confounds"]:
                continue
            guess = logits.detach().argmax(dim=-1).cpu()  # (B,)
            target = batch["confounds"][name].detach().cpu()  # (B,)
            self._val_confounds.setdefault(name, []).append((guess, target))

    def _log_confound_accuracy(self, rows: dict[str, Tensor]) -> None:
        """Logs ``val_adv_<confound>_acc`` and ``val_adv_<confound>_majority``."""
        for name in sorted(k[len("guess/") :] for k in rows if k.startswith("guess/")):
            accuracy, majority = confound_accuracy(rows[f"guess/{name}"], rows[f"target/{name}"])
            if not np.isnan(accuracy):
                self.log(f"val_adv_{name}_acc", accuracy, sync_dist=True)
                self.log(f"val_adv_{name}_majority", majority, sync_dist=True)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Dropout, modality dropout and augmentation draw from the global RNG. Seeding
        # it from (seed, epoch, batch) makes every step's randomness independent of what
        # ran before (Lightning draws from it when it builds a DataLoader iterator, which
        # happens at different moments in a fresh and in a resumed fit), so a run resumed
        # from a checkpoint ends where the uninterrupted one would.
        # Data-parallel workers (global_rank > 0) draw their own masks.
        step = (self.seed * 100_003 + self.current_epoch) * 100_003 + batch_idx
        torch.manual_seed(step + self.global_rank * 1_000_000_007)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Proximal updates (sparse group lasso) after each real optimiser step.
        self.model.after_optimizer_step(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self) -> Any:
        groups = self.model.param_groups(self.optim.lr, self.optim.weight_decay)
        optimizer = torch.optim.AdamW(
            groups, lr=self.optim.lr, weight_decay=self.optim.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(self.optim.max_epochs, 1)
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _pos_weight(self) -> Tensor | None:
        return self.pos_weight if self.optim.class_weight else None

    def _risk_loss(self, logit: Tensor, label: Tensor) -> Tensor:
        label = label.float()
        pos_weight = self._pos_weight()
        if self.optim.loss == "bce":
            return F.binary_cross_entropy_with_logits(logit, label, pos_weight=pos_weight)
        if self.optim.loss == "focal":
            return _focal_loss(logit, label, self.optim.focal_gamma, pos_weight)
        raise ValueError(f"optim.loss must be 'bce' or 'focal', got {self.optim.loss!r}")

    def _progress(self) -> float:
        """Progress of the adversary's ramp (``fusion.adversary.ramp_progress``)."""
        if not self.trainer:
            return 1.0
        trainer = self.trainer
        batches = float(trainer.num_training_batches)  # inf for an unsized loader
        steps_per_epoch = batches / trainer.accumulate_grad_batches
        if not math.isinf(steps_per_epoch):
            steps_per_epoch = math.ceil(steps_per_epoch)
        return ramp_progress(
            self.global_step,
            trainer.estimated_stepping_batches,
            steps_per_epoch,
            self.model.adversary_cfg.ramp_epochs,
        )


def _cat_rows(
    logits: list[Tensor],
    labels: list[Tensor],
    keys: list[Tensor],
    confounds: dict[str, list[tuple[Tensor, Tensor]]],
    strata: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """The validation step outputs as one tensor per column (empty dict when none)."""
    if not logits:
        return {}
    rows = {"logit": torch.cat(logits), "label": torch.cat(labels)}
    if keys:
        rows["key"] = torch.cat(keys)  # (N, 2)
    if strata:
        rows["stratum"] = torch.cat(strata)  # (N,)
    for name, pairs in confounds.items():
        rows[f"guess/{name}"] = torch.cat([g for g, _ in pairs])
        rows[f"target/{name}"] = torch.cat([t for _, t in pairs])
    return rows


def _stratum(batch: dict[str, Any], names: list[str]) -> Tensor:
    """One cell id per row from the confounds' class codes (-1, unknown, is a class too).

    Shapes:
        batch["confounds"][name]: (B,) int -> (B,) int64
    """
    cell = torch.zeros_like(batch["label"], dtype=torch.int64)
    for name in names:
        code = batch["confounds"][name].detach().long() + 1  # >= 0
        cell = cell * STRATUM_BASE + code
    return cell.cpu()


# Class codes per confound stay below this (sites and ancestries number a handful).
STRATUM_BASE = 1 << 16


def _gather_unique(rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every worker's rows, each (subject_id, prediction_time) once, sorted by that key.

    Needs ``torch.distributed`` initialised; every worker must call it (a collective).
    """
    import torch.distributed as dist

    parts: list[dict[str, Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    parts = [p for p in parts if p]
    if not parts:
        return {}
    columns = set.intersection(*(set(p) for p in parts))
    merged = {c: torch.cat([p[c] for p in parts]) for c in columns}
    if "key" not in merged:
        return merged
    _, first = np.unique(merged["key"].numpy(), axis=0, return_index=True)  # sorted by key
    keep, n = torch.as_tensor(first), len(merged["key"])
    return {c: v[keep] if len(v) == n else v for c, v in merged.items()}


def confound_accuracy(guess: Tensor, target: Tensor) -> tuple[float, float]:
    """Accuracy of class guesses and the majority rate, over rows with a known label.

    Args:
        guess: predicted classes; target: true classes, -1 = unknown.

    Returns:
        ``(accuracy, majority_rate)``; both NaN when no label is known.

    Shapes:
        guess, target: (N,)
    """
    known = target >= 0
    if not bool(known.any()):
        return float("nan"), float("nan")
    guess, target = guess[known], target[known]
    accuracy = (guess == target).float().mean().item()
    majority = torch.bincount(target).max().item() / target.numel()
    return accuracy, majority


def _focal_loss(logit: Tensor, label: Tensor, gamma: float, pos_weight: Tensor | None) -> Tensor:
    """Focal loss (Lin et al. 2017): BCE scaled by (1 - p_t)^gamma."""
    bce = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    p_t = torch.exp(-bce)
    weight = (1 - p_t) ** gamma
    if pos_weight is not None:
        weight = weight * torch.where(label > 0.5, pos_weight, torch.ones_like(pos_weight))
    return (weight * bce).mean()
