"""The confound audit: does the frozen representation still encode site or ancestry?

A low adversary loss during training proves nothing on its own: the adversary
may simply have lost the game. The audit freezes the model, embeds held-out
patients, and fits a FRESH cross-validated probe for each confound. Its accuracy
is reported next to the majority-class rate (what a probe that learned nothing
scores) and its balanced accuracy next to chance (1 / number of classes).

It also asks whether the risk signal transfers across sites: a logistic probe for
the outcome fitted on the embeddings of all sites but one and scored on the
left-out site (leave-one-site-out AUROC).

Shapes:
    embeddings (N, D); confound codes (N,) with -1 = unknown; labels (N,)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clinfuse.evaluation.metrics import auroc


def probe_confound(
    embeddings: np.ndarray,
    codes: np.ndarray,
    names: list[str] | None = None,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated logistic probe predicting a categorical confound from embeddings.

    Returns:
        probe_accuracy, probe_balanced_accuracy, majority_rate, chance_balanced,
        n, n_classes, classes (names when given) and folds used. ``probe_accuracy``
        is NaN when fewer than two classes are present.
    """
    keep = np.asarray(codes) >= 0
    z, c = np.asarray(embeddings)[keep], np.asarray(codes)[keep]
    classes, counts = np.unique(c, return_counts=True)
    # A class seen once cannot be both fitted and scored in cross-validation: the
    # probe runs on the classes with at least two samples; the rates below use all.
    rare = classes[counts < 2]
    out: dict[str, Any] = {
        "n": int(len(c)),
        "n_classes": int(len(classes)),
        "classes": [names[i] if names and i < len(names) else str(i) for i in classes],
        "majority_rate": float(counts.max() / counts.sum()) if len(c) else float("nan"),
        "chance_balanced": 1.0 / len(classes) if len(classes) else float("nan"),
    }
    out["excluded_rare_classes"] = int(len(rare))
    usable = ~np.isin(c, rare)
    z, c = z[usable], c[usable]
    counts = counts[counts >= 2]
    k = int(min(folds, counts.min())) if len(counts) > 1 else 0
    if k < 2:
        out.update(probe_accuracy=float("nan"), probe_balanced_accuracy=float("nan"), folds=k)
        return out
    pred = cross_val_predict(
        _probe(seed), z, c, cv=StratifiedKFold(k, shuffle=True, random_state=seed)
    )
    out.update(
        probe_accuracy=float(np.mean(pred == c)),
        probe_balanced_accuracy=float(balanced_accuracy_score(c, pred)),
        folds=k,
    )
    return out


def leave_one_site_out(
    embeddings: np.ndarray,
    labels: np.ndarray,
    sites: np.ndarray,
    site_names: list[str],
    seed: int = 0,
) -> dict[str, float]:
    """Outcome AUROC on each site of a probe fitted on the other sites' embeddings."""
    z, y, s = np.asarray(embeddings), np.asarray(labels).astype(int), np.asarray(sites)
    out = {}
    for code in np.unique(s[s >= 0]):
        train, test = s != code, s == code
        if len(np.unique(y[train])) < 2 or len(np.unique(y[test])) < 2:
            continue
        model = _probe(seed).fit(z[train], y[train])
        name = site_names[code] if code < len(site_names) else str(code)
        out[name] = auroc(y[test], model.predict_proba(z[test])[:, 1])
    return out


def run_audit(
    embeddings: np.ndarray,
    labels: np.ndarray,
    confounds: dict[str, np.ndarray],
    vocabularies: dict[str, list[str]],
    seed: int = 0,
) -> dict[str, Any]:
    """The full audit: a probe per confound plus leave-one-site-out AUROC."""
    out: dict[str, Any] = {
        name: probe_confound(embeddings, codes, vocabularies.get(name), seed=seed)
        for name, codes in confounds.items()
    }
    if "site" in confounds:
        out["leave_one_site_out_auroc"] = leave_one_site_out(
            embeddings, labels, confounds["site"], vocabularies.get("site", []), seed
        )
    return out


def _probe(seed: int):
    return make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    )
