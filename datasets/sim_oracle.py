"""Performance ceilings of a simulated cohort, from its ground truth.

``modality_ceilings(oracle)`` fits cross-validated logistic regressions on the
latent factors each modality carries and reports the AUROC against the drawn
outcome. Those are what a perfect encoder of one modality could reach; the
oracle row (the true risk itself) is the Bayes-optimal AUROC of the cohort.
"""

from __future__ import annotations

import numpy as np
import polars as pl

# Which latent factors each modality (or combination) can see.
FEATURE_SETS = {
    "image": ("lung_disease",),
    "timeseries": ("physio_severity",),
    "genomics": ("genetic_score", "modifier_carrier", "ancestry"),
    "site": ("site",),
    "fused_additive": ("lung_disease", "physio_severity", "genetic_score", "modifier_carrier"),
    "fused_interaction": (
        "lung_disease",
        "physio_severity",
        "genetic_score",
        "modifier_carrier",
        "physio_x_carrier",
    ),
}


def modality_ceilings(oracle: pl.DataFrame, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """AUROC of the true risk and of cross-validated logistic regressions per feature set.

    Args:
        oracle: ``oracle.parquet`` of a simulated cohort (or ``sample_oracle``).
        folds: cross-validation folds.
        seed: fold shuffling seed.

    Returns:
        ``{"oracle": auroc, "image": auroc, ...}`` for every entry of ``FEATURE_SETS``.
    """
    from sklearn.metrics import roc_auc_score

    y = oracle["outcome"].to_numpy().astype(int)
    out = {"oracle": float(roc_auc_score(y, oracle["true_risk"].to_numpy()))}
    for name, columns in FEATURE_SETS.items():
        x = _design(oracle, columns)
        out[name] = float(roc_auc_score(y, _cv_scores(x, y, folds, seed)))
    return out


def _design(oracle: pl.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """Numeric features; string columns one-hot, ``physio_x_carrier`` the interaction.

    Shapes:
        returns: (N, F) float64.
    """
    parts = []
    for col in columns:
        if col == "physio_x_carrier":
            parts.append(
                oracle["physio_severity"].to_numpy() * oracle["modifier_carrier"].to_numpy()
            )
        elif oracle[col].dtype == pl.String:
            parts.extend(oracle[col].to_dummies().to_numpy().T.astype(float))
        else:
            parts.append(oracle[col].to_numpy().astype(float))
    return np.column_stack(parts)


def _cv_scores(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    model = LogisticRegression(max_iter=1000)
    return cross_val_predict(model, x, y, cv=cv, method="decision_function")


def format_ceilings(ceilings: dict[str, float]) -> str:
    """One line per feature set: ``name  auroc``."""
    return "\n".join(f"  {name:<18} AUROC {value:.3f}" for name, value in ceilings.items())
