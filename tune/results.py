"""results.parquet: one row per trial of the experiment, finished or not.

Rows come from Tune's own record of each trial (its status, config, last result
and failure count, as saved in the experiment state), so a trial that never
reported, one still pending when the sweep was stopped and one that failed are
all there.

``status``
    completed    trained every epoch (``optim.max_epochs``)
    stopped      ended early by ASHA or by early stopping
    error        failed ``max_failures + 1`` times; ``error`` holds the last reason
    interrupted  the sweep was stopped while it ran; ``--resume`` continues it from
                 its last checkpoint
    pending      never started (or started and never reported); ``--resume`` runs it

``failures`` counts the trial's failures (an exception in the trial, a lost node);
``retries`` the restarts that followed them (a completed trial with ``retries`` 1
failed once and finished on its second attempt). ``node_id``/``node_ip``/``pid``
name the worker of its last report. ``wall_s`` is the driver's clock from the
trial's first start to its last report (a pause between ``--resume`` runs counts);
``train_s`` is Tune's ``time_total_s``, the seconds spent in the trial's reported
iterations, carried over from the checkpoint a retried trial restarted from (work
lost after that checkpoint is not counted).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from typing import Any

import numpy as np
import polars as pl

from clinfuse.tune.space import plain_paths
from clinfuse.tune.trainable import BACKBONE_METRIC, METRIC, NODE_KEY

RESULTS_FILE = "results.parquet"
STRATEGY_KEY = "model.fusion.name"
UNFINISHED = ("interrupted", "pending")
_FIXED = {
    "trial_id": pl.String, "strategy": pl.String, "best_val_auroc": pl.Float64,
    "epochs": pl.Int64, "status": pl.String, "failures": pl.Int64, "retries": pl.Int64,
    "node_id": pl.String, "node_ip": pl.String, "pid": pl.Int64, "wall_s": pl.Float64,
    "train_s": pl.Float64,
    "cnn_images": pl.Float64, "error": pl.String,
}  # fmt: skip


def load_trials(experiment: str) -> list[Any]:
    """Tune's trials of the experiment at ``experiment`` (a local path or URI)."""
    from ray.tune import ExperimentAnalysis

    with _quiet("ray.tune.analysis.experiment_analysis"):
        # It warns about every trial without a result file: pending trials have none.
        return list(ExperimentAnalysis(experiment).trials)


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def results_table(trials: list[Any], max_epochs: int) -> pl.DataFrame:
    """One row per trial (columns in the module docstring, then the sampled values),
    best first; trials without a score last."""
    rows = [trial_row(t, max_epochs) for t in trials]
    if not rows:
        return pl.DataFrame(schema=_FIXED)
    table = pl.DataFrame(rows, infer_schema_length=None)
    table = table.with_columns(pl.col(k).cast(v) for k, v in _FIXED.items())
    return table.sort(["best_val_auroc", "trial_id"], descending=[True, False], nulls_last=True)


def trial_row(trial: Any, max_epochs: int) -> dict[str, Any]:
    """The results row of one Tune trial."""
    last = trial.last_result or {}
    epochs = int(last.get("training_iteration") or 0)
    status = trial_status(trial.status, epochs, max_epochs)
    failures = int(trial.num_failures)
    row = {
        "trial_id": trial.trial_id,
        "strategy": trial.config.get(STRATEGY_KEY),
        "best_val_auroc": _best(trial),
        "epochs": epochs,
        "status": status,
        "failures": failures,
        "retries": failures - (status == "error"),  # the last failure of an error is final
        "node_id": last.get(NODE_KEY),
        "node_ip": last.get("node_ip"),
        "pid": last.get("pid"),
        "wall_s": _wall_seconds(trial),
        "train_s": last.get("time_total_s"),
        # Images the trial ran through the CNN itself (0 = all from the shared cache).
        "cnn_images": last.get(BACKBONE_METRIC),
        "error": _error_line(trial) if status == "error" else None,
    }
    row.update({k: _cell(v) for k, v in sorted(plain_paths(trial.config).items())})
    return row


def trial_status(tune_status: str, epochs: int, max_epochs: int) -> str:
    """Our status from Tune's (PENDING, RUNNING, PAUSED, TERMINATED, ERROR) and the epochs."""
    if tune_status == "ERROR":
        return "error"
    if tune_status == "TERMINATED":
        return "completed" if epochs >= max_epochs else "stopped"
    # Tune saves a trial that was running when the sweep stopped as PENDING.
    return "interrupted" if epochs > 0 else "pending"


def _wall_seconds(trial: Any) -> float | None:
    meta = trial.run_metadata
    if meta.start_time is None or not np.isfinite(meta.last_result_time):
        return None
    return float(meta.last_result_time - meta.start_time)


def _best(trial: Any) -> float | None:
    best = trial.run_metadata.metric_analysis.get(METRIC, {}).get("max")
    return float(best) if best is not None and np.isfinite(best) else None


def _error_line(trial: Any) -> str | None:
    """The last ``Xxx: message`` line of the trial's saved traceback."""
    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001 - an unreadable error file must not hide the table
        return None
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    named = [line for line in lines if ": " in line and line.split(":")[0].endswith("Error")]
    return (named or lines or [None])[-1]


def _cell(value: Any) -> Any:
    """Parquet needs one type per column: bools and numbers stay, anything else is text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def outcome(table: pl.DataFrame, num_samples: int) -> dict[str, int]:
    """Trials per status, plus ``unsampled``: trials the searcher had not yet proposed."""
    counts = {status: 0 for status in ("completed", "stopped", "error", *UNFINISHED)}
    counts.update(dict(table.group_by("status").len().iter_rows()))
    counts["unsampled"] = max(num_samples - table.height, 0)
    return counts


def describe(counts: dict[str, int]) -> str:
    """``6 trials: 3 completed, 1 stopped, 2 pending`` (statuses with no trial left out)."""
    total = sum(counts.values())
    names = {"unsampled": "not yet sampled"}
    parts = [f"{n} {names.get(status, status)}" for status, n in counts.items() if n]
    return f"{total} trials: {', '.join(parts)}"
