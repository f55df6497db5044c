"""Chooses the genotype encoder's marker groups before the model is trained.

With ``model.encoders.sgl_mlp.select: path``, a sparse-group-lasso path is fitted on
the train split and its strength chosen on the tuning split, or its stable groups
kept over half-samples of the train split (``encoders.sgl_path``, ``sgl_stability``);
the chosen groups are written into the encoder's config (``keep_groups``), so the
resolved ``config.yaml`` and the exported artifact both say which genes the model
reads. The whole path (strengths, groups kept, tuning loss) is saved beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clinfuse.datasets.datamodule import CohortDataModule
from clinfuse.encoders.genomics import SGLMLPConfig
from clinfuse.encoders.sgl_path import regularization_path

ENCODER = "sgl_mlp"
PATH_FILE = "genotype_path.json"


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
    cfg = SGLMLPConfig(**{k: v for k, v in kwargs.items() if k != "keep_groups"})
    if dm.spec is None or dm.spec.n_markers == 0:
        return None
    train, tuning = (dm.datasets[s].tensors for s in ("train", "tuning"))
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
        )
    except ValueError as err:
        raise ValueError(f"model.encoders.{ENCODER}.select=path: {err}") from err
    kwargs["keep_groups"] = list(result.groups)
    path = result.to_dict()
    if run is not None:
        (run / PATH_FILE).write_text(json.dumps(path, indent=2))
    return path
