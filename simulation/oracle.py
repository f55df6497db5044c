"""Performance ceilings of a simulated cohort, from its ground truth.

``modality_ceilings(oracle)`` fits cross-validated logistic regressions on the
latent factors each modality carries and reports the AUROC against the drawn
outcome. Those are what a perfect encoder of one modality could reach; the
oracle row (the true risk itself) is the Bayes-optimal AUROC of the cohort.

``split_ceiling_scores(oracle, splits)`` fits the same regressions on one split
(train) and scores the subjects of another (held_out), so a model evaluated on
held_out can be read against ceilings on exactly its subjects and its sample of
outcomes.

``observed_ceiling_scores(oracle, splits, present)`` does the same for a cohort whose
subjects miss a modality: the ceiling of what any model could reach from the data
that is there.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import polars as pl

# Which latent factors each modality (or combination) can see.
FEATURE_SETS = {
    "image": ("lung_disease",),
    "timeseries": ("physio_severity",),
    "genomics": ("genetic_score", "modifier_carrier", "ancestry"),
    # Without ancestry, which is a site proxy the confound adversary removes.
    "genomics_causal": ("genetic_score", "modifier_carrier"),
    "site": ("site",),
    "fused_additive": ("lung_disease", "physio_severity", "genetic_score", "modifier_carrier"),
    "fused_interaction": (
        "lung_disease",
        "physio_severity",
        "genetic_score",
        "modifier_carrier",
        "physio_x_carrier",
    ),
    "fused_interaction_site": (
        "lung_disease",
        "physio_severity",
        "genetic_score",
        "modifier_carrier",
        "physio_x_carrier",
        "site",
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


def split_ceiling_scores(
    oracle: pl.DataFrame,
    splits: pl.DataFrame,
    names: tuple[str, ...] | None = None,
    fit_split: str = "train",
    score_split: str = "held_out",
) -> pl.DataFrame:
    """Scores of logistic regressions fitted on ``fit_split``'s true latent factors.

    Each feature set of ``FEATURE_SETS`` (or ``names``) gets a logistic regression
    (sklearn defaults, C=1) fitted on the latent factors and drawn outcomes of the
    ``fit_split`` subjects; the returned frame holds its decision function on the
    ``score_split`` subjects, next to their outcome and true risk.

    Args:
        oracle: ``oracle.parquet`` of a simulated cohort.
        splits: ``subject_splits.parquet`` (subject_id, split).
        names: feature sets to fit (default: all of ``FEATURE_SETS``).
        fit_split, score_split: split names.

    Returns:
        ``subject_id``, ``outcome``, ``true_risk`` and one float column per feature
        set, one row per ``score_split`` subject of the oracle (oracle order).
    """
    from sklearn.linear_model import LogisticRegression

    names = tuple(FEATURE_SETS) if names is None else names
    fit, score = _split_masks(oracle, splits, fit_split, score_split)
    y = oracle["outcome"].to_numpy().astype(int)
    out = oracle.filter(pl.Series(score)).select("subject_id", "outcome", "true_risk")
    for name in names:
        x = _design(oracle, FEATURE_SETS[name])  # (N, F)
        model = LogisticRegression(max_iter=1000).fit(x[fit], y[fit])
        out = out.with_columns(pl.Series(name, model.decision_function(x[score])))
    return out


# Confounds a ceiling may be allowed to read (``observed_ceiling_scores``).
CONFOUND_COLUMNS = ("site", "ancestry")

# The latent factors each missing-able modality's data carries.
MODALITY_FACTORS = {
    "image": ("lung_disease",),
    "genomics": ("genetic_score", "modifier_carrier"),
}


def observed_ceiling_scores(
    oracle: pl.DataFrame,
    splits: pl.DataFrame,
    present: dict[str, np.ndarray],
    fit_split: str = "train",
    score_split: str = "held_out",
    confounds: Collection[str] = (),
) -> pl.DataFrame:
    """Held-out scores of the interaction ceiling on the data each subject has.

    The ``fused_interaction`` factors, with the factors of a modality a subject lacks
    set to 0 (the physiology x carrier term too, when genotypes are missing) and one
    presence indicator per modality of ``present`` as a feature, so the fit can use
    missingness itself (informative when sicker patients are filmed more often).
    A logistic regression (C=1) fitted on ``fit_split``, scored on ``score_split``:
    the AUROC no model of that cohort can beat, up to sampling.

    Args:
        oracle: ``oracle.parquet`` of a simulated cohort.
        splits: ``subject_splits.parquet`` (subject_id, split).
        present: modality (a key of ``MODALITY_FACTORS``) -> (N,) bool per oracle row;
            a modality not given is present for every subject.
        fit_split, score_split: split names.
        confounds: oracle columns (``site``, ``ancestry``) the reader may also use, one
            indicator per class: what a model that reads a proxy of them (the scanner
            in the films, the ancestry in the genotypes or the record) can add. The
            genetic mean of an ancestry group, the site's link to the outcome and its
            ancestry mix are all in them; the default model is made not to read them.

    Returns:
        ``subject_id``, ``outcome``, ``true_risk`` and ``observed_interaction``, one row
        per ``score_split`` subject (oracle order).
    """
    from sklearn.linear_model import LogisticRegression

    unknown = sorted(set(present) - set(MODALITY_FACTORS))
    if unknown:
        raise ValueError(f"present: unknown modality {unknown}; known: {sorted(MODALITY_FACTORS)}")
    n = oracle.height
    for modality, mask in present.items():
        if np.shape(mask) != (n,):
            raise ValueError(
                f"present[{modality!r}] has shape {np.shape(mask)}, expected ({n},) "
                "(one flag per oracle row)"
            )
    factors: dict[str, np.ndarray] = {
        c: oracle[c].to_numpy().astype(float)
        for c in ("lung_disease", "physio_severity", "genetic_score", "modifier_carrier")
    }
    indicators = []
    for modality, mask in present.items():
        seen = np.asarray(mask, dtype=bool)
        for c in MODALITY_FACTORS[modality]:
            factors[c] = np.where(seen, factors[c], 0.0)
        indicators.append(seen.astype(float))
    unknown = sorted(set(confounds) - set(CONFOUND_COLUMNS))
    if unknown:
        raise ValueError(f"confounds: unknown {unknown}; known: {list(CONFOUND_COLUMNS)}")
    classes = [oracle[c].to_dummies().to_numpy().astype(float) for c in confounds]
    inter = factors["physio_severity"] * factors["modifier_carrier"]
    x = np.column_stack([*factors.values(), inter, *indicators, *classes])  # (N, F)
    fit, score = _split_masks(oracle, splits, fit_split, score_split)
    y = oracle["outcome"].to_numpy().astype(int)
    model = LogisticRegression(max_iter=2000).fit(x[fit], y[fit])
    out = oracle.filter(pl.Series(score)).select("subject_id", "outcome", "true_risk")
    return out.with_columns(pl.Series("observed_interaction", model.decision_function(x[score])))


def _split_masks(
    oracle: pl.DataFrame, splits: pl.DataFrame, fit_split: str, score_split: str
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) bool masks of the oracle rows in ``fit_split`` and ``score_split``; an empty
    one is an error naming the split."""
    split = _split_of(oracle, splits)
    fit, score = split == fit_split, split == score_split
    for wanted, rows in ((fit_split, fit), (score_split, score)):
        if not rows.any():
            raise ValueError(f"subject_splits has no subject of split {wanted!r} in the oracle")
    return fit, score


def _split_of(oracle: pl.DataFrame, splits: pl.DataFrame) -> np.ndarray:
    """The split name of every oracle row (N,); a subject without one is an error."""
    joined = oracle.select("subject_id").join(
        splits.select("subject_id", "split"), on="subject_id", how="left", maintain_order="left"
    )
    missing = joined.filter(pl.col("split").is_null())
    if missing.height:
        raise ValueError(
            f"subject_splits has no split for {missing.height} oracle subject(s), "
            f"e.g. subject_id {missing['subject_id'][0]}"
        )
    return joined["split"].to_numpy()


def format_ceilings(ceilings: dict[str, float]) -> str:
    """One line per feature set: ``name  auroc``."""
    return "\n".join(f"  {name:<18} AUROC {value:.3f}" for name, value in ceilings.items())
