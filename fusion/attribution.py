"""Per-patient modality attribution.

Two views per sample:

* what the fusion looked at: attention mass per modality (attention fusion),
  gate values (gated fusion) or per-modality logits (late fusion);
* what the prediction depended on: the leave-one-modality-out change in logit,
  ``delta_m = logit(all) - logit(without m)``, the modality marked absent exactly as
  a missing one would be. A positive delta means the modality raised the risk.

The most influential modality is the present one with the largest ``|delta_m|``.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import torch
from torch import Tensor

from clinfuse.fusion.model import FusionModel


@torch.no_grad()
def modality_attribution(model: FusionModel, batch: dict[str, Any]) -> pl.DataFrame:
    """One row per sample of ``batch``.

    Columns: ``subject_id``, ``prediction_time`` (when in the batch), ``logit``,
    ``risk``, and per modality m: ``present_m``, ``delta_m`` (null when absent),
    ``attention_m`` / ``gate_m`` / ``logit_m`` depending on the fusion strategy,
    then ``most_influential`` (null when the sample has no modality).
    Runs in eval mode (no dropout, no modality dropout) and restores the mode.
    """
    was_training = model.training
    model.eval()
    try:
        embeddings, tokens = model.encode(batch)  # encoders run once
        variants = [(), *[[m] for m in model.modalities]]
        runs = model.fuse_variants(embeddings, tokens, variants)  # tokens built once
        views = _fusion_views(model.fusion)  # the first variant's: nothing left out
        full = {"logit": runs["logit"][:, 0], "embeddings": runs["embeddings"]}
        deltas = {
            m: full["logit"] - runs["logit"][:, 1 + i] for i, m in enumerate(model.modalities)
        }
    finally:
        model.train(was_training)
    present = {m: p for m, (_, p) in full["embeddings"].items()}
    columns = _id_columns(batch)
    columns["logit"] = full["logit"]
    columns["risk"] = torch.sigmoid(full["logit"])
    for m in model.modalities:
        columns[f"present_{m}"] = present[m]
        columns[f"delta_{m}"] = deltas[m].masked_fill(~present[m], float("nan"))
    columns.update(views)
    frame = pl.DataFrame({k: v.cpu().numpy() for k, v in columns.items()})
    frame = frame.with_columns(pl.col(f"delta_{m}").fill_nan(None) for m in model.modalities)
    return frame.with_columns(most_influential=pl.Series(_most_influential(deltas, present)))


def _fusion_views(fusion: Any) -> dict[str, Tensor]:
    """The fusion's own per-modality weights from its last forward."""
    for attr, prefix in (
        ("last_attention", "attention"),
        ("last_gates", "gate"),
        ("last_modality_logits", "logit"),
    ):
        values = getattr(fusion, attr, None)
        if values:
            return {f"{prefix}_{m}": v for m, v in values.items()}
    return {}


def _most_influential(deltas: dict[str, Tensor], present: dict[str, Tensor]) -> list[str | None]:
    names = list(deltas)
    size = torch.stack([deltas[m].abs() for m in names], dim=1)  # (B, M)
    mask = torch.stack([present[m] for m in names], dim=1)  # (B, M)
    best = size.masked_fill(~mask, -1.0).argmax(dim=1)
    return [names[i] if mask[b].any() else None for b, i in enumerate(best.tolist())]


def _id_columns(batch: dict[str, Any]) -> dict[str, Tensor]:
    return {k: batch[k] for k in ("subject_id", "prediction_time") if k in batch}


def summarize_attribution(model: FusionModel, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Cohort-level summary for the report.

    Per modality: the share of samples for which it was the most influential,
    the mean |delta logit| over samples where it was present, and the mean
    attention / gate weight when the fusion exposes one.
    """
    frame = pl.concat([modality_attribution(model, b) for b in batches], how="diagonal_relaxed")
    out: dict[str, Any] = {"n": frame.height}
    for m in model.modalities:
        out[f"{m}_most_influential_share"] = float((frame["most_influential"] == m).mean() or 0.0)
        out[f"{m}_mean_abs_delta_logit"] = _mean(frame[f"delta_{m}"].abs())
        for prefix in ("attention", "gate"):
            if f"{prefix}_{m}" in frame.columns:
                out[f"{m}_mean_{prefix}"] = _mean(frame[f"{prefix}_{m}"])
    return out


def _mean(series: pl.Series) -> float:
    value = series.drop_nulls().drop_nans().mean()
    return float("nan") if value is None else float(value)
