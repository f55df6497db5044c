"""The model artifact: what a trained run hands to scoring.

A directory holding ``model.safetensors`` (weights only: loading never unpickles
objects) and ``artifact.json`` (resolved model and data config, the DataSpec with
normalization statistics, temperature, decision threshold, training prevalence,
OOD statistics, code and package versions, input hashes). ``model_id`` is the
sha256 of the weights file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_model, save_model
from torch import nn

from clinfuse.config import from_dict, to_dict
from clinfuse.datasets.spec import DataSpec
from clinfuse.training.provenance import file_sha256

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "artifact.json"


@dataclass
class ModelArtifact:
    """A loaded artifact. ``model`` is in eval mode."""

    model: nn.Module
    spec: DataSpec
    model_config: dict[str, Any]
    data_config: dict[str, Any]
    temperature: float = 1.0
    logit_offset: float = 0.0
    threshold: float = 0.5
    train_prevalence: float = 0.5
    ood: dict[str, Any] | None = None
    model_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def calibrated_logit(self, logit: np.ndarray) -> np.ndarray:
        """``(logit + logit_offset) / temperature``: the offset undoes the class weighting
        of the training loss, the temperature is fitted on the tuning split."""
        return (np.asarray(logit, dtype=np.float64) + self.logit_offset) / self.temperature

    def risk(self, logit: np.ndarray) -> np.ndarray:
        """Calibrated probabilities."""
        return 1.0 / (1.0 + np.exp(-self.calibrated_logit(logit)))


def save_artifact(out_dir: str | Path, model: nn.Module, spec: DataSpec, **meta: Any) -> str:
    """Writes weights and metadata atomically; returns the model id (weights sha256).

    ``meta`` must hold ``model_config`` and ``data_config`` (plain dicts) and may
    hold temperature, threshold, train_prevalence, ood and provenance entries.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_weights = out / f".{WEIGHTS}.tmp"
    save_model(model, str(tmp_weights))
    os.replace(tmp_weights, out / WEIGHTS)
    model_id = file_sha256(out / WEIGHTS)
    payload = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "spec": to_dict(spec),
        **meta,
    }
    _write_json_atomic(out / META, payload)
    return model_id


def load_artifact(path: str | Path) -> ModelArtifact:
    """Rebuilds the model from its config and loads the weights strictly."""
    from clinfuse.fusion.model import ModelConfig, build_model

    root = Path(path)
    meta_path = root / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not a clinfuse model artifact (no {META})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: artifact format {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    spec = from_dict(DataSpec, meta["spec"])
    model = build_model(from_dict(ModelConfig, meta["model_config"]), spec)
    load_model(model, str(root / WEIGHTS), strict=True)
    model.eval()
    return ModelArtifact(
        model=model,
        spec=spec,
        model_config=meta["model_config"],
        data_config=meta["data_config"],
        temperature=float(meta.get("temperature", 1.0)),
        logit_offset=float(meta.get("logit_offset", 0.0)),
        threshold=float(meta.get("threshold", 0.5)),
        train_prevalence=float(meta.get("train_prevalence", 0.5)),
        ood=meta.get("ood"),
        model_id=meta["model_id"],
        meta=meta,
    )


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
