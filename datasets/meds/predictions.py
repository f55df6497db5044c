"""Predictions in the MEDS-evaluation schema: ``clinfuse score --format meds``.

``meds_evaluation.schema.PredictionSchema`` is the MEDS label schema plus
``predicted_boolean_value`` and ``predicted_boolean_probability``, and it allows no
other column (``Disallowed extra columns``): the file holds exactly those columns, so
``meds-evaluation`` reads it as is; our columns (OOD score, flags, fingerprints...)
stay in the score part files, keyed on the same (subject_id, prediction_time).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

from clinfuse.datasets.schema import LABELS, TIME, scan
from clinfuse.errors import InputError

MEDS_PREDICTIONS = "meds_predictions/predictions.parquet"  # inside the score OUT_DIR
COLUMNS = {
    "subject_id": pl.Int64,
    "prediction_time": TIME,
    "boolean_value": pl.Boolean,
    "predicted_boolean_value": pl.Boolean,
    "predicted_boolean_probability": pl.Float32,
}


def meds_predictions(
    scores: pl.DataFrame, cohort: Any, threshold: float
) -> tuple[pl.DataFrame, int]:
    """One row per label with a risk: the label, ``risk >= threshold`` and the risk.

    Args:
        scores: the score part files (``scoring.score.read_scores``).
        cohort: the scored cohort (its labels give ``boolean_value``).
        threshold: the model's decision threshold (``artifact.json``).

    Returns:
        The predictions, and the number of label rows left out because their scoring
        failed (risk null: the ``error`` column of the part files says why).
    """
    labels = scan(cohort, LABELS).select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("prediction_time").cast(TIME),
        pl.col("boolean_value").cast(pl.Boolean),
    )
    risk = scores.lazy().select("subject_id", "prediction_time", "risk")
    joined = labels.join(risk, on=["subject_id", "prediction_time"], how="left").collect()
    if joined["boolean_value"].null_count():
        raise InputError("a label row has a null boolean_value", fix="run `clinfuse validate`")
    scored = joined.filter(pl.col("risk").is_not_null())
    out = scored.select(
        "subject_id",
        "prediction_time",
        "boolean_value",
        (pl.col("risk") >= threshold).alias("predicted_boolean_value"),
        pl.col("risk").cast(pl.Float32).alias("predicted_boolean_probability"),
    ).sort("subject_id", "prediction_time")
    return out.cast(COLUMNS), joined.height - scored.height


def write_meds_predictions(
    out_dir: str | Path, cohort: Any, threshold: float
) -> tuple[Path, int, int]:
    """Writes ``OUT_DIR/meds_predictions/predictions.parquet`` (atomically).

    Returns:
        The path, rows written, label rows left out (failed scoring).
    """
    from clinfuse.scoring.score import read_scores

    frame, left_out = meds_predictions(read_scores(out_dir), cohort, threshold)
    path = Path(out_dir) / MEDS_PREDICTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)
    return path, frame.height, left_out
