"""Chooses the genotype encoder's marker groups before the model is trained.

With ``model.encoders.sgl_mlp.select: path``, a sparse-group-lasso path is fitted on
the train split and its strength chosen on the tuning split, or its stable groups
kept over half-samples of the train split (``encoders.sgl_path``, ``sgl_stability``);
the chosen groups are written into the encoder's config (``keep_groups``), so the
resolved ``config.yaml`` and the exported artifact both say which genes the model
reads. The whole path (strengths, groups kept, tuning loss) is saved beside them.

With ``path_interaction: timeseries`` the path also looks for genes that change the
effect of physiology. Its environment is the risk the vitals and labs alone carry:
gradient boosting on the baseline's fixed window features (``evaluation.baseline``),
cross-fitted on the train split (each train subject scored by a model that never saw
its outcome, so the score carries no label of its own into the path) and averaged
over the fold models on the tuning split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinfuse.datasets.datamodule import CohortDataModule
from clinfuse.encoders.genomics import SGLMLPConfig
from clinfuse.encoders.sgl_path import regularization_path

ENCODER = "sgl_mlp"
PATH_FILE = "genotype_path.json"
ENVIRONMENT_FOLDS = 5


def wants_genotype_path(encoders: dict[str, dict[str, Any]]) -> bool:
    """Whether ``model.encoders`` asks training to choose the genotype groups."""
    kwargs = encoders.get(ENCODER)
    return kwargs is not None and kwargs.get("select", "fixed") == "path"


def choose_genotype_groups(
    encoders: dict[str, dict[str, Any]], dm: CohortDataModule, run: Path | None = None
) -> dict[str, Any] | None:
    """Runs the path when the genotype encoder asks for it; sets its ``keep_groups``.

    Args:
        encoders: ``model.encoders`` of the run config (edited in place).
        dm: the set-up DataModule (its train and tuning tensors and DataSpec).
        run: the run directory; the path goes to ``run/genotype_path.json``.

    Returns:
        The path (``PathResult.to_dict``), or None when nothing was chosen.
    """
    if not wants_genotype_path(encoders):
        return None
    kwargs = encoders[ENCODER]
    chosen = ("keep_groups", "interaction_groups")
    cfg = SGLMLPConfig(**{k: v for k, v in kwargs.items() if k not in chosen})
    if dm.spec is None or dm.spec.n_markers == 0:
        return None
    train, tuning = (dm.datasets[s].tensors for s in ("train", "tuning"))
    environment, env_info = None, None
    if cfg.path_interaction == "timeseries":
        *environment, env_info = timeseries_environment(dm, seed=cfg.path_seed)
    try:
        result = regularization_path(
            dm.spec,
            train,
            tuning,
            alpha=cfg.alpha,
            ancestry_pcs=cfg.path_pcs,
            n_lambdas=cfg.path_lambdas,
            rule=cfg.path_rule,
            stability={
                "threshold": cfg.path_threshold,
                "max_false": cfg.path_max_false,
                "pairs": cfg.path_pairs,
                "seed": cfg.path_seed,
            },
            environment=None if environment is None else tuple(environment),
        )
    except ValueError as err:
        raise ValueError(f"model.encoders.{ENCODER}.select=path: {err}") from err
    kwargs["keep_groups"] = list(result.groups)
    if cfg.path_interaction != "none":
        kwargs["interaction_groups"] = list(result.interaction_groups)
    path = result.to_dict()
    if env_info is not None:
        path["environment"] = env_info
    if run is not None:
        (run / PATH_FILE).write_text(json.dumps(path, indent=2))
    return path


def timeseries_environment(
    dm: CohortDataModule, seed: int = 0, folds: int = ENVIRONMENT_FOLDS
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The vitals/labs risk score of every train and tuning subject, cross-fitted.

    Each of ``folds`` stratified folds of the train split is scored by gradient
    boosting (``evaluation.baseline.fit_gbdt``) fitted on the other folds and early
    stopped on the tuning split; tuning subjects get the mean of the fold models.

    Returns:
        The train scores (N_train,), the tuning scores (N_tuning,), both float64 logits
        in the DataModule's row order, and ``{"source", "folds", "train_auroc"}`` (the
        cross-fitted score's AUROC on the train split).

    Raises:
        ValueError: when the cohort has no vitals/labs channel, or a split is too small
            for the folds.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from clinfuse.evaluation.baseline import fit_gbdt, timeseries_features

    spec = dm.spec
    where = f"model.encoders.{ENCODER}.path_interaction=timeseries"
    if spec is None or not spec.channels:
        raise ValueError(f"{where}: the cohort has no vitals/labs channel to score")
    feats, labels = {}, {}
    for split in ("train", "tuning"):
        feats[split], _ = timeseries_features(
            dm.cohort_dir, dm.split_samples(split), spec.channels, spec.window_hours
        )
        labels[split] = dm.datasets[split].tensors["label"].numpy().astype(int)
    y = labels["train"]
    if min(np.bincount(y, minlength=2)) < folds or len(set(labels["tuning"])) < 2:
        raise ValueError(
            f"{where}: the train split needs {folds} subjects of each outcome and the tuning "
            f"split both outcomes to cross-fit the vitals/labs score"
        )
    train = np.zeros(len(y))
    tuning = np.zeros(len(labels["tuning"]))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, score_rows in cv.split(feats["train"], y):
        model = fit_gbdt(
            feats["train"][fit_rows], y[fit_rows], feats["tuning"], labels["tuning"], seed=seed
        )
        train[score_rows] = model.decision_function(feats["train"][score_rows])
        tuning += model.decision_function(feats["tuning"]) / folds
    info = {"source": "timeseries", "folds": folds, "train_auroc": float(roc_auc_score(y, train))}
    return torch.from_numpy(train), torch.from_numpy(tuning), info
