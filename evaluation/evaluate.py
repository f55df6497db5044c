"""``clinfuse evaluate``: metrics.json and report.html for a trained run on a cohort.

The cohort may be the training cohort (default split: held_out) or another one
(a confound-flip test cohort, a new site: use ``split="all"``). Site and
ancestry for subgroup tables and the audit come from the evaluated cohort's own
subjects table, so a site never seen in training is still reported by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from clinfuse.datasets.schema import ORACLE_FILE, sidecar_root
from clinfuse.errors import InputError
from clinfuse.evaluation.audit import genetic_signal, run_audit
from clinfuse.evaluation.metrics import (
    auroc,
    auroc_drop,
    binary_report,
    bootstrap_ci,
    ece,
    paired_auroc_delta,
)
from clinfuse.evaluation.model_card import write_model_card
from clinfuse.evaluation.report import plot_curves, plot_genotype_path, save_overlays, write_html
from clinfuse.simulation.oracle import FEATURE_SETS
from clinfuse.training.artifact import ModelArtifact, load_artifact
from clinfuse.training.predict import collect_predictions


def evaluate(
    run_dir: str | Path,
    cohort_dir: str | Path,
    out_dir: str | Path | None = None,
    split: str | None = None,
    n_bootstrap: int = 1000,
    gradcam_images: int = 4,
    seed: int = 0,
    baseline: bool = True,
    shifted: str | Path | None = None,
) -> dict[str, Any]:
    """Scores ``split`` of ``cohort_dir`` with the run's artifact; writes metrics.json and report.html.

    With ``baseline``, the gradient-boosting baseline on fixed features
    (``evaluation.baseline``) is fit on the run's own training split and scored on
    the same samples; ``metrics["baseline"]`` holds its AUROC and the model's
    paired-bootstrap AUROC difference from it, and ``metrics["baseline_matched"]`` the
    same for the baseline given the default model's confound treatment (ComBat on the
    film features, site and ancestry read in training and averaged out of every score;
    ``BaselineConfig.confounds``): the like-for-like peer of a model made not to lean
    on site or ancestry.

    With ``shifted``, a second cohort (every labelled sample of it: e.g. the same world
    with the site or ancestry link to the outcome reversed, or an unseen site) is scored
    too; ``metrics["shift"]`` holds its AUROC, per-site AUROC and the drop from the
    evaluated split, with a bootstrap CI.
    """
    art = load_artifact(Path(run_dir) / "model")
    out = Path(out_dir) if out_dir else Path(run_dir) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    samples, split = _select_samples(cohort_dir, art, split)
    batches = artifact_batches(cohort_dir, samples, art, Path(run_dir) / "image_cache")
    pred = collect_predictions(art.model, batches)
    p = art.risk(pred["logit"])
    y = pred["label"].astype(int)
    metrics: dict[str, Any] = {"cohort": str(cohort_dir), "split": split, "model_id": art.model_id}
    metrics.update(binary_report(y, p, art.threshold, n_bootstrap=n_bootstrap, seed=seed))
    metrics.update(_oracle(cohort_dir, samples, y))
    baseline_logits: dict[str, np.ndarray] = {}
    if baseline:
        for key, confounds in BASELINES.items():
            metrics[key], logit = _baseline(
                run_dir, art, cohort_dir, samples, y, p, n_bootstrap, seed, confounds
            )
            if logit is not None:
                baseline_logits[f"{key}_logit"] = logit
    _write_predictions(out / PREDICTIONS_FILE, samples, y, p, pred["logit"], baseline_logits)
    metrics["per_site"] = _subgroups(samples["site"], y, p)
    metrics["per_ancestry"] = _subgroups(samples["ancestry"], y, p)
    if shifted is not None:
        cache = Path(run_dir) / "image_cache"
        metrics["shift"] = _shift(art, shifted, cache, y, p, n_bootstrap, seed)
    modality_embeddings = {
        m: (pred[f"embedding_{m}"], pred[f"present_{m}"]) for m in art.model.modalities
    }
    risk_factors = _risk_factors(cohort_dir, samples)
    markers = _risk_markers(cohort_dir, samples) if risk_factors is not None else None
    metrics["audit"] = _audit(
        pred["fused"], y, samples, seed, risk_factors, modality_embeddings, markers
    )
    signal = _genetic_signal(pred, y, risk_factors, seed)
    if signal is not None:
        metrics["audit"]["genetic_signal"] = signal
    metrics["attribution"] = _attribution_summary(art, batches)
    metrics.update(_group_selection(art, cohort_dir))
    plots = plot_curves(y, p, out)
    plots.update(plot_genotype_path(metrics.get("genomics", {}).get("path"), out))
    overlays = _gradcam(art, batches, out, gradcam_images)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    write_model_card(out, metrics, art.meta, run_dir)
    write_html(metrics, plots, overlays, out / "report.html")
    return metrics


def _select_samples(cohort_dir, art: ModelArtifact, split: str | None) -> tuple[pl.DataFrame, str]:
    from clinfuse.datasets.samples import load_samples

    samples = load_samples(cohort_dir)
    if split is None:
        split = "held_out" if (samples["split"] == "held_out").any() else "all"
    if split != "all":
        samples = samples.filter(pl.col("split") == split)
    if samples.height == 0:
        raise InputError(
            f"no labelled samples in split {split!r}", cohort_dir, "pick another --split"
        )
    return samples, split


def _shift(
    art: ModelArtifact,
    cohort_dir,
    cache_dir: Path,
    y: np.ndarray,
    p: np.ndarray,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """The model on every labelled sample of a shifted cohort, and the drop from ``y, p``."""
    out, y_s, p_s = discrimination(art, cohort_dir, cache_dir, "all", n_bootstrap, seed)
    drop = auroc_drop(y, p, y_s, p_s, n_bootstrap, seed=seed)
    out.update({"drop": drop["drop"], "drop_ci": drop["ci"]})
    return out


def discrimination(
    art: ModelArtifact,
    cohort_dir,
    cache_dir: Path | None,
    split: str = "all",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """AUROC (bootstrap CI), per-site AUROC and the oracle's AUROC of a model on a cohort
    split, without the audit, attribution or report (shift tests, benchmarks).

    Returns:
        the metrics, the labels (N,) and the risks (N,).
    """
    samples, _ = _select_samples(cohort_dir, art, split)
    pred = collect_predictions(art.model, artifact_batches(cohort_dir, samples, art, cache_dir))
    y, p = pred["label"].astype(int), art.risk(pred["logit"])
    out = {
        "cohort": str(cohort_dir),
        "n": int(len(y)),
        "prevalence": float(np.mean(y)),
        "auroc": auroc(y, p),
        "auroc_ci": list(bootstrap_ci(auroc, y, p, n_bootstrap, seed=seed)),
        "per_site": _subgroups(samples["site"], y, p),
    }
    out.update({f"shifted_{k}": v for k, v in _oracle(cohort_dir, samples, y).items()})
    return out, y, p


def artifact_batches(
    cohort_dir, samples: pl.DataFrame, art: ModelArtifact, cache_dir
) -> list[dict[str, Any]]:
    """The batches an exported model reads for ``samples`` of a cohort: built with the
    data settings and DataSpec the artifact was trained with (films read only when the
    model has an image encoder; ``cache_dir`` the decoded-film cache, or None)."""
    from clinfuse.datasets.datamodule import config_from_dict, make_loader

    cfg = config_from_dict(art.data_config)
    images = "image" in art.model.encoders  # a model without one reads no film
    return list(make_loader(cohort_dir, samples, art.spec, cfg, cache_dir, images))


def _oracle(cohort_dir, samples: pl.DataFrame, y: np.ndarray) -> dict[str, Any]:
    rows = _oracle_rows(cohort_dir, samples, ["true_risk"])
    if rows is None:
        return {}
    return {"oracle_auroc": auroc(y, rows["true_risk"].fill_null(float("nan")).to_numpy())}


def _oracle_rows(cohort_dir, samples: pl.DataFrame, columns: list[str]) -> pl.DataFrame | None:
    """``columns`` of ``oracle.parquet`` aligned to ``samples`` (null for subjects it does
    not list), or None when the cohort has no oracle."""
    path = sidecar_root(cohort_dir) / ORACLE_FILE
    if not path.is_file():
        return None
    oracle = pl.read_parquet(path, columns=["subject_id", *columns]).unique("subject_id")
    return samples.select("subject_id").join(
        oracle, on="subject_id", how="left", maintain_order="left"
    )


PREDICTIONS_FILE = "predictions.parquet"


def _write_predictions(
    path: Path,
    samples: pl.DataFrame,
    y: np.ndarray,
    risk: np.ndarray,
    logit: np.ndarray,
    baseline_logits: dict[str, np.ndarray],
) -> None:
    """One row per evaluated sample: keys, split, label, calibrated risk and raw logit
    (and each baseline's logit that ran: ``baseline_logit``, ``baseline_matched_logit``),
    for paired comparisons with other models."""
    from clinfuse.integrity.checksums import write_parquet

    frame = samples.select("subject_id", "prediction_time", "split").with_columns(
        pl.Series("label", y.astype(bool)),
        pl.Series("risk", np.asarray(risk, dtype=np.float64)),
        pl.Series("logit", np.asarray(logit, dtype=np.float64)),
        *(pl.Series(k, v.astype(np.float64)) for k, v in baseline_logits.items()),
    )
    write_parquet(frame, path)


# metrics.json key -> the baseline's confound treatment (``BaselineConfig.confounds``).
BASELINES = {"baseline": "none", "baseline_matched": "matched"}
BASELINE_NAMES = {"none": "gbdt_features", "matched": "gbdt_confound_matched"}


def _baseline(
    run_dir,
    art: ModelArtifact,
    cohort_dir,
    samples: pl.DataFrame,
    y,
    p,
    n_bootstrap: int,
    seed: int,
    confounds: str = "none",
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The gradient-boosting baseline's AUROC on these samples and the model's margin over
    it, and the baseline's logits (None when it could not be fit)."""
    from clinfuse.evaluation.baseline import BaselineConfig, fit_run_baseline

    try:
        cfg = BaselineConfig(confounds=confounds)
        fitted = fit_run_baseline(run_dir, art.model, cfg, seed=seed)
        logit = fitted.logit(cohort_dir, samples)  # (N,)
    except (FileNotFoundError, ValueError) as err:  # e.g. the training cohort has moved
        return {"skipped": f"baseline not fit: {err}"}, None
    delta = paired_auroc_delta(y, p, logit, n_bootstrap, seed=seed)
    return {
        "model": BASELINE_NAMES[confounds],
        "modalities": list(fitted.modalities),
        "n_features": fitted.n_features,
        "n_iter": fitted.n_iter,
        "auroc": auroc(y, logit),
        "auroc_ci": list(bootstrap_ci(auroc, y, logit, n_bootstrap, seed=seed)),
        "delta": delta["delta"],
        "delta_ci": delta["ci"],
    }, logit


def _subgroups(groups: pl.Series, y: np.ndarray, p: np.ndarray) -> dict[str, dict[str, Any]]:
    names = groups.fill_null("unknown").to_numpy()
    out = {}
    for name in sorted(set(names)):
        m = names == name
        out[str(name)] = {
            "n": int(m.sum()),
            "prevalence": float(y[m].mean()),
            "auroc": auroc(y[m], p[m]),
            "ece": ece(y[m], p[m]),
            "mean_risk": float(p[m].mean()),
        }
    return out


# The simulator's latent causes of the outcome (oracle.parquet): the audit's floor.
RISK_FACTORS = FEATURE_SETS["fused_additive"]


def _risk_factors(cohort_dir, samples: pl.DataFrame) -> np.ndarray | None:
    """The true risk factors of each sample (N, F) when the cohort has an oracle, else None.

    Subjects the oracle does not list get NaN rows (left out of that probe).
    """
    path = sidecar_root(cohort_dir) / ORACLE_FILE
    if not path.is_file():
        return None
    missing = [c for c in RISK_FACTORS if c not in pl.read_parquet_schema(path)]
    if missing:
        raise ValueError(f"{path}: oracle has no risk-factor column(s) {missing}")
    rows = _oracle_rows(cohort_dir, samples, list(RISK_FACTORS))
    factors = rows.select(pl.col(c).cast(pl.Float64) for c in RISK_FACTORS)
    return factors.fill_null(float("nan")).to_numpy()  # (N, F)


def _risk_markers(cohort_dir, samples: pl.DataFrame) -> np.ndarray | None:
    """The causal markers' dosages of each sample (N, K), when the cohort names its causal
    groups (the simulator's ``oracle_groups.parquet``) and has genotypes, else None.

    Missing calls and patients without genotypes take the marker's mean over these
    samples: what a model can read of them is nothing beyond the cohort's average.
    """
    from clinfuse.evaluation.baseline import genotype_features

    root = sidecar_root(cohort_dir)
    truth, markers = root / "oracle_groups.parquet", root / "markers.parquet"
    if not truth.is_file() or not markers.is_file():
        return None
    causal = pl.read_parquet(truth).filter(pl.col("causal"))["group"].to_list()
    names = pl.read_parquet(markers).filter(pl.col("group").is_in(causal))["marker"].to_list()
    if not names:
        return None
    dosage, _ = genotype_features(cohort_dir, samples, names)  # (N, K), NaN = not called
    called = np.isfinite(dosage)
    if not called.any():
        return None
    mean = np.where(called.any(0), np.nansum(dosage, 0) / np.maximum(called.sum(0), 1), 0.0)
    return np.where(called, dosage, mean)


def _audit(
    fused: np.ndarray,
    y: np.ndarray,
    samples: pl.DataFrame,
    seed: int,
    risk_factors: np.ndarray | None = None,
    modality_embeddings: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    risk_markers: np.ndarray | None = None,
) -> dict[str, Any]:
    confounds, vocab = {}, {}
    for name in ("site", "ancestry"):
        values = samples[name]
        if values.null_count() == len(values):
            continue
        vocab[name] = sorted(values.drop_nulls().unique().to_list())
        index = {v: i for i, v in enumerate(vocab[name])}
        confounds[name] = np.array([index.get(v, -1) for v in values.to_list()])
    return run_audit(
        fused, y, confounds, vocab, seed, risk_factors, modality_embeddings, risk_markers
    )


def run_genetic_signal(
    art: ModelArtifact, cohort_dir, cache_dir: Path | None, split: str = "held_out", seed: int = 0
) -> dict[str, Any] | None:
    """``audit.genetic_signal`` of a model on a cohort split, without the rest of the
    evaluation (benchmarks that compare it across confound treatments)."""
    samples, _ = _select_samples(cohort_dir, art, split)
    pred = collect_predictions(art.model, artifact_batches(cohort_dir, samples, art, cache_dir))
    y = pred["label"].astype(int)
    return _genetic_signal(pred, y, _risk_factors(cohort_dir, samples), seed)


def _genetic_signal(
    pred: dict[str, np.ndarray], y: np.ndarray, risk_factors: np.ndarray | None, seed: int
) -> dict[str, Any] | None:
    """The true genetic signal read from the genotype embedding and the fused representation
    (``audit.genetic_signal``), when the cohort has an oracle and the model a genotype encoder."""
    if risk_factors is None or "embedding_genomics" not in pred:
        return None
    column = {name: risk_factors[:, i] for i, name in enumerate(RISK_FACTORS)}
    return genetic_signal(
        pred["embedding_genomics"],
        pred["present_genomics"],
        pred["fused"],
        y,
        column["genetic_score"],
        column["modifier_carrier"],
        seed=seed,
    )


def _group_selection(art: ModelArtifact, cohort_dir) -> dict[str, Any]:
    """Marker groups kept by the sparse-group-lasso encoder, scored against the truth when known."""
    encoder = art.model.encoders["genomics"] if "genomics" in art.model.encoders else None  # noqa: SIM401 (ModuleDict has no .get)
    if encoder is None or not hasattr(encoder, "selected_groups"):
        return {}
    selected = encoder.selected_groups()
    out: dict[str, Any] = {"selected_groups": selected, "n_groups": len(art.spec.groups)}
    truth = sidecar_root(cohort_dir) / "oracle_groups.parquet"
    if truth.is_file():
        from clinfuse.encoders.genomics import group_selection_metrics

        causal = pl.read_parquet(truth).filter(pl.col("causal"))["group"].to_list()
        out["causal_groups"] = causal
        out.update({f"group_{k}": v for k, v in group_selection_metrics(selected, causal).items()})
    if "genotype_path" in art.meta:  # the strength chosen by training (select: path)
        out["path"] = art.meta["genotype_path"]
    return {"genomics": out}


def _attribution_summary(art: ModelArtifact, batches: list[dict[str, Any]]) -> dict[str, Any]:
    from clinfuse.fusion.attribution import summarize_attribution

    return summarize_attribution(art.model, batches)


def _gradcam(art: ModelArtifact, batches: list[dict[str, Any]], out: Path, n: int) -> list[str]:
    """Grad-CAM of the risk logit for a few films, the other modalities held fixed.

    The gradient flows through the pooled image embedding; image patch tokens (for
    attention fusion) enter as constants.
    """
    model = art.model
    if n <= 0 or "image" not in model.encoders:
        return []
    from clinfuse.encoders.gradcam import encoder_grad_cam

    batch = next((b for b in batches if bool(b["image_present"].any())), None)
    if batch is None:
        return []
    keep = batch["image_present"].nonzero().flatten()[:n]
    sub = _take(batch, keep)
    with torch.no_grad():
        embeddings, tokens = model.encode(sub)
        risk = art.risk(model.fuse(embeddings, tokens)["logit"].numpy()).tolist()

    def score(image_embedding: torch.Tensor) -> torch.Tensor:
        emb = {**embeddings, "image": (image_embedding, embeddings["image"][1])}
        return model.fuse(emb, tokens)["logit"]

    cams = encoder_grad_cam(model.encoders["image"], sub["image"], score)
    captions = [f"risk {r:.2f}, outcome {int(y)}" for r, y in zip(risk, sub["label"], strict=True)]
    return save_overlays(sub["image"][:, 0].numpy(), cams.numpy(), captions, out)


def _take(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    return {k: _take(v, index) if isinstance(v, dict) else v[index] for k, v in batch.items()}


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
