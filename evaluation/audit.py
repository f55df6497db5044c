"""The confound audit: does the frozen representation still encode site or ancestry?

A low adversary loss during training proves nothing on its own: the adversary
may simply have lost the game. The audit freezes the model, embeds held-out
patients, and fits a FRESH cross-validated probe for each confound. Its accuracy
is reported next to the majority-class rate (what a probe that learned nothing
scores) and its balanced accuracy next to chance (1 / number of classes).

Three probes run on the same folds: a logistic regression (linear leakage), a
small MLP (one hidden layer; smooth non-linear leakage a linear probe misses) and
gradient-boosted trees (scikit-learn ``HistGradientBoostingClassifier``: leakage
in thresholds and interactions of a few features, which neither of the others
reads well).

On a simulated cohort the majority rate is too low a floor: sites differ in case
mix and ancestry shifts the genetic score, so a representation that carries only
the genuine risk factors still predicts site and ancestry through them. When the
true risk factors are known (the simulator's ``oracle.parquet``), the same probes
are fitted on them for the same patients (``risk_factor_probe_accuracy``): what
any representation that carries the risk cannot avoid.

The latent factors are scalars (the genetic score is one number per patient), but a
model reads the genetic risk from the causal genes' dosages, and those dosages
differ in frequency between populations: on the demo cohort the causal markers'
dosages alone give ancestry to a logistic probe at 0.86-0.90 (majority 0.41), the
scalar factors at 0.45. With the causal markers known (``oracle_groups.parquet``),
the same probes also run on the risk factors together with those dosages
(``risk_marker_probe_accuracy``), and a probe's floor is the larger of the two: a
model that keeps the genes' real signal cannot be held below what the genes
themselves say about ancestry.

It also asks whether the risk signal transfers across sites: a logistic probe for
the outcome fitted on the embeddings of all sites but one and scored on the
left-out site (leave-one-site-out AUROC).

Where the confound enters: given each modality's own embedding (before fusion),
the same two probes run on it, over the patients that have the modality
(``<confound>.by_modality``). A site read from the image embedding points at the
scanners; an ancestry read from the genotype embedding at population structure.

Whether the true genetic signal survives confound treatment (``genetic_signal``):
on the genotype embedding and on the fused representation of the patients with
genotypes, cross-validated linear probes read the simulator's carrier status
(logistic, AUROC), its genetic score (ridge, R^2) and the outcome (logistic, AUROC).
A treatment that removes ancestry must leave these where the untreated model has
them.

Shapes:
    embeddings (N, D); confound codes (N,) with -1 = unknown; labels (N,);
    risk_factors (N, F); genetic_score, carrier (N,)
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clinfuse.evaluation.metrics import auroc

# Probe kinds of the audit: key prefix -> name in the verdict.
PROBE_KINDS = {"": "logistic", "mlp_": "MLP", "gbt_": "trees"}
# Key prefixes of the floors: the latent risk factors, and those with the causal markers.
RISK_SOURCES = ("risk_factor_", "risk_marker_")


def probe_confound(
    embeddings: np.ndarray,
    codes: np.ndarray,
    names: list[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    risk_factors: np.ndarray | None = None,
    risk_markers: np.ndarray | None = None,
) -> dict[str, Any]:
    """Cross-validated probes predicting a categorical confound from embeddings.

    Args:
        embeddings: the frozen representation of each sample.
        codes: confound class per sample (-1 = unknown, left out).
        names: class names, for the report.
        folds: stratified folds (fewer when the smallest class is smaller).
        seed: seeds the folds and the probes.
        risk_factors: the true risk factors of the same samples (NaN rows left out
            of that probe); the same probes on the same folds give the floor that a
            representation carrying the risk cannot go below.
        risk_markers: the causal markers' dosages of the same samples (N, K; needs
            ``risk_factors``); the same probes on the factors and these dosages
            together give the ``risk_marker_`` floor.

    Returns:
        probe_accuracy and probe_balanced_accuracy (logistic), mlp_probe_accuracy and
        mlp_probe_balanced_accuracy (MLP), gbt_probe_accuracy and
        gbt_probe_balanced_accuracy (gradient-boosted trees), the same three with a
        ``risk_factor_`` prefix (when ``risk_factors`` is given), majority_rate, chance_balanced, n, n_classes,
        classes (names when given) and folds used. Accuracies are NaN when fewer
        than two classes are present.
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
    out.update(_probe_scores(z[usable], c[usable], folds, seed))
    if risk_factors is not None:
        factors = np.asarray(risk_factors, dtype=np.float64)[keep][usable]
        out.update(_risk_factor_scores(factors, c[usable], folds, seed))
        if risk_markers is not None:
            markers = np.asarray(risk_markers, dtype=np.float64)[keep][usable]
            both = np.hstack([factors, markers])
            out.update(_risk_factor_scores(both, c[usable], folds, seed, "risk_marker_"))
    return out


def _probe_scores(z: np.ndarray, c: np.ndarray, folds: int, seed: int) -> dict[str, Any]:
    """Logistic and MLP probe accuracies (cross-validated) of ``c`` from ``z``."""
    counts = np.unique(c, return_counts=True)[1]
    k = int(min(folds, counts.min())) if len(counts) > 1 else 0
    out: dict[str, Any] = {"folds": k}
    for prefix, probe in (("", _probe), ("mlp_", _mlp_probe), ("gbt_", _gbt_probe)):
        acc, bal = _cv_accuracy(probe(seed), z, c, k, seed) if k >= 2 else (np.nan, np.nan)
        out[f"{prefix}probe_accuracy"] = float(acc)
        out[f"{prefix}probe_balanced_accuracy"] = float(bal)
    return out


def _risk_factor_scores(
    factors: np.ndarray, c: np.ndarray, folds: int, seed: int, prefix: str = "risk_factor_"
) -> dict[str, Any]:
    """The same probes on the true risk factors: the floor a risk-carrying representation meets."""
    known = np.isfinite(factors).all(axis=1)
    scores = _probe_scores(factors[known], c[known], folds, seed)
    out: dict[str, Any] = {f"{prefix}n": int(known.sum())}
    for kind in PROBE_KINDS:
        for stat in ("accuracy", "balanced_accuracy"):
            out[f"{prefix}{kind}probe_{stat}"] = scores[f"{kind}probe_{stat}"]
    return out


def _cv_accuracy(probe: Any, z: np.ndarray, c: np.ndarray, k: int, seed: int) -> tuple:
    """Accuracy and balanced accuracy of out-of-fold predictions."""
    with warnings.catch_warnings():
        # A probe stopped at max_iter still gives a valid (if weaker) upper bound
        # on what it could not read; the warning would only clutter evaluate.
        warnings.simplefilter("ignore", ConvergenceWarning)
        pred = cross_val_predict(
            probe, z, c, cv=StratifiedKFold(k, shuffle=True, random_state=seed)
        )
    return float(np.mean(pred == c)), float(balanced_accuracy_score(c, pred))


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
    risk_factors: np.ndarray | None = None,
    modality_embeddings: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    risk_markers: np.ndarray | None = None,
) -> dict[str, Any]:
    """The full audit: probes per confound plus leave-one-site-out AUROC.

    Args:
        embeddings: frozen representation of the evaluated samples.
        labels: outcome per sample.
        confounds: confound name -> class codes (-1 = unknown).
        vocabularies: confound name -> class names.
        seed: seeds folds and probes.
        risk_factors: true risk factors of the same samples when known (simulated
            cohorts); adds the ``risk_factor_*`` floor to each confound.
        modality_embeddings: modality -> (embedding (N, D_m), present (N,) bool);
            adds ``by_modality`` to each confound.
        risk_markers: the causal markers' dosages of the same samples when known
            (N, K, missing calls imputed); adds the ``risk_marker_*`` floor.
    """
    out: dict[str, Any] = {
        name: probe_confound(
            embeddings,
            codes,
            vocabularies.get(name),
            seed=seed,
            risk_factors=risk_factors,
            risk_markers=risk_markers,
        )  # fmt: skip
        for name, codes in confounds.items()
    }
    if modality_embeddings:
        for name, codes in confounds.items():
            out[name]["by_modality"] = probe_by_modality(modality_embeddings, codes, seed)
    if "site" in confounds:
        out["leave_one_site_out_auroc"] = leave_one_site_out(
            embeddings, labels, confounds["site"], vocabularies.get("site", []), seed
        )
    if confounds:
        out["verdict"] = audit_verdict({name: out[name] for name in confounds})
    return out


def probe_limit(majority: float, risk_factor: float, n: int) -> tuple[float, float]:
    """The floor a probe may reach and the limit it is held to: ``(floor, floor + 2 s.e.)``.

    floor = max(majority rate, the same probe on the true risk factors): a
    representation that carries the risk reads the confound as well as the risk
    factors do (sites differ in case mix). ``risk_factor`` is the larger of the probe
    on the latent factors and the probe on them with the causal markers' dosages, when
    both ran. Two binomial standard errors of an accuracy at the floor over ``n``
    patients allow for the probe's own sampling noise.
    """
    floor = majority if not np.isfinite(risk_factor) else max(majority, risk_factor)
    return floor, floor + 2.0 * float(np.sqrt(floor * (1.0 - floor) / max(n, 1)))


def audit_verdict(probes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every probe (fused and per modality, each kind) against its floor + 2 s.e.

    Args:
        probes: confound -> ``probe_confound`` result (with ``by_modality`` when run).

    Returns:
        ``passed`` (bool: no probe above its limit), ``above`` (one entry per probe
        above: confound, representation, probe kind, accuracy, floor, limit) and
        ``checked`` (probes compared).
    """
    above, checked = [], 0
    for name, a in probes.items():
        places = [("fused", a, a["majority_rate"], a["n"])]
        places += [(m, b, b["majority_rate"], b["n"]) for m, b in a.get("by_modality", {}).items()]
        for where, res, majority, n in places:
            for prefix, kind in PROBE_KINDS.items():
                acc = res.get(f"{prefix}probe_accuracy", float("nan"))
                if not np.isfinite(acc):
                    continue
                rf = [a.get(f"{src}{prefix}probe_accuracy", np.nan) for src in RISK_SOURCES]
                rf = max((v for v in rf if np.isfinite(v)), default=float("nan"))
                floor, limit = probe_limit(majority, rf, n)
                checked += 1
                if acc > limit:
                    above.append(
                        {"confound": name, "representation": where, "probe": kind,
                         "accuracy": acc, "floor": floor, "limit": limit}
                    )  # fmt: skip
    return {"passed": not above, "above": above, "checked": checked}


def probe_by_modality(
    modality_embeddings: dict[str, tuple[np.ndarray, np.ndarray]], codes: np.ndarray, seed: int
) -> dict[str, dict[str, Any]]:
    """The confound probes on each modality's embedding, over the samples that have it.

    Returns:
        modality -> ``probe_accuracy``, ``mlp_probe_accuracy``, ``majority_rate``
        and ``n`` of those samples.
    """
    out = {}
    for modality, (z, present) in modality_embeddings.items():
        present = np.asarray(present, dtype=bool)
        res = probe_confound(np.asarray(z)[present], np.asarray(codes)[present], seed=seed)
        keys = ("probe_accuracy", "mlp_probe_accuracy", "gbt_probe_accuracy", "majority_rate", "n")
        out[modality] = {k: res[k] for k in keys}
    return out


def genetic_signal(
    genotype_embedding: np.ndarray,
    present: np.ndarray,
    fused: np.ndarray,
    labels: np.ndarray,
    genetic_score: np.ndarray,
    carrier: np.ndarray,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated linear probes of the true genetic signal, on the patients with genotypes.

    Each probe uses the folds of the confound probes (stratified, shuffled with ``seed``;
    plain k-fold for the continuous score); every prediction comes from a fold that did
    not see the patient.

    Args:
        genotype_embedding: the genotype encoder's output (N, D_g).
        present: which samples have genotypes (N,) bool.
        fused: the fused representation of the same samples (N, D).
        labels: outcome per sample (N,).
        genetic_score: the simulator's genetic score per sample (N,), NaN = unknown.
        carrier: the simulator's modifier-carrier status per sample (N,), 0/1, NaN = unknown.
        folds: number of folds (fewer when a class is smaller).
        seed: seeds folds and probes.

    Returns:
        ``carrier_auroc`` (logistic), ``genetic_score_r2`` (ridge), ``outcome_auroc``
        (logistic) from the genotype embedding, the same three with a ``fused_`` prefix
        from the fused representation, and ``n``, the samples probed. NaN where a target
        has a single class or too few samples.
    """
    score = np.asarray(genetic_score, dtype=np.float64)
    carrier = np.asarray(carrier, dtype=np.float64)
    keep = np.asarray(present, dtype=bool) & np.isfinite(score) & np.isfinite(carrier)
    if not np.isin(carrier[keep], (0.0, 1.0)).all():
        raise ValueError("genetic signal: carrier status must be 0/1 (or NaN when unknown)")
    targets = (carrier[keep].astype(int), score[keep], np.asarray(labels)[keep].astype(int))
    out: dict[str, Any] = {"n": int(keep.sum())}
    for prefix, z in (("", genotype_embedding), ("fused_", fused)):
        z = np.asarray(z, dtype=np.float64)[keep]
        out[f"{prefix}carrier_auroc"] = _cv_auroc(z, targets[0], folds, seed)
        out[f"{prefix}genetic_score_r2"] = _cv_r2(z, targets[1], folds, seed)
        out[f"{prefix}outcome_auroc"] = _cv_auroc(z, targets[2], folds, seed)
    return out


def _cv_auroc(z: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """AUROC of a logistic probe's out-of-fold decision function for binary ``y``."""
    counts = np.unique(y, return_counts=True)[1]
    k = int(min(folds, counts.min())) if len(counts) == 2 else 0
    if k < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cv = StratifiedKFold(k, shuffle=True, random_state=seed)
        scores = cross_val_predict(_probe(seed), z, y, cv=cv, method="decision_function")
    return auroc(y, scores)


def _cv_r2(z: np.ndarray, target: np.ndarray, folds: int, seed: int) -> float:
    """Out-of-fold R^2 of a ridge probe (standardized inputs, alpha 1) for ``target``."""
    k = int(min(folds, len(target) // 2))
    if k < 2:
        return float("nan")
    probe = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    pred = cross_val_predict(probe, z, target, cv=KFold(k, shuffle=True, random_state=seed))
    return float(r2_score(target, pred))


def _probe(seed: int):
    return make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    )


def _mlp_probe(seed: int):
    """One hidden layer of 64 ReLU units with L2 1e-2 (no early stopping: a split off
    a few dozen held-out patients would leave classes out)."""
    mlp = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-2, max_iter=400, random_state=seed)
    return make_pipeline(StandardScaler(), mlp)


def _gbt_probe(seed: int):
    """Gradient-boosted trees, shallow and few: 100 rounds of 15-leaf trees with leaves of
    at least 20 patients and an L2 penalty. No early stopping: its internal split of a
    few dozen held-out patients per fold would leave classes out (as for the MLP)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        learning_rate=0.1,
        max_iter=100,
        max_leaf_nodes=15,
        min_samples_leaf=20,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=seed,
    )
