"""The model artifact: what a trained run hands to scoring.

A directory holding ``model.safetensors`` (weights only: loading never unpickles
objects), ``artifact.json`` (resolved model and data config, the DataSpec with
normalization statistics, temperature, decision threshold, training prevalence,
OOD statistics, code and package versions, input hashes) and ``artifact.sha256``.
``model_id`` is the sha256 of the weights file.

Every load verifies the artifact before building anything (``verify_artifact``):
``artifact.json`` against its line in ``artifact.sha256`` (``sha256sum`` format, so
``cd model && sha256sum -c artifact.sha256`` checks it too), then the weights against
``model_id``. A flipped bit in either is a one-line ``IntegrityError`` naming the
file and both digests, never a model that scores differently.

Artifacts exported before ``artifact.sha256`` existed have no ``"checksums"`` key in
their ``artifact.json``: they still load, with a warning, and their weights are still
checked against ``model_id``; only ``artifact.json`` itself is then unchecked. An
artifact whose ``artifact.json`` names the sidecar but has none is refused.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from clinfuse.config import from_dict, to_dict
from clinfuse.datasets.spec import DataSpec
from clinfuse.errors import IntegrityError, NotFoundError
from clinfuse.integrity.checksums import check_digest, read_sums, write_sums, write_text_atomic
from clinfuse.training.provenance import file_sha256

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "artifact.json"
SUMS = "artifact.sha256"
RETRAIN = "restore the model directory from a backup or retrain (clinfuse train)"


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
        "checksums": SUMS,  # tells a loader that a missing sidecar is damage, not age
        "spec": to_dict(spec),
        **meta,
    }
    _write_json_atomic(out / META, payload)
    write_sums(out / SUMS, {META: file_sha256(out / META), WEIGHTS: model_id})
    return model_id


def load_artifact(path: str | Path) -> ModelArtifact:
    """Verifies the artifact (``verify_artifact``), rebuilds the model from its config
    and loads the weights strictly.

    Raises:
        NotFoundError: ``path`` holds no ``artifact.json``.
        IntegrityError: a file differs from its recorded sha256 or cannot be parsed.
    """
    from clinfuse.fusion.model import ModelConfig, build_model

    root = Path(path)
    meta = verify_artifact(root)
    spec = from_dict(DataSpec, meta["spec"])
    model = build_model(from_dict(ModelConfig, meta["model_config"]), spec)
    try:
        load_model(model, str(root / WEIGHTS), strict=True)
    except SafetensorError as err:  # verified bytes that do not parse: written broken
        raise IntegrityError(f"weights cannot be read ({err})", root / WEIGHTS, RETRAIN) from err
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


def verify_artifact(root: str | Path) -> dict[str, Any]:
    """Checks an artifact's files against their recorded sha256; returns ``artifact.json``.

    Order: ``artifact.json`` against ``artifact.sha256`` (before parsing it, so a flipped
    digit in a calibration constant is caught, not loaded), then the weights against
    ``model_id``. Costs one sha256 pass over the weights (~20 ms for a demo model).

    Raises:
        NotFoundError: no ``artifact.json`` in ``root``.
        IntegrityError: naming the file that differs (both digests), is missing or does
            not parse.
    """
    root = Path(root)
    meta_path = root / META
    if not meta_path.is_file():
        raise NotFoundError(
            f"not a clinfuse model artifact (no {META})", root,
            "pass the model/ directory that clinfuse train or tune wrote",
        )  # fmt: skip
    sums = read_sums(root / SUMS) if (root / SUMS).is_file() else None
    if sums is not None:
        check_digest(meta_path, sums.get(META), RETRAIN)
    meta = _parse_meta(meta_path)
    if sums is None:
        _no_sums(root, meta)
    elif sums.get(WEIGHTS, meta["model_id"]) != meta["model_id"]:
        raise IntegrityError(
            f"{SUMS} and {META} record different weights digests", root / SUMS, RETRAIN
        )
    check_digest(root / WEIGHTS, meta["model_id"], RETRAIN)
    return meta


def _parse_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise IntegrityError(f"not valid JSON ({err})", meta_path, RETRAIN) from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise IntegrityError(
            f"artifact format {found} is not {FORMAT_VERSION}", meta_path,
            "score with the clinfuse version that exported it, or retrain",
        )  # fmt: skip
    if not isinstance(meta.get("model_id"), str):
        raise IntegrityError("no model_id (the weights' sha256)", meta_path, RETRAIN)
    return meta


def _no_sums(root: Path, meta: dict[str, Any]) -> None:
    """An artifact without ``artifact.sha256``: damage if its metadata names one, else old."""
    if meta.get("checksums"):
        raise IntegrityError(
            f"{SUMS} is missing (artifact.json says it was written)", root / SUMS, RETRAIN
        )
    warnings.warn(
        f"{root}: exported before clinfuse wrote {SUMS}; its weights are checked against "
        f"model_id but {META} itself cannot be (re-export the model to add the checksum)",
        stacklevel=3,
    )


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
