"""The model card: a Markdown summary of a trained model and its evaluation.

``docs/model-card-template.md`` is the single source of the card's layout and prose.
``render_model_card`` reads it, fills every ``{{name}}`` placeholder from the
evaluation metrics (``metrics.json``), the artifact metadata (``artifact.json``:
model id, model and data config, DataSpec, temperature, threshold, provenance) and
the resolved run config (``config.yaml``), and refuses to return a card with a
placeholder left unfilled. ``clinfuse evaluate`` writes the card as
``model_card.md`` beside ``metrics.json``.
"""

from __future__ import annotations

import math
import numbers
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from clinfuse.datasets.batch import MODALITIES

TEMPLATE = files("clinfuse") / "docs" / "model-card-template.md"  # package data
CARD_FILE = "model_card.md"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_COMMENT = re.compile(r"\n*<!--.*?-->\n*", re.DOTALL)
_SMALL_SUBGROUP = 30
# A probe "recovers" a confound when its accuracy beats the majority rate by more
# than this many binomial standard errors of the majority rate, sqrt(p (1 - p) / n).
_PROBE_Z = 2.0


def render_model_card(
    metrics: dict[str, Any],
    artifact_meta: dict[str, Any],
    run_config: dict[str, Any],
    template: str | Path | None = None,
) -> str:
    """Fills the model-card template.

    Args:
        metrics: the ``metrics.json`` dict written by ``evaluate``.
        artifact_meta: the artifact's ``artifact.json`` dict (``ModelArtifact.meta``).
        run_config: the run's resolved ``config.yaml`` as a dict ({} when the run
            directory has none, e.g. a sweep's best model).
        template: template path (default ``docs/model-card-template.md``).

    Returns:
        The card as Markdown.

    Raises:
        FileNotFoundError: the template is missing.
        ValueError: the template names a placeholder this module does not fill.
    """
    text = _COMMENT.sub("\n\n", _read_template(template), count=1)
    fields = _fields(metrics, artifact_meta, run_config)
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(fields))
    if unknown:
        raise ValueError(f"{template or TEMPLATE}: unknown placeholders {unknown}")
    return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], text)


def write_model_card(
    out_dir: str | Path,
    metrics: dict[str, Any],
    artifact_meta: dict[str, Any],
    run_dir: str | Path,
) -> Path:
    """Renders the card with ``run_dir/config.yaml`` (when present); writes ``out_dir/model_card.md``."""
    config_path = Path(run_dir) / "config.yaml"
    run_config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    path = Path(out_dir) / CARD_FILE
    path.write_text(render_model_card(metrics, artifact_meta, run_config or {}))
    return path


def _read_template(template: str | Path | None) -> str:
    path = Path(template) if template else TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model-card template not found")
    return path.read_text()


def _fields(metrics: dict, meta: dict, run_config: dict) -> dict[str, str]:
    model_id = str(metrics.get("model_id") or meta.get("model_id") or "unknown")
    fields = {"model_id": model_id, "model_id_short": model_id[:12]}
    fields.update(_model_fields(metrics, meta, run_config))
    fields.update(_data_fields(metrics, meta))
    fields.update(_metric_fields(metrics))
    fields.update(_audit_fields(metrics.get("audit") or {}))
    fields["calibration"] = _calibration(metrics, meta)
    fields["limitations_found"] = _limitations(metrics, meta)
    fields.update(_provenance_fields(meta.get("provenance") or {}))
    return fields


# ---------------------------------------------------------------- model details


def _model_fields(metrics: dict, meta: dict, run_config: dict) -> dict[str, str]:
    model = meta.get("model_config") or run_config.get("model") or {}
    return {
        "modalities": _modalities(metrics.get("attribution") or {}),
        "encoders": _encoders(model.get("encoders") or {}),
        "fusion": _fusion(model.get("fusion") or {}, model),
        "adversary": _adversary(model.get("adversary") or {}),
        "training": _training(run_config, meta.get("data_config") or {}),
    }


def _modalities(attribution: dict) -> str:
    used = [m for m in MODALITIES if f"{m}_mean_abs_delta_logit" in attribution]
    return ", ".join(used) if used else "not recorded"


def _encoders(encoders: dict) -> str:
    if not encoders:
        return "not recorded"
    return "; ".join(f"`{name}` ({_kv(cfg)})" for name, cfg in encoders.items())


def _fusion(fusion: dict, model: dict) -> str:
    name = fusion.get("name", "not recorded")
    extra = {"modality_dropout": model.get("modality_dropout")}
    return f"`{name}` ({_kv({**(fusion.get('cfg') or {}), **extra})})"


def _adversary(adv: dict) -> str:
    if not adv.get("enabled"):
        return "none (trained without confound adversary)"
    confounds = ", ".join(adv.get("confounds") or []) or "none"
    keys = ("mode", "lambda_max", "gamma", "weight", "on_modalities")
    return f"hides {confounds} ({_kv({k: adv[k] for k in keys if k in adv})})"


def _training(run_config: dict, data: dict) -> str:
    optim = run_config.get("optim") or {}
    picked = {"seed": run_config.get("seed")}
    picked.update({k: optim.get(k) for k in ("loss", "lr", "weight_decay", "max_epochs")})
    picked.update({k: data.get(k) for k in ("batch_size", "image_size", "window_hours")})
    picked = {k: v for k, v in picked.items() if v is not None}
    return _kv(picked) if picked else "run config not recorded"


def _kv(cfg: dict) -> str:
    items = [f"{k}={_short(v)}" for k, v in cfg.items() if v is not None and k != "cache_dir"]
    return ", ".join(items) if items else "defaults"


def _short(value: Any) -> str:
    # Sampled hyperparameters carry 16 digits; four significant ones identify them.
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}"
    return str(value)


# ------------------------------------------------------------------------- data


def _data_fields(metrics: dict, meta: dict) -> dict[str, str]:
    spec = meta.get("spec") or {}
    provenance = meta.get("provenance") or {}
    return {
        "training_cohort": f"`{provenance.get('cohort', 'not recorded')}`",
        "evaluated_cohort": f"`{metrics.get('cohort', 'not recorded')}`",
        "split": str(metrics.get("split", "not recorded")),
        "n": str(metrics.get("n", "n/a")),
        "prevalence": _num(metrics.get("prevalence")),
        "train_prevalence": _num(meta.get("train_prevalence")),
        "sites_seen": _names(spec.get("sites")),
        "ancestries_seen": _names(spec.get("ancestries")),
    }


def _names(values: list | None) -> str:
    return ", ".join(_cell(v) for v in values) if values else "none recorded"


# ---------------------------------------------------------------------- metrics


def _metric_fields(metrics: dict) -> dict[str, str]:
    return {
        "metrics_table": _metrics_table(metrics),
        "oracle": _oracle(metrics),
        "per_site_table": _subgroup_table(metrics.get("per_site") or {}, "site"),
        "per_ancestry_table": _subgroup_table(metrics.get("per_ancestry") or {}, "ancestry"),
        "genomic_groups": _genomic_groups(metrics.get("genomics") or {}),
    }


def _genomic_groups(g: dict) -> str:
    if "selected_groups" not in g:
        return "No sparse-group-lasso genotype encoder: no group selection to report."
    kept = ", ".join(_cell(x) for x in g["selected_groups"]) or "none"
    line = f"Genotype groups kept by the sparse-group-lasso encoder ({len(g['selected_groups'])} of {g.get('n_groups', '?')}): {kept}."
    if "causal_groups" in g:
        line += (
            f" Against the simulator's causal groups ({', '.join(g['causal_groups'])}): "
            f"precision {_num(g.get('group_precision'))}, recall {_num(g.get('group_recall'))}."
        )
    return line


def _metrics_table(m: dict) -> str:
    rows = [
        ("AUROC", _num(m.get("auroc")), _ci(m.get("auroc_ci"))),
        ("AUPRC", _num(m.get("auprc")), _ci(m.get("auprc_ci"))),
    ]
    rows += [(label, _num(m.get(key)), "") for key, label in _THRESHOLD_METRICS]
    lines = ["| metric | value | 95% CI |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


_THRESHOLD_METRICS = (
    ("threshold", "decision threshold"),
    ("accuracy", "accuracy"),
    ("precision", "precision (PPV)"),
    ("recall", "recall (sensitivity)"),
    ("specificity", "specificity"),
    ("f1", "F1"),
    ("g_mean", "G-mean"),
    ("brier", "Brier score"),
    ("ece", "ECE"),
)


def _oracle(m: dict) -> str:
    if "oracle_auroc" not in m:
        return "No oracle risk for this cohort (real data): the attainable AUROC is unknown."
    return (
        f"Oracle AUROC (the simulator's true risk, the best any model can reach on these "
        f"patients): {_num(m['oracle_auroc'])}; this model: {_num(m.get('auroc'))}."
    )


def _subgroup_table(groups: dict, label: str) -> str:
    if not groups:
        return f"No {label} recorded in the evaluated cohort."
    lines = [f"| {label} | n | prevalence | AUROC | ECE | mean risk |", "|---|---|---|---|---|---|"]
    for name, g in groups.items():
        cells = [_cell(name), str(g.get("n", "n/a"))]
        cells += [_num(g.get(k)) for k in ("prevalence", "auroc", "ece", "mean_risk")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ audit


def _audit_fields(audit: dict) -> dict[str, str]:
    probes = {k: v for k, v in audit.items() if isinstance(v, dict) and "majority_rate" in v}
    return {
        "audit_table": _audit_table(probes),
        "audit_reading": _audit_reading(probes),
        "loso_table": _loso_table(audit.get("leave_one_site_out_auroc") or {}),
    }


def _audit_table(probes: dict) -> str:
    if not probes:
        return "No confound recorded in the evaluated cohort: no audit."
    head = (
        "| confound | n | classes | logistic probe | MLP probe | majority rate "
        "| risk-factor floor | balanced accuracy | chance | folds |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in probes.items():
        cells = [_cell(name), str(p.get("n")), _names(p.get("classes"))]
        cells += [_num(p.get(k)) for k in _AUDIT_COLUMNS] + [str(p.get("folds", "n/a"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_AUDIT_COLUMNS = (
    "probe_accuracy",
    "mlp_probe_accuracy",
    "majority_rate",
    "risk_factor_probe_accuracy",
    "probe_balanced_accuracy",
    "chance_balanced",
)
# Probe accuracies read against the majority rate, with the name used in the verdict.
_PROBES = (("probe_accuracy", "linear"), ("mlp_probe_accuracy", "MLP"))


def _audit_reading(probes: dict) -> str:
    lines = []
    for name, p in probes.items():
        lines.append(f"- {_cell(name)}: {_probe_verdict(p)}")
        if p.get("by_modality"):
            lines.append(f"  {_by_modality_note(p['by_modality'])}")
    return "\n".join(lines) if lines else ""


def _by_modality_note(by: dict) -> str:
    """The probes on each modality's own embedding, most readable first."""
    ranked = sorted(
        by.items(),
        key=lambda kv: -max(kv[1]["probe_accuracy"], kv[1]["mlp_probe_accuracy"]),
    )
    parts = [
        f"{_cell(m)} {_num(p['probe_accuracy'])} / {_num(p['mlp_probe_accuracy'])} "
        f"(majority {_num(p['majority_rate'])})"
        for m, p in ranked
    ]
    return (
        "Read from each modality's embedding before fusion (logistic / MLP): "
        + "; ".join(parts)
        + "."
    )


def _probe_verdict(p: dict) -> str:
    """Whether any probe beats the majority rate by more than ``_PROBE_Z`` standard errors.

    When the cohort carries the true risk factors (simulated cohorts), the verdict also
    says whether the probe beats what the risk factors themselves give away.
    """
    base = p.get("majority_rate")
    fitted = [(p.get(k), label) for k, label in _PROBES if _finite(p.get(k))]
    if not fitted or not _finite(base):
        return "probe not fitted (fewer than two classes with two samples each)."
    margin = _PROBE_Z * math.sqrt(base * (1 - base) / max(p.get("n") or 1, 1))
    above = [(acc - base, label) for acc, label in fitted if acc - base > margin]
    if above:
        gap, label = max(above)
        return (
            f"recoverable: the {label} probe beats the majority rate by {gap:+.3f} "
            f"(more than {_PROBE_Z:g} standard errors, {margin:.3f}){_floor_note(p, margin)}."
        )
    gaps = ", ".join(f"{label} {acc - base:+.3f}" for acc, label in fitted)
    return (
        f"not recovered: probe minus majority rate {gaps}, "
        f"within {_PROBE_Z:g} standard errors ({margin:.3f})."
    )


def _floor_note(p: dict, margin: float) -> str:
    """How the best probe compares with the same probe on the true risk factors."""
    floor = p.get("risk_factor_probe_accuracy")
    if not _finite(floor):
        return ""
    what = "the true risk factors"
    genes = p.get("risk_marker_probe_accuracy")
    if _finite(genes) and genes > floor:
        floor, what = genes, "the true risk factors with the causal genes' dosages"
    best = max(p.get(k) for k, _ in _PROBES if _finite(p.get(k)))
    if best - floor > margin:
        return f"; above the {floor:.3f} that {what} give away"
    return f"; no more than the {floor:.3f} that {what} themselves give away"


def _loso_table(loso: dict) -> str:
    if not loso:
        return "Not computed (fewer than two sites with both outcome classes)."
    lines = ["| left-out site | outcome AUROC |", "|---|---|"]
    return "\n".join(lines + [f"| {_cell(k)} | {_num(v)} |" for k, v in loso.items()])


# ------------------------------------------------------------------ calibration


def _calibration(m: dict, meta: dict) -> str:
    return "\n".join(
        [
            f"- Temperature scaling fitted on the tuning split: T = {_num(meta.get('temperature'))}.",
            f"- Expected calibration error {_num(m.get('ece'))}, Brier score {_num(m.get('brier'))}.",
            f"- Observed prevalence {_num(m.get('prevalence'))}; training prevalence "
            f"{_num(meta.get('train_prevalence'))} (`clinfuse score --target-prevalence` "
            "re-anchors risks to a new base rate).",
            "- Reliability diagram: `calibration.png` beside this card; per-subgroup ECE "
            "in the tables above.",
        ]
    )


# ------------------------------------------------------------------ limitations


def _limitations(m: dict, meta: dict) -> str:
    found = _sample_size_notes(m) + _unseen_site_notes(m, meta) + _audit_notes(m)
    found += _genomics_notes(m)
    found += _provenance_notes(meta.get("provenance") or {})
    return "\n".join(f"- {line}" for line in found) if found else "- None flagged automatically."


def _sample_size_notes(m: dict) -> list[str]:
    notes = []
    for key in ("per_site", "per_ancestry"):
        for name, g in (m.get(key) or {}).items():
            if not _finite(g.get("auroc")):
                notes.append(f"{_cell(name)}: AUROC undefined (one outcome class only).")
            elif g.get("n", 0) < _SMALL_SUBGROUP:
                notes.append(f"{_cell(name)}: only {g.get('n')} samples; estimates are unstable.")
    return notes


def _unseen_site_notes(m: dict, meta: dict) -> list[str]:
    seen = set((meta.get("spec") or {}).get("sites") or [])
    unseen = [s for s in (m.get("per_site") or {}) if seen and s not in seen]
    return [f"{_cell(s)}: site never seen in training." for s in unseen]


def _audit_notes(m: dict) -> list[str]:
    audit = m.get("audit") or {}
    notes = []
    for name, p in audit.items():
        if isinstance(p, dict) and "majority_rate" in p and "recoverable" in _probe_verdict(p):
            notes.append(f"The representation still encodes {_cell(name)} (confound audit).")
    return notes


def _genomics_notes(m: dict) -> list[str]:
    g = m.get("genomics") or {}
    if "selected_groups" in g and not g["selected_groups"] and g.get("n_groups"):
        return [
            "The sparse-group-lasso encoder kept no genotype group: genotypes do not "
            "contribute to this model's risk."
        ]
    return []


def _provenance_notes(provenance: dict) -> list[str]:
    if (provenance.get("code") or {}).get("git_dirty"):
        return ["Trained from a working tree with uncommitted changes (git_dirty)."]
    return []


# ------------------------------------------------------------------- provenance


def _provenance_fields(provenance: dict) -> dict[str, str]:
    return {
        "code_version": _code_version(provenance.get("code") or {}),
        "packages": _kv(provenance.get("packages") or {}),
        "cohort_hashes": _hash_table(provenance.get("cohort_files_sha256") or {}),
    }


def _code_version(code: dict) -> str:
    if not code:
        return "not recorded"
    commit = code.get("git_commit") or "no git commit recorded"
    dirty = " (uncommitted changes)" if code.get("git_dirty") else ""
    return f"clinfuse {code.get('clinfuse', '?')}, commit `{commit}`{dirty}"


def _hash_table(hashes: dict) -> str:
    if not hashes:
        return "Not recorded."
    lines = ["| file | sha256 |", "|---|---|"]
    return "\n".join(lines + [f"| {_cell(f)} | `{h}` |" for f, h in sorted(hashes.items())])


# ---------------------------------------------------------------------- helpers


def _finite(value: Any) -> bool:
    # numbers.Real covers numpy scalars too (metrics may hold np.float64).
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def _ci(ci: Any) -> str:
    if not ci or len(ci) != 2 or not all(_finite(v) for v in ci):
        return "n/a"
    return f"{_num(ci[0])} to {_num(ci[1])}"


def _cell(value: Any) -> str:
    """A table-safe string: pipes and newlines would break a Markdown row."""
    return str(value).replace("|", "\\|").replace("\n", " ")
